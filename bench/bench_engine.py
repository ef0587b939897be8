"""Engine benchmark: projection, subscription throughput, write->handler latency.

Each figure is measured once per driver of --drivers (default: psycopg 3 and
psycopg2, each on a store of its own) and printed beside one plain psycopg2
baseline measured in the same run on the same server: single-row INSERT +
COMMIT from one connection.

    python bench/bench_engine.py [--messages 20000] [--streams 2000] [--dsn DSN]
                                 [--drivers psycopg,psycopg2] [--scale 1000000]

Figures, over --messages stored messages (no-op handler):

* projection: `projector.run()` over the whole backlog;
* subscription with an ack per message, and with a batched ack (checkpoint every 100):
  `runner.run()` over the projected backlog ("runner alone");
* project + handle: a fresh backlog consumed by one Executor running the projector and a
  batched-ack runner (checkpoint every 100), from start to the last handler call; also
  the sequential figure 1 / (1/projection + 1/batched runner) for reference;
* write -> handler latency through an Executor in another process at --latency-rate
  writes/s, beside its floor with plain psycopg2 (INSERT + NOTIFY + COMMIT at the same
  rate, a process that LISTENs and SELECTs the new rows: one hop), with where the time
  goes: the write's round trip, the store's NOTIFY reaching a listener in the executor's
  process, the projector's step committed (its step listener, which hands the partitions
  to the runner), the handler called;
* with --scale N: projection and both subscriptions again over N messages, with the
  growth ratios (rate at N / rate at --messages; 1.0 = flat).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import depeche_nb
from bench.common import (
    BenchEvent,
    Row,
    Server,
    Target,
    add_drivers_option,
    describe_code,
    describe_server,
    load_average,
    paced_writes,
    print_table,
    resolve_server,
)
from depeche_nb.tools import PgNotificationListener, PydanticMessageSerializer, StreamNamePartitioner


def raw_insert_commit_rate(server: Server, duration: float) -> float:
    """The baseline: psycopg2's usual INSERT then commit(), one connection."""
    conn = server.connect()
    table = f"bench_raw_{uuid.uuid4().hex[:8]}"
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {table} (id bigserial PRIMARY KEY, stream text, message_id uuid, "
            "payload jsonb, added_at timestamptz DEFAULT now())"
        )
    conn.commit()
    count, start = 0, time.perf_counter()
    with conn.cursor() as cur:
        while time.perf_counter() - start < duration:
            cur.execute(
                f"INSERT INTO {table} (stream, message_id, payload) VALUES (%s, %s, %s)",
                ("s-1", str(uuid.uuid4()), '{"number": 1}'),
            )
            conn.commit()
            count += 1
    rate = count / (time.perf_counter() - start)
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    return rate


def _raw_follower(libpq_dsn: str, table: str, ready: Any, results: Any, expected: int) -> None:
    """The latency floor's consumer: LISTEN, and on each notification read the new rows."""
    import select

    import psycopg2

    conn = psycopg2.connect(libpq_dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(f"LISTEN {table}")
    ready.set()
    seen: dict[int, float] = {}
    last = 0
    deadline = time.monotonic() + 120
    while len(seen) < expected and time.monotonic() < deadline:
        if not select.select([conn], [], [], 1.0)[0]:
            continue
        conn.poll()
        conn.notifies.clear()
        cur.execute(f"SELECT id, number FROM {table} WHERE id > %s ORDER BY id", (last,))
        now = time.monotonic()
        for row_id, number in cur.fetchall():
            seen[number] = now
            last = row_id
    conn.close()
    results.put(seen)


def raw_latency(server: Server, count: int, rate: float) -> list[float]:
    """The floor under write -> handler with plain psycopg2: INSERT + NOTIFY + COMMIT at `rate`/s,
    a follower process that LISTENs and SELECTs the new rows (one hop, no projection)."""
    conn = server.connect()
    table = f"bench_rawlat_{uuid.uuid4().hex[:8]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, number int, payload jsonb)")
    conn.commit()
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_raw_follower, args=(server.libpq_dsn, table, ready, results, count))
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("follower process did not start")
        time.sleep(0.5)
        sent: dict[int, float] = {}
        with conn.cursor() as cur:
            for number in range(count):
                sent[number] = time.monotonic()
                cur.execute(
                    f"INSERT INTO {table} (number, payload) VALUES (%s, %s); NOTIFY {table}",
                    (number, '{"number": 1}'),
                )
                conn.commit()
                time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - sent[number])))
        seen: dict[int, float] = results.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.terminate()
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")
        conn.commit()
        conn.close()
    return sorted((seen[n] - sent[n]) * 1000 for n in sent if n in seen)


def fill_store(store: depeche_nb.MessageStore[BenchEvent], messages: int, streams: int) -> None:
    per_stream = messages // streams
    for s in range(streams):
        store.write_all(f"bench-{s}", [BenchEvent(number=i) for i in range(per_stream)])


def projection_rate(engine: sa.Engine, name: str, messages: int, streams: int) -> tuple[float, Any]:
    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(BenchEvent))
    fill_store(store, messages, streams)
    stream = store.aggregated_stream(
        name=f"{name}_agg", partitioner=StreamNamePartitioner(10), stream_wildcards=["bench-%"]
    )
    start = time.perf_counter()
    stream.projector.run()
    elapsed = time.perf_counter() - start
    return messages / elapsed, stream


class _NoOp(depeche_nb.MessageHandler[BenchEvent]):
    @depeche_nb.MessageHandler.register
    def on_event(self, message: BenchEvent) -> None:
        return None


def subscription_rate(stream: Any, name: str, ack: depeche_nb.AckStrategy, batch_size: int) -> float:
    subscription = stream.subscription(name=name, handlers=_NoOp(), ack_strategy=ack, batch_size=batch_size)
    total = sum(p.head + 1 for p in subscription.progress())
    start = time.perf_counter()
    subscription.runner.run()
    elapsed = time.perf_counter() - start
    assert all(p.lag == 0 for p in subscription.progress())
    return total / elapsed


def project_and_handle_rate(engine: sa.Engine, name: str, messages: int, streams: int) -> float:
    """A fresh backlog through one Executor (projector + batched-ack runner), start to last call."""
    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(BenchEvent))
    fill_store(store, messages, streams)
    stream = store.aggregated_stream(
        name=f"{name}_agg", partitioner=StreamNamePartitioner(10), stream_wildcards=["bench-%"]
    )
    done = threading.Event()
    handled = [0]
    last = [0.0]

    class Counter(depeche_nb.MessageHandler[BenchEvent]):
        @depeche_nb.MessageHandler.register
        def on_event(self, message: BenchEvent) -> None:
            handled[0] += 1
            if handled[0] >= messages:
                last[0] = time.perf_counter()
                done.set()

    subscription = stream.subscription(
        name=f"{name}_ph", handlers=Counter(), ack_strategy=depeche_nb.AckStrategy.BATCHED, batch_size=100
    )
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=60, disable_signals=True)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    start = time.perf_counter()
    executor.start()
    try:
        if not done.wait(600):
            raise RuntimeError(f"only {handled[0]} of {messages} messages were handled")
    finally:
        executor.stop()
    if executor.errors:
        raise executor.errors[0][1]
    return messages / (last[0] - start)


def _executor_child(dsn: str, name: str, ready: Any, results: Any, expected: int) -> None:
    engine = depeche_nb.connect(dsn)
    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(BenchEvent))
    stream = store.aggregated_stream(
        name=f"{name}_agg", partitioner=StreamNamePartitioner(10), stream_wildcards=["lat-%"]
    )
    received: dict[int, float] = {}
    # Hops, by time: when the store's NOTIFY reached a listener here, when the projector's
    # step committed (its step listener runs then, as the executor's hand-off does).
    notified: list[float] = []
    projected: list[float] = []

    class Recorder(depeche_nb.MessageHandler[BenchEvent]):
        @depeche_nb.MessageHandler.register
        def on_event(self, message: BenchEvent) -> None:
            received[message.number] = time.monotonic()

    subscription = stream.subscription(name=f"{name}_lat", handlers=Recorder())
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=60)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    add_step_listener = getattr(stream.projector, "add_step_listener", None)  # older code has none
    if add_step_listener is not None:
        add_step_listener(lambda heads: projected.append(time.monotonic()))
    listener = PgNotificationListener(engine, [store.notification_channel])
    listener.start()

    def listen() -> None:
        for _ in listener.messages():
            notified.append(time.monotonic())

    threading.Thread(target=listen, daemon=True).start()
    executor.start()
    ready.set()
    deadline = time.monotonic() + 120
    while len(received) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.stop()
    listener.stop()
    results.put((received, notified, projected))


def latency(server: Server, driver: str, name: str, count: int, rate: float) -> dict[str, list[float]]:
    """Write `count` messages at `rate`/s; ms from just before write() to the handler call
    ("total"), and to each hop on the way (see the module docstring)."""
    engine = server.engine(driver)
    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(BenchEvent))
    store.aggregated_stream(
        name=f"{name}_agg", partitioner=StreamNamePartitioner(10), stream_wildcards=["lat-%"]
    )
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_executor_child, args=(server.url_for(driver), name, ready, results, count))
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("executor process did not start")
        time.sleep(0.5)
        sent, wrote = paced_writes(
            count, rate, lambda number: store.write(f"lat-{number % 50}", BenchEvent(number=number))
        )
        received, notified, projected = results.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.terminate()
        engine.dispose()
    missing = set(sent) - set(received)
    if missing:
        raise RuntimeError(f"{len(missing)} messages never reached the handler")

    def first_after(times: list[float], start: float, end: float) -> float | None:
        return next((t for t in times if start <= t <= end), None)

    hops: dict[str, list[float]] = {"total": [], "write": [], "notified": [], "projected": []}
    for n, start in sent.items():
        end = received[n]
        hops["total"].append((end - start) * 1000)
        hops["write"].append((wrote[n] - start) * 1000)
        for key, times in (("notified", notified), ("projected", projected)):
            moment = first_after(times, start, end)
            if moment is not None:
                hops[key].append((moment - start) * 1000)
    return {key: sorted(values) for key, values in hops.items()}


def _p(values: list[float], q: float) -> float:
    return values[max(0, int(len(values) * q) - 1)] if values else float("nan")


def driver_figures(server: Server, driver: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of ours with `driver`, on stores named `name...`."""
    engine = server.engine(driver)
    try:
        projected, stream = projection_rate(engine, name, args.messages, args.streams)
        single = subscription_rate(stream, f"{name}_single", depeche_nb.AckStrategy.SINGLE, 100)
        batched = subscription_rate(stream, f"{name}_batched", depeche_nb.AckStrategy.BATCHED, 100)
        both = project_and_handle_rate(engine, f"{name}_ph", args.messages, args.streams)
        scaled: dict[str, float] = {}
        if args.scale:
            scaled["projection"], big = projection_rate(engine, f"{name}_big", args.scale, args.scale // 10)
            scaled["single"] = subscription_rate(big, f"{name}_bsingle", depeche_nb.AckStrategy.SINGLE, 100)
            scaled["batched"] = subscription_rate(
                big, f"{name}_bbatched", depeche_nb.AckStrategy.BATCHED, 100
            )
    finally:
        engine.dispose()
    hops = latency(server, driver, f"{name}_l", args.latency_messages, args.latency_rate)
    lat = hops["total"]
    p50, p95 = statistics.median(lat), _p(lat, 0.95)
    print(
        f"  [{driver}] projection {projected:,.0f}/s, ack per message {single:,.0f}/s, "
        f"batched ack {batched:,.0f}/s, project + handle {both:,.0f}/s, latency p50 {p50:.2f} ms"
    )
    sys.stdout.flush()
    return {
        "projection": projected,
        "single": single,
        "batched": batched,
        "both": both,
        "sequential": 1 / (1 / projected + 1 / batched),
        "p50": p50,
        "p95": p95,
        "max": lat[-1],
        "hops": hops,
        "scaled": scaled,
    }


def drop_objects(server: Server, driver: str, prefix: str) -> None:
    """Drop the tables and functions (the stores' write functions) named `prefix...`."""
    engine = server.engine(driver)
    try:
        with engine.begin() as conn:
            pattern = (prefix.replace("_", r"\_") + "%",)
            for table in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", pattern
            ).scalars():
                conn.exec_driver_sql(f'DROP TABLE "{table}" CASCADE')
            for function in conn.exec_driver_sql(
                "SELECT proname FROM pg_proc WHERE proname LIKE %s", pattern
            ).scalars():
                conn.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{function}"')
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=2_000)
    parser.add_argument("--latency-messages", type=int, default=300)
    parser.add_argument("--latency-rate", type=float, default=50.0, help="writes per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds for the baseline")
    parser.add_argument(
        "--scale", type=int, default=0, help="also measure projection and subscriptions over this many"
    )
    parser.add_argument("--dsn", default=None)
    add_drivers_option(parser)
    args = parser.parse_args()

    server = resolve_server(args.dsn)
    for line in describe_server(server, ("fsync", "synchronous_commit")):
        print(line)
    print(describe_code())
    print(f"ours measured with: {', '.join(args.drivers)}; baseline: plain psycopg2")
    print(f"at start, {load_average()}")
    name = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        baseline = raw_insert_commit_rate(server, args.duration)
        print(f"  baseline: raw INSERT+COMMIT {baseline:,.0f}/s")
        floor = raw_latency(server, args.latency_messages, args.latency_rate)
        print(
            f"  baseline: raw INSERT+NOTIFY+COMMIT -> LISTEN + SELECT, p50 {statistics.median(floor):.2f} ms"
        )
        figures = {
            driver: driver_figures(server, driver, f"{name}_{driver}", args) for driver in args.drivers
        }
    finally:
        drop_objects(server, args.drivers[0], name)

    def row(label: str, key: str, target: Target) -> Row:
        return Row(label, {driver: figures[driver][key] for driver in args.drivers}, baseline, target)

    print()
    print(
        f"{args.messages:,} messages in {args.streams:,} streams, 10 partitions; baseline raw INSERT+COMMIT"
    )
    print_table(
        [
            row("projection (messages/s)", "projection", Target(min_ratio=5)),
            row("subscription, ack per message", "single", Target(min_ratio=0.8)),
            row("subscription, batched ack (100) = runner alone", "batched", Target(min_per_second=60_000)),
            row("project + handle, one Executor, checkpoint 100", "both", Target(min_per_second=45_000)),
            row("project, then handle (sequential, for reference)", "sequential", Target()),
        ]
    )
    print()
    print(
        f"write->handler latency through the executor at {args.latency_rate:g} writes/s "
        f"({args.latency_messages} messages; targets p50 <= 0.5 ms, p95 <= 1.5 ms):"
    )
    print(
        f"  [baseline] plain psycopg2, INSERT + NOTIFY + COMMIT -> a process that LISTENs and SELECTs "
        f"the new rows: p50 {statistics.median(floor):.2f} ms, p95 {_p(floor, 0.95):.2f} ms, "
        f"max {floor[-1]:.2f} ms"
    )
    for driver, figure in figures.items():
        print(
            f"  [{driver}] p50 {figure['p50']:.2f} ms, p95 {figure['p95']:.2f} ms, "
            f"max {figure['max']:.2f} ms ({figure['p50'] / statistics.median(floor):.2f}x / "
            f"{figure['p95'] / _p(floor, 0.95):.2f}x the baseline's)"
        )
        hops = figure["hops"]
        print(
            "    where the time goes (medians, ms after write() was called): write returned "
            f"{statistics.median(hops['write']):.2f}, NOTIFY at a listener "
            f"{statistics.median(hops['notified']) if hops['notified'] else float('nan'):.2f}, "
            f"projector step committed "
            f"{statistics.median(hops['projected']) if hops['projected'] else float('nan'):.2f}, "
            f"handler called {figure['p50']:.2f}"
        )
    if args.scale:
        print()
        print(
            f"scale: the same over {args.scale:,} messages (growth = rate at {args.scale:,} / rate at "
            f"{args.messages:,}; 1.00 = flat)"
        )
        for driver, figure in figures.items():
            scaled = figure["scaled"]
            print(
                f"  [{driver}] "
                + ", ".join(
                    f"{key} {scaled[key]:,.0f}/s (growth {scaled[key] / figure[key]:.2f})"
                    for key in ("projection", "single", "batched")
                )
            )
    print(
        "Depeche DB 0.13.1 on this machine class: projection 0.56x, ack per message 0.27x, "
        "batched ack 3.4x, latency p50 8.3 ms / p95 13.8 ms"
    )
    print(f"at end, {load_average()}")


if __name__ == "__main__":
    main()

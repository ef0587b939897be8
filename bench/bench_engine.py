"""Engine benchmark: projection, subscription throughput, write->handler latency.

Each figure is measured once per driver of --drivers (default: psycopg 3 and
psycopg2, each on a store of its own) and printed beside one plain psycopg2
baseline measured in the same run on the same server: single-row INSERT +
COMMIT from one connection.

    python bench/bench_engine.py [--messages 20000] [--streams 2000] [--dsn DSN]
                                 [--drivers psycopg,psycopg2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
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
    print_table,
    resolve_server,
)
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner


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


def _executor_child(dsn: str, name: str, ready: Any, results: Any, expected: int) -> None:
    engine = depeche_nb.connect(dsn)
    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(BenchEvent))
    stream = store.aggregated_stream(
        name=f"{name}_agg", partitioner=StreamNamePartitioner(10), stream_wildcards=["lat-%"]
    )
    received: dict[int, float] = {}

    class Recorder(depeche_nb.MessageHandler[BenchEvent]):
        @depeche_nb.MessageHandler.register
        def on_event(self, message: BenchEvent) -> None:
            received[message.number] = time.monotonic()

    subscription = stream.subscription(name=f"{name}_lat", handlers=Recorder())
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=60)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    executor.start()
    ready.set()
    deadline = time.monotonic() + 120
    while len(received) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.stop()
    results.put(received)


def latency(server: Server, driver: str, name: str, count: int, rate: float) -> list[float]:
    """Write `count` messages at `rate`/s; ms from just before write() to the handler call."""
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
        sent: dict[int, float] = {}
        for number in range(count):
            sent[number] = time.monotonic()
            store.write(f"lat-{number % 50}", BenchEvent(number=number))
            time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - sent[number])))
        received: dict[int, float] = results.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.terminate()
        engine.dispose()
    missing = set(sent) - set(received)
    if missing:
        raise RuntimeError(f"{len(missing)} messages never reached the handler")
    return sorted((received[n] - sent[n]) * 1000 for n in sent)


def driver_figures(server: Server, driver: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of ours with `driver`, on stores named `name...`."""
    engine = server.engine(driver)
    try:
        projected, stream = projection_rate(engine, name, args.messages, args.streams)
        single = subscription_rate(stream, f"{name}_single", depeche_nb.AckStrategy.SINGLE, 100)
        batched = subscription_rate(stream, f"{name}_batched", depeche_nb.AckStrategy.BATCHED, 100)
    finally:
        engine.dispose()
    lat = latency(server, driver, f"{name}_l", args.latency_messages, args.latency_rate)
    p50, p95 = statistics.median(lat), lat[int(len(lat) * 0.95) - 1]
    print(
        f"  [{driver}] projection {projected:,.0f}/s, ack per message {single:,.0f}/s, "
        f"batched ack {batched:,.0f}/s, latency p50 {p50:.2f} ms"
    )
    sys.stdout.flush()
    return {
        "projection": projected,
        "single": single,
        "batched": batched,
        "p50": p50,
        "p95": p95,
        "max": lat[-1],
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
            row("subscription, batched ack (100)", "batched", Target(min_ratio=10)),
        ]
    )
    print()
    print(
        f"write->handler latency through the executor at {args.latency_rate:g} writes/s "
        f"({args.latency_messages} messages; targets p50 < 3 ms, p95 < 6 ms):"
    )
    for driver, figure in figures.items():
        print(
            f"  [{driver}] p50 {figure['p50']:.2f} ms, p95 {figure['p95']:.2f} ms, max {figure['max']:.2f} ms"
        )
    print(
        "Depeche DB 0.13.1 on this machine class: projection 0.56x, ack per message 0.27x, "
        "batched ack 3.4x, latency p50 8.3 ms / p95 13.8 ms"
    )
    print(f"at end, {load_average()}")


if __name__ == "__main__":
    main()

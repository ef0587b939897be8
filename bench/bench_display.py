"""Benchmark: what a notebook display of a big store costs (reprs and overview DataFrames).

Usage: python -m bench.bench_display [--sizes 10000 1000000] [--repeat 5] [--dsn DSN]
                                     [--drivers psycopg,psycopg2]

For each size N, writes N messages (100 per stream, so N / 100 streams) into a
fresh store, projects them into an aggregated stream of 16 partitions, lets a
subscription acknowledge 1,000 of them, then writes 100 more that stay
unprojected (so lag and backlog are not zero), and runs VACUUM ANALYZE as
autovacuum eventually would. It then times, once per driver of --drivers:

* the HTML reprs of the store, the aggregated stream and the subscription
  (`_repr_html_()`, what Jupyter calls for each display);
* `store.streams_dataframe()`, `stream.partitions_dataframe()` and
  `subscription.state_dataframe()` with their default arguments;

beside two plain psycopg2 baselines on the same server: a `SELECT 1` round trip
(the floor of any display) and `SELECT count(*)` of the messages table (one scan,
what a display that reads the whole table costs at least). Each figure is the
median of R runs (default 5), interleaved, in milliseconds; the ratio column is
ours over the scan. Target: every display under 50 ms at 1,000,000 messages,
and about the same at every size. The tables are dropped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import depeche_nb
import depeche_nb.notebook  # registers the HTML reprs
from bench.common import (
    BenchEvent,
    Server,
    add_drivers_option,
    describe_code,
    describe_server,
    load_average,
    resolve_server,
)
from depeche_nb.postgres.driver import PSYCOPG2
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.tools import PydanticMessageSerializer

SETTINGS = ("shared_buffers", "work_mem")
PER_STREAM = 100
PARTITIONS = 16
ACKED = 1000
TAIL = 100
TARGET_MS = 50.0


class ByAccount:
    """`acct-<n>` goes to partition n % PARTITIONS."""

    def get_partition(self, message: Any) -> int:
        return int(message.stream.rsplit("-", 1)[1]) % PARTITIONS


def handle(message: BenchEvent) -> None:
    return None


def fill(store: depeche_nb.MessageStore[BenchEvent], messages: int) -> None:
    for s in range(messages // PER_STREAM):
        store.write_all(f"acct-{s}", [BenchEvent(number=i) for i in range(PER_STREAM)])


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_objects(server: Server, prefix: str) -> None:
    """Drop the tables, functions and definitions named `prefix...`."""
    engine = server.engine(PSYCOPG2)
    try:
        with engine.begin() as conn:
            pattern = (prefix.replace("_", r"\_") + "%",)
            for table in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", pattern
            ).scalars():
                conn.exec_driver_sql(f"DROP TABLE {quote_ident(table)} CASCADE")
            for function in conn.exec_driver_sql(
                "SELECT proname FROM pg_proc WHERE proname LIKE %s", pattern
            ).scalars():
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {quote_ident(function)}")
            if conn.exec_driver_sql("SELECT to_regclass('depeche_nb_definitions')").scalar():
                conn.exec_driver_sql("DELETE FROM depeche_nb_definitions WHERE name LIKE %s", pattern)
    finally:
        engine.dispose()


def measure_size(server: Server, drivers: tuple[str, ...], messages: int, repeat: int) -> dict[str, Any]:
    """Fill a store of `messages` messages and time every display on it (seconds, per run)."""
    name = f"bench_{uuid.uuid4().hex[:8]}_display"
    engines = {driver: server.engine(driver) for driver in drivers}
    try:
        runs: dict[str, Callable[[], Any]] = {}
        for index, (driver, engine) in enumerate(engines.items()):
            store: depeche_nb.MessageStore[BenchEvent] = depeche_nb.MessageStore(
                name, engine, PydanticMessageSerializer(BenchEvent)
            )
            stream = store.aggregated_stream(
                name=f"{name}_agg", partitioner=ByAccount(), stream_wildcards=["acct-%"]
            )
            register: depeche_nb.MessageHandlerRegister[BenchEvent] = depeche_nb.MessageHandlerRegister()
            register.register(handle)
            subscription = stream.subscription(name=f"{name}_sub", handlers=register)
            if index == 0:
                started = time.perf_counter()
                fill(store, messages)
                stream.projector.run(progress=False)
                subscription.runner.step(ACKED)
                store.write_all("acct-0", [BenchEvent(number=i) for i in range(TAIL)])
                print(f"  filled {messages:,} messages in {time.perf_counter() - started:.0f} s", flush=True)
            for label, fn in (
                ("store repr", store._repr_html_),
                ("aggregated stream repr", stream._repr_html_),
                ("subscription repr", subscription._repr_html_),
                ("streams_dataframe()", store.streams_dataframe),
                ("partitions_dataframe()", stream.partitions_dataframe),
                ("state_dataframe()", subscription.state_dataframe),
            ):
                runs[f"{label}|{driver}"] = fn
        conn = server.connect()
        conn.autocommit = True
        table = quote_ident(StoreNames(name).messages_table)
        try:
            with conn.cursor() as cur:
                for each in (table, quote_ident(f"{name}_agg_stream")):
                    cur.execute(f"VACUUM ANALYZE {each}")

            def query(sql: str) -> Callable[[], Any]:
                def run() -> Any:
                    with conn.cursor() as cur:
                        cur.execute(sql)
                        return cur.fetchall()

                return run

            runs["floor|baseline"] = query("SELECT 1")
            runs["scan|baseline"] = query(f"SELECT count(*) FROM {table}")
            for fn in runs.values():  # warm-up: connections, caches, first imports, plans
                fn()
            figures: dict[str, list[float]] = {key: [] for key in runs}
            for _ in range(repeat):
                # Interleaved, so a change of machine load hits every figure alike.
                for key, fn in runs.items():
                    figures[key].append(timed(fn))
        finally:
            conn.close()
        return {key: statistics.median(values) for key, values in figures.items()}
    finally:
        for engine in engines.values():
            engine.dispose()
        drop_objects(server, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="messages")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--dsn", help="server to use (default: DEPECHE_NB_DSN, else the embedded server)")
    add_drivers_option(parser)
    args = parser.parse_args(argv)
    sizes = [size - size % PER_STREAM for size in args.sizes]

    server = resolve_server(args.dsn)
    for line in describe_server(server, SETTINGS):
        print(line)
    print(describe_code())
    print(
        f"{PER_STREAM} messages per stream, {PARTITIONS} partitions, {ACKED:,} acknowledged, "
        f"{TAIL} unprojected; median of {args.repeat} runs, in ms"
    )
    print(f"at start, {load_average()}")
    results = {size: measure_size(server, args.drivers, size, args.repeat) for size in sizes}
    print()

    labels = list(dict.fromkeys(key.split("|")[0] for key in results[sizes[0]] if "baseline" not in key))
    header = ["figure (ms)", "messages", *(f"ours[{d}]" for d in args.drivers), "scan", "ours/scan", ""]
    body = []
    for label in [*labels, "floor", "scan"]:
        for size in sizes:
            figures = results[size]
            if label in ("floor", "scan"):
                baseline = f"{1000 * figures[f'{label}|baseline']:.2f}"
                blanks = ["" for _ in args.drivers]
                body.append([f"baseline: {label}", f"{size:,}", *blanks, baseline, "", ""])
                continue
            ours = [1000 * figures[f"{label}|{d}"] for d in args.drivers]
            scan = 1000 * figures["scan|baseline"]
            verdict = "" if size < 1_000_000 else ("ok" if max(ours) < TARGET_MS else "MISSED")
            body.append(
                [
                    label,
                    f"{size:,}",
                    *(f"{ms:.2f}" for ms in ours),
                    f"{scan:.2f}",
                    f"{max(ours) / scan:.2f}x",
                    verdict,
                ]
            )
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    for row in [header, *body]:
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        print(" | ".join(cells).rstrip())
    print(f"\ntarget: every display under {TARGET_MS:g} ms at 1,000,000 messages (verdict column)")
    print(f"at end, {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

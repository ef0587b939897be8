"""Benchmark: loading a store into pandas with `store.to_dataframe()` against `pandas.read_sql`.

Usage: python bench/bench_frames.py [--messages N] [--repeat R] [--dsn DSN]
                                    [--drivers psycopg,psycopg2]

Writes N messages (default 100,000; a small pydantic model over 100 streams)
into a fresh store, then alternates R times (default 5) between

* ours, once per driver of --drivers (default: psycopg 3 and psycopg2):
  `store.to_dataframe(limit=None)` — server-side cursor in chunks, payload
  keys flattened into typed columns, tz-aware timestamps;
* baseline: `pandas.read_sql` of the same rows (the same SELECT a user would
  write: metadata columns and the jsonb payload, which psycopg2 decodes to
  dicts) through a psycopg2 engine — it does not flatten anything;
* for context, the baseline plus `pandas.json_normalize(max_level=0)` of the
  payload column, i.e. what it takes to get the same shape by hand.

Each figure is the median of its R runs, as rows per second. Target: ours
takes at most 1.5x the time of `read_sql` (a rows/s ratio >= 0.67x). On Linux it
then measures memory, per driver in a fresh process: the frame's own size
(`memory_usage(deep=True)`) and how far the process's peak RSS grew while building it. The
store's table and function are dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pydantic
import sqlalchemy as sa

from depeche_nb import MessageStore
from depeche_nb.postgres.driver import PSYCOPG2
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.store.serializers import PydanticMessageSerializer

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Row,
    Target,
    add_drivers_option,
    describe_code,
    describe_server,
    load_average,
    print_table,
    resolve_server,
)

SETTINGS = ("shared_buffers", "work_mem")
BATCH = 1000
STREAMS = 100
TIME_RATIO_TARGET = 1.5


class Deposited(pydantic.BaseModel):
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    account: str
    amount: float
    count: int
    flagged: bool
    note: str

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


def fill(store: MessageStore[Deposited], messages: int) -> None:
    for batch in range(messages // BATCH):
        stream = f"account-{batch % STREAMS}"
        store.write_all(
            stream,
            [
                Deposited(
                    account=stream,
                    amount=(batch * BATCH + i) / 100,
                    count=i,
                    flagged=i % 7 == 0,
                    note=f"deposit {i}",
                )
                for i in range(BATCH)
            ],
        )


def _memory_child(url: str, name: str, results: Any) -> None:
    """In a fresh process: the frame's own size (deep) and how far the process's peak RSS
    grew while `to_dataframe(limit=None)` built it."""
    engine = sa.create_engine(url)
    store = MessageStore(name, engine, PydanticMessageSerializer(Deposited))
    store.to_dataframe(limit=10)  # imports, connections, caches: not the frame's
    before = _rss_bytes()
    frame = store.to_dataframe(limit=None)
    peak = _peak_rss_bytes()
    results.put((int(frame.memory_usage(deep=True).sum()), max(0, peak - before), len(frame)))
    engine.dispose()


def _peak_rss_bytes() -> int:
    # VmHWM: this process's high-water mark (ru_maxrss would count the parent's, which a
    # spawned child inherits through exec).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(url: str, name: str) -> tuple[int, int, int]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(url, name, results))
    child.start()
    try:
        return results.get(timeout=900)  # type: ignore[no-any-return]
    finally:
        child.join(timeout=60)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000, help="rows to load (default 100,000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--dsn", help="server to use (default: DEPECHE_NB_DSN, else the embedded server)")
    add_drivers_option(parser)
    args = parser.parse_args(argv)
    messages = args.messages - args.messages % BATCH

    server = resolve_server(args.dsn)
    for line in describe_server(server, SETTINGS):
        print(line)
    print(describe_code())
    print(
        f"pandas {pd.__version__}; {messages:,} messages in {STREAMS} streams; median of {args.repeat} runs"
    )
    print(f"ours measured with: {', '.join(args.drivers)}; baselines: pandas.read_sql on psycopg2")
    print(f"at start, {load_average()}")
    print()

    engine = server.engine(PSYCOPG2)  # the baselines', and for set-up
    engines = {driver: server.engine(driver) for driver in args.drivers}
    name = f"bench_{uuid.uuid4().hex[:8]}_frames"
    names = StoreNames(name)
    table = quote_ident(names.messages_table)
    try:
        stores = {
            driver: MessageStore(name, ours_engine, PydanticMessageSerializer(Deposited))
            for driver, ours_engine in engines.items()
        }
        fill(stores[args.drivers[0]], messages)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        select = sa.text(
            f"SELECT global_position, stream, version, message_id, added_at, message FROM {table} "
            "ORDER BY global_position"
        )

        def ours(store: MessageStore[Deposited]) -> Callable[[], pd.DataFrame]:
            return lambda: store.to_dataframe(limit=None)

        def baseline() -> pd.DataFrame:
            return pd.read_sql(select, engine)

        def baseline_flattened() -> pd.DataFrame:
            frame = pd.read_sql(select, engine)
            payload = pd.json_normalize(frame.pop("message").tolist(), max_level=0)
            return pd.concat([frame, payload], axis=1)

        # key -> (label, function); "ours[driver]" for each driver, then the baselines.
        runs: dict[str, tuple[str, Callable[[], pd.DataFrame]]] = {
            **{
                f"ours[{driver}]": (f"ours: store.to_dataframe(limit=None) [{driver}]", ours(store))
                for driver, store in stores.items()
            },
            "baseline": ("baseline: pandas.read_sql(SELECT ...)", baseline),
            "flattened": ("context: read_sql + json_normalize(max_level=0)", baseline_flattened),
        }
        figures: dict[str, list[float]] = {key: [] for key in runs}
        shapes: dict[str, tuple[int, int]] = {}
        for _, fn in runs.values():  # warm-up: connections, caches, first imports
            fn()
        for _ in range(args.repeat):
            # Interleaved, so a change of machine load hits every figure alike.
            for key, (_, fn) in runs.items():
                seconds, frame = timed(fn)
                figures[key].append(seconds)
                shapes[key] = frame.shape
        assert all(shape[0] == messages for shape in shapes.values()), shapes
        median = {key: statistics.median(values) for key, values in figures.items()}
        for key, (label, _) in runs.items():
            times = ", ".join(f"{s:.3f}" for s in figures[key])
            print(
                f"  {label:<60} {messages / median[key]:>10,.0f} rows/s   median {median[key]:.3f} s "
                f"(runs: {times}), shape {shapes[key]}"
            )
        print()
        for driver in args.drivers:
            time_ratio = median[f"ours[{driver}]"] / median["baseline"]
            print(
                f"time ours[{driver}] / read_sql: {time_ratio:.2f}  (target <= {TIME_RATIO_TARGET}: "
                f"{'ok' if time_ratio <= TIME_RATIO_TARGET else 'MISSED'})"
            )
        print()
        if sys.platform.startswith("linux"):
            print("memory (each in a fresh process; target: the frame at most half of 549 MB per")
            print("1,000,000 rows as first measured, peak growth <= 1.2x the frame):")
            for driver in args.drivers:
                held, grew, rows = memory(server.url_for(driver), name)
                print(
                    f"  [{driver}] frame {held / 1e6:,.1f} MB ({held / rows:,.0f} B/row, i.e. "
                    f"{held / rows:,.0f} MB per 1M rows), process peak grew {grew / 1e6:,.1f} MB "
                    f"({grew / held:.2f}x the frame)"
                )
            print()
        ours_rates = {driver: messages / median[f"ours[{driver}]"] for driver in args.drivers}
        target = Target(min_ratio=round(1 / TIME_RATIO_TARGET, 2))
        print_table(
            [
                Row("to_dataframe vs read_sql", ours_rates, messages / median["baseline"], target),
                Row(
                    "to_dataframe vs read_sql + json_normalize",
                    ours_rates,
                    messages / median["flattened"],
                ),
            ],
            unit="rows/s",
        )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {quote_ident(names.write_function)}")
        for each in (engine, *engines.values()):
            each.dispose()
    print(f"at end, {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

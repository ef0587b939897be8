"""Benchmark: the message store against plain psycopg2 on the same server, in the same run.

Usage: python bench/bench_store.py [--duration SECONDS] [--dsn DSN] [--processes N]
                                   [--drivers psycopg,psycopg2]

Every figure runs for --duration seconds (default 5) in spawned processes
(not threads: the GIL would throttle the concurrent figures); each process
opens its own engine, store or connection after it started. Each "ours"
figure is measured once per driver of --drivers (default: psycopg 3 and
psycopg2), each beside the same psycopg2 baseline. Printed:

* single writes, 1 and N processes: `store.write()` vs INSERT + COMMIT;
* N processes all writing to one stream (the per-stream lock's cost);
* 100-message batches: `write_all`, `synchronize` and 100 x `write(conn=...)`
  in one caller transaction vs one multi-row INSERT + COMMIT;
* reads of 20,000 messages over 200 streams, deserialised, vs a plain
  SELECT fetching the same rows (psycopg2 decodes the JSON);
* reads of 1,000 streams of 10 messages, one stream at a time, with `store.read()` and
  inside one `store.reader()`, vs one plain SELECT per stream.

Progress lines also give the client CPU per item (the worker processes, all
threads, while measured; not the server's), which moves less than throughput
when other work shares the machine. The tables and functions created (named
bench_<random>...) are dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg2.extras
import pydantic

from depeche_nb import MessageStore
from depeche_nb.postgres.driver import default_driver
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.store.serializers import PydanticMessageSerializer

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Row,
    Server,
    Step,
    Target,
    WorkerFactory,
    add_drivers_option,
    describe_code,
    describe_server,
    load_average,
    print_table,
    resolve_server,
    run_in_processes,
)

BATCH = 100  # messages per batch figure
STREAMS_PER_PROCESS = 10
AGGREGATE_MAX = 1000  # synchronize: an aggregate grows by BATCH up to this, then a new one starts
READ_MESSAGES = 20_000
READ_STREAMS = 200
# Many small streams (an aggregate's history each), read one stream at a time.
SMALL_STREAMS = 1_000
SMALL_STREAM_LENGTH = 10
SETTINGS = ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes", "shared_buffers")

# Figures Depeche DB 0.13.1 reached on this machine class, for context.
DEPECHE_DB_SINGLE_WRITE_RATIO = 0.31
DEPECHE_DB_TXN_100_RATIO = 0.05


class Numbered(pydantic.BaseModel):
    """A small message, like the tests' `Numbered`."""

    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    number: int
    text: str = ""

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


def baseline_payload(number: int) -> tuple[str, dict[str, Any]]:
    """What a plain psycopg2 caller builds: an id and the same JSON document the store keeps."""
    message_id = str(uuid.uuid4())
    payload = {
        "message_id": message_id,
        "occurred_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "number": number,
        "text": "",
        "__typename__": "Numbered",
    }
    return message_id, payload


@dataclass(frozen=True)
class Config:
    server: Server
    store: str
    baseline_table: str
    same_stream: bool = False
    read_streams: tuple[str, ...] = field(default_factory=tuple)
    driver: str = field(default_factory=default_driver)  # ours only; the baselines are psycopg2


def _streams(index: int, config: Config) -> list[str]:
    if config.same_stream:
        return ["shared-stream"]
    return [f"p{index}-s{k}" for k in range(STREAMS_PER_PROCESS)]


def _store(config: Config) -> MessageStore[Numbered]:
    return MessageStore(
        config.store, config.server.engine(config.driver), PydanticMessageSerializer(Numbered)
    )


# -- worker factories (run in the spawned processes) ------------------------------------------


def baseline_single_insert(index: int, config: Config) -> Step:
    conn = config.server.connect()
    cur = conn.cursor()
    sql = (
        f"INSERT INTO {quote_ident(config.baseline_table)} (stream, message_id, payload) VALUES (%s, %s, %s)"
    )
    streams = _streams(index, config)
    counter = iter(range(1 << 62))

    def step() -> int:
        n = next(counter)
        message_id, payload = baseline_payload(n)
        cur.execute(sql, (streams[n % len(streams)], message_id, psycopg2.extras.Json(payload)))
        conn.commit()
        return 1

    return step


def baseline_multi_insert(index: int, config: Config) -> Step:
    conn = config.server.connect()
    cur = conn.cursor()
    sql = f"INSERT INTO {quote_ident(config.baseline_table)} (stream, message_id, payload) VALUES %s"
    streams = _streams(index, config)
    counter = iter(range(1 << 62))

    def step() -> int:
        n = next(counter)
        stream = streams[n % len(streams)]
        rows = []
        for i in range(BATCH):
            message_id, payload = baseline_payload(n * BATCH + i)
            rows.append((stream, message_id, psycopg2.extras.Json(payload)))
        psycopg2.extras.execute_values(cur, sql, rows, page_size=BATCH)
        conn.commit()
        return BATCH

    return step


def baseline_inserts_in_one_transaction(index: int, config: Config) -> Step:
    conn = config.server.connect()
    cur = conn.cursor()
    sql = (
        f"INSERT INTO {quote_ident(config.baseline_table)} (stream, message_id, payload) VALUES (%s, %s, %s)"
    )
    streams = _streams(index, config)
    counter = iter(range(1 << 62))

    def step() -> int:
        n = next(counter)
        stream = streams[n % len(streams)]
        for i in range(BATCH):
            message_id, payload = baseline_payload(n * BATCH + i)
            cur.execute(sql, (stream, message_id, psycopg2.extras.Json(payload)))
        conn.commit()
        return BATCH

    return step


def ours_write(index: int, config: Config) -> Step:
    store = _store(config)
    streams = _streams(index, config)
    counter = iter(range(1 << 62))

    def step() -> int:
        n = next(counter)
        store.write(streams[n % len(streams)], Numbered(number=n))
        return 1

    return step


def ours_write_all(index: int, config: Config) -> Step:
    store = _store(config)
    streams = _streams(index, config)
    counter = iter(range(1 << 62))

    def step() -> int:
        n = next(counter)
        store.write_all(streams[n % len(streams)], [Numbered(number=n * BATCH + i) for i in range(BATCH)])
        return BATCH

    return step


def ours_synchronize(index: int, config: Config) -> Step:
    store = _store(config)
    aggregates = iter(range(1 << 62))
    stream = f"p{index}-aggregate-{next(aggregates)}"
    history: list[Numbered] = []

    def step() -> int:
        nonlocal stream, history
        expected = len(history)
        history = history + [Numbered(number=expected + i) for i in range(BATCH)]
        store.synchronize(stream, expected, history)
        if len(history) >= AGGREGATE_MAX:
            stream, history = f"p{index}-aggregate-{next(aggregates)}", []
        return BATCH

    return step


def ours_writes_in_caller_transaction(index: int, config: Config) -> Step:
    store = _store(config)
    streams = _streams(index, config)
    counter = iter(range(1 << 62))

    def step() -> int:
        n = next(counter)
        stream = streams[n % len(streams)]
        with store.engine.begin() as conn:
            for i in range(BATCH):
                store.write(stream, Numbered(number=n * BATCH + i), conn=conn)
        return BATCH

    return step


def baseline_read(index: int, config: Config) -> Step:
    conn = config.server.connect()
    cur = conn.cursor()
    table = quote_ident(StoreNames(config.store).messages_table)
    sql = (
        f"SELECT message_id, stream, version, message, global_position, added_at FROM {table} "
        "ORDER BY global_position"
    )

    def step() -> int:
        cur.execute(sql)
        rows = cur.fetchall()
        conn.rollback()
        return len(rows)

    return step


def baseline_read_each_stream(index: int, config: Config) -> Step:
    conn = config.server.connect()
    cur = conn.cursor()
    table = quote_ident(StoreNames(config.store).messages_table)
    sql = (
        f"SELECT message_id, stream, version, message, global_position, added_at FROM {table} "
        "WHERE stream = %s ORDER BY version"
    )

    def step() -> int:
        count = 0
        for stream in config.read_streams:
            cur.execute(sql, (stream,))
            count += len(cur.fetchall())
        conn.rollback()
        return count

    return step


def ours_reader_streams(index: int, config: Config) -> Step:
    store = _store(config)

    def step() -> int:
        with store.reader() as reader:
            return sum(len(list(reader.read(stream))) for stream in config.read_streams)

    return step


def ours_read_wildcard(index: int, config: Config) -> Step:
    store = _store(config)
    return lambda: len(list(store.read_wildcard("%")))


def ours_read_streams(index: int, config: Config) -> Step:
    store = _store(config)

    def step() -> int:
        return sum(len(list(store.read(stream))) for stream in config.read_streams)

    return step


def ours_reader_wildcard(index: int, config: Config) -> Step:
    store = _store(config)

    def step() -> int:
        with store.reader() as reader:
            return len(list(reader.read_wildcard("%")))

    return step


# -- the run ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, server: Server, duration: float, processes: int, drivers: tuple[str, ...]) -> None:
        self.server = server
        self.duration = duration
        self.processes = processes
        self.drivers = drivers
        run_id = uuid.uuid4().hex[:8]
        self.store_name = f"bench_{run_id}"
        self.read_store_name = f"bench_{run_id}_reads"
        self.small_store_name = f"bench_{run_id}_small"
        self.baseline_table = f"bench_{run_id}_baseline"
        self.engine = server.engine(drivers[0])
        self.config = Config(server, self.store_name, self.baseline_table, driver=drivers[0])

    def measure(
        self, label: str, factory: WorkerFactory, processes: int, config: Config | None = None
    ) -> float:
        """One figure, from emptied write tables so every figure starts from the same state."""
        self.reset()
        result = run_in_processes(factory, config or self.config, processes, self.duration)
        print(
            f"  {label:<68} {result.per_second:>9,.0f}/s   client CPU "
            f"{result.client_cpu_us_per_item:>5,.0f} us/item   ({result.count:,} in {result.steps:,} steps)"
        )
        sys.stdout.flush()
        return result.per_second

    def measure_ours(
        self, label: str, factory: WorkerFactory, processes: int, config: Config | None = None
    ) -> dict[str, float]:
        """One figure of ours per driver."""
        config = config or self.config
        return {
            driver: self.measure(f"{label} [{driver}]", factory, processes, replace(config, driver=driver))
            for driver in self.drivers
        }

    def setup(self) -> None:
        _store(self.config)  # creates the store's table and function
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TABLE {quote_ident(self.baseline_table)} ("
                "id bigserial PRIMARY KEY, stream text NOT NULL, message_id uuid NOT NULL, "
                "payload jsonb NOT NULL, added_at timestamptz NOT NULL DEFAULT now())"
            )

    def reset(self) -> None:
        """Empty the written tables."""
        tables = [self.baseline_table, StoreNames(self.store_name).messages_table]
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(map(quote_ident, tables))} RESTART IDENTITY")

    def cleanup(self) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {quote_ident(self.baseline_table)}")
            for name in (self.store_name, self.read_store_name, self.small_store_name):
                names = StoreNames(name)
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {quote_ident(names.messages_table)}")
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {quote_ident(names.write_function)}")
        self.engine.dispose()

    def writes(self) -> list[Row]:
        n = self.processes
        same = Config(self.server, self.store_name, self.baseline_table, same_stream=True)
        print(f"single writes ({STREAMS_PER_PROCESS} streams per process, round robin)")
        base: dict[str, float] = {}
        ours: dict[str, dict[str, float]] = {}
        for key, what, procs, config in [
            ("1", "1 process", 1, None),
            ("n", f"{n} processes", n, None),
            ("s", f"{n} processes, 1 stream", n, same),
        ]:
            base[key] = self.measure(
                f"baseline A: INSERT + COMMIT, {what}", baseline_single_insert, procs, config
            )
            ours[key] = self.measure_ours(f"ours: store.write(), {what}", ours_write, procs, config)
        print(f"batches of {BATCH} messages, 1 process (messages/s)")
        for key, label, factory in [
            ("b", f"baseline B: one {BATCH}-row INSERT + COMMIT", baseline_multi_insert),
            ("c", f"baseline C: {BATCH} x INSERT, one COMMIT", baseline_inserts_in_one_transaction),
        ]:
            base[key] = self.measure(label, factory, 1)
        for key, label, factory in [
            ("wa", f"ours: store.write_all({BATCH} messages)", ours_write_all),
            ("sy", f"ours: store.synchronize(+{BATCH}), aggregates up to {AGGREGATE_MAX}", ours_synchronize),
            (
                "tx",
                f"ours: {BATCH} x store.write(conn=c), one transaction",
                ours_writes_in_caller_transaction,
            ),
        ]:
            ours[key] = self.measure_ours(label, factory, 1)
        single, batch = Target(min_ratio=0.9), Target(min_ratio=0.4)
        return [
            Row("write, 1 process vs A", ours["1"], base["1"], single),
            Row(f"write, {n} processes vs A", ours["n"], base["n"], single),
            Row(f"write, {n} processes, same stream vs A", ours["s"], base["s"]),
            Row(f"write_all({BATCH}) vs B (msgs)", ours["wa"], base["b"], batch),
            Row(f"synchronize(+{BATCH}) vs B (msgs)", ours["sy"], base["b"]),
            Row(f"{BATCH} x write(conn) in 1 txn vs B (msgs)", ours["tx"], base["b"]),
            Row(f"{BATCH} x write(conn) in 1 txn vs C (msgs)", ours["tx"], base["c"], Target(min_ratio=0.5)),
            Row(
                f"{BATCH} x write(conn) in 1 txn (msgs)", ours["tx"], base["c"], Target(min_per_second=10_000)
            ),
        ]

    def reads(self) -> list[Row]:
        store: MessageStore[Numbered] = MessageStore(
            self.read_store_name, self.engine, PydanticMessageSerializer(Numbered)
        )
        streams = tuple(f"stream-{k:03d}" for k in range(READ_STREAMS))
        per_round = 10
        for round_ in range(READ_MESSAGES // (READ_STREAMS * per_round)):
            for stream in streams:
                store.write_all(stream, [Numbered(number=round_ * per_round + i) for i in range(per_round)])
        table = quote_ident(StoreNames(self.read_store_name).messages_table)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
            count = conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
        assert count == READ_MESSAGES, count
        config = Config(self.server, self.read_store_name, self.baseline_table, read_streams=streams)
        print(f"reads: {READ_MESSAGES:,} messages in {READ_STREAMS} streams, 1 process (messages/s)")
        base = self.measure(
            "baseline: SELECT ... ORDER BY global_position, fetchall", baseline_read, 1, config
        )
        target = Target(min_per_second=50_000)
        rows = [
            Row(name, self.measure_ours(label, factory, 1, config), base, target)
            for name, label, factory in [
                ("read_wildcard('%') vs SELECT", "ours: list(store.read_wildcard('%'))", ours_read_wildcard),
                (
                    f"read(stream) x {READ_STREAMS} vs SELECT",
                    f"ours: store.read(stream) for {READ_STREAMS} streams",
                    ours_read_streams,
                ),
                (
                    "reader().read_wildcard('%') vs SELECT",
                    "ours: store.reader(): list(r.read_wildcard('%'))",
                    ours_reader_wildcard,
                ),
            ]
        ]
        return rows + self.small_reads()

    def small_reads(self) -> list[Row]:
        """Many short streams, each read on its own: an aggregate's history, decoded."""
        store: MessageStore[Numbered] = MessageStore(
            self.small_store_name, self.engine, PydanticMessageSerializer(Numbered)
        )
        streams = tuple(f"aggregate-{k:04d}" for k in range(SMALL_STREAMS))
        for stream in streams:
            store.write_all(stream, [Numbered(number=i) for i in range(SMALL_STREAM_LENGTH)])
        table = quote_ident(StoreNames(self.small_store_name).messages_table)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        config = Config(self.server, self.small_store_name, self.baseline_table, read_streams=streams)
        print(
            f"reads: {SMALL_STREAMS:,} streams x {SMALL_STREAM_LENGTH} messages, each stream read on "
            "its own, 1 process (messages/s)"
        )
        base = self.measure(
            "baseline: SELECT ... WHERE stream = %s per stream, fetchall",
            baseline_read_each_stream,
            1,
            config,
        )
        read = self.measure_ours(
            f"ours: store.read(stream) for {SMALL_STREAMS:,} streams", ours_read_streams, 1, config
        )
        reader = self.measure_ours(
            f"ours: one store.reader(): r.read(stream) for {SMALL_STREAMS:,} streams",
            ours_reader_streams,
            1,
            config,
        )
        for driver in self.drivers:
            print(
                f"  [{driver}] reader().read() / read(): {reader[driver] / read[driver]:.2f}x (target >= 1)"
            )
        target = Target(min_per_second=60_000)
        return [
            Row(f"read(stream), {SMALL_STREAMS:,} x {SMALL_STREAM_LENGTH} vs SELECT", read, base, target),
            Row(
                f"reader().read(stream), {SMALL_STREAMS:,} x {SMALL_STREAM_LENGTH} vs SELECT",
                reader,
                base,
                target,
            ),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per figure (default 5)")
    parser.add_argument("--dsn", help="server to use (default: DEPECHE_NB_DSN, else the embedded server)")
    parser.add_argument("--processes", type=int, default=8, help="processes of the concurrent figures")
    add_drivers_option(parser)
    args = parser.parse_args(argv)

    server = resolve_server(args.dsn)
    for line in describe_server(server, SETTINGS):
        print(line)
    print(describe_code())
    print(f"duration: {args.duration:g} s per figure; concurrency by spawned processes")
    print(f"ours measured with: {', '.join(args.drivers)}; baselines: plain psycopg2")
    print(f"at start, {load_average()}")
    print()
    bench = Bench(server, args.duration, args.processes, args.drivers)
    bench.setup()
    try:
        rows = bench.writes()
        rows += bench.reads()
    finally:
        bench.cleanup()
    print()
    print_table(rows)
    print()
    print(
        f"Depeche DB 0.13.1 on this machine class, for context: {DEPECHE_DB_SINGLE_WRITE_RATIO:.2f}x "
        f"baseline A for single writes, {DEPECHE_DB_TXN_100_RATIO:.2f}x for {BATCH} writes "
        "in one transaction."
    )
    print(f"at end, {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: depeche-nb beside the Python library "eventsourcing" 9.5, same server, same run.

Usage (eventsourcing is an optional dependency, `pip install -e ".[bench-eventsourcing]"`):

    python bench/bench_eventsourcing.py [--duration 3] [--repeats 3] [--dsn DSN]
                                        [--drivers psycopg[,psycopg2]]

Both sides run on the server `bench.common.resolve_server()` picks (--dsn, else
DEPECHE_NB_DSN, else the embedded server). eventsourcing is configured through its
own environment keys (PERSISTENCE_MODULE=eventsourcing.postgres, POSTGRES_HOST, ...,
taken from the server's libpq address; POSTGRES_PASSWORD may be empty) and keeps its
tables in a schema of their own (POSTGRES_SCHEMA=bench_<random>_es), dropped at the
end with our stores (bench_<random>...). Ours runs with psycopg 3 unless --drivers
says otherwise. Each figure is measured --repeats times, alternating ours and theirs;
printed are the median, the spread (min-max) and the ratio ours/theirs of the medians.

Workloads (eventsourcing's side uses its public API the way its applications do):

1. single appends, one event per transaction, for --duration s in a spawned process
   (`bench.common.run_in_processes`, as bench_store.py): ours `store.write(stream, m)`
   over 10 streams; theirs `app.save(aggregate)` after one command method call
   (one new event) on one of 10 aggregates held in memory (no read before the save).
2. 100 events per transaction, same method: ours `store.write_all(stream, [100])` and
   100 x `store.write(stream, m, conn=c)` in one `engine.begin()`; theirs one
   `app.save(aggregate)` with 100 pending events.
3. consumption of 20,000 stored events (2,000 streams / aggregates of 10), no-op
   handler, checkpoint every 100: ours the "runner alone" figure of bench_engine.py
   (`subscription_rate`, AckStrategy.BATCHED, batch 100, over an aggregated stream
   already projected) and "project + handle" through one Executor
   (`project_and_handle_rate`, a fresh backlog each time); theirs a `ProjectionRunner`
   with a `PostgresTrackingRecorder` view whose projection calls
   `view.insert_tracking()` every 100 events (and at the last), timed from its first
   event to that last checkpoint (its set-up, a new application, view, pools and
   threads, left out as our subscription's creation is; the rate from its construction
   is printed beside it). Its subscription selects 500 events at a time in one thread
   and decodes and calls process_event in another; the application sequence is already
   in order, so it has no projection step: both of our figures are set against it.
4. write -> handler latency at --latency-rate writes/s (--latency-messages writes):
   ours bench_engine's `latency()` (Executor in another process); theirs from just
   before `app.save()` to the projection's `process_event` for that event, with the
   ProjectionRunner in another process following the application's recorder
   (LISTEN/NOTIFY), tracking recorded per event.
   Ours has two hops (the projector's step commits to the aggregated stream, then the
   runner reads it), theirs one (its runner SELECTs the application's table).
5. reads of 1,000 streams x 10 events, decoded, one stream at a time, in passes over
   all of them for 1 s per measurement (in this process), after a warm-up pass: ours
   `store.read(stream)`; theirs `app.repository.get(id)` (the aggregate rebuilt) and
   `list(app.events.get(id))` (the domain events only).

Consumption (3) and reads (5) run in this process, the write figures in a spawned one
each, the latency consumers in a spawned one each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import psycopg.conninfo

try:
    import eventsourcing
    from eventsourcing.application import Application
    from eventsourcing.dispatch import singledispatchmethod
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.persistence import Tracking
    from eventsourcing.postgres import PostgresTrackingRecorder
    from eventsourcing.projection import Projection, ProjectionRunner
except ImportError as error:
    sys.exit(
        f"eventsourcing with its PostgreSQL persistence is not installed ({error}): "
        'pip install "eventsourcing[postgres]>=9.5,<10"'
    )

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import depeche_nb
from bench.bench_engine import (
    _p,  # the percentile of a sorted list, as bench_engine prints it
    drop_objects,
    latency,
    project_and_handle_rate,
    projection_rate,
    subscription_rate,
)
from bench.bench_store import (
    Config,
    Numbered,
    ours_read_streams,
    ours_write,
    ours_write_all,
    ours_writes_in_caller_transaction,
)
from bench.common import (
    Server,
    Step,
    WorkerFactory,
    describe_code,
    describe_server,
    load_average,
    paced_writes,
    parse_drivers,
    resolve_server,
    run_in_processes,
)
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.store.serializers import PydanticMessageSerializer

AGGREGATES = 10  # streams / aggregates a writing process round-robins over (bench_store's 10)
BATCH = 100
CONSUME_EVENTS = 20_000
CONSUME_STREAMS = 2_000
CHECKPOINT = 100
READ_STREAMS = 1_000
READ_LENGTH = 10
READ_SECONDS = 1.0  # passes over the READ_STREAMS streams per read measurement, for at least this long
LATENCY_AGGREGATES = 50  # bench_engine's latency() writes to 50 streams
INSTALL = 'pip install "eventsourcing[postgres]>=9.5,<10"'


# -- eventsourcing's side: the domain model, applications and projections ---------------------


class Series(Aggregate):
    """An aggregate whose one command records a number, as our BenchEvent / Numbered carry."""

    class NumberAdded(Aggregate.Event):
        number: int

    def __init__(self) -> None:
        self.last = -1

    @event(NumberAdded)
    def add(self, number: int) -> None:
        self.last = number


# One application class per workload: its name gives its table (<name>_events).
class EsWrites(Application[uuid.UUID]):
    name = "EsWrites"


class EsConsume(Application[uuid.UUID]):
    name = "EsConsume"


class EsLatency(Application[uuid.UUID]):
    name = "EsLatency"


class EsReads(Application[uuid.UUID]):
    name = "EsReads"


class _Consumer(Projection[PostgresTrackingRecorder]):
    """A no-op handler that records its position every CHECKPOINT events and at the last.

    A subclass per run (`_consumer_class`) gives the name (hence the tracking table) and
    the class-level run state the benchmark reads."""

    expected: ClassVar[int] = 0
    done: ClassVar[threading.Event]
    marks: ClassVar[dict[str, float]]

    def __init__(self, view: PostgresTrackingRecorder) -> None:
        super().__init__(view)
        self.count = 0

    def _track(self, tracking: Tracking) -> None:
        self.count += 1
        if self.count == 1:
            self.marks["first"] = time.perf_counter()
        if self.count % CHECKPOINT == 0 or self.count == self.expected:
            self.view.insert_tracking(tracking)
            if self.count == self.expected:
                self.marks["last"] = time.perf_counter()
                self.done.set()

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self._track(tracking)  # Series.Created: nothing to do but track

    @process_event.register(Series.NumberAdded)
    def _(self, domain_event: Any, tracking: Tracking) -> None:
        self._track(tracking)  # the no-op handler


def _consumer_class(name: str, expected: int) -> type[_Consumer]:
    attributes = {"name": name, "expected": expected, "done": threading.Event(), "marks": {}}
    return type(name, (_Consumer,), attributes)


class _LatencyProbe(Projection[PostgresTrackingRecorder]):
    """Notes when each number reaches process_event, then records tracking (per event)."""

    received: ClassVar[dict[int, float]]

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)

    @process_event.register(Series.NumberAdded)
    def _(self, domain_event: Any, tracking: Tracking) -> None:
        self.received[domain_event.number] = time.monotonic()
        self.view.insert_tracking(tracking)


def es_environment(server: Server, schema: str) -> dict[str, str]:
    """eventsourcing's configuration keys for `server`, its tables in `schema`."""
    params = psycopg.conninfo.conninfo_to_dict(server.libpq_dsn)
    ignored = sorted(set(params) - {"host", "port", "user", "dbname", "password"})
    if ignored:
        print(f"note: eventsourcing is given host/port/user/dbname/password only, not {', '.join(ignored)}")
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params.get("dbname", "postgres")),
        "POSTGRES_HOST": str(params.get("host", "")),  # a socket directory works too
        "POSTGRES_PORT": str(params.get("port", "5432")),
        "POSTGRES_USER": str(params.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(params.get("password", "")),  # must be set; may be empty
        "POSTGRES_SCHEMA": schema,
    }


@dataclass(frozen=True)
class EsConfig:
    env: dict[str, str]
    events_per_save: int = 1


def es_saves(index: int, config: EsConfig) -> Step:
    """`events_per_save` commands on one of AGGREGATES aggregates, one `app.save()`: that
    many events per transaction."""
    app = EsWrites(config.env)
    aggregates = [Series() for _ in range(AGGREGATES)]
    app.save(*aggregates)
    counter = itertools.count()
    per_save = config.events_per_save

    def step() -> int:
        n = next(counter)
        aggregate = aggregates[n % AGGREGATES]
        for i in range(per_save):
            aggregate.add(n * per_save + i)
        app.save(aggregate)
        return per_save

    return step


def fill_es(app: Application[uuid.UUID], aggregates: int, length: int) -> list[uuid.UUID]:
    """`aggregates` aggregates of `length` events (Created + length-1 NumberAdded), saved 100 at a time."""
    ids: list[uuid.UUID] = []
    for start in range(0, aggregates, 100):
        batch = [Series() for _ in range(min(100, aggregates - start))]
        for aggregate in batch:
            for i in range(length - 1):
                aggregate.add(i)
        app.save(*batch)
        ids.extend(aggregate.id for aggregate in batch)
    return ids


def es_consume_rate(env: dict[str, str], name: str, expected: int) -> tuple[float, float, float]:
    """A fresh ProjectionRunner over `expected` stored events: events/s from its first event to the
    last checkpoint (its set-up left out, as `subscription_rate` leaves out the subscription's),
    events/s from its construction, and ms from its construction to the first event."""
    projection = _consumer_class(name, expected)
    start = time.perf_counter()
    runner = ProjectionRunner(
        application_class=EsConsume,
        projection_class=projection,
        view_class=PostgresTrackingRecorder,
        env=env,
    )
    with runner:
        deadline = time.monotonic() + 300
        while not projection.done.wait(0.05):
            if runner.is_interrupted.is_set() or time.monotonic() > deadline:
                break  # leaving the context re-raises the runner's error
    runner.view.datastore.close()
    if not projection.done.is_set():
        raise RuntimeError(f"eventsourcing's runner stopped before the last of {expected} events")
    first, last = projection.marks["first"], projection.marks["last"]
    return (expected - 1) / (last - first), expected / (last - start), (first - start) * 1000


def _es_latency_child(env: dict[str, str], name: str, ready: Any, results: Any, expected: int) -> None:
    projection = cast(type[_LatencyProbe], type(name, (_LatencyProbe,), {"name": name, "received": {}}))
    with ProjectionRunner(
        application_class=EsLatency,
        projection_class=projection,
        view_class=PostgresTrackingRecorder,
        env=env,
    ) as runner:
        ready.set()
        deadline = time.monotonic() + 120
        while len(projection.received) < expected and time.monotonic() < deadline:
            if runner.is_interrupted.is_set():
                break
            time.sleep(0.05)
        results.put(dict(projection.received))
    runner.view.datastore.close()


def es_latency(env: dict[str, str], name: str, count: int, rate: float) -> dict[str, list[float]]:
    """ms from just before `app.save()` to process_event ("total") and to save() returning ("write")."""
    app = EsLatency(env)
    aggregates = [Series() for _ in range(LATENCY_AGGREGATES)]
    app.save(*aggregates)
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_es_latency_child, args=(env, name, ready, results, count))
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("eventsourcing's runner process did not start")
        time.sleep(0.5)  # as bench_engine's latency(): its listener is up

        def save(number: int) -> None:
            aggregate = aggregates[number % LATENCY_AGGREGATES]
            aggregate.add(number)
            app.save(aggregate)

        sent, wrote = paced_writes(count, rate, save)
        received: dict[int, float] = results.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.terminate()
        app.close()
    missing = set(sent) - set(received)
    if missing:
        raise RuntimeError(f"{len(missing)} events never reached eventsourcing's projection")
    return {
        "total": sorted((received[n] - sent[n]) * 1000 for n in sent),
        "write": sorted((wrote[n] - sent[n]) * 1000 for n in sent),
    }


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Figure:
    """One figure over the repeats: ours per driver, theirs."""

    name: str
    unit: str
    ours: dict[str, list[float]]
    theirs: list[float]

    def add(self, side: str, value: float) -> None:
        (self.theirs if side == THEIRS else self.ours.setdefault(side, [])).append(value)


THEIRS = "eventsourcing"


def _spread(values: Sequence[float], digits: int) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def _progress(rep: int, label: str, text: str) -> None:
    print(f"  [{rep}] {label:<58} {text}")
    sys.stdout.flush()


class Bench:
    def __init__(self, server: Server, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.drivers: tuple[str, ...] = args.drivers
        self.name = f"bench_{uuid.uuid4().hex[:8]}"
        self.schema = f"{self.name}_es"
        self.env = es_environment(server, self.schema)

    # set-up and clean-up

    def admin(self, *statements: str) -> None:
        conn = self.server.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    def vacuum(self, prefix: str, schema: str | None = None) -> None:
        """VACUUM ANALYZE the tables named `prefix...` (in `schema`, else any): what a backlog just
        written leaves to autovacuum would otherwise run in the server during the next figure."""
        conn = self.server.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT schemaname, tablename FROM pg_tables WHERE tablename LIKE %s "
                    "AND (%s::text IS NULL OR schemaname = %s)",
                    (prefix.replace("_", r"\_") + "%", schema, schema),
                )
                for table_schema, table in cur.fetchall():
                    cur.execute(f"VACUUM ANALYZE {quote_ident(table_schema)}.{quote_ident(table)}")
        finally:
            conn.close()

    def setup(self) -> None:
        self.admin(f"CREATE SCHEMA {quote_ident(self.schema)}")
        EsWrites(self.env).close()  # creates its table, type and function in the schema

    def cleanup(self) -> None:
        drop_objects(self.server, self.drivers[0], self.name)
        self.admin(f"DROP SCHEMA IF EXISTS {quote_ident(self.schema)} CASCADE")

    def store_name(self, what: str, driver: str) -> str:
        return f"{self.name}_{what}_{driver}"

    def es_table(self, app: type[Application[uuid.UUID]]) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(app.name.lower() + '_events')}"

    # 1 and 2: writes, each measurement in a spawned process

    def run(self, rep: int, label: str, factory: WorkerFactory, config: Any) -> float:
        result = run_in_processes(factory, config, 1, self.args.duration)
        _progress(
            rep,
            label,
            f"{result.per_second:>9,.0f}/s   client CPU {result.client_cpu_us_per_item:>5,.0f} us/event",
        )
        return result.per_second

    def writes(self) -> list[Figure]:
        for driver in self.drivers:
            depeche_nb.MessageStore(
                self.store_name("w", driver), self.server.engine(driver), PydanticMessageSerializer(Numbered)
            ).engine.dispose()
        tables = [quote_ident(StoreNames(self.store_name("w", d)).messages_table) for d in self.drivers]
        tables.append(self.es_table(EsWrites))
        es_one, es_batch = EsConfig(self.env), EsConfig(self.env, events_per_save=BATCH)
        single = Figure("single appends, 1 event/txn", "events/s", {}, [])
        write_all = Figure(f"{BATCH} events/txn: write_all vs save()", "events/s", {}, [])
        in_txn = Figure(f"{BATCH} events/txn: {BATCH} x write(conn) vs save()", "events/s", {}, [])

        def ours(driver: str) -> Config:
            return Config(self.server, self.store_name("w", driver), "", driver=driver)

        plan: list[tuple[Figure, str, str, WorkerFactory, Callable[[str], Any]]] = []
        for driver in self.drivers:
            plan.append((single, driver, f"ours[{driver}] store.write()", ours_write, ours))
        plan.append((single, THEIRS, "eventsourcing app.save(1 new event)", es_saves, lambda _: es_one))
        for driver in self.drivers:
            plan.append((write_all, driver, f"ours[{driver}] store.write_all({BATCH})", ours_write_all, ours))
            plan.append(
                (
                    in_txn,
                    driver,
                    f"ours[{driver}] {BATCH} x store.write(conn=c), 1 txn",
                    ours_writes_in_caller_transaction,
                    ours,
                )
            )
        plan.append(
            (write_all, THEIRS, f"eventsourcing app.save({BATCH} new events)", es_saves, lambda _: es_batch)
        )
        print(
            f"writes, 1 process, {self.args.duration:g} s each, {AGGREGATES} streams / aggregates round robin"
        )
        for rep in range(1, self.args.repeats + 1):
            for figure, side, label, factory, config in plan:
                self.admin(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
                value = self.run(rep, label, factory, config(side))
                figure.add(side, value)
                if figure is write_all and side == THEIRS:
                    in_txn.add(side, value)
        return [single, write_all, in_txn]

    # 3: consumption

    def consumption(self) -> list[Figure]:
        runner_alone = Figure("consume 20k: runner alone vs ProjectionRunner", "events/s", {}, [])
        both = Figure("consume 20k: project + handle vs ProjectionRunner", "events/s", {}, [])
        print(
            f"consumption: {CONSUME_EVENTS:,} events in {CONSUME_STREAMS:,} streams / aggregates, "
            f"no-op handler, checkpoint every {CHECKPOINT}"
        )
        streams: dict[str, Any] = {}
        engines = {driver: self.server.engine(driver) for driver in self.drivers}
        app = EsConsume(self.env)
        try:
            for driver, engine in engines.items():
                projected, streams[driver] = projection_rate(
                    engine, self.store_name("c", driver), CONSUME_EVENTS, CONSUME_STREAMS
                )
                print(f"  ours[{driver}]: backlog written and projected ({projected:,.0f}/s)")
            fill_es(app, CONSUME_STREAMS, CONSUME_EVENTS // CONSUME_STREAMS)
            assert app.recorder.max_notification_id() == CONSUME_EVENTS
            self.vacuum(self.name)  # our backlog
            self.vacuum("", self.schema)  # theirs
            print("  eventsourcing: backlog written")
            for rep in range(1, self.args.repeats + 1):
                for driver, engine in engines.items():
                    rate = subscription_rate(
                        streams[driver],
                        f"{self.name}_s{rep}_{driver}",
                        depeche_nb.AckStrategy.BATCHED,
                        CHECKPOINT,
                    )
                    runner_alone.add(driver, rate)
                    _progress(rep, f"ours[{driver}] runner alone (batched ack, 100)", f"{rate:>9,.0f}/s")
                    rate = project_and_handle_rate(
                        engine, self.store_name(f"ph{rep}", driver), CONSUME_EVENTS, CONSUME_STREAMS
                    )
                    both.add(driver, rate)
                    _progress(rep, f"ours[{driver}] project + handle, one Executor", f"{rate:>9,.0f}/s")
                    self.vacuum(self.store_name(f"ph{rep}", driver))  # its fresh backlog
                rate, cold, first_ms = es_consume_rate(self.env, f"consume{rep}", CONSUME_EVENTS)
                runner_alone.add(THEIRS, rate)
                both.add(THEIRS, rate)
                _progress(
                    rep,
                    "eventsourcing ProjectionRunner + tracking recorder",
                    f"{rate:>9,.0f}/s   (from construction {cold:,.0f}/s, first event at {first_ms:.0f} ms)",
                )
        finally:
            app.close()
            for engine in engines.values():
                engine.dispose()
        return [runner_alone, both]

    # 4: latency

    def latency(self) -> list[Figure]:
        count, rate = self.args.latency_messages, self.args.latency_rate
        p50 = Figure(f"write -> handler p50 at {rate:g}/s", "ms", {}, [])
        p95 = Figure(f"write -> handler p95 at {rate:g}/s", "ms", {}, [])
        print(f"write -> handler latency, {count} writes at {rate:g}/s, handler in another process")
        EsLatency(self.env).close()  # its table, before the first truncation
        for rep in range(1, self.args.repeats + 1):
            for driver in self.drivers:
                hops = latency(self.server, driver, self.store_name(f"l{rep}", driver), count, rate)
                self.note_latency(
                    rep, f"ours[{driver}] Executor (projector + runner)", driver, hops, p50, p95
                )
            self.admin(f"TRUNCATE {self.es_table(EsLatency)} RESTART IDENTITY")
            hops = es_latency(self.env, f"latency{rep}", count, rate)
            self.note_latency(rep, "eventsourcing ProjectionRunner", THEIRS, hops, p50, p95)
        return [p50, p95]

    @staticmethod
    def note_latency(
        rep: int, label: str, side: str, hops: dict[str, list[float]], p50: Figure, p95: Figure
    ) -> None:
        total = hops["total"]
        p50.add(side, statistics.median(total))
        p95.add(side, _p(total, 0.95))
        _progress(
            rep,
            label,
            f"p50 {statistics.median(total):.2f} ms, p95 {_p(total, 0.95):.2f} ms, max {total[-1]:.2f} ms "
            f"(write returned after {statistics.median(hops['write']):.2f} ms)",
        )

    # 5: reads

    def reads(self) -> list[Figure]:
        repository = Figure(
            f"read {READ_STREAMS:,} x {READ_LENGTH}: read vs repository.get", "events/s", {}, []
        )
        events = Figure(f"read {READ_STREAMS:,} x {READ_LENGTH}: read vs events.get", "events/s", {}, [])
        print(f"reads: {READ_STREAMS:,} streams / aggregates x {READ_LENGTH} events, decoded, one at a time")
        streams = tuple(f"aggregate-{k:04d}" for k in range(READ_STREAMS))
        steps: dict[str, Step] = {}
        for driver in self.drivers:
            name = self.store_name("r", driver)
            engine = self.server.engine(driver)
            store: depeche_nb.MessageStore[Numbered] = depeche_nb.MessageStore(
                name, engine, PydanticMessageSerializer(Numbered)
            )
            for stream in streams:
                store.write_all(stream, [Numbered(number=i) for i in range(READ_LENGTH)])
            engine.dispose()
            self.admin(f"VACUUM ANALYZE {quote_ident(StoreNames(name).messages_table)}")
            steps[driver] = ours_read_streams(
                0, Config(self.server, name, "", read_streams=streams, driver=driver)
            )
        app = EsReads(self.env)
        try:
            ids = fill_es(app, READ_STREAMS, READ_LENGTH)
            self.admin(f"VACUUM ANALYZE {self.es_table(EsReads)}")

            def rebuild() -> int:
                return sum(app.repository.get(i).version for i in ids)

            def decode() -> int:
                return sum(len(list(app.events.get(i))) for i in ids)

            plan: list[tuple[str, str, Step]] = [
                *((driver, f"ours[{driver}] store.read(stream)", steps[driver]) for driver in self.drivers),
                ("rebuild", "eventsourcing app.repository.get(id)", rebuild),
                ("decode", "eventsourcing list(app.events.get(id))", decode),
            ]
            for _, _, step in plan:
                step()  # warm-up pass: connections, prepared statements, caches
            for rep in range(1, self.args.repeats + 1):
                for side, label, step in plan:
                    count, passes, start = 0, 0, time.perf_counter()
                    while passes == 0 or time.perf_counter() - start < READ_SECONDS:
                        count += step()
                        passes += 1
                    rate = count / (time.perf_counter() - start)
                    assert count == passes * READ_STREAMS * READ_LENGTH, count
                    _progress(rep, label, f"{rate:>9,.0f}/s   ({passes} passes)")
                    if side == "rebuild":
                        repository.add(THEIRS, rate)
                    elif side == "decode":
                        events.add(THEIRS, rate)
                    else:
                        repository.add(side, rate)
                        events.add(side, rate)
        finally:
            app.close()
        return [repository, events]


def print_figures(figures: Sequence[Figure], drivers: Sequence[str], *, digits: int, note: str) -> None:
    """An aligned table: per figure, median (min-max) of ours per driver and of theirs, and ours/theirs."""
    header = (
        "figure",
        "unit",
        *(f"ours[{d}] median (min-max)" for d in drivers),
        "eventsourcing median (min-max)",
        *(f"ours[{d}]/theirs" for d in drivers),
    )
    body = [
        (
            figure.name,
            figure.unit,
            *(_spread(figure.ours[d], digits) for d in drivers),
            _spread(figure.theirs, digits),
            *(
                f"{statistics.median(figure.ours[d]) / statistics.median(figure.theirs):.2f}x"
                for d in drivers
            ),
        )
        for figure in figures
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        return " | ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )

    print(note)
    print(fmt(header))
    print("-+-".join("-" * width for width in widths))
    for line in body:
        print(fmt(line))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds per write measurement (default 3)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (default 3)")
    parser.add_argument("--latency-messages", type=int, default=200)
    parser.add_argument("--latency-rate", type=float, default=50.0, help="writes per second (default 50)")
    parser.add_argument("--dsn", help="server to use (default: DEPECHE_NB_DSN, else the embedded server)")
    parser.add_argument(
        "--drivers",
        type=parse_drivers,
        default=("psycopg",),
        help="drivers to measure ours with, comma-separated (default: psycopg; psycopg,psycopg2 for both)",
    )
    args = parser.parse_args(argv)
    version = importlib.metadata.version("eventsourcing")
    if not (9, 5) <= _version(version) < (10,):
        sys.exit(f"eventsourcing {version} is installed; this benchmark is written for 9.5: {INSTALL}")

    server = resolve_server(args.dsn)
    for line in describe_server(server, ("fsync", "synchronous_commit", "shared_buffers")):
        print(line)
    print(describe_code())
    print(f"theirs:   eventsourcing {version} from {Path(eventsourcing.__file__).resolve().parent}")
    print(
        f"ours measured with: {', '.join(args.drivers)}; theirs with psycopg {psycopg.__version__} "
        f"(its own pool); {args.repeats} measurements per figure, alternating ours and theirs"
    )
    print(f"at start, {load_average()} ({dt.datetime.now().isoformat(timespec='seconds')})")
    print()
    started = time.perf_counter()
    bench = Bench(server, args)
    print(f"eventsourcing's tables in schema {bench.schema}; ours named {bench.name}_...")
    try:
        bench.setup()
        throughput = bench.writes()
        throughput += bench.consumption()
        latencies = bench.latency()
        throughput += bench.reads()
    finally:
        bench.cleanup()
    print()
    print_figures(
        throughput,
        args.drivers,
        digits=0,
        note="throughput (higher is better; ratio > 1: ours faster)",
    )
    print()
    print_figures(latencies, args.drivers, digits=2, note="latency (lower is better; ratio < 1: ours faster)")
    print(
        "  ours: two hops (the projector's step commits to the aggregated stream, then the runner reads "
        "it);\n  theirs: one (after the NOTIFY its runner SELECTs the application's table; no projection "
        "step, the table lock at each write keeps its order)"
    )
    print()
    print(f"at end, {load_average()}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

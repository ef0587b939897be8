"""Workers heal themselves (DESIGN invariant 7): a private PostgreSQL is restarted (fast,
immediate) and its postmaster killed with -9 while writers, projectors and Executors
run; afterwards every committed message is projected exactly once and handled, and
every Executor is alive and handles new messages within seconds.

Also findings 8 (`projector.run()` stopped after a stored continuation) and 9
(concurrent projector steps under a server default of REPEATABLE READ).

The engines are plain `sa.create_engine` engines (no `pool_pre_ping`), as a user
would pass them, on both drivers.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
import depeche_nb.tools
from depeche_nb import MessageHandler, SubscriptionMessage
from depeche_nb.core.errors import UnsupportedServerError
from depeche_nb.engine.executor import Executor
from depeche_nb.postgres import server_check
from depeche_nb.postgres.driver import DRIVERS, backend_pid, is_transient, open_connection
from tests.faults import FaultyServer
from tests.support import Numbered
from tests.workers import build_stream

pytestmark = pytest.mark.slow

# Bounds of the waits below (each ends as soon as its condition holds).
RECOVERY_BOUND_S = 20.0
DRAIN_BOUND_S = 20.0


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyServer]:
    server = FaultyServer()
    # The ephemeral server commits asynchronously (a test-speed default it rewrites at
    # every start): a crash would then lose committed transactions, our DDL included.
    # Production servers commit synchronously, and that is what these tests are about;
    # a database setting survives restarts, the CHECKPOINT makes it survive a crash.
    database = server.sql("SELECT current_database()")[0][0]
    server.sql(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
    server.sql("CHECKPOINT")
    yield server
    server.close()


@pytest.fixture(params=DRIVERS)
def faulty_engine(request: pytest.FixtureRequest, faulty: FaultyServer) -> Iterator[sa.Engine]:
    eng = faulty.engine()
    eng = sa.create_engine(eng.url.set(drivername=f"postgresql+{request.param}"))
    yield eng
    eng.dispose()


def _scalar(engine: sa.Engine, sql: str) -> Any:
    # Test-side reads retry too: they may run while the server is coming back.
    deadline = time.monotonic() + RECOVERY_BOUND_S
    while True:
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql(sql).scalar_one()
        except sa.exc.DBAPIError as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait_for(condition: Callable[[], bool], bound: float) -> float | None:
    """Seconds until `condition()` held, or None if it did not within `bound`. The
    conditions are database states another process's thread produces; there is no
    event to await across that boundary, so this polls at a short interval."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


class LogToTable(MessageHandler[Numbered]):
    """Inserts one row per handler call through the engine's pool: after a restart the
    pool's connections are dead, so this also proves the pool recovers."""

    def __init__(self, engine: sa.Engine, table: str) -> None:
        super().__init__()
        self._engine = engine
        self._insert = sa.text(f'INSERT INTO "{table}" (message_id) VALUES (:id)')

    @MessageHandler.register
    def handle(self, message: SubscriptionMessage[Numbered]) -> None:
        with self._engine.begin() as conn:
            conn.execute(self._insert, {"id": str(message.stored_message.message_id)})


class Writers:
    """Threads writing `par-<n>` messages until stopped; a write that fails on a lost
    connection is not retried (its outcome is unknown), so the truth about what was
    committed is the messages table itself."""

    def __init__(self, store: depeche_nb.MessageStore[Numbered], threads: int = 2) -> None:
        self._store = store
        self._stop = threading.Event()
        self.failures = 0
        self._threads = [threading.Thread(target=self._write, args=(t,), daemon=True) for t in range(threads)]

    def _write(self, thread: int) -> None:
        i = 0
        while not self._stop.wait(0.005):
            i += 1
            try:
                self._store.write(f"par-{(thread * 1000 + i) % 10}", Numbered(number=i))
            except Exception as exc:
                assert is_transient(exc), exc
                self.failures += 1
                self._stop.wait(0.05)

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def _executor(engine: sa.Engine, name: str, log_table: str) -> Executor:
    """An executor with its own projector and runner objects (as a second process has)."""
    _, stream = build_stream(engine, name, f"{name}_agg")
    subscription = stream.subscription(name=f"{name}_sub", handlers=LogToTable(engine, log_table))
    # The safety-net timer far beyond the test's waits: recovery must not rely on it.
    executor = Executor(engine=engine, stimulation_interval=600, disable_signals=True)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    return executor


FAULTS: dict[str, Callable[[FaultyServer], float]] = {
    "restart_fast": lambda server: server.restart("fast"),
    "restart_immediate": lambda server: server.restart("immediate"),
    "kill_postmaster": lambda server: server.kill_postmaster(),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_executors_heal_after_the_server_went_away(
    faulty: FaultyServer, faulty_engine: sa.Engine, unique_name: str, fault: str
) -> None:
    engine = faulty_engine
    name = unique_name
    store, _ = build_stream(engine, name, f"{name}_agg")
    log_table = f"{name}_log"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{log_table}" (message_id uuid NOT NULL)')
    handled = f'SELECT count(DISTINCT message_id) FROM "{log_table}"'
    executors = [_executor(engine, name, log_table) for _ in range(2)]
    for executor in executors:
        executor.start()
    try:
        with Writers(store) as writers:
            assert _wait_for(lambda: _scalar(engine, handled) >= 30, RECOVERY_BOUND_S) is not None
            before = _scalar(engine, f'SELECT count(*) FROM "{name}_messages"')
            away = FAULTS[fault](faulty)
            server_back = time.monotonic()
            # Writers keep going while the workers find their way back.
            written = f'SELECT count(*) FROM "{name}_messages"'
            assert _wait_for(lambda: _scalar(engine, written) >= before + 20, RECOVERY_BOUND_S) is not None
        marker = Numbered(number=-1)
        marker_written_at = datetime.datetime.now(datetime.timezone.utc)
        store.write("par-0", marker)
        marked = f"SELECT count(*) FROM \"{log_table}\" WHERE message_id = '{marker.message_id}'"
        recovery = _wait_for(lambda: _scalar(engine, marked) > 0, RECOVERY_BOUND_S)
        assert recovery is not None, f"a message written after the {fault} was not handled within 20 s"
        since_back = time.monotonic() - server_back
        # Every worker of every executor ran after that write (woken by its notification),
        # and each is back from its backoff.
        back = _wait_for(
            lambda: all(
                h.healthy and all(w.last_run_at and w.last_run_at > marker_written_at for w in h.workers)
                for h in (executor.health() for executor in executors)
            ),
            RECOVERY_BOUND_S,
        )
        assert back is not None, [executor.health() for executor in executors]
        committed = _scalar(engine, f'SELECT count(*) FROM "{name}_messages"')
        drained = _wait_for(lambda: _scalar(engine, handled) == committed, DRAIN_BOUND_S)
        assert drained is not None, f"{_scalar(engine, handled)} of {committed} committed messages handled"
        projected, distinct_gp = (
            _scalar(engine, f'SELECT count(*) FROM "{name}_agg_stream"'),
            _scalar(engine, f'SELECT count(DISTINCT global_position) FROM "{name}_agg_stream"'),
        )
        missing = _scalar(
            engine,
            f'SELECT count(*) FROM "{name}_messages" m WHERE NOT EXISTS '
            f'(SELECT 1 FROM "{name}_agg_stream" s WHERE s.global_position = m.global_position)',
        )
        healths = [executor.health() for executor in executors]
        calls = _scalar(engine, f'SELECT count(*) FROM "{log_table}"')
        print(
            f"\n{fault} [{engine.dialect.driver}]: server away {away:.2f} s; marker handled "
            f"{recovery:.2f} s after its write ({since_back:.2f} s after the server was back), "
            f"all workers back {back:.2f} s later; "
            f"{committed} committed, {projected} projected, "
            f"{calls} handler calls for {committed} messages, {writers.failures} failed writes; "
            f"reconnects {[h.reconnects for h in healths]}"
        )
        assert (projected, distinct_gp, missing) == (committed, committed, 0)
        for h in healths:
            assert all(w.alive for w in h.workers), h
            assert h.reconnects >= 1, h
            # A worker whose connection the server ended while idle replaces it before use
            # and never sees an error; one that was mid-statement recovers and reports it.
            recovered = sum(w.recoveries for w in h.workers)
            assert (h.last_error is not None and h.last_error_at is not None) == (recovered > 0), h
    finally:
        for executor in executors:
            executor.stop()


def test_health_is_a_rich_repr(faulty: FaultyServer, faulty_engine: sa.Engine, unique_name: str) -> None:
    engine = faulty_engine
    executor = _executor(engine, unique_name, f"{unique_name}_log")
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{unique_name}_log" (message_id uuid NOT NULL)')
    import depeche_nb.notebook  # noqa: F401  (registers the HTML renderers)

    with executor:
        health = executor.health()
        html = health._repr_html_()
    assert health.running and len(health.workers) == 2
    assert "ExecutorHealth" in html and "StreamProjector" in html and "<table" in html
    assert not executor.health().running


def test_run_does_not_stop_after_a_stored_continuation(faulty_engine: sa.Engine, unique_name: str) -> None:
    """Finding 8: a step that finishes a stored continuation says nothing about later commits."""
    engine = faulty_engine
    store, stream = build_stream(engine, unique_name, f"{unique_name}_agg")
    for i in range(3):
        store.write(f"par-{i}", Numbered(number=i))
    first = stream.projector.step(max_messages=2)
    assert len(first) == 2 and first.more_available  # a continuation is stored
    for i in range(3, 5):
        store.write(f"par-{i}", Numbered(number=i))
    stream.projector.run()
    assert _scalar(engine, f'SELECT count(*) FROM "{unique_name}_agg_stream"') == 5


def test_concurrent_steps_under_a_repeatable_read_default(
    faulty: FaultyServer, faulty_engine: sa.Engine, unique_name: str
) -> None:
    """Finding 9: with `default_transaction_isolation = 'repeatable read'`, a step that got
    the lock right after another committed read the heads and checkpoint from before."""
    engine = faulty_engine
    store, _ = build_stream(engine, unique_name, f"{unique_name}_agg")
    errors: list[BaseException] = []
    done = threading.Event()

    def project() -> None:
        _, stream = build_stream(engine, unique_name, f"{unique_name}_agg")
        while not done.is_set():
            try:
                stream.projector.step(max_messages=3)
            except Exception as exc:
                errors.append(exc)
                return

    with faulty.setting("default_transaction_isolation", "repeatable read"):
        engine.dispose()  # new sessions, which take the new default
        assert _scalar(engine, "SHOW default_transaction_isolation") == "repeatable read"
        projectors = [threading.Thread(target=project) for _ in range(3)]
        for thread in projectors:
            thread.start()
        with Writers(store, threads=2):
            time.sleep(3)  # the duration of the race, not a synchronisation
        done.set()
        for thread in projectors:
            thread.join(timeout=10)
        build_stream(engine, unique_name, f"{unique_name}_agg")[1].projector.run()
    assert errors == []
    committed = _scalar(engine, f'SELECT count(*) FROM "{unique_name}_messages"')
    assert committed > 50
    assert (
        _scalar(engine, f'SELECT count(DISTINCT global_position) FROM "{unique_name}_agg_stream"')
        == committed
    )


def test_a_direct_connection_offers_everything(faulty_engine: sa.Engine) -> None:
    connection = open_connection(faulty_engine)
    try:
        assert server_check.problems(connection) == []
    finally:
        connection.close()


def test_an_engine_without_what_we_need_is_refused_before_anything_is_written(
    faulty: FaultyServer, faulty_engine: sa.Engine, unique_name: str
) -> None:
    """A CockroachDB-like server: `version()` names it (an unqualified call resolves in
    search_path order, so a schema placed before pg_catalog can answer for it)."""
    fake = f"{unique_name}_crdb"
    faulty.sql(f'CREATE SCHEMA "{fake}"')
    faulty.sql(
        f'CREATE FUNCTION "{fake}".version() RETURNS text LANGUAGE sql '
        "AS $$ SELECT 'CockroachDB CCL v23.1.11 (x86_64-pc-linux-gnu)' $$"
    )
    url = faulty_engine.url.update_query_dict({"options": f"-csearch_path={fake},pg_catalog"})
    engine = depeche_nb.connect(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(UnsupportedServerError, match=r"CockroachDB.*fix: use PostgreSQL 13"):
            build_stream(engine, unique_name, f"{unique_name}_agg")
    finally:
        engine.dispose()
    tables = _scalar(
        faulty_engine, f"SELECT count(*) FROM pg_tables WHERE starts_with(tablename, '{unique_name}')"
    )
    assert tables == 0


def test_transient_errors_are_told_from_others(faulty: FaultyServer, faulty_engine: sa.Engine) -> None:
    connection = open_connection(faulty_engine)
    try:
        with connection.cursor() as cursor, pytest.raises(Exception) as division:
            cursor.execute("SELECT 1 / 0")
        assert not is_transient(division.value)
        assert faulty.terminate(backend_pid(connection))
        with connection.cursor() as cursor, pytest.raises(Exception) as terminated:
            cursor.execute("SELECT 1")
        assert is_transient(terminated.value)
    finally:
        connection.close()
    with pytest.raises(sa.exc.DBAPIError) as wrapped, faulty_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1 FROM pg_terminate_backend(pg_backend_pid())")
    assert is_transient(wrapped.value)


def test_the_first_write_after_a_session_ended_while_idle_succeeds(
    faulty: FaultyServer, faulty_engine: sa.Engine, unique_name: str
) -> None:
    """The thread's cached write connection was ended by the server while idle (here every
    client backend is terminated): the next write opens a new session instead of failing."""
    store = depeche_nb.MessageStore(
        name=unique_name,
        engine=faulty_engine,
        serializer=depeche_nb.tools.PydanticMessageSerializer(Numbered),
    )
    store.write("idle-1", Numbered(number=1))
    for pid in faulty.backends():
        faulty.terminate(pid)
    assert _wait_for(lambda: not faulty.backends(), RECOVERY_BOUND_S) is not None
    assert store.write("idle-1", Numbered(number=2)).version == 2
    assert [m.message.number for m in store.read("idle-1")] == [1, 2]

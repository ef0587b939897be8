"""The driver seam: the only module that knows how psycopg 3 and psycopg2 differ.

Both drivers are first-class. A plain `postgresql://` URL selects psycopg 3
(as SQLAlchemy 2.1 does) unless `DEPECHE_NB_DRIVER=psycopg2`; an engine a user
passes keeps its own driver. Everything above this module talks to
connections through the functions here, so no other module imports a driver.

Connections we open ourselves (outside SQLAlchemy's pool, see `rawconn`) use
client-side parameter binding on both drivers: psycopg2 always does, and
psycopg 3's `ClientCursor` does the same. That keeps our hot paths' scripts
of several statements (BEGIN ...; COMMIT) in one round trip; psycopg 3's
default server-side binding refuses several statements in one execute.
Statements that go through a SQLAlchemy connection (a caller's transaction)
are always single statements, which both binding styles accept.
"""

from __future__ import annotations

import functools
import os
import select
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the embedded server uses this module without SQLAlchemy installed
    import sqlalchemy as sa

PSYCOPG = "psycopg"
PSYCOPG2 = "psycopg2"
DRIVERS = (PSYCOPG, PSYCOPG2)
DRIVER_ENV = "DEPECHE_NB_DRIVER"


def default_driver() -> str:
    """The driver for URLs that name none: `DEPECHE_NB_DRIVER`, else psycopg 3."""
    chosen = os.environ.get(DRIVER_ENV, "").strip() or PSYCOPG
    return check_driver(chosen, f"{DRIVER_ENV}")


def check_driver(driver: object, what: str = "driver") -> str:
    if driver not in DRIVERS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, DRIVERS))}, got {driver!r}")
    return str(driver)


def with_driver(url: str, driver: str | None = None) -> str:
    """A SQLAlchemy URL for `url`: libpq-style `postgres://`/`postgresql://` URLs get
    `driver` (default: `default_driver()`); a URL naming its driver keeps it."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            chosen = check_driver(driver) if driver is not None else default_driver()
            return f"postgresql+{chosen}://" + url[len(prefix) :]
    return url


def driver_of(engine: sa.Engine) -> str:
    driver = engine.dialect.driver
    if engine.dialect.name != "postgresql" or driver not in DRIVERS:
        raise ValueError(
            f"depeche-nb needs a PostgreSQL engine using psycopg (3) or psycopg2, "
            f"got {engine.dialect.name}+{driver}"
        )
    return driver


def open_connection(engine: sa.Engine, *, autocommit: bool = True) -> Any:
    """A new DBAPI connection to `engine`'s database, outside its pool, with
    client-side parameter binding (see the module docstring).

    Its session's time zone is UTC, so both drivers hand out timestamps in UTC
    (`datetime.timezone.utc`) whatever the server's `TimeZone` setting is, and its
    transactions are READ COMMITTED whatever the server's default: our statements
    (writes, acks, the projector) are written for it, and under a REPEATABLE READ
    default a concurrent ack or claim would fail with a serialization error.
    """
    driver = driver_of(engine)
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    if driver == PSYCOPG:
        import psycopg

        connection = psycopg.connect(*cargs, **cparams, autocommit=True, cursor_factory=_script_cursor())
    else:
        import psycopg2

        connection = psycopg2.connect(*cargs, **cparams)
        connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'; SET default_transaction_isolation = 'read committed'")
        connection.autocommit = autocommit
    except BaseException:
        connection.close()
        raise
    return connection


@functools.cache
def _script_cursor() -> type:
    """psycopg 3's client-side binding cursor, positioned after a script on its last
    statement's result as psycopg2 is (psycopg 3 starts at the first)."""
    import psycopg

    class ScriptCursor(psycopg.ClientCursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> ScriptCursor:
            super().execute(query, params, **kwargs)
            if len(self._results) > 1:
                self.set_result(-1)
            return self

    return ScriptCursor


def script_value(connection: Any, sql: str, params: tuple[Any, ...]) -> str | None:
    """Run a script of statements (`%s` parameters: str, int, bool or None) on one of our
    own autocommit connections and return the first value of its last result, as text.

    psycopg2's cursor does this in C. psycopg 3's cursor machinery costs about 25 us of
    Python per call, as much as the write it carries, so on psycopg 3 the script goes to
    libpq directly (`PQexec`, which like psycopg2 keeps only the last result), with the
    values quoted by libpq. A failing statement raises the driver's error, as a cursor
    would (`is_transient`, `sqlstate` and `diagnostic` read it the same way)."""
    if type(connection).__module__.split(".")[0] != PSYCOPG:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            value = cursor.fetchone()[0]
            return None if value is None else str(value)
    from psycopg import errors, pq

    pgconn = connection.pgconn
    escape = pq.Escaping(pgconn).escape_literal
    encoding = connection.info.encoding
    literals = tuple(_literal(value, escape, encoding) for value in params)
    result = pgconn.exec_((sql % literals).encode(encoding))
    if result.status == pq.ExecStatus.FATAL_ERROR:
        raise errors.error_from_result(result, encoding=encoding)
    if result.status != pq.ExecStatus.TUPLES_OK or result.ntuples == 0:
        return None
    value = result.get_value(0, 0)
    return None if value is None else value.decode(encoding)


def render(cursor: Any, sql: str, params: Any) -> str:
    """`sql` with `params` bound as the cursor binds them (on the client, see the module
    docstring), as text to join with other rendered statements into one script; run the
    script without parameters, so nothing in it is taken for a placeholder again."""
    text = cursor.mogrify(sql, params)
    if isinstance(text, bytes):  # psycopg2
        import psycopg2.extensions

        return text.decode(psycopg2.extensions.encodings[cursor.connection.encoding])
    return str(text)


def sends_ahead(connection: Any) -> bool:
    """Whether `send_script` works on this connection: psycopg 3's libpq interface can
    send a query and take its results later; psycopg2's blocking connections cannot."""
    return type(connection).__module__.split(".")[0] == PSYCOPG


def send_script(connection: Any, script: str) -> None:
    """Send a script (statements rendered already, see `render`) on one of our psycopg 3
    autocommit connections and return without waiting: the server runs it while the caller
    works. Nothing else may run on the connection until `script_rows` took its results."""
    from psycopg import generators

    pgconn = connection.pgconn
    pgconn.send_query(script.encode(connection.info.encoding))
    connection.wait(generators.send(pgconn))


def script_finished(connection: Any) -> bool:
    """Whether the script `send_script` sent has all its results here, without blocking.
    Raises the driver's error when the connection broke (the session ended)."""
    pgconn = connection.pgconn
    pgconn.consume_input()
    return not pgconn.is_busy()


def script_rows(connection: Any) -> list[tuple[Any, ...]]:
    """The rows of the last statement of the script `send_script` sent, waiting for them;
    the script's first error is raised as a cursor would raise it."""
    from psycopg import generators, pq
    from psycopg.adapt import Transformer
    from psycopg.errors import error_from_result

    pgconn = connection.pgconn
    results = connection.wait(generators.fetch_many(pgconn))
    encoding = connection.info.encoding
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise error_from_result(result, encoding=encoding)
    last = results[-1]
    if last.status != pq.ExecStatus.TUPLES_OK:
        return []
    transformer = Transformer(connection)
    transformer.set_pgresult(last)
    return transformer.load_rows(0, last.ntuples, tuple)


def _literal(value: Any, escape: Any, encoding: str) -> str:
    if value is None:
        return "NULL"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return str(escape(value.encode(encoding)).decode(encoding))
    raise TypeError(f"script_value takes str, int, bool or None parameters, got {type(value).__name__}")


def execute_repeated(cursor: Any, sql: str, params: Any) -> None:
    """Execute a statement that runs again and again on a connection someone else owns
    (a caller's SQLAlchemy connection): psycopg 3 prepares it on the server (with a cursor
    that binds on the server, as SQLAlchemy's do), in its own bookkeeping, which also
    knows when a rollback or DDL makes it deallocate everything; psycopg2 executes it.
    (`rawconn.Prepared` is for our own connections, where nothing else deallocates.)"""
    if type(cursor).__module__.split(".")[0] == PSYCOPG and not isinstance(cursor, _client_cursor_class()):
        cursor.execute(sql, params, prepare=True)
    else:
        cursor.execute(sql, params)


@functools.cache
def _client_cursor_class() -> type:
    import psycopg

    return psycopg.ClientCursor


def server_has_spoken(connection: Any) -> bool:
    """Whether an idle connection's socket is readable. Between statements the server sends
    nothing unasked, so this means it ended the session (a termination notice, end of file)
    or, rarely, sent a notice: either way a reason not to trust the session blindly. One
    system call, no round trip."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
    except (OSError, ValueError):  # a socket already closed
        return True
    return bool(readable)


def socket_watch(connection: Any) -> Callable[[], bool]:
    """`server_has_spoken(connection)` bound to the connection's socket: where the platform
    has poll(), one poll() of a file descriptor registered once, without looking the socket
    up through the driver on every call (a runner asks before each message it delivers)."""
    make_poller = getattr(select, "poll", None)
    if make_poller is None:  # Windows
        return lambda: server_has_spoken(connection)
    try:
        descriptor = connection.fileno()
    except (OSError, ValueError):
        return lambda: True  # closed already
    poller = make_poller()
    # Errors, hang-ups and a descriptor closed under us (POLLNVAL) are reported without asking.
    poller.register(descriptor, select.POLLIN | select.POLLPRI)

    def spoken() -> bool:
        return bool(poller.poll(0))

    return spoken


def backend_pid(connection: Any) -> int:
    info = getattr(connection, "info", None)
    pid = getattr(info, "backend_pid", None)
    if pid is None:
        pid = connection.get_backend_pid()
    return int(pid)


def is_closed(connection: Any) -> bool:
    return bool(connection.closed)


def pending_notifications(connection: Any) -> list[tuple[str, str]]:
    """Notifications that arrived on a listening connection, without blocking."""
    if hasattr(connection, "notifies") and callable(connection.notifies):
        return [(n.channel, n.payload) for n in connection.notifies(timeout=0)]
    connection.poll()
    received = []
    while connection.notifies:
        notify = connection.notifies.pop(0)
        received.append((notify.channel, notify.payload))
    return received


def _driver_error_types() -> tuple[type[BaseException], ...]:
    # Only drivers already imported can have raised; importing the other costs time.
    types: list[type[BaseException]] = []
    for module_name in DRIVERS:
        module = sys.modules.get(module_name)
        if module is not None:
            types.append(module.Error)
    return tuple(types)


def driver_error(error: BaseException) -> BaseException | None:
    """The driver's exception behind `error` (itself, or a SQLAlchemy error's `.orig`)."""
    orig = getattr(error, "orig", error)
    return orig if isinstance(orig, _driver_error_types()) else None


def is_driver_error(error: BaseException) -> bool:
    return driver_error(error) is not None


def is_connection_error(error: BaseException) -> bool:
    """True for errors of a broken or unreachable connection (the driver's OperationalError)."""
    orig = driver_error(error)
    if orig is None:
        return False
    module = sys.modules[type(orig).__module__.split(".")[0]]
    return isinstance(orig, module.OperationalError)


def sqlstate(error: BaseException) -> str | None:
    orig = driver_error(error)
    if orig is None:
        return None
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def diagnostic(error: BaseException, field: str) -> str | None:
    """A field of the server's error report (`message_primary`, `constraint_name`, ...)."""
    orig = driver_error(error)
    diag = getattr(orig, "diag", None)
    return getattr(diag, field, None) if diag is not None else None


UNIQUE_VIOLATION = "23505"

# Errors that say nothing about the statement, only that the server or the session
# went away or that a concurrent transaction won: worth the same work again on a
# fresh connection. Class 08 (connection exceptions) is taken as a whole.
TRANSIENT_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: fast shutdown, pg_terminate_backend
        "57P02",  # crash_shutdown: another backend crashed, the server restarts
        "57P03",  # cannot_connect_now: the server is starting or in recovery
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "25006",  # read_only_sql_transaction: a failed-over primary is now a standby
        "53300",  # too_many_connections: old sessions not yet gone after a restart
    }
)


def is_transient(error: BaseException) -> bool:
    """True for database errors that retrying on a new connection can cure: a lost or
    refused connection, a server shutting down or restarting, a failover to a
    read-only server, a serialization failure or deadlock (see `TRANSIENT_SQLSTATES`).

    Looks through SQLAlchemy's wrapper (`.orig`, `connection_invalidated`) and
    through the `__cause__` chain, so an error of ours raised from a lost
    connection counts too.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "connection_invalidated", False):
            return True
        orig = driver_error(current)
        if orig is not None and _is_transient_driver_error(orig):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_transient_driver_error(orig: BaseException) -> bool:
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state is not None:
        return state in TRANSIENT_SQLSTATES or state.startswith("08")
    # Without a SQLSTATE the server never answered: libpq lost or could not open the
    # connection (OperationalError), or the driver refuses a connection it knows is
    # closed (InterfaceError). psycopg2 also reports a connection lost mid-result as a
    # bare DatabaseError; its other SQLSTATE-less errors (adaptation, misuse) are
    # subclasses (ProgrammingError, DataError, ...), which stay non-transient.
    module = sys.modules[type(orig).__module__.split(".")[0]]
    return (
        isinstance(orig, (module.OperationalError, module.InterfaceError))
        or type(orig) is module.DatabaseError
    )


__all__ = [
    "DRIVERS",
    "DRIVER_ENV",
    "PSYCOPG",
    "PSYCOPG2",
    "TRANSIENT_SQLSTATES",
    "UNIQUE_VIOLATION",
    "backend_pid",
    "check_driver",
    "default_driver",
    "diagnostic",
    "driver_error",
    "driver_of",
    "execute_repeated",
    "is_closed",
    "is_connection_error",
    "is_driver_error",
    "is_transient",
    "open_connection",
    "pending_notifications",
    "script_value",
    "server_has_spoken",
    "socket_watch",
    "sqlstate",
    "with_driver",
]

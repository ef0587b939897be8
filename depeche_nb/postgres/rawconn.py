"""Direct DBAPI connections for the hot paths, and their clean-up with the engine.

SQLAlchemy's pool checkout/return and statement layer cost about 0.1 ms per
call, as much as a local round trip. The write path therefore keeps one
autocommit connection per (process, thread, engine), opened through the
driver seam with the engine's own connect arguments; every statement on it
commits on its own.

These connections live outside the engine's pool, so `engine.dispose()`
alone would not close them and a `DROP DATABASE` after it would fail on
our sessions. Every connection opened here is therefore registered with its
engine and closed by `close_connections(engine)`, which runs on SQLAlchemy's
`engine_disposed` event: thread-local write connections of every thread,
lock sessions and listener sessions alike. Their owners open a new one on
next use, except listeners, which stop (see `PgNotificationListener`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.driver import (
    execute_repeated,
    is_closed,
    is_connection_error,
    is_driver_error,
    open_connection,
    server_has_spoken,
    sqlstate,
)
from depeche_nb.postgres.server_check import ensure_supported

_local = threading.local()
# Rendering an engine's URL costs ~15 us, too much per write; cache it per engine.
_url_keys: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()
_registry_guard = threading.Lock()
# engine -> {id(connection): (connection, on_dispose callback or None)}
_opened: weakref.WeakKeyDictionary[sa.Engine, dict[int, tuple[Any, Callable[[], None] | None]]] = (
    weakref.WeakKeyDictionary()
)


def _url_key(engine: sa.Engine) -> str:
    key = _url_keys.get(engine)
    if key is None:
        key = _url_keys[engine] = str(engine.url)
    return key


def open_dbapi_connection(
    engine: sa.Engine, *, autocommit: bool = True, on_dispose: Callable[[], None] | None = None
) -> Any:
    """A new connection to the engine's database, outside its pool, closed when the
    engine is disposed (after `on_dispose` ran, if given). The first one per engine URL
    checks that the server offers what the engine needs (`server_check`)."""
    ensure_supported(engine)
    connection = open_connection(engine, autocommit=autocommit)
    with _registry_guard:
        connections = _opened.get(engine)
        if connections is None:
            connections = _opened[engine] = {}
            sa.event.listen(engine, "engine_disposed", close_connections)
        # Forget connections closed meanwhile, so the registry does not grow.
        for key in [k for k, (c, _) in connections.items() if is_closed(c)]:
            del connections[key]
        connections[id(connection)] = (connection, on_dispose)
    return connection


def close_connections(engine: sa.Engine) -> None:
    """Close every connection `open_dbapi_connection` opened for `engine`, in all threads."""
    with _registry_guard:
        entries = list(_opened.pop(engine, {}).values())
    for connection, on_dispose in entries:
        if on_dispose is not None:
            with contextlib.suppress(Exception):
                on_dispose()
        with contextlib.suppress(Exception):
            connection.close()


@contextlib.contextmanager
def autocommit_cursor(engine: sa.Engine) -> Iterator[Any]:
    """A cursor on this thread's autocommit connection for `engine`.

    A connection whose session ended while idle is replaced before use; one that failed
    during a statement (server restart, network) or was closed by `engine.dispose()` is
    dropped and the next call opens a fresh one.
    """
    connections: dict[tuple[int, int, str], Any] = getattr(_local, "connections", None) or {}
    _local.connections = connections
    # The URL is part of the key: a collected engine's id may be reused by another.
    key = (os.getpid(), id(engine), _url_key(engine))
    connection = connections.get(key)
    if connection is not None and not is_closed(connection) and server_has_spoken(connection):
        # Ended while idle (server restart, terminated backend, idle timeout): nothing was
        # sent on it yet, so a new session is safe and the caller never sees the old one's end.
        with contextlib.suppress(Exception):
            connection.close()
        connection = None
    if connection is None or is_closed(connection):
        connection = open_dbapi_connection(engine)
        connections[key] = connection
    try:
        with connection.cursor() as cursor:
            yield cursor
    except Exception as exc:
        if is_connection_error(exc) or is_closed(connection):
            connections.pop(key, None)
            with contextlib.suppress(Exception):
                connection.close()
        raise


# A parameter with the cast that follows it (carried into EXECUTE's arguments, which need
# it as much as the statement: psycopg2 sends a list of UUIDs as a text array, say).
_PLACEHOLDER = re.compile(r"(?:%\((\w+)\)s|%s)(::\w+(?:\[\])?)?|%%")


class Prepared:
    """One hot statement, prepared once per session and then run as `EXECUTE`.

    Our connections bind parameters on the client (see `driver`), so every plain
    statement is parsed, analysed and planned again on every call; for the statements
    of the write-to-handler path that costs more than the round trip (0.1 to 0.5 ms
    each). `PREPARE` keeps the analysed statement and, once PostgreSQL finds its
    generic plan no worse, the plan too, per session; `EXECUTE name(values)` carries the
    values as literals, which both drivers render as usual.

    `sql` takes parameters as `%(name)s` (each name once or more) or as `%s` (not
    both); every parameter needs a type PostgreSQL can infer from its context (write a
    cast where it cannot). A prepared statement survives the tables it reads being
    replaced (PostgreSQL re-plans it), not a change of its result columns.

    Only for the connections opened here: their cursors bind on the client, which
    psycopg 3 never prepares with, so nothing deallocates behind our back (psycopg 3
    runs DEALLOCATE ALL after a rollback on connections where it prepared itself, such
    as SQLAlchemy's; see `driver.execute_repeated` for those).
    """

    def __init__(self, sql: str) -> None:
        names: list[str] = []
        casts: dict[str, str] = {}
        positional = 0

        def number(match: re.Match[str]) -> str:
            nonlocal positional
            if match.group(0) == "%%":
                return "%"
            name, cast = match.group(1), match.group(2) or ""
            if name is None:
                positional += 1
                name = str(positional)
            elif name not in names:
                names.append(name)
            if cast:
                casts.setdefault(name, cast)
            return f"${names.index(name) + 1 if names else positional}{cast}"

        body = _PLACEHOLDER.sub(number, sql)
        if names and positional:
            raise ValueError("a prepared statement takes either %(name)s or %s parameters, not both")
        self.sql = sql
        self.name = "depeche_nb_" + hashlib.blake2b(sql.encode(), digest_size=8).hexdigest()
        self.prepare_sql = f"PREPARE {self.name} AS {body}"
        placeholders = (
            [f"%({name})s{casts.get(name, '')}" for name in names]
            if names
            else [f"%s{casts.get(str(i), '')}" for i in range(1, positional + 1)]
        )
        arguments = f"({', '.join(placeholders)})" if placeholders else ""
        self.execute_sql = f"EXECUTE {self.name}{arguments}"

    def __repr__(self) -> str:
        return f"Prepared({self.name})"


# connection -> names of the statements prepared in its session
DUPLICATE_PREPARED_STATEMENT = "42P05"
UNDEFINED_PREPARED_STATEMENT = "26000"
_prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def prepared_sql(cursor: Any, statement: Prepared) -> str:
    """The `EXECUTE` text of `statement` for `cursor`'s session, preparing it there first
    (one extra round trip per session). Run it with the statement's parameters, alone or
    inside a script of several statements."""
    connection = cursor.connection
    done = _prepared.get(connection)
    if done is None:
        done = _prepared[connection] = set()
    if statement.name not in done:
        try:
            cursor.execute(statement.prepare_sql)
        except Exception as exc:
            # Prepared already in this session by a connection object we no longer track.
            if sqlstate(exc) != DUPLICATE_PREPARED_STATEMENT:
                raise
        done.add(statement.name)
    return statement.execute_sql


def execute_prepared(cursor: Any, statement: Prepared, params: Any = None) -> None:
    """Run `statement` (see `Prepared`) on `cursor` with `params`."""
    cursor.execute(prepared_sql(cursor, statement), params)


def execute_in(conn: sa.Connection, sql: str, params: Any) -> list[Any]:
    """Run one statement in a caller's SQLAlchemy connection, in its transaction, on its
    DBAPI connection directly, and return its rows.

    For statements a caller runs many times in one transaction (`store.write(conn=...)`):
    SQLAlchemy's statement and result layer costs about 50 us per call, as much as the
    write itself. psycopg 3 prepares the statement once per session
    (`driver.execute_repeated`). The transaction is begun the SQLAlchemy way
    first (so `conn.commit()` commits it) and errors come as SQLAlchemy's, as from
    `conn.exec_driver_sql` (a lost connection invalidated); what passes by is
    SQLAlchemy's cursor events."""
    return _rows_in(conn, sql, params, lambda cursor: execute_repeated(cursor, sql, params))


def execute_prepared_in(conn: sa.Connection, statement: Prepared, params: Any) -> list[Any]:
    """`execute_in` with `statement` prepared once per session (`Prepared`), also on
    psycopg2, which has no prepared statements of its own: for a connection that we opened
    and whose transaction holds nothing but our reads. The session may have lost the
    statement behind our back when it was someone else's in between (DEALLOCATE or DISCARD
    on a pooled connection): then that transaction, ours, is rolled back and the statement
    prepared again. On a caller's connection such an error would abort their transaction."""

    def run(cursor: Any) -> None:
        execute_prepared(cursor, statement, params)

    dbapi = conn.connection.driver_connection
    try:
        return _rows_in(conn, statement.sql, params, run)
    except sa.exc.DBAPIError as error:
        if error.orig is None or sqlstate(error.orig) != UNDEFINED_PREPARED_STATEMENT or conn.invalidated:
            raise
    conn.rollback()
    _prepared.pop(dbapi, None)
    return _rows_in(conn, statement.sql, params, run)


def _rows_in(conn: sa.Connection, sql: str, params: Any, run: Callable[[Any], None]) -> list[Any]:
    if not conn.in_transaction():
        conn.begin()
    dbapi = conn.connection.driver_connection
    try:
        with dbapi.cursor() as cursor:  # type: ignore[union-attr]
            run(cursor)
            return list(cursor.fetchall())
    except Exception as exc:
        if not is_driver_error(exc):
            raise
        dialect = conn.dialect
        invalidated = bool(dialect.is_disconnect(exc, dbapi, None))  # type: ignore[arg-type]
        if invalidated:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql,
            params,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=invalidated,
            dialect=dialect,
        ) from exc


@contextlib.contextmanager
def callers_or_own(engine: sa.Engine, conn: sa.Connection | None) -> Iterator[sa.Connection]:
    """The caller's connection as it is (their transaction, they commit), or a new one
    that is committed and closed at the end of the block."""
    if conn is not None:
        yield conn
        return
    with engine.connect() as own:
        yield own
        own.commit()

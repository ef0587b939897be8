"""Direct DBAPI connections for the hot paths.

SQLAlchemy's pool checkout/return and statement layer cost about 0.1 ms per
call, as much as a local round trip. The write path therefore keeps one
autocommit psycopg2 connection per (process, thread, engine), opened with the
engine's own connect arguments; every statement on it commits on its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

_local = threading.local()
# Rendering an engine's URL costs ~15 us, too much per write; cache it per engine.
_url_keys: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()


def _url_key(engine: sa.Engine) -> str:
    key = _url_keys.get(engine)
    if key is None:
        key = _url_keys[engine] = str(engine.url)
    return key


def open_dbapi_connection(engine: sa.Engine, *, autocommit: bool = True) -> Any:
    """A new psycopg2 connection to the engine's database, outside its pool."""
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    connection = engine.dialect.dbapi.connect(*cargs, **cparams)  # type: ignore[union-attr]
    connection.autocommit = autocommit
    return connection


@contextlib.contextmanager
def autocommit_cursor(engine: sa.Engine) -> Iterator[Any]:
    """A cursor on this thread's autocommit connection for `engine`.

    A connection that failed (server restart, network) is dropped and the
    next call opens a fresh one.
    """
    connections: dict[tuple[int, int, str], Any] = getattr(_local, "connections", None) or {}
    _local.connections = connections
    # The URL is part of the key: a collected engine's id may be reused by another.
    key = (os.getpid(), id(engine), _url_key(engine))
    connection = connections.get(key)
    if connection is None or connection.closed:
        connection = open_dbapi_connection(engine)
        connections[key] = connection
    try:
        with connection.cursor() as cursor:
            yield cursor
    except engine.dialect.dbapi.OperationalError:  # type: ignore[union-attr]
        connections.pop(key, None)
        with contextlib.suppress(Exception):
            connection.close()
        raise


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

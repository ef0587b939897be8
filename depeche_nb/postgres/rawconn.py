"""Direct DBAPI access for the hot paths, pooled by the caller's SQLAlchemy engine.

SQLAlchemy's statement layer costs tens of microseconds per call, as much as
a local round trip; the write and read paths use psycopg2 cursors directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa


@contextlib.contextmanager
def autocommit_cursor(engine: sa.Engine) -> Iterator[Any]:
    """A cursor whose every statement (or multi-statement string) commits on its own."""
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        assert dbapi is not None
        dbapi.autocommit = True
        try:
            with dbapi.cursor() as cursor:
                yield cursor
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    finally:
        raw.close()

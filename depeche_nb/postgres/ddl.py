"""Run schema DDL once per process and safely when several processes race to create it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.names import lock_namespace

_done: set[tuple[str, str]] = set()
_guard = threading.Lock()
# One cluster-wide key: concurrent CREATE ... IF NOT EXISTS of the same object
# can still fail on the catalog's unique indexes, so DDL runs one at a time.
_DDL_LOCK = lock_namespace("ddl", "schema")


def run_ddl_once(engine: sa.Engine, key: str, statements: Sequence[str]) -> None:
    """Execute `statements` in one transaction under a global DDL lock, once per engine URL."""
    marker = (_url_key(engine.url), key)
    with _guard:
        if marker in _done:
            return
        run_ddl(engine, statements)
        _done.add(marker)


def run_ddl(engine: sa.Engine, statements: Sequence[str]) -> None:
    """Execute `statements` in one transaction under the global DDL lock, every time (for
    tables that come and go, such as a rebuild's new projection)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s, 0)", (_DDL_LOCK,))
        # A bare DBAPI cursor: DDL bodies contain `%` (plpgsql RAISE), which
        # parameter interpolation would misread.
        with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            for statement in statements:
                cursor.execute(statement)


def _url_key(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


def forget_ddl_for(url: sa.URL) -> None:
    """Make every `run_ddl_once` for this URL run again (its schema was dropped)."""
    key = _url_key(url)
    with _guard:
        for marker in [m for m in _done if m[0] == key]:
            _done.discard(marker)


def tables_exist(cursor: Any, *tables: str) -> bool:
    """Whether every one of the (quoted) tables exists: read-only callers ask first instead
    of creating them, or failing their transaction on a missing one."""
    cursor.execute("SELECT bool_and(to_regclass(t) IS NOT NULL) FROM unnest(%s::text[]) t", (list(tables),))
    return bool(cursor.fetchone()[0])

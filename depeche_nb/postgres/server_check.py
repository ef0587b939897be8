"""Know where you run: does the server offer what the engine needs?

The engine needs, from one PostgreSQL primary over a direct connection:

* xid8 snapshots (`pg_current_snapshot`, `pg_visible_in_snapshot`, PostgreSQL 13+)
  for exact projection;
* session advisory locks that stay with the session from one statement to the
  next, for partition locks;
* LISTEN/NOTIFY, for wake-ups.

A transaction-mode pooler (PgBouncer, and poolers like it) hands each
transaction to any server session: the session pid changes between
statements, advisory locks are left behind on a session we no longer talk
to, and LISTEN listens nowhere. CockroachDB and YugabyteDB speak the protocol
but lack the snapshot functions or advisory locks. `problems()` names each gap
with its fix; `ensure_supported(engine)` runs the check once per engine URL per
process (from `connect()`'s pool and from `rawconn`), before anything is
written, and raises `UnsupportedServerError`.
"""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.errors import UnsupportedServerError
from depeche_nb.postgres.driver import backend_pid, is_driver_error, open_connection
from depeche_nb.postgres.names import lock_namespace

_PROBE_LOCK = lock_namespace("probe", "session_lock")
_POOLER_FIX = (
    "connect directly to the PostgreSQL primary (or through a pooler in session mode, "
    "e.g. PgBouncer pool_mode = session); partition locks and LISTEN need one session "
    "per connection"
)
_verified: set[str] = set()
_guard = threading.Lock()


def problems(connection: Any) -> list[str]:
    """What the server behind `connection` (an autocommit DBAPI connection) lacks, each
    with its fix; empty when it offers everything."""
    found: list[str] = []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT version(), pg_backend_pid(), "
            "to_regproc('pg_catalog.pg_current_snapshot') IS NOT NULL, "
            "to_regproc('pg_catalog.pg_visible_in_snapshot') IS NOT NULL"
        )
        version, pid, has_snapshot, has_visible = cursor.fetchone()
        for engine_name in ("CockroachDB", "YugabyteDB"):
            if engine_name.lower() in str(version).lower() or (
                engine_name == "YugabyteDB" and "-YB-" in str(version)
            ):
                found.append(
                    f"the server is {engine_name} ({version}), which lacks the xid8 snapshots and "
                    "session advisory locks depeche-nb relies on; fix: use PostgreSQL 13 or newer"
                )
        if not (has_snapshot and has_visible):
            found.append(
                f"the server lacks pg_current_snapshot()/pg_visible_in_snapshot() ({version}); "
                "fix: use PostgreSQL 13 or newer"
            )
        # Behind PgBouncer the client knows the pooler's process id, not the server's.
        if backend_pid(connection) != pid:
            found.append(
                f"a connection pooler is in the way (the session pid is not the server's); fix: {_POOLER_FIX}"
            )
        cursor.execute("SELECT pg_backend_pid()")
        if cursor.fetchone()[0] != pid:
            found.append(
                "a transaction-mode pooler is in the way (the session changed between "
                f"statements); fix: {_POOLER_FIX}"
            )
        found += _advisory_and_listen_problems(cursor)
    return found


def _advisory_and_listen_problems(cursor: Any) -> list[str]:
    found: list[str] = []
    try:
        cursor.execute("SELECT pg_try_advisory_lock(%s, 0)", (_PROBE_LOCK,))
        locked = bool(cursor.fetchone()[0])
        # In a later statement: true only if the lock stayed with this session.
        cursor.execute("SELECT pg_advisory_unlock(%s, 0)", (_PROBE_LOCK,))
        if locked and not cursor.fetchone()[0]:
            found.append(f"session advisory locks do not stay with the session; fix: {_POOLER_FIX}")
    except Exception as exc:
        if not is_driver_error(exc):
            raise
        found.append(f"the server refuses session advisory locks ({exc}); fix: use PostgreSQL 13 or newer")
    try:
        cursor.execute("LISTEN depeche_nb_probe")
        cursor.execute("UNLISTEN depeche_nb_probe")
    except Exception as exc:
        if not is_driver_error(exc):
            raise
        found.append(f"the server refuses LISTEN ({exc}); fix: use PostgreSQL, directly or in session mode")
    return found


def ensure_supported(engine: sa.Engine) -> None:
    """Raise `UnsupportedServerError` if the server lacks what the engine needs; checks
    once per engine URL per process, on a connection of its own."""
    key = engine.url.render_as_string(hide_password=False)
    if key in _verified:
        return
    with _guard:
        if key in _verified:
            return
        connection = open_connection(engine)
        try:
            found = problems(connection)
        finally:
            connection.close()
        if found:
            raise UnsupportedServerError(
                f"depeche-nb cannot run on {engine.url.render_as_string(hide_password=True)}: "
                + "; ".join(found)
            )
        _verified.add(key)


__all__ = ["ensure_supported", "problems"]

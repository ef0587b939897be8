"""`DbLockProvider`: non-blocking named locks as PostgreSQL session advisory locks.

All locks of one provider live on one dedicated connection: if the process
dies, PostgreSQL ends the session and releases every lock it held, so other
workers take over its partitions without any lease timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.rawconn import autocommit_cursor, open_dbapi_connection

_MASK32 = 0xFFFFFFFF
_HELD_SQL = """
    SELECT u.i FROM unnest(%s::int[], %s::int8[], %s::int8[]) AS u(i, hi, lo)
    WHERE EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = u.hi::oid AND l.objid = u.lo::oid
    )
"""


def advisory_key(namespace: str, name: str) -> int:
    """A signed 64-bit key; 64 bits make accidental collisions between names negligible."""
    digest = hashlib.blake2b(f"depeche_nb:{namespace}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class DbLockProvider:
    """`lock(name)` -> True if acquired now (never blocks); `unlock(name)` releases it."""

    def __init__(self, name: str, engine: sa.Engine) -> None:
        self.name = validate_name(name, "lock provider name")
        self._engine = engine
        self._connection: Any = None
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    def _cursor(self) -> Any:
        if self._connection is None or self._connection.closed:
            self._held.clear()  # a new session holds nothing
            self._connection = open_dbapi_connection(self._engine)
        return self._connection.cursor()

    def lock(self, name: str) -> bool:
        with self._mutex:
            if name in self._held:
                return False
            with self._cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key(self.name, name),))
                acquired = bool(cursor.fetchone()[0])
            if acquired:
                self._held.add(name)
            return acquired

    def unlock(self, name: str) -> None:
        with self._mutex:
            if name not in self._held:
                raise KeyError(f"lock {name!r} is not held by this provider")
            self._held.discard(name)
            with self._cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(self.name, name),))

    def held(self) -> frozenset[str]:
        with self._mutex:
            return frozenset(self._held)

    def held_by_anyone(self, names: Sequence[str]) -> set[str]:
        """Which of `names` some session (any provider object of this name, any process)
        holds right now; read from `pg_locks`, taking nothing."""
        if not names:
            return set()
        keys = [advisory_key(self.name, name) for name in names]
        # A bigint advisory key shows in pg_locks as its unsigned 32-bit halves;
        # Python's >> on a negative int shifts arithmetically, so mask.
        high = [(key >> 32) & _MASK32 for key in keys]
        low = [key & _MASK32 for key in keys]
        with autocommit_cursor(self._engine) as cursor:
            cursor.execute(_HELD_SQL, (list(range(len(keys))), high, low))
            return {names[row[0]] for row in cursor.fetchall()}

    def finalize(self) -> None:
        """Close the lock session, releasing every lock at once."""
        with self._mutex:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    self._connection.close()
            self._connection = None
            self._held.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.finalize()

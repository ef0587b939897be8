"""`DbLockProvider`: non-blocking named locks as PostgreSQL session advisory locks.

All locks of one provider live on one dedicated connection: if the process
dies, PostgreSQL ends the session and releases every lock it held, so other
workers take over its partitions without any lease timeout.

The session can also end while the process lives (a terminated backend, a
network drop, a failover): its locks are gone at that moment. `still_holds`
tells, without a round trip in the common case: an idle session receives
nothing, so a readable socket means the server wrote (a termination notice,
or end of file) and a `SELECT 1` then settles it. A lost session's locks move
to `lost()`; unlocking one of them is a no-op. Locks alone cannot stop a
runner that lost them, which is why acknowledgements are fenced too (see
`postgres.state_table`). The session opts out of `idle_session_timeout`,
which would otherwise end it between batches.
"""

from __future__ import annotations

import contextlib
import dataclasses as _dc
import datetime as _dt
import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.driver import (
    PSYCOPG,
    backend_pid,
    driver_of,
    is_closed,
    is_driver_error,
    render,
    script_finished,
    script_rows,
    send_script,
    socket_watch,
)
from depeche_nb.postgres.rawconn import (
    Prepared,
    autocommit_cursor,
    execute_prepared,
    open_dbapi_connection,
    prepared_sql,
)

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

# Who holds each of the given keys: the holding session's pid from pg_locks, and from
# pg_stat_activity what PostgreSQL knows about that session. PostgreSQL keeps no time at
# which an advisory lock was granted: the session's start and the end of its last statement
# bound it. Reading both views takes no lock.
_HOLDERS_SQL = """
    SELECT u.i, l.pid, a.application_name, host(a.client_addr), a.client_hostname, a.client_port,
           a.backend_start, a.state, a.state_change, a.usename
    FROM unnest(%s::int[], %s::int8[], %s::int8[]) AS u(i, hi, lo)
    JOIN pg_locks l ON l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = u.hi::oid AND l.objid = u.lo::oid
    LEFT JOIN pg_stat_activity a ON a.pid = l.pid
"""


# Set once on every lock session:
# - no idle timeouts, which would end the session (and its locks) between batches;
# - asynchronous commit: what commits on this session (a claim's fencing token, see
#   `DbLockProvider.lock_with`) needs no flush of its own; the acknowledgement that depends
#   on it commits synchronously, which flushes it too;
# - no bitmap scans: a claim reads a partition's next rows with ORDER BY position LIMIT n.
#   On a table not yet analysed (a fresh stream, a bulk import) the planner expects a few
#   rows and prefers a bitmap scan of every row after the position plus a sort, so each
#   batch would read the rest of its partition. The ordered index scan stops after n.
LOCK_SESSION_SETTINGS = (
    "SET idle_session_timeout = 0; SET idle_in_transaction_session_timeout = 0; "
    "SET synchronous_commit = off; SET enable_bitmapscan = off"
)


@_dc.dataclass(frozen=True)
class LockHolder:
    """The session holding an advisory lock right now, as `pg_stat_activity` shows it.

    Without the privileges of `pg_read_all_stats`, another role's session shows only its
    pid (the other fields are None). `client_addr` is None for a Unix-socket connection.
    The lock was granted by one of the session's statements, so at some time between
    `backend_start` and `state_change` (when its last statement ended or the current one
    began).
    """

    pid: int
    application_name: str | None
    client_addr: str | None
    client_hostname: str | None
    client_port: int | None
    backend_start: _dt.datetime | None
    state: str | None
    state_change: _dt.datetime | None
    user: str | None

    @property
    def client(self) -> str:
        """Where the session connects from, as text."""
        if self.client_addr is None:
            # -1: a Unix socket; None: not visible to this role.
            return "local socket" if self.client_port == -1 else "unknown"
        host = self.client_hostname or self.client_addr
        return f"{host}:{self.client_port}" if self.client_port else host


def _key_halves(keys: Sequence[int]) -> tuple[list[int], list[int]]:
    # A bigint advisory key shows in pg_locks as its unsigned 32-bit halves;
    # Python's >> on a negative int shifts arithmetically, so mask.
    return [(key >> 32) & _MASK32 for key in keys], [key & _MASK32 for key in keys]


def lock_holders(cursor: Any, keys: Sequence[int]) -> dict[int, LockHolder]:
    """The holder of each of the advisory `keys` that some session holds now, by key;
    read from `pg_locks` and `pg_stat_activity` on the caller's cursor, taking nothing."""
    if not keys:
        return {}
    high, low = _key_halves(keys)
    cursor.execute(_HOLDERS_SQL, (list(range(len(keys))), high, low))
    return {keys[row[0]]: LockHolder(*row[1:]) for row in cursor.fetchall()}


def advisory_key(namespace: str, name: str) -> int:
    """A signed 64-bit key; 64 bits make accidental collisions between names negligible."""
    digest = hashlib.blake2b(f"depeche_nb:{namespace}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@_dc.dataclass(frozen=True)
class Unlocking:
    """A lock to release with a script that does something first: `build(cursor)` gives
    the script, whose last statement calls `pg_advisory_unlock(%s)` with the lock's key,
    passed after `params` (see `DbLockProvider.run_then_unlock`)."""

    name: str
    build: Callable[[Any], str]
    params: tuple[Any, ...]


@_dc.dataclass(frozen=True)
class Locking:
    """A lock to take with the statement that needs it (see `DbLockProvider.lock_with`)."""

    name: str
    statement: Prepared
    params: dict[str, Any]


class DbLockProvider:
    """`lock(name)` -> True if acquired now (never blocks); `unlock(name)` releases it."""

    def __init__(self, name: str, engine: sa.Engine) -> None:
        self.name = validate_name(name, "lock provider name")
        self._engine = engine
        self._connection: Any = None
        self._server_has_spoken: Callable[[], bool] = lambda: True  # of `_connection`
        self._held: set[str] = set()
        self._lost: set[str] = set()
        # What `send_ahead` sent and `collect_ahead` has not taken yet, and its rows once
        # they are here (None while it runs).
        self._ahead: tuple[Unlocking | None, Locking | None] | None = None
        self._ahead_rows: list[Any] | None = None
        self._mutex = threading.Lock()

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def _cursor(self) -> Any:
        return self._session().cursor()

    def _session(self) -> Any:
        """The lock session, opened (again) if need be."""
        if self._ahead is not None:
            raise RuntimeError(f"lock provider {self.name!r}: a script sent ahead was not collected")
        if self._connection is None or is_closed(self._connection):
            self._forget_session()
            self._connection = open_dbapi_connection(self._engine)
            self._server_has_spoken = socket_watch(self._connection)
            with self._connection.cursor() as cursor:
                cursor.execute(LOCK_SESSION_SETTINGS)
        return self._connection

    def _forget_session(self) -> None:
        """The session is gone (or about to be replaced): whatever it held is lost."""
        self._lost |= self._held
        self._held.clear()
        self._ahead = self._ahead_rows = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
        self._connection = None

    def _session_alive(self) -> bool:
        connection = self._connection
        if connection is None or is_closed(connection):
            return False
        try:
            if self._ahead is not None and self._ahead_rows is None:
                # The socket speaks for the script in flight too. Once it finished, its
                # rows are taken, so that what comes next says what it says when idle.
                if not self._server_has_spoken() or not script_finished(connection):
                    return True
                self._ahead_rows = script_rows(connection)
            if not self._server_has_spoken():
                return True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        except Exception as exc:
            if not (is_driver_error(exc) or isinstance(exc, (OSError, ValueError))):
                raise
            return False

    @property
    def session_pid(self) -> int | None:
        """The server process id of the lock session (None before the first lock)."""
        connection = self._connection
        return None if connection is None or is_closed(connection) else backend_pid(connection)

    def still_holds(self, name: str) -> bool:
        """Whether this provider's session still holds lock `name` (it may have ended)."""
        with self._mutex:
            if name not in self._held:
                return False
            if not self._session_alive():
                self._forget_session()
                return False
            return True

    def lost(self) -> frozenset[str]:
        """Locks this provider held when its session ended."""
        with self._mutex:
            return frozenset(self._lost)

    def lock(self, name: str) -> bool:
        with self._mutex:
            if name in self._held:
                return False
            if self._connection is not None and not self._session_alive():
                self._forget_session()
            self._lost.discard(name)
            with self._cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key(self.name, name),))
                acquired = bool(cursor.fetchone()[0])
            if acquired:
                self._held.add(name)
            return acquired

    def lock_with(self, name: str, statement: Prepared, params: dict[str, Any]) -> list[Any] | None:
        """`lock(name)` and a statement that needs the lock, in one round trip on the lock
        session: `statement` takes the lock itself with `pg_try_advisory_lock(%(lock_key)s)`
        and says in the first column of its first row whether it got it. Returns its rows
        if it did (the lock is then held as after `lock`), else None."""
        with self._mutex:
            if name in self._held:
                return None
            if self._connection is not None and not self._session_alive():
                self._forget_session()
            self._lost.discard(name)
            key = advisory_key(self.name, name)
            with self._cursor() as cursor:
                try:
                    execute_prepared(cursor, statement, {**params, "lock_key": key})
                    rows = cursor.fetchall()
                except Exception as exc:
                    if is_driver_error(exc):
                        # It may have failed after taking the lock, which outlives the statement.
                        self._release_quietly(key)
                    raise
            if not rows or not rows[0][0]:
                return None
            self._held.add(name)
            return list(rows)

    def _release_quietly(self, key: int) -> None:
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_advisory_unlock(%s) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid() AND objsubid = 1 AND granted "
                    "AND classid = ((%s::bigint >> 32) & 4294967295)::oid "
                    "AND objid = (%s::bigint & 4294967295)::oid",
                    (key, key, key),
                )
        except Exception as exc:
            if not (is_driver_error(exc) or isinstance(exc, (OSError, ValueError, AttributeError))):
                raise
            self._forget_session()  # gone: its locks went with it

    def run_then_unlock(self, name: str, build: Callable[[Any], str], params: tuple[Any, ...]) -> Any:
        """Release lock `name` with a script that does something first, in one round trip
        on the lock session: `build(cursor)` gives the script, whose last statement calls
        `pg_advisory_unlock(%s)` with the lock's key, passed after `params`. Returns that
        statement's row, or None (running nothing) when the lock went with its session:
        then do the work elsewhere and `unlock` as usual. If the script fails the session is
        closed, which releases the lock and rolls back what the script did."""
        with self._mutex:
            if name in self._lost:
                return None
            if name not in self._held:
                raise KeyError(f"lock {name!r} is not held by this provider")
            self._held.discard(name)
            try:
                with self._cursor() as cursor:
                    cursor.execute(build(cursor), (*params, advisory_key(self.name, name)))
                    return cursor.fetchone()
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                self._forget_session()
                self._lost.discard(name)
                raise

    def run_then_unlock_and_lock_with(self, release: Unlocking, take: Locking) -> list[Any] | None:
        """`run_then_unlock` of `release` and then `lock_with` of `take`, in one round trip
        on the lock session: a runner hands one partition back (with its batch's
        acknowledgement) and claims the next. Returns the rows of `take`'s statement, whose
        first value says whether `take` was granted (it is then held), or None, running
        nothing, when `release` went with its session or `take` is held here already: then
        do both the usual way. If the script fails, the session is closed, as in
        `run_then_unlock`, and neither lock is held."""
        with self._mutex:
            if not self._can_hand_over(release, take):
                return None
            try:
                with self._cursor() as cursor:
                    cursor.execute(self._hand_over_script(cursor, release, take))
                    rows = list(cursor.fetchall())
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                self._forget_session()
                self._lost.discard(release.name)
                self._lost.discard(take.name)
                raise
            self._handed_over(release, take, rows)
            return rows

    @property
    def sends_ahead(self) -> bool:
        """Whether `send_ahead` can work here (psycopg 3; see `driver.sends_ahead`)."""
        return driver_of(self._engine) == PSYCOPG

    def send_ahead(self, release: Unlocking | None, take: Locking | None) -> bool:
        """`run_then_unlock_and_lock_with` (or only one of its halves) sent without waiting:
        the server runs it while the caller works, and `collect_ahead` takes its rows.
        Meanwhile `still_holds` still tells whether the session lives; anything else on
        this provider is refused until then. False, sending nothing, where it cannot be
        done (see `sends_ahead`, and `run_then_unlock_and_lock_with` for when it returns
        None): do it the usual way."""
        with self._mutex:
            if not self.sends_ahead or (release is None and take is None):
                return False
            if not self._can_hand_over(release, take):
                return False
            if release is None and self._connection is not None and not self._session_alive():
                self._forget_session()
            try:
                connection = self._session()
                with connection.cursor() as cursor:
                    script = self._hand_over_script(cursor, release, take)
                send_script(connection, script)
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                self._forget_session()
                return False
            self._ahead = (release, take)
            return True

    def collect_ahead(self) -> list[Any] | None:
        """The rows of what `send_ahead` sent (as from `run_then_unlock_and_lock_with`, or of
        the unlock when nothing was taken), waiting for them; None when its outcome is
        unknown: the session ended meanwhile or the script failed (the session is then
        closed). Then neither lock is held here and whatever the script was to do must be
        done again the usual way (a fenced acknowledgement can be made twice)."""
        with self._mutex:
            sent, self._ahead = self._ahead, None
            rows, self._ahead_rows = self._ahead_rows, None
            if sent is None or self._connection is None:
                return None
            release, take = sent
            try:
                if rows is None:
                    rows = script_rows(self._connection)
            except Exception as exc:
                if not (is_driver_error(exc) or isinstance(exc, (OSError, ValueError))):
                    raise
                self._forget_session()  # `release` moves to the lost locks
                return None
            self._handed_over(release, take, rows)
            return rows

    def _can_hand_over(self, release: Unlocking | None, take: Locking | None) -> bool:
        if release is not None:
            if release.name in self._lost:
                return False
            if release.name not in self._held:
                raise KeyError(f"lock {release.name!r} is not held by this provider")
        return take is None or take.name not in self._held

    def _hand_over_script(self, cursor: Any, release: Unlocking | None, take: Locking | None) -> str:
        parts = []
        if release is not None:
            key = advisory_key(self.name, release.name)
            parts.append(render(cursor, release.build(cursor), (*release.params, key)))
        if take is not None:
            params = {**take.params, "lock_key": advisory_key(self.name, take.name)}
            parts.append(render(cursor, prepared_sql(cursor, take.statement), params))
        return "; ".join(parts)

    def _handed_over(self, release: Unlocking | None, take: Locking | None, rows: list[Any]) -> None:
        if release is not None:
            self._held.discard(release.name)
        if take is not None:
            self._lost.discard(take.name)
            if rows and rows[0][0]:
                self._held.add(take.name)

    def unlock(self, name: str) -> None:
        with self._mutex:
            if name in self._lost:
                self._lost.discard(name)  # went with its session: nothing to release
                return
            if name not in self._held:
                raise KeyError(f"lock {name!r} is not held by this provider")
            self._held.discard(name)
            try:
                with self._cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(self.name, name),))
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                # The session broke under us: its locks are released by its end.
                self._forget_session()
                self._lost.discard(name)

    def held(self) -> frozenset[str]:
        with self._mutex:
            return frozenset(self._held)

    def held_by_anyone(self, names: Sequence[str]) -> set[str]:
        """Which of `names` some session (any provider object of this name, any process)
        holds right now; read from `pg_locks`, taking nothing."""
        if not names:
            return set()
        high, low = _key_halves([advisory_key(self.name, name) for name in names])
        with autocommit_cursor(self._engine) as cursor:
            cursor.execute(_HELD_SQL, (list(range(len(names))), high, low))
            return {names[row[0]] for row in cursor.fetchall()}

    def finalize(self) -> None:
        """Close the lock session, releasing every lock at once."""
        with self._mutex:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    self._connection.close()
            self._connection = None
            self._ahead = self._ahead_rows = None
            self._held.clear()
            self._lost.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.finalize()

"""A PostgreSQL server that a test controls and hurts: restart it (fast or immediate),
kill -9 its postmaster, terminate a backend, shorten a session timeout.

It is an ephemeral `EmbeddedServer` of its own (a private data folder and socket),
so faults never touch the session's shared server. After a restart or a kill it
comes back at the same address, as a real server does after a crash or failover.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from depeche_nb.postgres.embedded import EmbeddedServer


class FaultyServer:
    def __init__(self) -> None:
        self.server = EmbeddedServer(ephemeral=True)
        self.url = self.server.start()
        self._admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)

    def engine(self, **options: object) -> sa.Engine:
        return sa.create_engine(self.url, **options)  # type: ignore[arg-type]

    def postmaster_pid(self) -> int:
        return int((self.server.data_dir / "postmaster.pid").read_text().splitlines()[0])

    def restart(self, mode: str = "fast") -> float:
        """`pg_ctl restart -m fast|immediate`; returns how long the server was away (s)."""
        started = time.monotonic()
        self.server._run_tool(
            "pg_ctl", ["stop", "-D", str(self.server.data_dir), "-m", mode, "-w", "-t", "30"]
        )
        self.server.start()
        return time.monotonic() - started

    def kill_postmaster(self) -> float:
        """kill -9 of the postmaster (its backends die with it), then start it again."""
        started = time.monotonic()
        pid = self.postmaster_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"postmaster {pid} survived SIGKILL")
            time.sleep(0.02)
        # Backends notice their postmaster is gone and exit; wait until the socket is free.
        time.sleep(0.3)
        self.server.start()
        return time.monotonic() - started

    def sql(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._admin.connect() as conn:
            result = conn.exec_driver_sql(statement, params)
            return [tuple(row) for row in result] if result.returns_rows else []

    def terminate(self, pid: int) -> bool:
        return bool(self.sql("SELECT pg_terminate_backend(%s)", (pid,))[0][0])

    def backends(self, application_name: str | None = None) -> list[int]:
        rows = self.sql(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() AND (%s::text IS NULL OR application_name = %s)",
            (application_name, application_name),
        )
        return [int(row[0]) for row in rows]

    @contextmanager
    def setting(self, name: str, value: str) -> Iterator[None]:
        """A server-wide setting (ALTER SYSTEM + reload) for the duration of the block."""
        self.sql(f"ALTER SYSTEM SET {name} = '{value}'")
        self.sql("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            self.sql(f"ALTER SYSTEM RESET {name}")
            self.sql("SELECT pg_reload_conf()")

    def close(self) -> None:
        self._admin.dispose()
        self.server.destroy()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

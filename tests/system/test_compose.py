"""docker-compose.yml: valid for Compose itself, and it keeps its promises.

The external validator is `docker compose config` (the Compose v2 plugin) when
installed, else `docker-compose config` (Debian's `docker-compose`, which .ci/run
installs). Neither needs a Docker daemon. The structural checks read the file
with PyYAML and always run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _validator() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    docker_compose = shutil.which("docker-compose")
    return [docker_compose] if docker_compose is not None else None


def _config(validator: list[str], path: Path, *, quiet: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *validator,
            "--project-directory",
            str(path.parent),
            "-f",
            str(path),
            "config",
            *(["-q"] if quiet else []),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=path.parent,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """`environment:` as a mapping, whichever of Compose's two spellings the file uses."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_file_passes_the_compose_validator(tmp_path: Path) -> None:
    validator = _validator()
    if validator is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs one)")
    result = _config(validator, COMPOSE_FILE, quiet=True)
    assert result.returncode == 0, result.stderr
    # The normalised file Compose would run keeps the health-gated start.
    normalised = _config(validator, COMPOSE_FILE, quiet=False)
    assert normalised.returncode == 0, normalised.stderr
    resolved = yaml.safe_load(normalised.stdout)
    assert resolved["services"]["lab"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The validator really validates: the same file with a misspelt condition is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("service_healthy", "service_healty"))
    refused = _config(validator, broken, quiet=True)
    assert refused.returncode != 0
    assert "service_healty" in refused.stderr + refused.stdout


def test_postgres_service_has_a_healthcheck_and_a_named_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    env = _environment(postgres)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= env.keys()
    test = postgres["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else str(test)
    assert "pg_isready" in command
    assert f"-U {env['POSTGRES_USER']}" in command and f"-d {env['POSTGRES_DB']}" in command
    named = [str(v).split(":", 1)[0] for v in postgres["volumes"] if not str(v).startswith((".", "/", "~"))]
    assert named, "the data must live in a named volume"
    assert set(named) <= set(compose.get("volumes") or {}), "named volumes must be declared at the top level"
    assert any(str(v).split(":")[1].startswith("/var/lib/postgresql") for v in postgres["volumes"])


def test_lab_service_points_at_postgres_and_waits_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    lab = services["lab"]
    pg_env = _environment(services["postgres"])
    dsn = urlsplit(_environment(lab)["DEPECHE_NB_DSN"])
    assert dsn.scheme in ("postgresql", "postgres")
    assert dsn.hostname == "postgres"  # the service name, resolvable on Compose's network
    assert dsn.port in (None, 5432)
    assert dsn.username == pg_env["POSTGRES_USER"]
    assert dsn.password == pg_env["POSTGRES_PASSWORD"]
    assert dsn.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert lab["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_lab_service_mounts_the_notebooks_and_serves_them(compose: dict[str, Any]) -> None:
    lab = compose["services"]["lab"]
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in lab["volumes"]}
    assert "." in mounts or "./notebooks" in mounts, mounts
    command = lab["command"] if isinstance(lab["command"], str) else " ".join(lab["command"])
    assert "jupyter lab" in command and "--ip=0.0.0.0" in command
    if "." in mounts:
        # The repository is mounted: the lab opens its notebooks folder from the working dir.
        assert lab["working_dir"] == mounts["."]
        assert re.search(r"jupyter lab .*\snotebooks\b", command), command
        assert (ROOT / "notebooks").is_dir()
    assert any(str(p).endswith("8888") for p in lab["ports"])

"""The documentation site builds strictly: every API reference resolves, every README section
a page includes exists, and the tutorials are rendered with their committed outputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _text(page: Path) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text()))


def test_the_site_builds_strictly_with_api_reference_and_tutorial_outputs(tmp_path: Path) -> None:
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    site = tmp_path / "site"
    store = _text(site / "reference" / "store" / "index.html")
    # Methods come from the docstrings, inherited ones included.
    for name in ("depeche_nb.MessageStore", "write", "read_wildcard", "synchronize"):
        assert name in store
    errors = _text(site / "reference" / "errors" / "index.html")
    assert "DefinitionChangedError" in errors and "PartitionLostError" in errors
    tutorial = _text(site / "tutorials" / "03_aggregated_streams_and_partitions" / "index.html")
    assert "RebuildReport rebuilt orders_by_type" in tutorial, "committed outputs are not rendered"
    guide = _text(site / "guide" / "index.html")
    assert "Exact aggregated streams" in guide


def test_a_broken_api_reference_fails_the_build(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", project / "README.md")
    config = (ROOT / "mkdocs.yml").read_text()
    config = re.sub(
        r"nav:.*?markdown_extensions:", "nav:\n  - Home: index.md\nmarkdown_extensions:", config, flags=re.S
    )
    config = config.replace('paths: ["."]', f'paths: ["{ROOT}"]')
    (project / "mkdocs.yml").write_text(config)
    (project / "docs" / "index.md").write_text("# Home\n\n::: depeche_nb.NoSuchThing\n")
    result = _build(project / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "depeche_nb.NoSuchThing" in result.stderr

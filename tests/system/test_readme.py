"""The README's promises: its example runs, and CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _fenced_after(marker: str, language: str) -> str:
    tail = README.split(marker, 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", tail, re.DOTALL)
    assert match, f"no {language} block after {marker}"
    return match.group(1)


def test_readme_example_runs_end_to_end(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_fenced_after("<!-- readme-example -->", "python"))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[StoredMessage(") and "stream='aggregate-me-1'" in lines[0]
    assert any(line.startswith("SubscriptionMessage(partition=2, position=") for line in lines[1:])
    assert result.stderr == ""


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.DOTALL)
    test_command = next(c for c in commands if c.rstrip().endswith("pytest"))
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command.strip() in ci_script.splitlines()

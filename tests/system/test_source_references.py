"""Comments and docstrings of the package name only files that the repository has.

A reader sent to a file that is not there (a note kept outside the repository, a
renamed notebook) is left with half an explanation.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Names of files a comment may point a reader to (Python modules are named as modules).
FILE_NAME = re.compile(r"(?<![\w.])[\w-]+(?:/[\w.-]+)*\.(?:md|ipynb|cfg|toml|ya?ml|png|txt|sh)\b")


def _comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    found = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                found.append((getattr(node, "lineno", 1), docstring))
    return found


def test_files_named_in_comments_exist() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    paths = set(tracked)
    names = {Path(p).name for p in tracked}
    missing = []
    for module in sorted((ROOT / "depeche_nb").rglob("*.py")):
        for line, text in _comments_and_docstrings(module.read_text()):
            for name in FILE_NAME.findall(text):
                if name not in paths and Path(name).name not in names:
                    missing.append(f"{module.relative_to(ROOT)}:{line}: {name}")
    assert not missing, "comments name files the repository does not have:\n" + "\n".join(missing)

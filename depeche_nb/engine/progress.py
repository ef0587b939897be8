"""Optional progress bars for long catch-up runs (`projector.run(progress=...)`, `runner.run(...)`).

`progress=True` always shows a bar, `False` never, `None` (the default) only
when it helps a person watching: in IPython, on the main thread (an
`Executor` calls `run()` from its own threads, where a bar would be noise in
whatever cell happens to be running), and with more than `AUTO_THRESHOLD`
messages waiting. The backlog is only counted when a bar may be shown, so a
headless worker pays nothing; tqdm is imported only then too.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

AUTO_THRESHOLD = 1000


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


def _interactive() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    # Not imported means not running in IPython; never import it just to ask.
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    get_ipython = getattr(ipython, "get_ipython", None)
    return callable(get_ipython) and get_ipython() is not None


def open_progress(progress: bool | None, backlog: Callable[[], int], description: str) -> ProgressBar | None:
    """A tqdm.auto bar sized to `backlog()`, or None when no bar is wanted."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {progress!r}")
    if progress is False or (progress is None and not _interactive()):
        return None
    total = backlog()
    if progress is None and total <= AUTO_THRESHOLD:
        return None
    from tqdm.auto import tqdm

    bar: ProgressBar = tqdm(total=total, desc=description, unit="msg", dynamic_ncols=True)
    return bar


__all__ = ["AUTO_THRESHOLD", "ProgressBar", "open_progress"]

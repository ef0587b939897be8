"""What an `Executor` reports about itself: `executor.health()`.

Plain snapshots (taken under no lock; counters are only ever increased by
their own worker thread), with a rich repr registered by the notebook layer.
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt

from depeche_nb.core.display import RichRepr

# Worker states.
STARTING = "starting"
RUNNING = "running"
IDLE = "idle"
BACKING_OFF = "backing off"  # a transient database error; retrying on a fresh connection
FAILED = "failed"  # a non-transient error stopped the executor
STOPPED = "stopped"


@_dc.dataclass(frozen=True)
class WorkerHealth(RichRepr):
    """One handler's worker thread."""

    handler: str
    channel: str
    state: str
    alive: bool
    runs: int
    # Transient database errors ridden out, and how many times it recovered from them.
    errors: int
    recoveries: int
    last_run_at: _dt.datetime | None
    last_error: str | None
    last_error_at: _dt.datetime | None


@_dc.dataclass(frozen=True)
class ExecutorHealth(RichRepr):
    """The executor as a whole: `reconnects` counts the workers' recoveries and the
    notification listener's reconnects since the executor started."""

    running: bool
    reconnects: int
    listener_reconnects: int
    last_error: str | None
    last_error_at: _dt.datetime | None
    workers: tuple[WorkerHealth, ...]

    @property
    def healthy(self) -> bool:
        """Running, and every worker alive and not backing off."""
        return self.running and all(w.alive and w.state not in (BACKING_OFF, FAILED) for w in self.workers)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        workers = ", ".join(f"{w.handler}: {w.state}, {w.runs} runs, {w.errors} errors" for w in self.workers)
        error = (
            f", last error {self.last_error!r} at {self.last_error_at:%H:%M:%S}" if self.last_error_at else ""
        )
        return f"<ExecutorHealth {state}, {self.reconnects} reconnects{error}; [{workers}]>"


__all__ = [
    "BACKING_OFF",
    "FAILED",
    "IDLE",
    "RUNNING",
    "STARTING",
    "STOPPED",
    "ExecutorHealth",
    "WorkerHealth",
]

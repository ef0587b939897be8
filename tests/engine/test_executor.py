"""The executor, against the real PostgreSQL of the test session (the notification listener it
uses is tested in `tests/postgres/test_listener.py`)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from depeche_nb.core.errors import InvalidIdentifierError
from depeche_nb.core.interfaces import RunOnNotificationResult, TimeBudget
from depeche_nb.engine.executor import Executor
from depeche_nb.engine.message_store import MessageStore
from depeche_nb.postgres.listener import APPLICATION_NAME
from depeche_nb.store.serializers import PydanticMessageSerializer
from tests.postgres.support import WAIT_S, notify, wait_until_gone
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


class RecordingHandler:
    """A RunOnNotification that records what the executor does with it."""

    def __init__(
        self,
        channel: str,
        *,
        interested: bool = True,
        results: list[RunOnNotificationResult | None] | None = None,
        fail_with: Exception | None = None,
    ) -> None:
        self.notification_channel = channel
        self.interested = interested
        self.results = list(results or [])
        self.fail_with = fail_with
        self.asked: list[dict[str, Any]] = []
        self.hints: list[dict[str, Any]] = []
        self.run_times: list[float] = []
        self.stopped = threading.Event()
        self._cond = threading.Condition()

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        self.asked.append(notification)
        return self.interested

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        self.hints.append(notification)

    def run(self, budget: TimeBudget | None = None) -> RunOnNotificationResult | None:
        assert budget is not None
        with self._cond:
            self.run_times.append(time.monotonic())
            self._cond.notify_all()
        if self.fail_with is not None:
            raise self.fail_with
        return self.results.pop(0) if self.results else None

    def stop(self) -> None:
        self.stopped.set()

    @property
    def runs(self) -> int:
        return len(self.run_times)

    def wait_for_runs(self, count: int, timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.runs >= count, timeout=timeout)


def listener_backends(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"
        return int(conn.execute(sa.text(sql), {"a": APPLICATION_NAME}).scalar_one())


def our_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith(("depeche-nb-executor", "depeche-nb-worker", "depeche-nb-listener"))
    }


@pytest.fixture
def executors() -> Iterator[list[Executor]]:
    """Executors a test creates are stopped even if it fails, so no thread outlives it."""
    created: list[Executor] = []
    yield created
    for ex in created:
        ex.stop(timeout=5)


def new_executor(executors: list[Executor], engine: sa.Engine, **kwargs: Any) -> Executor:
    kwargs.setdefault("disable_signals", True)
    ex = Executor(engine=engine, **kwargs)
    executors.append(ex)
    return ex


# -- Executor --------------------------------------------------------------------------------------


def test_a_store_write_runs_the_handler_without_waiting_for_the_timer(
    engine: sa.Engine, executors: list[Executor], unique_name: str
) -> None:
    store: MessageStore[Numbered] = MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    handler = RecordingHandler(store.notification_channel)
    ex = new_executor(executors, engine, stimulation_interval=60)
    assert ex.register(handler) is handler
    ex.start()
    assert ex.is_running
    assert handler.wait_for_runs(1)  # the catch-up run at start
    store.write(f"s-{uuid.uuid4()}", Numbered(number=1))
    # With a 60 s timer, only the notification can explain a second run this soon.
    assert handler.wait_for_runs(2)
    assert handler.hints == [{}]  # the store's NOTIFY has an empty payload
    time.sleep(0.2)
    assert handler.runs == 2  # one wake-up, one run: the worker does not spin
    ex.stop()
    assert not ex.is_running and handler.stopped.is_set()


def test_start_returns_at_once(engine: sa.Engine, executors: list[Executor], channel: str) -> None:
    ex = new_executor(executors, engine)
    ex.register(RecordingHandler(channel))
    started = time.monotonic()
    ex.start()
    assert time.monotonic() - started < 0.5


def test_the_safety_net_timer_runs_handlers_without_notifications(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    handler = RecordingHandler(channel)
    ex = new_executor(executors, engine, stimulation_interval=0.3)
    ex.register(handler)
    ex.start()
    assert handler.wait_for_runs(3, timeout=2.0)
    assert handler.asked == []  # no notification was involved
    gaps = [b - a for a, b in zip(handler.run_times, handler.run_times[1:], strict=False)]
    assert all(gap > 0.2 for gap in gaps)


def test_work_remaining_runs_the_handler_again_at_once(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    remaining = RunOnNotificationResult.WORK_REMAINING
    handler = RecordingHandler(channel, results=[remaining, remaining, remaining])
    ex = new_executor(executors, engine, stimulation_interval=60)
    ex.register(handler)
    ex.start()
    assert handler.wait_for_runs(4)  # the start run, then once more per WORK_REMAINING
    time.sleep(0.2)
    assert handler.runs == 4  # DONE_FOR_NOW (None) ends the series


def test_uninterested_handler_is_not_run(engine: sa.Engine, executors: list[Executor], channel: str) -> None:
    uninterested = RecordingHandler(channel, interested=False)
    interested = RecordingHandler(channel)
    ex = new_executor(executors, engine, stimulation_interval=60)
    ex.register(uninterested)
    ex.register(interested)
    ex.start()
    assert uninterested.wait_for_runs(1) and interested.wait_for_runs(1)
    notify(engine, channel, '{"partition": 3}')
    assert interested.wait_for_runs(2)  # the notification did arrive
    assert uninterested.asked == [{"partition": 3}]
    assert uninterested.hints == []
    assert uninterested.runs == 1
    assert interested.hints == [{"partition": 3}]


def test_a_failing_handler_stops_the_executor(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    error = ValueError("boom")
    failing = RecordingHandler(channel, fail_with=error)
    healthy = RecordingHandler(channel + "_b")
    ex = new_executor(executors, engine, stimulation_interval=60)
    ex.register(failing)
    ex.register(healthy)
    ex.start()
    deadline = time.monotonic() + 2.0
    while ex.is_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ex.is_running
    assert ex.errors == [(failing, error)]
    assert failing.stopped.is_set() and healthy.stopped.is_set()
    assert failing.runs == 1


def test_run_reraises_the_handler_error_after_shutdown(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    error = ValueError("boom")
    failing = RecordingHandler(channel, fail_with=error)
    ex = new_executor(executors, engine, stimulation_interval=60, disable_signals=False)
    ex.register(failing)
    safety = threading.Timer(5.0, ex.stop)  # bounds the test should run() not return
    safety.start()
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(ValueError, match="boom"):
            ex.run()
    finally:
        safety.cancel()
    assert not ex.is_running and failing.stopped.is_set()
    assert signal.getsignal(signal.SIGTERM) is previous_sigterm


def test_run_returns_when_stopped_from_another_thread(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    handler = RecordingHandler(channel)
    ex = new_executor(executors, engine, stimulation_interval=60)
    ex.register(handler)
    threading.Timer(0.3, ex.stop).start()
    started = time.monotonic()
    ex.run()
    assert time.monotonic() - started < 2.0
    assert ex.errors == [] and handler.stopped.is_set()


class BlockingHandler(RecordingHandler):
    """Runs until stop() is called, like a runner in the middle of a long batch."""

    def __init__(self, channel: str) -> None:
        super().__init__(channel)
        self.finished = threading.Event()

    def run(self, budget: TimeBudget | None = None) -> RunOnNotificationResult | None:
        super().run(budget)
        self.stopped.wait(5)
        time.sleep(0.1)  # finishing the batch takes a moment after stop()
        self.finished.set()
        return None


def test_stop_waits_for_a_running_handler_to_finish(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    handler = BlockingHandler(channel)
    ex = new_executor(executors, engine, stimulation_interval=60)
    ex.register(handler)
    ex.start()
    assert handler.wait_for_runs(1)
    ex.stop()
    assert handler.finished.is_set()
    assert not any(t.name.startswith("depeche-nb-worker") and t.is_alive() for t in threading.enumerate())


_WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    from depeche_nb.engine.executor import Executor

    class Handler:
        notification_channel = sys.argv[1]
        def interested_in_notification(self, notification): return True
        def take_notification_hint(self, notification): pass
        def run(self, budget=None):
            print("ready", flush=True)
        def stop(self): pass

    executor = Executor(stimulation_interval=60)
    executor.register(Handler())
    executor.run()
    print("stopped", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_worker_process_cleanly(channel: str, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER_SCRIPT, channel],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 15)
        assert readable, "the worker did not start"
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"


def test_repeated_start_stop_leaves_no_threads_or_connections(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    threads_before = our_threads()
    backends_before = listener_backends(engine)
    handler = RecordingHandler(channel)
    ex = new_executor(executors, engine, stimulation_interval=60)
    ex.register(handler)
    pids = []
    for round_ in range(1, 4):
        ex.start()
        assert handler.wait_for_runs(round_)
        assert ex.listener is not None
        pids.append(ex.listener.backend_pid)
        ex.stop()
        assert not ex.is_running
    assert our_threads() == threads_before
    assert all(pid is not None and wait_until_gone(engine, pid) for pid in pids)
    assert listener_backends(engine) == backends_before


def test_stop_right_after_start_leaves_nothing_behind(
    engine: sa.Engine, executors: list[Executor], channel: str
) -> None:
    threads_before = our_threads()
    backends_before = listener_backends(engine)
    ex = new_executor(executors, engine)
    ex.register(RecordingHandler(channel))
    for _ in range(3):
        ex.start()
        ex.stop()
    assert our_threads() == threads_before
    deadline = time.monotonic() + 2.0
    while listener_backends(engine) > backends_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert listener_backends(engine) == backends_before


def test_context_manager(engine: sa.Engine, channel: str) -> None:
    handler = RecordingHandler(channel)
    executor = Executor(engine=engine, stimulation_interval=60)
    executor.register(handler)
    with executor as ex:
        assert ex.is_running
        assert handler.wait_for_runs(1)
    assert not ex.is_running and handler.stopped.is_set()


def test_register_rejects_bad_handlers(engine: sa.Engine, executors: list[Executor], channel: str) -> None:
    ex = new_executor(executors, engine)
    with pytest.raises(InvalidIdentifierError):
        ex.register(RecordingHandler("x; DROP TABLE t"))
    with pytest.raises(TypeError, match="RunOnNotification"):
        ex.register(object())  # type: ignore[type-var]
    handler = RecordingHandler(channel)
    ex.register(handler)
    ex.register(handler)  # the same object twice must not get two threads
    assert ex.channel_register[channel] == [handler]
    ex.start()
    with pytest.raises(RuntimeError, match="before starting"):
        ex.register(RecordingHandler(channel))


def test_db_dsn_and_engine_are_exclusive(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="not both"):
        Executor("postgresql://x@/y", engine=engine)

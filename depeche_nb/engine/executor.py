"""Run `RunOnNotification` handlers (projectors, subscription runners) when their channel is notified.

Threads, all daemons so a forgotten executor never keeps a kernel alive:

* the listener thread (`PgNotificationListener`) LISTENs on every registered
  channel and turns each notification into wake-ups: for every handler on that
  channel that is `interested_in_notification`, it calls `take_notification_hint`
  and sets the handler's event;
* the dispatcher thread starts the listener and the workers and owns the
  shutdown, so that a failure seen by any thread ends everything the same way;
* one worker thread per handler, so a slow handler never delays another.
  A worker runs its handler with a 1 s budget, again at once while it
  reports `WORK_REMAINING`, then waits for its event.

A projector and the runners of its aggregated stream registered with the same executor
are linked in process: after each step that committed, the projector hands the partitions
it advanced ({partition: head}) to those runners and wakes them, so a write reaches its
handler without waiting for the projector's NOTIFY and a second wake-up. The hand-off is
a hint only: a runner still claims the partition (lock and fencing token) and reads under
the claim what is committed. The projector still notifies, for runners elsewhere. Linked
runners also take the messages the projector just decoded instead of decoding the same
rows again (`engine.decoded`).

The worker's wait has a timeout, `stimulation_interval` (10 s by default).
That timer is a safety net, not the way progress is made: the store sends its
NOTIFY after the commit, so a process that dies in between loses the wake-up
(never the data), and the timer bounds how long such work can wait. Workers
start only after LISTEN is active and run their handler once at start, so
nothing committed before or during start-up is missed.

Transient database errors heal (see `postgres.driver.is_transient`: a lost
connection, a server restart or crash, a failover, a serialization failure
or deadlock). The worker that saw one logs it, backs off on the bounded
schedule of `core.backoff` (0.05 s doubling to 2 s, with jitter) and runs its
handler again, whose next statements open fresh connections and retake its
locks; it runs once as soon as the database answers again, without waiting
for a write. The listener reconnects on its own, without giving up. Nothing
is lost meanwhile: an unacknowledged message is delivered again, a
projector step that did not commit is redone. This also covers a handler
whose own database work hit such an error and whose error handler chose
EXIT: the message stays unacknowledged and comes again.

Any other error stops the whole executor (as in Depeche DB: a failing
subscription must not silently fall behind). It is logged, kept in
`errors` and re-raised by `run()` after the shutdown.

`health()` reports all of this: running, reconnects, the last error and
its time, and per worker its state, runs and errors. `running_executors()`
lists the executors running in this process (held weakly), so a notebook's
operations console can show their health without being handed them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import signal
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import sqlalchemy as sa

from depeche_nb.core.backoff import backoff_delays
from depeche_nb.core.interfaces import FixedTimeBudget, RunOnNotification, RunOnNotificationResult
from depeche_nb.core.lifecycle import StartStopContext
from depeche_nb.engine import health
from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.driver import is_transient
from depeche_nb.postgres.listener import PgNotification, PgNotificationListener, validate_channel

logger = logging.getLogger("depeche_nb.executor")

H = TypeVar("H", bound=RunOnNotification)

RUN_BUDGET_SECONDS = 1.0
# How often run() looks at the flag its signal handlers set; see _on_signal.
_SIGNAL_CHECK_INTERVAL_S = 0.1
_HANDLER_METHODS = ("interested_in_notification", "take_notification_hint", "run", "stop")

ErrorCallback = Callable[[RunOnNotification, Exception], None]

# Every executor started in this process; weak, so a forgotten one is still collected.
_started: weakref.WeakSet[Executor] = weakref.WeakSet()
_started_guard = threading.Lock()


def running_executors() -> list[Executor]:
    """The executors of this process that are running now, in no particular order."""
    with _started_guard:
        started = list(_started)
    return [executor for executor in started if executor.is_running]


class _Worker:
    """The thread that runs one handler whenever it is woken (or the safety-net timer fires)."""

    def __init__(
        self,
        handler: RunOnNotification,
        stimulation_interval: float,
        stopping: threading.Event,
        on_error: ErrorCallback,
    ) -> None:
        self.handler = handler
        self._interval = stimulation_interval if stimulation_interval > 0 else None
        self._stopping = stopping
        self._on_error = on_error
        self._wake = threading.Event()
        self.thread = threading.Thread(
            target=self._loop, name=f"depeche-nb-worker[{handler.notification_channel}]", daemon=True
        )
        # Written only by this worker's thread; `health()` reads them.
        self.state = health.STARTING
        self.runs = 0
        self.errors = 0
        self.recoveries = 0
        self.last_run_at: _dt.datetime | None = None
        self.last_error: str | None = None
        self.last_error_at: _dt.datetime | None = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        delays = None  # the backoff schedule while the database is away
        while True:
            # Clear before running: a wake-up that arrives during the run is
            # kept and causes one more run, so none is lost.
            self._wake.clear()
            if self._stopping.is_set():
                self.state = health.STOPPED
                return
            try:
                self._run_until_done()
            except Exception as exc:
                if not is_transient(exc):
                    self.state = health.FAILED
                    logger.exception("handler %r failed; stopping the executor", self.handler)
                    self._on_error(self.handler, exc)
                    return
                self._note_transient(exc)
                delays = delays or backoff_delays()
                # Run again as soon as the delay is over, not at the next write.
                self._stopping.wait(next(delays))
                continue
            if delays is not None:
                delays = None
                self.recoveries += 1
                logger.info("handler %r works again after a transient database error", self.handler)
            self.state = health.IDLE
            self._wake.wait(self._interval)

    def _run_until_done(self) -> None:
        while not self._stopping.is_set():
            self.state = health.RUNNING
            result = self.handler.run(budget=FixedTimeBudget(RUN_BUDGET_SECONDS))
            self.runs += 1
            self.last_run_at = _dt.datetime.now(_dt.timezone.utc)
            if result is not RunOnNotificationResult.WORK_REMAINING:
                return

    def _note_transient(self, error: Exception) -> None:
        self.state = health.BACKING_OFF
        self.errors += 1
        self.last_error = f"{type(error).__name__}: {error}".strip()
        self.last_error_at = _dt.datetime.now(_dt.timezone.utc)
        # One line, no traceback: this is expected during a restart or failover.
        logger.warning("handler %r: transient database error, retrying: %s", self.handler, self.last_error)

    def health(self) -> health.WorkerHealth:
        return health.WorkerHealth(
            handler=repr(self.handler),
            channel=self.handler.notification_channel,
            state=self.state,
            alive=self.thread.is_alive(),
            runs=self.runs,
            errors=self.errors,
            recoveries=self.recoveries,
            last_run_at=self.last_run_at,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
        )


def _hand_off(targets: list[_Worker], heads: dict[int, int]) -> None:
    for target in targets:
        target.handler.take_handoff(heads)  # type: ignore[attr-defined]
        target.wake()


def _link_handoffs(
    workers: list[_Worker],
) -> list[tuple[RunOnNotification, Callable[[dict[int, int]], None]]]:
    """Let each projector hand the partitions it just advanced straight to this executor's
    runners of its aggregated stream, and wake them: the in-process path from a write to
    its handler skips the projector's NOTIFY round trip and a second wake-up. The projector
    still notifies, for runners in other processes; a runner treats the handoff as a hint
    and reads under its claim what the projector committed (see
    `SubscriptionRunner.take_handoff`), so this moves nothing but the wake-up earlier."""
    links: list[tuple[RunOnNotification, Callable[[dict[int, int]], None]]] = []
    for worker in workers:
        projector = worker.handler
        channel = getattr(projector, "handoff_channel", None)
        if channel is None or not callable(getattr(projector, "add_step_listener", None)):
            continue
        targets = [
            w
            for w in workers
            if w.handler.notification_channel == channel
            and callable(getattr(w.handler, "take_handoff", None))
        ]
        if not targets:
            continue

        hand_off = functools.partial(_hand_off, targets)

        projector.add_step_listener(hand_off)  # type: ignore[attr-defined]
        links.append((projector, hand_off))
    return links


class Executor(StartStopContext):
    """Runs registered handlers on notifications of their channels.

    Give a DSN or an engine; with neither, the database is resolved like
    `depeche_nb.connect()` does. `run()` blocks (a worker process; SIGINT and
    SIGTERM stop it cleanly), `start()` returns at once (a notebook), `stop()`
    ends either. Also a context manager: `with Executor(...) as ex:` runs the
    block with the executor started.
    """

    def __init__(
        self,
        db_dsn: str | None = None,
        stimulation_interval: float = 10.0,
        disable_signals: bool = False,
        *,
        engine: sa.Engine | None = None,
    ) -> None:
        if db_dsn is not None and engine is not None:
            raise ValueError("give either db_dsn or engine, not both")
        self.engine = connect(engine if engine is not None else db_dsn)
        self.stimulation_interval = stimulation_interval
        self.disable_signals = disable_signals
        self.channel_register: defaultdict[str, list[RunOnNotification]] = defaultdict(list)
        # (handler, error); the handler is None when the listener itself failed.
        self.errors: list[tuple[RunOnNotification | None, Exception]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._signalled = False
        self._listener: PgNotificationListener | None = None
        self._dispatcher: threading.Thread | None = None
        self._workers: list[_Worker] = []
        # (projector, its step listener) of the current start, see `_link_handoffs`.
        self._handoffs: list[tuple[RunOnNotification, Callable[[dict[int, int]], None]]] = []

    # -- public -------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        dispatcher = self._dispatcher
        return dispatcher is not None and dispatcher.is_alive()

    @property
    def listener(self) -> PgNotificationListener | None:
        """The listener of the current (or last) start."""
        return self._listener

    @property
    def handlers(self) -> list[RunOnNotification]:
        return [handler for handlers in self.channel_register.values() for handler in handlers]

    def worker_health(self, handler: RunOnNotification) -> health.WorkerHealth | None:
        """The health of the worker thread that runs `handler` (None if the executor was not
        started with it)."""
        worker = next((w for w in self._workers if w.handler is handler), None)
        return None if worker is None else worker.health()

    def health(self) -> health.ExecutorHealth:
        """A snapshot of how the executor fares (a rich repr in a notebook)."""
        workers = tuple(worker.health() for worker in self._workers)
        listener = self._listener
        listener_reconnects = listener.reconnects if listener is not None else 0
        errors = [w for w in workers if w.last_error_at is not None]
        last = max(errors, key=lambda w: w.last_error_at or _dt.datetime.min, default=None)
        return health.ExecutorHealth(
            running=self.is_running,
            reconnects=listener_reconnects + sum(w.recoveries for w in workers),
            listener_reconnects=listener_reconnects,
            last_error=last.last_error if last is not None else None,
            last_error_at=last.last_error_at if last is not None else None,
            workers=workers,
        )

    def register(self, handler: H) -> H:
        """Run `handler` on notifications of `handler.notification_channel`; returns `handler`."""
        missing = [name for name in _HANDLER_METHODS if not callable(getattr(handler, name, None))]
        if missing:
            raise TypeError(f"{handler!r} is not a RunOnNotification: it lacks {', '.join(missing)}")
        channel = validate_channel(handler.notification_channel)
        with self._lock:
            if self.is_running:
                raise RuntimeError("register handlers before starting the executor")
            registered = self.channel_register[channel]
            # Registering twice would run one handler on two threads at once.
            if not any(h is handler for h in registered):
                registered.append(handler)
        return handler

    def start(self) -> None:
        """Start listening and running handlers in background threads; returns at once."""
        with self._lock:
            if self.is_running:
                raise RuntimeError("the executor is already running")
            self.errors = []
            self._signalled = False
            # A fresh event per start: threads of an earlier start that are
            # still finishing keep seeing their own (set) event.
            self._stopping = stopping = threading.Event()
            self._workers = [
                _Worker(handler, self.stimulation_interval, stopping, self._handler_failed)
                for handler in self.handlers
            ]
            self._handoffs = _link_handoffs(self._workers)
            by_channel: defaultdict[str, list[_Worker]] = defaultdict(list)
            for worker in self._workers:
                by_channel[worker.handler.notification_channel].append(worker)
            # reconnect_delays=None: the listener never gives up while the executor runs.
            # Its thread wakes the workers itself (no hand-off to the dispatcher thread).
            self._listener = PgNotificationListener(
                self.engine,
                list(self.channel_register),
                reconnect_delays=None,
                on_notification=lambda n: self._dispatch(n, by_channel[n.channel]),
            )
            self._dispatcher = threading.Thread(
                target=self._dispatch_main,
                args=(self._listener, self._workers, stopping),
                name="depeche-nb-executor",
                daemon=True,
            )
            self._dispatcher.start()
        with _started_guard:
            _started.add(self)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, call `stop()` on every handler, and wait for all threads to end."""
        self._request_stop()
        dispatcher = self._dispatcher
        current = threading.current_thread()
        if dispatcher is None or current is dispatcher or any(w.thread is current for w in self._workers):
            return  # called from inside: the dispatcher finishes the shutdown on its own
        dispatcher.join(timeout)
        if dispatcher.is_alive():
            logger.warning("the executor did not stop within %.1f s", timeout)

    def run(self) -> None:
        """Run until stopped (by `stop()`, SIGINT/SIGTERM or a failing handler).

        Re-raises the first handler error, after the shutdown.
        """
        restore_signals = self._install_signal_handlers()
        try:
            self.start()
            try:
                self._wait_for_stop_request()
            finally:
                self.stop()
        finally:
            restore_signals()
        if self.errors:
            raise self.errors[0][1]

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"Executor(channels={list(self.channel_register)!r}, handlers={len(self.handlers)}, {state})"

    # -- threads ------------------------------------------------------------------------------

    def _dispatch_main(
        self, listener: PgNotificationListener, workers: list[_Worker], stopping: threading.Event
    ) -> None:
        try:
            if not self._start_listening(listener, stopping):
                return
            for worker in workers:
                worker.thread.start()
            # Notifications are dispatched on the listener's thread; this ends with it.
            for _ in listener.messages():
                pass
        except Exception as exc:
            logger.exception("the executor's notification listener failed; stopping the executor")
            self.errors.append((None, exc))
        finally:
            self._shut_down(listener, workers, stopping)

    def _start_listening(self, listener: PgNotificationListener, stopping: threading.Event) -> bool:
        # Under the lock so that a stop() racing with start-up either prevents
        # the listener from starting or finds it started and stops it.
        with self._lock:
            if stopping.is_set():
                return False
            listener.start()
            return True

    def _dispatch(self, notification: PgNotification, workers: list[_Worker]) -> None:
        for worker in workers:
            handler = worker.handler
            try:
                if handler.interested_in_notification(notification.payload):
                    handler.take_notification_hint(notification.payload)
                    worker.wake()
            except Exception as exc:
                logger.exception("handler %r failed on a notification; stopping the executor", handler)
                self._handler_failed(handler, exc)

    def _handler_failed(self, handler: RunOnNotification, error: Exception) -> None:
        self.errors.append((handler, error))
        self._request_stop()

    def _request_stop(self) -> None:
        with self._lock:
            self._stopping.set()
            listener = self._listener
        if listener is not None:
            listener.stop()  # ends the dispatcher's messages() loop, which then shuts down

    def _shut_down(
        self, listener: PgNotificationListener, workers: list[_Worker], stopping: threading.Event
    ) -> None:
        stopping.set()
        listener.stop()
        for projector, step_listener in self._handoffs:
            projector.remove_step_listener(step_listener)  # type: ignore[attr-defined]
        for handler in (worker.handler for worker in workers):
            try:
                handler.stop()
            except Exception:
                logger.exception("handler %r failed to stop", handler)
        for worker in workers:
            worker.wake()
        for worker in workers:
            if worker.thread.is_alive():
                worker.thread.join()

    # -- signals ------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> Callable[[], None]:
        """Route SIGINT/SIGTERM to a clean stop; returns what restores the previous handlers."""
        if self.disable_signals or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler runs between two bytecodes of the main
        # thread, which may hold a lock that Event.set() or stop() would need.
        self._signalled = True

    def _wait_for_stop_request(self) -> None:
        while not self._stopping.wait(_SIGNAL_CHECK_INTERVAL_S):
            if self._signalled:
                logger.info("signal received; stopping the executor")
                return

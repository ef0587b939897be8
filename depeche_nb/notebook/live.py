"""Live refresh for widgets: LISTEN in a background thread, update widgets on the kernel's thread.

Why this shape:

* No polling: a `PgNotificationListener` wakes the thread the moment a
  NOTIFY arrives on the widget's channels (store or aggregated stream).
* Throttled and coalescing: a busy store can send thousands of notifications
  a second; the thread refreshes at most once per `min_interval` (0.5 s, so
  at most about two refreshes a second) and folds every notification that
  arrived meanwhile into that one refresh. A notification during the wait
  is never lost: it leaves the state "dirty", which the next refresh clears.
* Widgets are touched on the kernel's main thread only. ipywidgets' trait
  updates and comm messages are not meant to come from arbitrary threads
  (a `with out:` from another thread races with the cell's own output
  capture, and inside IPython `Output.__exit__` swallows exceptions), so in a
  kernel the thread only schedules the refresh with
  `get_ipython().kernel.io_loop.add_callback(...)` (a tornado IOLoop on the
  main thread in ipykernel 6 and 7; `add_callback` is its one thread-safe
  method). At most one such callback is pending at a time. A long-running
  cell blocks that loop, so the refresh then happens when the cell ends:
  live updates never interrupt or slow down the user's code. Outside a
  kernel (plain Python, pytest) there is no loop and no frontend; the
  thread calls the refresh itself and the widget serialises it with its own
  lock.
* `idle_interval` (off by default) adds a slow timer for widgets whose data
  also changes without a notification (acknowledgements, locks, parked
  messages): a refresh when that many seconds passed without one. It is a
  safety net on top of the notifications, as the Executor's timer is.
* The refresher holds the widget only weakly, so a forgotten widget can
  still be collected; `stop()` (called by the widget's `close()`) ends the
  thread and closes the LISTEN connection.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.listener import PgNotificationListener

logger = logging.getLogger("depeche_nb.widgets")

# Seconds between two refreshes of one widget, at least.
MIN_INTERVAL = 0.5
_JOIN_TIMEOUT_S = 10.0


def kernel_io_loop() -> Any | None:
    """The running IPython kernel's main-thread IOLoop, or None outside a kernel."""
    # Never import IPython just to ask: not imported means not in a kernel.
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if not callable(get_ipython):
        return None
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    loop = getattr(kernel, "io_loop", None)
    return loop if callable(getattr(loop, "add_callback", None)) else None


class LiveRefresher:
    """Calls `callback` (soon, throttled) after notifications on `channels`, until `stop()`.

    `io_loop`: where to run the callback; the default finds the kernel's loop
    (None outside a kernel: the thread calls it directly).
    """

    def __init__(
        self,
        engine: sa.Engine,
        channels: Sequence[str],
        callback: Callable[[], None],
        *,
        min_interval: float = MIN_INTERVAL,
        idle_interval: float | None = None,
        io_loop: Any | None = ...,
        name: str = "depeche-nb-live",
    ) -> None:
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0, got {min_interval}")
        if idle_interval is not None and not idle_interval > 0:
            raise ValueError(f"idle_interval must be > 0 or None, got {idle_interval}")
        self.channels = list(channels)
        self.min_interval = min_interval
        self.idle_interval = idle_interval
        self.io_loop = kernel_io_loop() if io_loop is ... else io_loop
        # A bound method is held weakly (see the module notes); other callables strongly.
        self._callback: Callable[[], Callable[[], None] | None]
        if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
            self._callback = weakref.WeakMethod(callback)
        else:
            self._callback = lambda: callback
        self._listener = PgNotificationListener(engine, self.channels)
        self._stopping = threading.Event()
        self._scheduled = threading.Event()  # a callback waits on the io_loop
        self._thread: threading.Thread | None = None
        self._name = name
        self.error: BaseException | None = None
        self.refreshes = 0  # callbacks delivered (for tests and curiosity)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def is_running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """LISTEN (before returning, so nothing sent afterwards is missed) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("this LiveRefresher was already started")
        self._listener.start()
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread and close the LISTEN connection; idempotent, callable from any thread."""
        self._stopping.set()
        # Ends the listener's thread and connection; our blocked messages() call then returns.
        self._listener.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(_JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("a widget's live-refresh thread did not stop within %.0f s", _JOIN_TIMEOUT_S)

    # -- the thread ---------------------------------------------------------------------------

    def _main(self) -> None:
        dirty = False
        last = float("-inf")
        # The widget drew itself when it started this refresher: the idle timer counts from now.
        quiet_since = time.monotonic()
        try:
            while not self._stopping.is_set():
                wait: float | None = None
                if dirty:
                    wait = last + self.min_interval - time.monotonic()
                elif self.idle_interval is not None:
                    wait = quiet_since + self.idle_interval - time.monotonic()
                if wait is not None and wait <= 0:
                    dirty = False
                    last = quiet_since = time.monotonic()
                    if not self._dispatch():
                        return
                    continue
                if self._next_notification(wait):
                    dirty = True
                elif wait is None or not self._listener.is_running:
                    return  # the listener ended: stop() was called
        except Exception as exc:  # the listener gave up reconnecting
            logger.warning("live refresh stopped: %s", exc)
            self.error = exc
        finally:
            self._listener.stop()

    def _next_notification(self, wait: float | None) -> bool:
        """Block until a notification (True), `wait` seconds passed or the listener ended."""
        # timeout=0 means "no timeout" for messages(); a tiny positive wait must stay positive.
        timeout = 0.0 if wait is None else max(wait, 1e-3)
        for _ in self._listener.messages(timeout=timeout):
            return True
        return False

    def _dispatch(self) -> bool:
        """Run the callback now (no kernel) or schedule it on the kernel's loop.
        False when the widget is gone."""
        if self._callback() is None:
            return False
        loop = self.io_loop
        if loop is None:
            self._deliver()
            return True
        if self._scheduled.is_set():
            return True  # one pending callback will read the latest state anyway
        self._scheduled.set()
        try:
            loop.add_callback(self._deliver_scheduled)
        except RuntimeError:  # the loop is closed: the kernel is shutting down
            return False
        return True

    def _deliver_scheduled(self) -> None:
        self._scheduled.clear()
        self._deliver()

    def _deliver(self) -> None:
        if self._stopping.is_set():
            return
        callback = self._callback()
        if callback is None:
            return
        try:
            callback()
            self.refreshes += 1
        except Exception:
            # The widget shows its own errors; this only keeps the io_loop and thread alive.
            logger.exception("a widget's live refresh failed")


__all__ = ["MIN_INTERVAL", "LiveRefresher", "kernel_io_loop"]

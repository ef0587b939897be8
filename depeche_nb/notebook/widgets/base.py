"""The base of the ipywidgets for exploring a store, an aggregated stream's partitions and a subscription.

* `StreamBrowser(store)`: page through the messages of a stream or LIKE
  pattern and look at one message's payload.
* `PartitionMap(aggregated_stream)`: which origin stream landed in which
  partition at which position, as a coloured grid beside the latest
  assignments.
* `SubscriptionStepper(subscription)`: Step / Step N / Run to end / Reset,
  what the last step handled and every partition's position, head and lag.
* `AggregateTimeline(repo, id)`: a slider (and Play) over an event-sourced
  aggregate's versions: the state after each event, the event, and the fields
  it changed, highlighted.

Shared behaviour (`DnbWidget`):

* All HTML is built with `notebook.html` (escaped, bounded, theme-neutral,
  no JavaScript). Where widgets do not render (GitHub, nbviewer, plain
  nbconvert) the output's text/html is a static snapshot of the same
  tables: each widget's mime bundle carries text/plain and text/html next
  to the widget view.
* One database action at a time per widget: recent JupyterLab/ipykernel can
  run button callbacks concurrently with a cell (and live refreshes run on
  a schedule of their own), so clicks take a lock and a click that arrives
  while another action runs is refused with a visible note instead of
  queueing up. Database work uses the library's thread-local connections,
  so a click never shares a connection with another thread.
* Errors never vanish: `print` in a click callback shows nowhere in
  JupyterLab, so an exception (a failing handler, a database that went
  away) is shown in the widget's error line and kept in `last_error`.
* `live=True` (default: when running in a kernel) refreshes from
  LISTEN/NOTIFY without polling; see `notebook.live`. `close()` stops it.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ipywidgets as widgets

from depeche_nb.engine.handlers import HANDLED
from depeche_nb.engine.runner import RunnerReport
from depeche_nb.notebook import html as h
from depeche_nb.notebook import live as _live
from depeche_nb.notebook.live import MIN_INTERVAL, LiveRefresher
from depeche_nb.notebook.widgets.style import TRACEBACK_CHARS, WIDGET_STYLE


def page(*parts: str) -> str:
    """Like `h.box`, with the widgets' extra style sheet."""
    return h.box(WIDGET_STYLE, *parts)


def error_html(error: BaseException, context: str = "") -> str:
    """The error line, and the traceback behind a "show traceback" toggle.

    The toggle is a plain `<details>` element: it opens in the browser without a
    round trip to the kernel, and works in the static snapshot too. The
    traceback includes the exception's notes (the runner's names the failed
    message); when long, its end is kept, where the error and the notes are.
    """
    text = f"{type(error).__name__}: {error}"
    if context:
        text = f"{context}: {text}"
    parts = [f'<div class="dnb-error">{h.esc(h.cut(text, 2000))}</div>']
    if error.__traceback__ is not None:
        trace = "".join(traceback.format_exception(error))
        if len(trace) > TRACEBACK_CHARS:
            trace = f"… ({len(trace) - TRACEBACK_CHARS:,} characters cut)\n" + trace[-TRACEBACK_CHARS:]
        parts.append(
            '<details class="dnb-traceback"><summary>show traceback</summary>'
            f'<pre class="dnb-pre">{h.esc(trace)}</pre></details>'
        )
    return "".join(parts)


class DnbWidget(widgets.VBox):  # type: ignore[misc]
    """A VBox with a lock for database actions, an error line, live refresh and a static snapshot."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._action_lock = threading.Lock()
        self._stale = False
        self._refresh_failed = False
        self._live: LiveRefresher | None = None
        self.last_error: BaseException | None = None
        # The error line's content, also part of the static snapshot.
        self._error_body = ""
        self.error = widgets.HTML(value="")
        self.error.add_class("dnb-error-line")
        self.status = widgets.HTML(value="")

    # -- live refresh -------------------------------------------------------------------------

    def _start_live(
        self, live: bool | None, engine: Any, channels: Sequence[str], idle_interval: float | None = None
    ) -> None:
        io_loop = _live.kernel_io_loop()
        if live is None:
            live = io_loop is not None
        if not live:
            return
        refresher = LiveRefresher(
            engine,
            channels,
            self._on_notification,
            min_interval=MIN_INTERVAL,
            idle_interval=idle_interval,
            io_loop=io_loop,
            name=f"depeche-nb-live-{type(self).__name__}",
        )
        try:
            refresher.start()
        except Exception as error:
            # The widget still works by its buttons; say why it will not follow changes.
            self._show_error(error, "live refresh unavailable")
            return
        self._live = refresher

    @property
    def live(self) -> bool:
        """True while the widget refreshes itself from notifications."""
        return self._live is not None and self._live.is_running

    @property
    def live_thread(self) -> threading.Thread | None:
        return None if self._live is None else self._live.thread

    def _on_notification(self) -> None:
        # Marked first, so an action that holds the lock right now refreshes once more at its end.
        self._stale = True
        self._run_locked(None)

    # -- actions ------------------------------------------------------------------------------

    def _run_locked(self, action: Callable[[], None] | None, busy: str = "") -> bool:
        """Run `action` (then any refresh that notifications asked for) under the lock.

        Returns False, showing `busy`, when another action is running. The
        loop around the lock closes the race where a notification marks the
        widget stale just after the holder last looked and before it released.
        """
        while True:
            if not self._action_lock.acquire(blocking=False):
                if action is not None and busy:
                    self.status.value = page(h.note(busy))
                return False
            try:
                if action is not None:
                    self._clear_error()
                    if self.status.value:
                        self.status.value = ""  # an old "busy" note no longer applies
                    try:
                        action()
                    except Exception as error:
                        self._show_error(error)
                    action = None
                while self._stale:
                    self._stale = False
                    self._guarded_refresh()
            finally:
                self._action_lock.release()
            if not self._stale:
                return True

    def _guarded_refresh(self) -> None:
        try:
            self._refresh()
        except Exception as error:
            self._show_error(error, "could not refresh")
            self._refresh_failed = True
            return
        if self._refresh_failed:
            # Only a refresh's own error goes away with a good refresh; a handler's error
            # stays until the next click.
            self._refresh_failed = False
            self._clear_error()

    def refresh(self) -> None:
        """Re-read the database and redraw.

        While an action (a click) runs, that action redraws once more at its
        end instead: this never waits, so it cannot deadlock when called from
        a message handler that a Step is running.
        """
        self._stale = True
        self._run_locked(None)

    def _refresh(self) -> None:
        raise NotImplementedError

    def _show_error(self, error: BaseException, context: str = "") -> None:
        self.last_error = error
        self._error_body = error_html(error, context)
        self.error.value = page(self._error_body)

    def _clear_error(self) -> None:
        self.last_error = None
        self._refresh_failed = False
        self._error_body = ""
        if self.error.value:
            self.error.value = ""

    # -- display ------------------------------------------------------------------------------

    def snapshot_html(self) -> str:
        """The widget's current view as self-contained HTML (what GitHub/nbviewer show)."""
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.snapshot_html()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # The widget view for live frontends, plus the static snapshot every
        # other renderer falls back to (they skip the widget mime type).
        bundle: dict[str, Any] = dict(super()._repr_mimebundle_(**kwargs))
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = self.snapshot_html()
        return bundle

    def close(self) -> None:
        """Stop the live refresh (thread and LISTEN connection) and close the widget views."""
        # getattr: __del__ calls close() also on an instance whose __init__ failed early.
        live, self._live = getattr(self, "_live", None), None
        if live is not None:
            live.stop()
        for child in descendants(self):
            child.close()
        super().close()


def descendants(widget: Any) -> Iterable[Any]:
    for child in getattr(widget, "children", ()):
        yield from descendants(child)
        yield child


def make_button(description: str, css: str, tooltip: str = "", icon: str = "") -> Any:
    button = widgets.Button(description=description, tooltip=tooltip or description, icon=icon)
    button.add_class(css)
    button.layout.width = "auto"
    return button


def step_words(report: RunnerReport) -> str:
    """'3 messages handled', or with the other outcomes: '5 messages — 4 handled, 1 failed'."""
    if not report.handled:
        return "nothing to do"
    messages = h.count(len(report.handled), "message")
    if set(report.counts()) == {HANDLED}:
        return f"{messages} handled"
    return f"{messages} — {report.describe()}"


def positive_int(name: str, value: object, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value

"""ipywidgets for exploring a store, an aggregated stream's partitions and a subscription.

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

Shared behaviour (`_DnbWidget`):

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

import hashlib
import json
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ipywidgets as widgets

from depeche_nb.engine.aggregated_stream import AggregatedStream
from depeche_nb.engine.frames import PartitionState, subscription_overview
from depeche_nb.engine.handlers import HANDLED
from depeche_nb.engine.projector import ProjectionReport
from depeche_nb.engine.runner import RunnerReport
from depeche_nb.engine.subscription import Subscription
from depeche_nb.event_sourcing.history import STATE_PREFIX, AggregateHistory, HistoryStep
from depeche_nb.event_sourcing.repository import EventStoreRepo
from depeche_nb.notebook import html as h
from depeche_nb.notebook import live as _live
from depeche_nb.notebook import reprs
from depeche_nb.notebook.live import MIN_INTERVAL, LiveRefresher
from depeche_nb.store.message_store import MessageStoreBase

# Colours for origin streams: light enough for the dark cell text on light and dark
# themes, few enough to tell apart (ColorBrewer Set3 plus four). Two streams can share
# one; the legend key in each cell tells them apart.
PALETTE = (
    "#8dd3c7",
    "#ffffb3",
    "#bebada",
    "#fb8072",
    "#80b1d3",
    "#fdb462",
    "#b3de69",
    "#fccde5",
    "#d9d9d9",
    "#bc80bd",
    "#ccebc5",
    "#ffed6f",
    "#66c2a5",
    "#e78ac3",
    "#c49c94",
    "#9edae5",
)

WIDGET_STYLE = (
    "<style>"
    ".dnb .dnb-pm-layout{display:flex;flex-wrap:wrap;gap:8px 24px;align-items:flex-start}"
    ".dnb table.dnb-pm-grid{border-collapse:separate;border-spacing:2px;margin:0 0 4px 0}"
    ".dnb .dnb-pm-grid th{font-weight:600;padding:0 6px 0 0;text-align:right;white-space:nowrap;"
    "vertical-align:bottom;"
    "background:transparent;color:inherit;border:0}"
    ".dnb .dnb-pm-grid td{min-width:18px;height:18px;padding:0 3px;text-align:center;font-size:11px;"
    "border:0;white-space:nowrap}"
    ".dnb .dnb-pm-grid td.dnb-pm-cell{color:#111;border-radius:2px}"
    ".dnb .dnb-pm-grid td.dnb-pm-more,.dnb .dnb-pm-grid td.dnb-pm-range{opacity:.7;background:transparent;"
    "color:inherit;text-align:right}"
    ".dnb .dnb-pm-legend{display:flex;flex-wrap:wrap;gap:2px 12px;margin:4px 0 0 0}"
    ".dnb .dnb-pm-swatch{display:inline-block;min-width:16px;padding:0 3px;"
    "text-align:center;color:#111;border-radius:2px;font-size:11px}"
    + "".join(f".dnb .dnb-c{i}{{background:{colour}}}" for i, colour in enumerate(PALETTE))
    + ".dnb .dnb-bar{display:inline-block;width:160px;height:10px;vertical-align:middle;"
    "background:rgba(128,128,128,.25);border-radius:2px;overflow:hidden}"
    ".dnb .dnb-bar-fill{display:block;height:100%;background:var(--jp-brand-color1,#2f7ed8)}"
    ".dnb .dnb-bar-done .dnb-bar-fill{background:var(--jp-success-color1,#3a9a3a)}"
    ".dnb .dnb-alt{display:none}"
    ".dnb details.dnb-traceback summary{cursor:pointer;opacity:.8}"
    ".dnb pre.dnb-json,.dnb pre.dnb-pre{font-family:var(--jp-code-font-family,monospace);"
    "font-size:inherit;margin:2px 0;padding:0;white-space:pre-wrap;word-break:break-all;"
    "background:transparent;color:inherit;max-height:400px;overflow:auto}"
    "</style>"
)

# Only in the timeline's pages: the other widgets' committed tutorial outputs stay as they are.
TIMELINE_STYLE = (
    "<style>.dnb .dnb-table tr.dnb-changed td{background:rgba(255,196,0,.22)}"
    ".dnb .dnb-changed-mark{font-weight:600}</style>"
)

# Text shown only where the style sheet is stripped, between items the style spaces itself.
_ALT_SEPARATOR = '<span class="dnb-alt"> · </span>'

# Characters of a payload shown by the browser (cut server-side beyond this).
PAYLOAD_CHARS = 20_000
TRACEBACK_CHARS = 20_000
PREVIEW_CHARS = 120
MAX_PAGE_SIZE = 200


def stream_colour_index(stream: str) -> int:
    """A stream's palette index: stable across processes and sessions (unlike `hash()`)."""
    digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % len(PALETTE)


def stream_colour(stream: str) -> str:
    return PALETTE[stream_colour_index(stream)]


def legend_key(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: short cell labels that still read where CSS is stripped."""
    key = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        key = chr(ord("A") + rest) + key
    return key


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


class _DnbWidget(widgets.VBox):  # type: ignore[misc]
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
        for child in _descendants(self):
            child.close()
        super().close()


def _descendants(widget: Any) -> Iterable[Any]:
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)
        yield child


def _button(description: str, css: str, tooltip: str = "", icon: str = "") -> Any:
    button = widgets.Button(description=description, tooltip=tooltip or description, icon=icon)
    button.add_class(css)
    button.layout.width = "auto"
    return button


def _step_words(report: RunnerReport) -> str:
    """'3 messages handled', or with the other outcomes: '5 messages — 4 handled, 1 failed'."""
    if not report.handled:
        return "nothing to do"
    messages = h.count(len(report.handled), "message")
    if set(report.counts()) == {HANDLED}:
        return f"{messages} handled"
    return f"{messages} — {report.describe()}"


def _positive_int(name: str, value: object, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


# -- StreamBrowser ------------------------------------------------------------------------------


class StreamBrowser(_DnbWidget):
    """Page through the messages of one stream or an SQL LIKE pattern (`%` = every stream).

    First / Prev / Next / Last move by `page_size` messages in global order;
    "Last" follows the newest messages while live. Pick a message of the page
    in the selector to see its payload as pretty JSON.
    """

    def __init__(
        self,
        store: MessageStoreBase[Any],
        pattern: str = "%",
        *,
        page_size: int = 20,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str (a stream name or LIKE pattern), got {pattern!r}")
        self.store = store
        self.page_size = _positive_int("page_size", page_size, MAX_PAGE_SIZE)
        self._views = store._storage.views
        # Page state: the first global position shown (None = the beginning), or the tail.
        self._start: int | None = None
        self._at_end = False
        self.rows: list[tuple[Any, ...]] = []  # the page: gp, stream, version, id, added, type, preview
        self.total = 0
        self.before = 0  # matching messages before the page

        self.pattern = widgets.Text(
            value=pattern,
            description="stream",
            placeholder="a stream name or LIKE pattern, e.g. order-%",
            continuous_update=False,
        )
        self.pattern.add_class("dnb-browser-pattern")
        self.first_button = _button("First", "dnb-browser-first", "the first page", "fast-backward")
        self.prev_button = _button("Prev", "dnb-browser-prev", "the previous page", "step-backward")
        self.next_button = _button("Next", "dnb-browser-next", "the next page", "step-forward")
        self.last_button = _button("Last", "dnb-browser-last", "the newest messages", "fast-forward")
        self.position_label = widgets.HTML(value="")
        self.table = widgets.HTML(value="")
        self.table.add_class("dnb-browser-table")
        self.selector = widgets.Dropdown(options=[], description="message")
        self.selector.layout.width = "max-content"
        self.payload = widgets.HTML(value="")
        self.payload.add_class("dnb-browser-payload")
        self._updating_selector = False

        self.pattern.observe(self._on_pattern, names="value")
        self.first_button.on_click(lambda _: self._run_locked(self._go_first, "busy: try again"))
        self.prev_button.on_click(lambda _: self._run_locked(self._go_prev, "busy: try again"))
        self.next_button.on_click(lambda _: self._run_locked(self._go_next, "busy: try again"))
        self.last_button.on_click(lambda _: self._run_locked(self._go_last, "busy: try again"))
        self.selector.observe(self._on_select, names="value")
        self.children = (
            widgets.HBox(
                [
                    self.pattern,
                    self.first_button,
                    self.prev_button,
                    self.next_button,
                    self.last_button,
                    self.position_label,
                ]
            ),
            self.table,
            self.selector,
            self.payload,
            self.status,
            self.error,
        )
        self.refresh()
        self._start_live(live, store.engine, [store.notification_channel])

    # -- navigation ---------------------------------------------------------------------------

    def _on_pattern(self, change: dict[str, Any]) -> None:
        def go() -> None:
            self._start, self._at_end = None, False
            self._refresh()

        self._run_locked(go, "busy: change the pattern again in a moment")

    def _go_first(self) -> None:
        self._start, self._at_end = None, False
        self._refresh()

    def _go_last(self) -> None:
        self._start, self._at_end = None, True
        self._refresh()

    def _go_next(self) -> None:
        if self.rows:
            self._start, self._at_end = self.rows[-1][0] + 1, False
        self._refresh()

    def _go_prev(self) -> None:
        if self.rows:
            start = self._views.page_start_before(
                self.store.engine, self.pattern.value, self.rows[0][0], self.page_size
            )
            self._start, self._at_end = start, False
        self._refresh()

    # Public equivalents of the buttons (for code and tests; they run under the same lock).
    def first_page(self) -> None:
        self._run_locked(self._go_first, "busy: try again")

    def previous_page(self) -> None:
        self._run_locked(self._go_prev, "busy: try again")

    def next_page(self) -> None:
        self._run_locked(self._go_next, "busy: try again")

    def last_page(self) -> None:
        self._run_locked(self._go_last, "busy: try again")

    # -- reading and drawing ------------------------------------------------------------------

    def _refresh(self) -> None:
        start = None if self._at_end else (self._start or 0)
        rows, total, before = self._views.page(
            self.store.engine, self.pattern.value, start, self.page_size, PREVIEW_CHARS + 1
        )
        more_after = not self._at_end and len(rows) > self.page_size
        rows = rows[: self.page_size]
        self.rows, self.total, self.before = rows, int(total), int(before)
        self.first_button.disabled = self.prev_button.disabled = self.before == 0
        self.next_button.disabled = not more_after
        self.last_button.disabled = not more_after
        self.position_label.value = page(h.note(self._position_text()))
        self.table.value = page(self._table_html())
        self._update_selector()

    def _position_text(self) -> str:
        if not self.rows:
            return f"no messages in streams matching {self.pattern.value!r}"
        first = self.before + 1
        return f"messages {first:,}-{first + len(self.rows) - 1:,} of {self.total:,}"

    def _table_html(self) -> str:
        title = h.title("StreamBrowser", f"{self.store.name} · {self.pattern.value}")
        if not self.rows:
            return title + h.note(f"no messages in streams matching {self.pattern.value!r}")
        body = h.table(
            ("global position", "stream", "version", "type", "payload", "added at"),
            [(r[0], r[1], r[2], r[5], h.cut(r[6], PREVIEW_CHARS), r[4]) for r in self.rows],
            max_rows=MAX_PAGE_SIZE,
        )
        return title + h.facts([self._position_text()]) + body

    def _update_selector(self) -> None:
        options = [(f"#{r[0]} · {h.cut(r[1], 60)} v{r[2]} · {r[5] or '?'}", r[0]) for r in self.rows]
        keep = self.selector.value
        values = [value for _, value in options]
        self._updating_selector = True
        try:
            self.selector.options = options
            self.selector.value = keep if keep in values else (values[0] if values else None)
        finally:
            self._updating_selector = False
        self._show_payload()

    def _on_select(self, change: dict[str, Any]) -> None:
        if not self._updating_selector:
            self._run_locked(self._show_payload, "busy: select again in a moment")

    def _show_payload(self) -> None:
        body = self._payload_html(self.selector.value)
        self.payload.value = page(body) if body else ""

    def _payload_html(self, global_position: int | None) -> str:
        if global_position is None:
            return ""
        row = self._views.message(self.store.engine, global_position, PAYLOAD_CHARS + 1)
        if row is None:
            return h.note(f"message at global position {global_position} is gone")
        stream, version, message_id, added_at, message_type, text, length = row
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pretty = text  # cut in the middle: show the raw (bounded) text
        parts = [
            h.title("Message", message_type or "?"),
            h.facts(
                [
                    ("stream", stream),
                    ("version", version),
                    ("global position", global_position),
                    ("added at", added_at),
                    ("id", message_id),
                ]
            ),
            f'<pre class="dnb-json">{h.esc(pretty)}</pre>',
        ]
        if length > PAYLOAD_CHARS:
            parts.append(h.note(f"payload cut: {length:,} characters, the first {PAYLOAD_CHARS:,} shown"))
        return "".join(parts)

    def snapshot_html(self) -> str:
        payload = self._payload_html(self.selector.value) if self.rows else ""
        return page(self._table_html(), payload, self._error_body)

    def __repr__(self) -> str:
        return (
            f"StreamBrowser(store={self.store.name!r}, pattern={self.pattern.value!r}, "
            f"showing {len(self.rows)} of {self.total} messages)"
        )


# -- PartitionMap -------------------------------------------------------------------------------


class PartitionMap(_DnbWidget):
    """Which origin stream landed in which partition, at which position.

    One grid row per partition (at most `max_partitions`), its last
    `positions` positions as cells coloured by origin stream (a legend key in
    each cell, so it reads where colours are stripped), beside a table of
    the latest `assignments` projected messages.
    """

    def __init__(
        self,
        aggregated_stream: AggregatedStream[Any],
        *,
        positions: int = 30,
        max_partitions: int = 32,
        assignments: int = 15,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        self.aggregated_stream = aggregated_stream
        self.positions = _positive_int("positions", positions, 500)
        self.max_partitions = _positive_int("max_partitions", max_partitions, 1000)
        self.assignments = _positive_int("assignments", assignments, 500)
        # Read state, kept for the snapshot and for tests.
        self.partitions: dict[int, tuple[int, list[tuple[int, str, int, int]]]] = {}
        self.partition_count = 0
        self.projected = 0
        self.latest: list[tuple[int, str, int, int, int]] = []
        self.stream_keys: dict[str, str] = {}  # origin stream -> legend key

        self.header = widgets.HTML(value="")
        self.grid = widgets.HTML(value="")
        self.grid.add_class("dnb-partition-grid")
        self.assignments_table = widgets.HTML(value="")
        self.refresh_button = _button("Refresh", "dnb-map-refresh", "read the partitions again", "refresh")
        self.refresh_button.on_click(lambda _: self._run_locked(self._refresh, "busy: try again"))
        self.children = (
            self.header,
            widgets.HBox([self.grid, self.assignments_table], layout=widgets.Layout(grid_gap="24px")),
            widgets.HBox([self.refresh_button]),
            self.status,
            self.error,
        )
        self.refresh()
        self._start_live(live, aggregated_stream.engine, [aggregated_stream.notification_channel])

    def _refresh(self) -> None:
        cell_rows, (partition_count, projected), latest = self.aggregated_stream.views.partition_map(
            self.aggregated_stream.engine, self.max_partitions, self.positions, self.assignments
        )
        partitions: dict[int, tuple[int, list[tuple[int, str, int, int]]]] = {}
        for partition, head, position, stream, version, gp in cell_rows:
            partitions.setdefault(partition, (head, []))[1].append((position, stream, version, gp))
        self.partitions = partitions
        self.partition_count, self.projected = int(partition_count), int(projected)
        self.latest = latest
        self.stream_keys = self._legend_keys()
        self.header.value = page(self._header_html())
        self.grid.value = page(self._grid_html())
        self.assignments_table.value = page(self._assignments_html())

    def _legend_keys(self) -> dict[str, str]:
        # Keys in order of first appearance in the store (global position), so they stay put
        # as new messages arrive.
        first_seen: dict[str, int] = {}
        for _, cells in self.partitions.values():
            for _, stream, _, gp in cells:
                first_seen[stream] = min(gp, first_seen.get(stream, gp))
        for gp, stream, *_ in self.latest:
            first_seen[stream] = min(gp, first_seen.get(stream, gp))
        ordered = sorted(first_seen, key=lambda s: (first_seen[s], s))
        return {stream: legend_key(i) for i, stream in enumerate(ordered)}

    def _header_html(self) -> str:
        return h.title("PartitionMap", self.aggregated_stream.name) + h.facts(
            [
                ("store", self.aggregated_stream.store.name),
                ("wildcards", ", ".join(self.aggregated_stream.stream_wildcards)),
                h.count(self.partition_count, "partition"),
                ("projected", f"{self.projected:,}"),
            ]
        )

    def _grid_html(self) -> str:
        if not self.partitions:
            return h.note("no partitions yet: nothing projected (stream.projector.step() projects)")
        # Every row gets the same number of columns (short rows end in one wide empty cell),
        # so a cell never stretches to the width of a neighbouring row's label.
        width = max(len(cells) for _, cells in self.partitions.values())
        rows = []
        for partition, (head, cells) in sorted(self.partitions.items()):
            hidden = head + 1 - len(cells)
            first = cells[0][0] if cells else head + 1
            parts = [
                f"<th>{h.esc(partition)}</th>",
                f'<td class="dnb-pm-range">{h.esc(f"{first}-{head}")}</td>',
                f'<td class="dnb-pm-more">{h.esc(f"+{hidden:,}") if hidden > 0 else ""}</td>',
            ]
            for position, stream, version, gp in cells:
                tip = f"partition {partition}, position {position}: {stream} v{version} (global {gp})"
                parts.append(
                    f'<td class="dnb-pm-cell dnb-c{stream_colour_index(stream)}" '
                    f'title="{h.esc(h.cut(tip, h.TITLE_CHARS))}">{h.esc(self.stream_keys[stream])}</td>'
                )
            if len(cells) < width:
                parts.append(f'<td colspan="{width - len(cells)}"></td>')
            rows.append("<tr>" + "".join(parts) + "</tr>")
        out = [h.section("Origin stream at each position (left to right: oldest shown to newest)")]
        # No label over the cells: a wide one would stretch every cell to its width.
        head_row = f'<tr><th>partition</th><th>positions</th><th></th><th colspan="{width}"></th></tr>'
        out.append(
            f'<table class="dnb-pm-grid"><thead>{head_row}</thead><tbody>{"".join(rows)}</tbody></table>'
        )
        if self.partition_count > len(self.partitions):
            out.append(h.note(f"… {self.partition_count - len(self.partitions):,} more partitions not shown"))
        out.append(self._legend_html())
        return "".join(out)

    def _legend_html(self, limit: int = 40) -> str:
        items = []
        for stream, key in list(self.stream_keys.items())[:limit]:
            # The space (not a margin) and the separator keep "A order-0 · B order-1" apart
            # where the style is stripped.
            items.append(
                f'<span><span class="dnb-pm-swatch dnb-c{stream_colour_index(stream)}">{h.esc(key)}</span> '
                f'<span class="dnb-name">{h.esc(h.cut(stream, 60))}</span></span>'
            )
        more = len(self.stream_keys) - limit
        legend = f'<div class="dnb-pm-legend">{_ALT_SEPARATOR.join(items)}</div>'
        return legend + (h.note(f"… {more:,} more streams") if more > 0 else "")

    def _assignments_html(self) -> str:
        if not self.latest:
            return ""
        return h.section("Latest assignments") + h.table(
            ("global position", "key", "origin stream", "version", "partition", "position"),
            [
                (gp, self.stream_keys.get(stream, ""), stream, v, p, pos)
                for gp, stream, v, p, pos in self.latest
            ],
            total=self.projected,
            noun="assignment",
            hint="stream.assignments_dataframe() has them all",
            max_rows=self.assignments,
        )

    def snapshot_html(self) -> str:
        return page(
            self._header_html(),
            f'<div class="dnb-pm-layout"><div>{self._grid_html()}</div>'
            f"<div>{self._assignments_html()}</div></div>",
            self._error_body,
        )

    def __repr__(self) -> str:
        return (
            f"PartitionMap(stream={self.aggregated_stream.name!r}, partitions={self.partition_count}, "
            f"projected={self.projected})"
        )


# -- SubscriptionStepper ------------------------------------------------------------------------


class SubscriptionStepper(_DnbWidget):
    """Step a subscription's runner by hand and watch every partition's position, head and lag.

    Step: one batch per partition with work; Step N: at most N messages; Run
    to end: until nothing is left; Reset: back to the beginning, so every
    message is delivered again. "Project first" runs a projector step
    before each runner step, so one written message can be followed from
    the store through its partition to its handler.
    """

    def __init__(
        self,
        subscription: Subscription[Any],
        *,
        project_first: bool = False,
        step_n: int = 10,
        max_partitions: int = 20,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        self.subscription = subscription
        self.max_partitions = _positive_int("max_partitions", max_partitions, 1000)
        self.last_report: RunnerReport | None = None
        self.last_projection: ProjectionReport | None = None
        self.states: list[PartitionState] = []
        self._last_note = "no step yet: press Step"
        self._overview_facts: list[tuple[str, object] | str] = []
        self._lag = 0

        self.step_button = _button("Step", "dnb-stepper-step", "one batch per partition with work", "play")
        self.step_n_button = _button("Step N", "dnb-stepper-step-n", "handle at most N messages")
        self.n_input = widgets.BoundedIntText(value=_positive_int("step_n", step_n), min=1, max=1_000_000)
        self.n_input.layout.width = "90px"
        self.n_input.add_class("dnb-stepper-n")
        self.run_button = _button("Run to end", "dnb-stepper-run", "handle until nothing is left", "forward")
        self.reset_button = _button("Reset", "dnb-stepper-reset", "back to the beginning", "undo")
        self.project_first = widgets.Checkbox(
            value=bool(project_first), description="Project first", indent=False
        )
        self.project_first.layout.width = "auto"
        self.header = widgets.HTML(value="")
        self.last_step = widgets.HTML(value="")
        self.last_step.add_class("dnb-stepper-last-step")
        self.bars = widgets.HTML(value="")
        self.bars.add_class("dnb-stepper-bars")
        self.error.add_class("dnb-stepper-error")

        busy = "busy: the previous action is still running"
        self.step_button.on_click(lambda _: self._run_locked(lambda: self._step(None), busy))
        self.step_n_button.on_click(
            lambda _: self._run_locked(lambda: self._step(int(self.n_input.value)), busy)
        )
        self.run_button.on_click(lambda _: self._run_locked(self._run_to_end, busy))
        self.reset_button.on_click(lambda _: self._run_locked(self._reset, busy))
        self.children = (
            self.header,
            widgets.HBox(
                [
                    self.step_button,
                    self.step_n_button,
                    self.n_input,
                    self.run_button,
                    self.reset_button,
                    self.project_first,
                ]
            ),
            self.error,
            self.last_step,
            self.bars,
            self.status,
        )
        self.last_step.value = page(self._last_step_html())
        self.refresh()
        stream = subscription.stream
        self._start_live(live, stream.engine, [stream.notification_channel])

    # -- actions (public for code and tests; the buttons call the same under the lock) --------

    def step(self, max_messages: int | None = None) -> RunnerReport | None:
        """Step once, as the Step button (Step N with `max_messages`); returns the report."""
        self._run_locked(lambda: self._step(max_messages), "busy: the previous action is still running")
        return self.last_report

    def run_to_end(self) -> RunnerReport | None:
        self._run_locked(self._run_to_end, "busy: the previous action is still running")
        return self.last_report

    def reset(self) -> None:
        self._run_locked(self._reset, "busy: the previous action is still running")

    def _step(self, max_messages: int | None) -> None:
        runner = self.subscription.runner

        def work() -> None:
            self._project(max_messages)
            runner.step(max_messages)

        what = "Step" if max_messages is None else f"Step {max_messages}"
        self._handle(what, work)

    def _run_to_end(self) -> None:
        runner = self.subscription.runner

        def work() -> None:
            if self.project_first.value:
                # progress=False: a bar inside a click callback would print nowhere useful.
                self.subscription.stream.projector.run(progress=False)
                self.last_projection = None
            runner.run_once(progress=False)

        self._handle("Run to end", work)

    def _project(self, max_messages: int | None) -> None:
        self.last_projection = None
        if self.project_first.value:
            self.last_projection = self.subscription.stream.projector.step(max_messages)

    def _handle(self, what: str, work: Callable[[], None]) -> None:
        runner = self.subscription.runner
        runner.last_report = None
        failure: Exception | None = None
        try:
            work()
        except Exception as error:
            failure = error
        # On failure the runner's report still lists what was handled, the failed message last.
        self.last_report = runner.last_report or RunnerReport(self.subscription.name)
        self._last_note = f"{what}: {_step_words(self.last_report)}"
        self.last_step.value = page(self._last_step_html())
        self._refresh()
        if failure is not None:
            self._show_error(
                failure, f"{what} stopped by an error (what was not acknowledged will be delivered again)"
            )

    def _reset(self) -> None:
        targets = self.subscription.reset()
        self.last_report, self.last_projection = None, None
        self._last_note = (
            f"Reset: {h.count(len(targets), 'partition')} back to the beginning; "
            "every message will be delivered again"
        )
        self.last_step.value = page(self._last_step_html())
        self._refresh()

    # -- drawing ------------------------------------------------------------------------------

    def _last_step_html(self) -> str:
        report = self.last_report
        # Muted when all went well; a failure or a message without a handler must stand out.
        plain = report is None or set(report.counts()) <= {HANDLED}
        parts = [h.section("Last step"), h.note(self._last_note) if plain else h.warning(self._last_note)]
        if self.last_projection is not None:
            parts.append(reprs.render_projection_report(self.last_projection))
        if self.last_report is not None:
            parts.append(reprs.render_runner_report(self.last_report))
        return "".join(parts)

    def _refresh(self) -> None:
        overview = subscription_overview(self.subscription)
        self.states = overview.partitions
        self._lag = overview.lag
        self._overview_facts = [
            ("stream", overview.stream),
            h.count(len(overview.partitions), "partition"),
            ("lag", f"{overview.lag:,}"),
            ("parked", overview.parked or 0),
            ("initialised", overview.initialized),
        ]
        self.header.value = page(self._header_html())
        self.bars.value = page(self._bars_html())

    def _header_html(self) -> str:
        return h.title("SubscriptionStepper", self.subscription.name) + h.facts(
            self._overview_facts,
            css={"lag": "dnb-warn" if self._lag else "dnb-ok"},
        )

    def _bars_html(self) -> str:
        if not self.states:
            return h.section("Partitions") + h.note("no partitions yet: nothing projected into the stream")
        shown = self.states
        parts = [h.section("Partitions: acknowledged position / head")]
        if len(shown) > self.max_partitions:
            # The rows that answer "what is behind?" first.
            shown = sorted(shown, key=lambda s: (-s.lag, s.partition))[: self.max_partitions]
            parts.append(h.note(f"the {self.max_partitions} partitions furthest behind:"))
        rows = []
        for s in shown:
            done = max(s.position + 1, 0)
            size = max(s.head + 1, 0)
            percent = 100 if size == 0 else round(100 * done / size)
            css = "dnb-bar dnb-bar-done" if s.lag <= 0 else "dnb-bar"
            # The width is a number computed here, never user data. The percentage is the bar's
            # text where the style is stripped (an untrusted notebook, GitHub), hidden otherwise.
            # Spans, not divs: without the style an empty block would still break the row's line.
            bar = (
                f'<span class="dnb-alt">{percent}%</span>'
                f'<span class="{css}"><span class="dnb-bar-fill" style="width:{percent}%"></span></span>'
            )
            lag_css = "dnb-ok" if s.lag <= 0 else "dnb-warn"
            rows.append(
                f"<tr>{h.cell(s.partition)}<td>{bar}</td>{h.cell(s.position)}{h.cell(s.head)}"
                f'<td class="dnb-num"><span class="{lag_css}">{h.esc(f"lag {s.lag:,}")}</span></td>'
                f"{h.cell('locked' if s.locked else '')}</tr>"
            )
        head = "".join(f"<th>{h.esc(c)}</th>" for c in ("partition", "", "position", "head", "lag", ""))
        parts.append(
            f'<table class="dnb-table dnb-bars"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        if len(self.states) > len(shown):
            parts.append(h.note(f"… {len(self.states) - len(shown):,} more partitions not shown"))
        return "".join(parts)

    def snapshot_html(self) -> str:
        return page(self._header_html(), self._error_body, self._last_step_html(), self._bars_html())

    def __repr__(self) -> str:
        return f"SubscriptionStepper(subscription={self.subscription.name!r}, lag={self._lag})"


# -- AggregateTimeline --------------------------------------------------------------------------


def _timeline_page(*parts: str) -> str:
    return page(TIMELINE_STYLE, *parts)


class AggregateTimeline(_DnbWidget):
    """Slide through the versions of aggregate `id` of an `EventStoreRepo`.

    The slider picks a version; the widget shows the aggregate's state after that
    version's event (its public attributes, see `AggregateHistory`), with the fields that
    event changed highlighted beside their value before, and the event itself. Play
    steps through the versions every `interval_ms`. Live, an event saved meanwhile is
    added at the end, and shown if the slider was at the end. Where widgets do not
    render, the output is the history table (the last `max_rows` versions).
    """

    def __init__(
        self,
        repo: EventStoreRepo[Any, Any, Any],
        id: object,
        *,
        interval_ms: int = 800,
        max_rows: int = 20,
        max_fields: int = 12,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(repo, EventStoreRepo):
            raise TypeError(f"repo must be an EventStoreRepo, got {type(repo).__name__}")
        interval = _positive_int("interval_ms", interval_ms, 60_000)
        self.max_rows = _positive_int("max_rows", max_rows, 500)
        self.max_fields = _positive_int("max_fields", max_fields, 200)
        store = repo.event_store
        if live and not isinstance(store, MessageStoreBase):
            raise TypeError(
                f"live=True needs the repository's store to be a MessageStore (its notifications), "
                f"got {type(store).__name__}"
            )
        self.repo = repo
        self.history: AggregateHistory[Any, Any] = AggregateHistory(repo, id)
        # Slider moves only redraw from the history in memory; this lock keeps a live
        # refresh (which appends to it) from drawing at the same time.
        self._draw_lock = threading.RLock()
        versions = self.history.version
        self.slider = widgets.IntSlider(
            value=versions, min=1, max=versions, description="version", continuous_update=True
        )
        self.slider.add_class("dnb-timeline-slider")
        self.play = widgets.Play(value=versions, min=1, max=versions, interval=interval, description="Play")
        self.play.add_class("dnb-timeline-play")
        # A kernel-side link: the state is drawn in the kernel anyway, and code and tests
        # that set `play.value` move the slider as the frontend's ticks do.
        self._link = widgets.link((self.play, "value"), (self.slider, "value"))
        self.header = widgets.HTML(value="")
        self.state_view = widgets.HTML(value="")
        self.state_view.add_class("dnb-timeline-state")
        self.event_view = widgets.HTML(value="")
        self.event_view.add_class("dnb-timeline-event")
        self.slider.observe(self._on_slider, names="value")
        self.children = (
            self.header,
            widgets.HBox([self.play, self.slider]),
            self.error,
            widgets.HBox([self.state_view, self.event_view], layout=widgets.Layout(grid_gap="24px")),
            self.status,
        )
        self._draw()
        if isinstance(store, MessageStoreBase):
            self._start_live(live, store.engine, [store.notification_channel])

    @property
    def shown(self) -> HistoryStep | None:
        """The step the widget shows (None only when the stream was emptied under it)."""
        steps = self.history.steps
        version = self.slider.value
        return steps[version - 1] if 1 <= version <= len(steps) else None

    @property
    def changed_fields(self) -> tuple[str, ...]:
        """The state fields the shown version's event changed (the highlighted rows)."""
        step = self.shown
        return () if step is None else step.changed

    def show_version(self, version: int) -> None:
        """Move the slider to `version` (as dragging it does)."""
        self.slider.value = _positive_int("version", version, self.slider.max)

    def _on_slider(self, change: dict[str, Any]) -> None:
        self._draw()

    def _refresh(self) -> None:
        with self._draw_lock:
            at_end = self.slider.value == self.slider.max
            self.history.update()
            versions = self.history.version
            if versions:
                # Raising max before the value, and lowering the value before max, keeps
                # every intermediate state valid for the slider's own checks.
                for widget in (self.slider, self.play):
                    if versions > widget.max:
                        widget.max = versions
                if at_end or self.slider.value > versions:
                    self.slider.value = versions
                for widget in (self.slider, self.play):
                    widget.max = versions
            self._draw()

    def _draw(self) -> None:
        with self._draw_lock:
            self.header.value = _timeline_page(self._header_html())
            step = self.shown
            if step is None:
                self.state_view.value = _timeline_page(h.note("no events: the stream is empty now"))
                self.event_view.value = ""
                return
            self.state_view.value = _timeline_page(self._state_html(step))
            self.event_view.value = _timeline_page(self._event_html(step))

    def _header_html(self) -> str:
        step = self.shown
        facts: list[tuple[str, object] | str] = [
            ("stream", self.history.stream),
            ("version", f"{step.version if step else 0} of {self.history.version}"),
        ]
        if step is not None:
            facts += [("event", step.event_type), ("stored at", step.added_at)]
        name = f"{self.history.aggregate_type} {self.history.id}"
        return h.title("AggregateTimeline", name) + h.facts(facts)

    def _state_html(self, step: HistoryStep) -> str:
        before = self.history.steps[step.version - 2].state if step.version > 1 else {}
        changed = set(step.changed)
        rows = []
        for name, value in step.state.items():
            if name in changed:
                rows.append(
                    f'<tr class="dnb-changed">{h.cell(name)}{h.cell(value)}'
                    f'<td class="dnb-changed-mark">changed</td>{h.cell(before.get(name))}</tr>'
                )
            else:
                rows.append(f"<tr>{h.cell(name)}{h.cell(value)}<td></td><td></td></tr>")
        removed = [name for name in step.changed if name not in step.state]
        for name in removed:
            rows.append(
                f'<tr class="dnb-changed">{h.cell(name)}<td></td>'
                f'<td class="dnb-changed-mark">removed</td>{h.cell(before.get(name))}</tr>'
            )
        head = "".join(f"<th>{h.esc(c)}</th>" for c in ("field", "value", "", "before"))
        table = (
            f'<table class="dnb-table dnb-timeline-fields"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        what = h.count(len(step.changed), "field")
        return h.section(f"State after version {step.version} ({what} changed)") + table

    def _event_html(self, step: HistoryStep) -> str:
        return (
            h.section(f"Event {step.version}: {step.event_type}")
            + h.facts(
                [
                    ("stored at", step.added_at),
                    ("global position", step.global_position),
                    ("id", step.message_id),
                ]
            )
            + h.record_table(list(step.event_fields().items()))
        )

    def _history_html(self) -> str:
        steps = self.history.steps
        if not steps:
            return h.note("no events: the stream is empty now")
        fields: list[str] = []
        for step in steps:
            fields += [name for name in step.state if name not in fields]
        shown_fields = fields[: self.max_fields]
        rows = [
            (
                s.version,
                s.event_type,
                s.added_at,
                ", ".join(s.changed),
                *(s.state.get(name) for name in shown_fields),
            )
            for s in steps
        ]
        parts = [
            h.section("History: the state after each event"),
            h.table(
                ("version", "event", "stored at", "changed", *(STATE_PREFIX + n for n in shown_fields)),
                rows,
                max_rows=self.max_rows,
                noun="version",
                hint="repo.history(id) has them all",
            ),
        ]
        if len(fields) > len(shown_fields):
            parts.append(h.note(f"… {len(fields) - len(shown_fields):,} more state fields not shown"))
        return "".join(parts)

    def snapshot_html(self) -> str:
        return _timeline_page(self._header_html(), self._history_html())

    def __repr__(self) -> str:
        return (
            f"AggregateTimeline(stream={self.history.stream!r}, version={self.slider.value} "
            f"of {self.history.version})"
        )


__all__ = [
    "PALETTE",
    "AggregateTimeline",
    "PartitionMap",
    "StreamBrowser",
    "SubscriptionStepper",
    "legend_key",
    "stream_colour",
    "stream_colour_index",
]

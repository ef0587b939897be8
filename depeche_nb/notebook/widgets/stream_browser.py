"""`StreamBrowser(store)`: page through the messages of a stream or LIKE pattern and look at one
message's payload."""

from __future__ import annotations

import json
from typing import Any

import ipywidgets as widgets

from depeche_nb.engine.message_store import MessageStore
from depeche_nb.notebook import html as h
from depeche_nb.notebook.widgets.base import DnbWidget, make_button, page, positive_int
from depeche_nb.notebook.widgets.style import MAX_PAGE_SIZE, PAYLOAD_CHARS, PREVIEW_CHARS

# -- StreamBrowser ------------------------------------------------------------------------------


class StreamBrowser(DnbWidget):
    """Page through the messages of one stream or an SQL LIKE pattern (`%` = every stream).

    First / Prev / Next / Last move by `page_size` messages in global order;
    "Last" follows the newest messages while live. Pick a message of the page
    in the selector to see its payload as pretty JSON.
    """

    def __init__(
        self,
        store: MessageStore[Any],
        pattern: str = "%",
        *,
        page_size: int = 20,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str (a stream name or LIKE pattern), got {pattern!r}")
        self.store = store
        self.page_size = positive_int("page_size", page_size, MAX_PAGE_SIZE)
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
        self.first_button = make_button("First", "dnb-browser-first", "the first page", "fast-backward")
        self.prev_button = make_button("Prev", "dnb-browser-prev", "the previous page", "step-backward")
        self.next_button = make_button("Next", "dnb-browser-next", "the next page", "step-forward")
        self.last_button = make_button("Last", "dnb-browser-last", "the newest messages", "fast-forward")
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

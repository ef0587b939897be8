"""`AggregateTimeline(repo, id)`: a slider (and Play) over an event-sourced aggregate's versions:
the state after each event, the event, and the fields it changed, highlighted."""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets as widgets

from depeche_nb.engine.message_store import MessageStore
from depeche_nb.event_sourcing.history import STATE_PREFIX, AggregateHistory, HistoryStep
from depeche_nb.event_sourcing.repository import EventStoreRepo
from depeche_nb.notebook import html as h
from depeche_nb.notebook.widgets.base import DnbWidget, page, positive_int
from depeche_nb.notebook.widgets.style import TIMELINE_STYLE

# -- AggregateTimeline --------------------------------------------------------------------------


def timeline_page(*parts: str) -> str:
    return page(TIMELINE_STYLE, *parts)


class AggregateTimeline(DnbWidget):
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
        interval = positive_int("interval_ms", interval_ms, 60_000)
        self.max_rows = positive_int("max_rows", max_rows, 500)
        self.max_fields = positive_int("max_fields", max_fields, 200)
        store = repo.event_store
        if live and not isinstance(store, MessageStore):
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
        if isinstance(store, MessageStore):
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
        self.slider.value = positive_int("version", version, self.slider.max)

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
            self.header.value = timeline_page(self._header_html())
            step = self.shown
            if step is None:
                self.state_view.value = timeline_page(h.note("no events: the stream is empty now"))
                self.event_view.value = ""
                return
            self.state_view.value = timeline_page(self._state_html(step))
            self.event_view.value = timeline_page(self._event_html(step))

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
        return timeline_page(self._header_html(), self._history_html())

    def __repr__(self) -> str:
        return (
            f"AggregateTimeline(stream={self.history.stream!r}, version={self.slider.value} "
            f"of {self.history.version})"
        )

"""`SubscriptionStepper(subscription)`: Step / Step N / Run to end / Reset, what the last step
handled and every partition's position, head and lag."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from depeche_nb.engine.handlers import HANDLED
from depeche_nb.engine.projector import ProjectionReport
from depeche_nb.engine.runner import RunnerReport
from depeche_nb.engine.subscription import Subscription
from depeche_nb.notebook import html as h
from depeche_nb.notebook import reprs
from depeche_nb.notebook.views.subscriptions import PartitionState, subscription_overview
from depeche_nb.notebook.widgets.base import DnbWidget, make_button, page, positive_int, step_words

# -- SubscriptionStepper ------------------------------------------------------------------------


class SubscriptionStepper(DnbWidget):
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
        self.max_partitions = positive_int("max_partitions", max_partitions, 1000)
        self.last_report: RunnerReport | None = None
        self.last_projection: ProjectionReport | None = None
        self.states: list[PartitionState] = []
        self._last_note = "no step yet: press Step"
        self._overview_facts: list[tuple[str, object] | str] = []
        self._lag = 0

        self.step_button = make_button(
            "Step", "dnb-stepper-step", "one batch per partition with work", "play"
        )
        self.step_n_button = make_button("Step N", "dnb-stepper-step-n", "handle at most N messages")
        self.n_input = widgets.BoundedIntText(value=positive_int("step_n", step_n), min=1, max=1_000_000)
        self.n_input.layout.width = "90px"
        self.n_input.add_class("dnb-stepper-n")
        self.run_button = make_button(
            "Run to end", "dnb-stepper-run", "handle until nothing is left", "forward"
        )
        self.reset_button = make_button("Reset", "dnb-stepper-reset", "back to the beginning", "undo")
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
        self._last_note = f"{what}: {step_words(self.last_report)}"
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

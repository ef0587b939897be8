"""Widgets, live refresh, progress bars and plots, headless on the real database.

Buttons are pressed with `button.click()` (what the frontend triggers) and the
widgets' state and HTML are checked. No `from __future__ import annotations`:
handler annotations must be real objects.
"""

import dataclasses
import datetime as dt
import hashlib
import html
import io
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import matplotlib
import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import ExitSubscriptionErrorHandler, MessageHandlerRegister, StoredMessage
from depeche_nb.event_sourcing import EventSourcedAggregateRoot, EventStoreRepo, NotFound
from depeche_nb.notebook import live as live_module
from depeche_nb.notebook.live import LiveRefresher
from depeche_nb.notebook.widgets.base import error_html
from depeche_nb.notebook.widgets.style import PALETTE, TRACEBACK_CHARS, legend_key, stream_colour_index
from depeche_nb.postgres.listener import APPLICATION_NAME
from depeche_nb.postgres.names import quote_ident
from depeche_nb.tools import PydanticMessageSerializer
from depeche_nb.widgets import (
    AggregateTimeline,
    PartitionMap,
    StreamBrowser,
    SubscriptionStepper,
    plot_partition_sizes,
    plot_subscription_lag,
)
from tests.support import AnyMessage, Numbered, Renamed

matplotlib.use("Agg")

HOSTILE = "<script>alert(1)</script>"
HOSTILE_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
WAIT_S = 5.0


class ByNumber:
    """`<prefix>-<k>` goes to partition k % partitions."""

    def __init__(self, partitions: int = 1000) -> None:
        self.partitions = partitions

    def get_partition(self, message: StoredMessage[Any]) -> int:
        tail = message.stream.rsplit("-", 1)[-1]
        return int(tail) % self.partitions if tail.isdigit() else 0


class Recorder:
    """Handlers that record what they saw; `fail_on` numbers raise (with hostile text)."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.fail_on: set[int] = set()
        self.on_handle: Callable[[], None] | None = None

    def register(self) -> MessageHandlerRegister[Any]:
        register: MessageHandlerRegister[Any] = MessageHandlerRegister()

        def handle_numbered(message: Numbered) -> None:
            if message.number in self.fail_on:
                raise RuntimeError(HOSTILE)
            self.seen.append(message.number)
            if self.on_handle is not None:
                self.on_handle()

        def handle_renamed(message: Renamed) -> None:
            return None

        register.register(handle_numbered)
        register.register(handle_renamed)
        return register


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Any]:
    return depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(AnyMessage))


def _subscription(
    engine: sa.Engine,
    name: str,
    recorder: Recorder,
    partitions: int = 1000,
    wildcards: list[str] | None = None,
) -> tuple[depeche_nb.MessageStore[Any], Any, Any]:
    store = _store(engine, name)
    stream = store.aggregated_stream(
        name=f"{name}_agg", partitioner=ByNumber(partitions), stream_wildcards=wildcards or ["n-%"]
    )
    subscription = stream.subscription(
        name=f"{name}_sub",
        handlers=recorder.register(),
        error_handler=ExitSubscriptionErrorHandler(),
    )
    return store, stream, subscription


def html_values(widget: Any) -> list[str]:
    """Every HTML string a widget tree shows."""
    values = []
    if isinstance(widget, widgets.HTML):
        values.append(widget.value)
    for child in getattr(widget, "children", ()):
        values.extend(html_values(child))
    return values


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def text(page: str) -> str:
    """The visible text of a page: tags dropped, entities decoded, spaces collapsed."""
    without_style = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", without_style)).split())


def data_rows(page: str) -> int:
    """Rows in the (last) table body of a page."""
    body = page.rsplit("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return body.count("<tr>")


def listener_pids(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APPLICATION_NAME,)
        ).all()
    return {row[0] for row in rows}


# -- StreamBrowser --------------------------------------------------------------------------------


def test_stream_browser_pages_through_a_wildcard(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    with engine.begin() as conn:
        for n in range(45):  # a-0 .. a-4 interleaved: global order differs from stream order
            store.write(f"a-{n % 5}", Numbered(number=n), conn=conn)
        for n in range(5):
            store.write("b-1", Numbered(number=100 + n), conn=conn)
    browser = StreamBrowser(store, page_size=20, live=False)
    try:
        assert browser.pattern.value == "%"
        assert (len(browser.rows), browser.total, browser.before) == (20, 50, 0)
        assert "messages 1-20 of 50" in browser.position_label.value
        assert browser.prev_button.disabled and browser.first_button.disabled
        assert not browser.next_button.disabled
        assert data_rows(browser.table.value) == 20
        numbers = [row[0] for row in browser.rows]
        assert numbers == sorted(numbers)

        browser.next_button.click()
        assert browser.before == 20 and len(browser.rows) == 20
        assert "messages 21-40 of 50" in browser.position_label.value
        browser.next_button.click()
        assert (browser.before, len(browser.rows)) == (40, 10)
        assert browser.next_button.disabled and browser.last_button.disabled
        assert [row[1] for row in browser.rows][-5:] == ["b-1"] * 5
        browser.prev_button.click()
        assert "messages 21-40 of 50" in browser.position_label.value
        browser.first_button.click()
        assert browser.before == 0 and browser.rows[0][0] == numbers[0]
        browser.last_button.click()
        assert (browser.before, len(browser.rows)) == (30, 20)
        assert "messages 31-50 of 50" in browser.position_label.value

        browser.pattern.value = "b-%"
        assert (browser.total, len(browser.rows), browser.before) == (5, 5, 0)
        assert {row[1] for row in browser.rows} == {"b-1"}
        browser.pattern.value = "a-3"  # a plain name is a pattern matching just that stream
        assert browser.total == 9 and [row[2] for row in browser.rows] == list(range(1, 10))
        browser.pattern.value = "nothing-%"
        assert browser.total == 0 and browser.rows == []
        assert "no messages in streams matching" in browser.table.value
        assert browser.selector.options == () and browser.payload.value == ""
        assert browser.last_error is None
    finally:
        browser.close()


class Tagged(pydantic.BaseModel):
    """jsonb orders keys by length: its message id `id` would lead every preview."""

    id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    customer_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    order_id: str
    note: str
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


def test_payload_previews_put_ids_last(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Tagged))
    message = Tagged(order_id="order-7", note="gift wrap " + "y" * 200, occurred_at=dt.datetime(2024, 5, 6))
    store.write("t-1", message)
    expected = (
        f'{{"note": "{message.note}", "order_id": "order-7", "occurred_at": "2024-05-06T00:00:00", '
        f'"id": "{message.id}", "customer_id": "{message.customer_id}"}}'
    )
    browser = StreamBrowser(store, live=False)
    try:
        # The table's preview is cut after 120 characters; the business fields come first.
        (row,) = browser.rows
        assert row[6] == expected[: len(row[6])] and row[6].startswith('{"note": "gift wrap')
        pane = html.unescape(browser.payload.value)
        assert pane.index('"order_id"') < pane.index('"id"') < pane.index('"customer_id"')
        assert json.loads(pane.split('<pre class="dnb-json">', 1)[1].split("</pre>", 1)[0]) == json.loads(
            expected
        )
    finally:
        browser.close()
    # The store's repr shows the same preview.
    assert html.escape(expected[:60]) in store._repr_html_()


def test_stream_browser_selector_shows_one_payload(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    store.write_all("s-1", [Numbered(number=n, text=f"text {n}") for n in range(3)])
    store.write("s-2", Numbered(number=7, text="x" * 50_000))
    browser = StreamBrowser(store, "s-%", live=False)
    try:
        assert len(browser.selector.options) == 4
        first = browser.rows[0][0]
        assert browser.selector.value == first  # the page's first message is shown at once
        assert '"number": 0' in text(browser.payload.value) and "Numbered" in browser.payload.value
        browser.selector.value = browser.rows[1][0]
        shown = text(browser.payload.value)
        assert '"number": 1' in shown and '"text": "text 1"' in shown
        assert "__typename__" not in browser.payload.value
        browser.selector.value = browser.rows[3][0]
        assert "payload cut" in browser.payload.value
        assert len(browser.payload.value) < 30_000
        assert "x" * 200 not in browser.table.value  # the table shows previews only
    finally:
        browser.close()


# -- PartitionMap ---------------------------------------------------------------------------------


def test_partition_map_grid_colours_and_bounds(engine: sa.Engine, unique_name: str) -> None:
    store, stream, _ = _subscription(engine, unique_name, Recorder(), partitions=2)
    with engine.begin() as conn:
        for n in range(4):  # n-0 and n-2 land in partition 0, n-1 and n-3 in partition 1
            store.write(f"n-{n}", Numbered(number=n), conn=conn)
        for n in range(5):
            store.write("n-0", Numbered(number=10 + n), conn=conn)
    stream.projector.run()
    pmap = PartitionMap(stream, positions=4, live=False)
    try:
        assert pmap.partition_count == 2 and pmap.projected == 9
        head0, cells0 = pmap.partitions[0]
        assert head0 == 6 and [c[0] for c in cells0] == [3, 4, 5, 6]  # the last 4 positions
        assert {c[1] for c in cells0} == {"n-0"}
        head1, cells1 = pmap.partitions[1]
        assert head1 == 1 and [(c[0], c[1]) for c in cells1] == [(0, "n-1"), (1, "n-3")]
        # Keys follow first appearance in the store.
        assert pmap.stream_keys == {"n-0": "A", "n-1": "B", "n-2": "C", "n-3": "D"}
        grid = pmap.grid.value
        assert "+3" in grid  # partition 0 holds 7, 4 shown
        assert ">3-6<" in grid and ">0-1<" in grid
        for name in ("n-0", "n-1", "n-3"):
            assert f'dnb-pm-cell dnb-c{stream_colour_index(name)}"' in grid
            assert f"{name} v" in grid  # the hover text names the stream and its version
        assert 'title="partition 1, position 1: n-3 v1' in grid
        assert data_rows(grid) == 2
        assert '<td colspan="2"></td>' in grid  # partition 1 shows 2 of the 4 columns
        assert data_rows(pmap.assignments_table.value) == 9
        assert "Latest assignments" in pmap.assignments_table.value
        assert "PartitionMap" in pmap.header.value and "2 partitions" in pmap.header.value

        store.write("n-1", Numbered(number=99))
        stream.projector.run()
        pmap.refresh_button.click()
        assert pmap.projected == 10 and pmap.partitions[1][0] == 2
    finally:
        pmap.close()


def test_stream_colours_are_deterministic() -> None:
    # A hash of the name, not Python's per-process salted hash().
    for name in ("orders-1", "", HOSTILE, "ü-stream"):
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        assert stream_colour_index(name) == int.from_bytes(digest, "big") % len(PALETTE)
    assert [legend_key(i) for i in (0, 25, 26, 27, 51, 52)] == ["A", "Z", "AA", "AB", "AZ", "BA"]


def test_partition_map_bounds_partitions(engine: sa.Engine, unique_name: str) -> None:
    store, stream, _ = _subscription(engine, unique_name, Recorder())
    with engine.begin() as conn:
        for n in range(12):
            store.write(f"n-{n}", Numbered(number=n), conn=conn)
    stream.projector.run()
    pmap = PartitionMap(stream, max_partitions=5, assignments=4, live=False)
    try:
        assert sorted(pmap.partitions) == [0, 1, 2, 3, 4] and pmap.partition_count == 12
        assert "7 more partitions not shown" in pmap.grid.value
        assert data_rows(pmap.assignments_table.value) == 4
        assert "8 earlier assignments not shown" in pmap.assignments_table.value
    finally:
        pmap.close()


# -- SubscriptionStepper --------------------------------------------------------------------------


def test_stepper_step_shows_what_moved_and_reset_redelivers(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=2)
    for n in range(3):
        store.write(f"n-{n}", Numbered(number=n))
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    try:
        assert "no step yet" in stepper.last_step.value
        assert sorted((s.partition, s.lag) for s in stepper.states) == [(0, 2), (1, 1)]
        assert "lag 3" in text(stepper.header.value)

        stepper.step_button.click()
        assert stepper.last_error is None, stepper.error.value
        assert sorted(recorder.seen) == [0, 1, 2]
        assert stepper.last_report is not None and len(stepper.last_report) == 3
        assert data_rows(stepper.last_step.value) == 3
        assert "Step: 3 messages handled" in stepper.last_step.value
        assert [s.lag for s in stepper.states] == [0, 0]
        assert stepper.bars.value.count("lag 0") == 2 and "width:100%" in stepper.bars.value
        assert "lag 0" in text(stepper.header.value)

        stepper.step_button.click()
        assert "nothing to do" in stepper.last_step.value and len(recorder.seen) == 3

        stepper.reset_button.click()
        assert "back to the beginning" in stepper.last_step.value
        assert sorted(s.lag for s in stepper.states) == [1, 2]
        assert "width:0%" in stepper.bars.value
        stepper.step_button.click()
        assert sorted(recorder.seen) == [0, 0, 1, 1, 2, 2]  # delivered again
        assert data_rows(stepper.last_step.value) == 3
    finally:
        stepper.close()


def test_stepper_step_n_run_to_end_and_project_first(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=1)
    store.write_all("n-0", [Numbered(number=n) for n in range(6)])
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, step_n=2, live=False)
    try:
        stepper.step_n_button.click()
        assert recorder.seen == [0, 1] and data_rows(stepper.last_step.value) == 2
        assert "Step 2: 2 messages handled" in stepper.last_step.value
        assert [s.lag for s in stepper.states] == [4]
        stepper.n_input.value = 3
        stepper.step_n_button.click()
        assert recorder.seen == [0, 1, 2, 3, 4]
        stepper.run_button.click()
        assert recorder.seen == list(range(6)) and [s.lag for s in stepper.states] == [0]
        assert "Run to end: 1 message handled" in stepper.last_step.value

        # One message travels: written, projected by the stepper, handled.
        store.write("n-0", Numbered(number=42))
        stepper.project_first.value = True
        stepper.step_button.click()
        assert recorder.seen[-1] == 42
        assert stepper.last_projection is not None and len(stepper.last_projection) == 1
        assert "ProjectionReport" in stepper.last_step.value and "RunnerReport" in stepper.last_step.value
        assert [s.lag for s in stepper.states] == [0]

        store.write_all("n-0", [Numbered(number=n) for n in range(50, 53)])
        stepper.run_button.click()
        assert recorder.seen[-3:] == [50, 51, 52] and [s.lag for s in stepper.states] == [0]
    finally:
        stepper.close()


def test_stepper_shows_handler_errors(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    recorder.fail_on = {1}
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=1)
    store.write_all("n-0", [Numbered(number=n) for n in range(3)])
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    try:
        stepper.step_button.click()  # must not raise: the error shows in the widget
        assert isinstance(stepper.last_error, RuntimeError)
        assert "RuntimeError" in stepper.error.value and HOSTILE_ESCAPED in stepper.error.value
        assert HOSTILE not in stepper.error.value
        assert "delivered again" in stepper.error.value
        assert recorder.seen == [0]
        assert stepper.last_report is not None
        assert [item.outcome for item in stepper.last_report.handled] == ["handled", "failed"]
        assert data_rows(stepper.last_step.value) == 2
        assert [s.lag for s in stepper.states] == [2]  # the failed message was not acknowledged

        # The traceback, on demand: a closed toggle under the error line, the runner's note
        # naming the failed message at its end; escaped like the rest.
        failed = stepper.last_report.handled[-1]
        toggle = stepper.error.value.split('<details class="dnb-traceback">', 1)[1]
        assert toggle.startswith("<summary>show traceback</summary><pre")
        shown = html.unescape(toggle)
        assert "Traceback (most recent call last)" in shown and "raise RuntimeError(HOSTILE)" in shown
        assert (
            shown.rstrip()
            .removesuffix("</pre></details></div>")
            .rstrip()
            .endswith(
                f"while subscription {subscription.name!r} handled message {failed.message_id} (Numbered, "
                f"stream 'n-0' version 2, partition 0 position 1, global position "
                f"{list(store.read('n-0'))[1].global_position}; 1 attempt(s))"
            )
        )
        assert HOSTILE not in toggle
        # A display of the widget after the failure (the static snapshot) shows it too.
        snapshot = stepper.snapshot_html()
        assert "RuntimeError" in text(snapshot) and "<summary>show traceback</summary>" in snapshot
        assert f"handled message {failed.message_id}" in html.unescape(snapshot)

        recorder.fail_on = set()
        stepper.step_button.click()
        assert stepper.last_error is None and stepper.error.value == ""
        assert "show traceback" not in stepper.snapshot_html()
        assert recorder.seen == [0, 1, 2] and [s.lag for s in stepper.states] == [0]
    finally:
        stepper.close()


def test_a_long_traceback_keeps_its_end() -> None:
    try:
        raise ValueError("x" * (2 * TRACEBACK_CHARS))
    except ValueError as error:
        error.add_note("while handling the message that failed")
        page = error_html(error, "Step stopped by an error")
    assert len(page) < TRACEBACK_CHARS + 5_000  # the error line and the traceback, both bounded
    trace = html.unescape(page.split("<pre", 1)[1])
    assert "characters cut)" in trace
    assert trace.removesuffix("</pre></details>").endswith("while handling the message that failed\n")


def test_stepper_counts_agree_with_the_report(engine: sa.Engine, unique_name: str) -> None:
    """Run to end over four good messages and a failing one: everything says 4 handled,
    1 failed (it used to say "5 messages handled" beside "handled 4, failed 1")."""
    recorder = Recorder()
    recorder.fail_on = {4}
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=1)
    store.write_all("n-0", [Numbered(number=n) for n in range(6)])
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    try:
        stepper.run_button.click()
        shown = text(stepper.last_step.value)
        assert "5 messages handled" not in shown
        assert "Run to end: 5 messages — 4 handled, 1 failed" in shown
        assert "messages 5 · handled 4 · failed 1" in shown
        assert "1 message failed: not acknowledged, delivered again by the next step" in shown
        report = stepper.last_report
        assert report is not None and report.counts() == {"handled": 4, "failed": 1}
        assert repr(report) == f"<RunnerReport {subscription.name}: 4 handled, 1 failed>"
        assert '<div class="dnb-warn">Run to end: 5 messages' in stepper.last_step.value
        assert "Run to end stopped by an error" in text(stepper.error.value)
    finally:
        stepper.close()


def test_stepper_says_when_messages_had_no_handler(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByNumber(1), stream_wildcards=["n-%"]
    )
    only_numbered: MessageHandlerRegister[Any] = MessageHandlerRegister()
    seen: list[int] = []

    def handle_numbered(message: Numbered) -> None:
        seen.append(message.number)

    only_numbered.register(handle_numbered)
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=only_numbered)
    store.write_all(
        "n-0", [Numbered(number=1), *(Renamed(name=f"r{n}") for n in range(3)), Numbered(number=2)]
    )
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    try:
        stepper.step_button.click()
        assert seen == [1, 2] and [s.lag for s in stepper.states] == [0]
        page = stepper.last_step.value
        shown = text(page)
        assert "Step: 5 messages — 2 handled, 3 acknowledged without a handler (Renamed ×3)" in shown
        assert '<div class="dnb-warn">Step: 5 messages' in page  # not the muted note style
        warning = (
            "3 messages acknowledged without a handler: Renamed ×3 — register a handler for them, "
            "or they are skipped for good"
        )
        assert f'<div class="dnb-warn">{html.escape(warning)}</div>' in page
        assert "messages 5 · handled 2 · no handler 3" in shown
        assert warning in text(stepper.snapshot_html())
        assert stepper.last_error is None
    finally:
        stepper.close()


def test_a_click_during_another_action_is_refused(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=1)
    store.write("n-0", Numbered(number=1))
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with stepper._action_lock:
            held.set()
            release.wait(WAIT_S)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(WAIT_S)
        stepper.step_button.click()
        assert recorder.seen == [] and "busy" in stepper.status.value
    finally:
        release.set()
        holder.join()
    stepper.step_button.click()
    assert recorder.seen == [1] and stepper.status.value == ""
    stepper.close()


def test_refresh_never_blocks_and_shows_its_own_errors(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=1)
    store.write("n-0", Numbered(number=1))
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    try:
        recorder.on_handle = stepper.refresh  # called while Step holds the widget's lock
        stepper.step_button.click()  # a waiting refresh() would hang here
        assert recorder.seen == [1] and [s.lag for s in stepper.states] == [0]

        heads = quote_ident(stream.names.heads_table)
        moved = quote_ident(stream.names.heads_table + "_x")
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {heads} RENAME TO {moved}")
        try:
            stepper.refresh()
            assert "could not refresh" in stepper.error.value and stepper.last_error is not None
        finally:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {moved} RENAME TO {heads}")
        stepper.refresh()
        assert stepper.error.value == "" and stepper.last_error is None
    finally:
        stepper.close()


# -- safety and display ---------------------------------------------------------------------------


def test_hostile_stream_names_are_escaped_everywhere(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, wildcards=["%"])
    store.write(HOSTILE, Numbered(number=1, text=HOSTILE))
    store.write("n-1", Renamed(name="</pre>" + HOSTILE))
    stream.projector.run()
    stepper = SubscriptionStepper(subscription, live=False)
    stepper.step_button.click()
    made = [StreamBrowser(store, live=False), PartitionMap(stream, live=False), stepper]
    browser = made[0]
    try:
        browser.selector.value = browser.rows[0][0]
        pages = [*html_values(browser), browser.snapshot_html()]
        browser.selector.value = browser.rows[1][0]
        pages += [browser.payload.value, browser.snapshot_html()]
        for widget in made[1:]:
            pages += [*html_values(widget), widget.snapshot_html()]
        for widget in made:
            pages.append(widget._repr_mimebundle_()["text/html"])
        assert all(HOSTILE not in page for page in pages)
        assert "</pre><script" not in "".join(pages)
        joined = "".join(pages)
        assert HOSTILE_ESCAPED in browser.table.value and HOSTILE_ESCAPED in browser.snapshot_html()
        assert HOSTILE_ESCAPED in made[1].grid.value and HOSTILE_ESCAPED in made[1].snapshot_html()
        assert joined.count(HOSTILE_ESCAPED) > 5
    finally:
        for widget in made:
            widget.close()


def test_widgets_degrade_to_static_html(engine: sa.Engine, unique_name: str) -> None:
    store, stream, subscription = _subscription(engine, unique_name, Recorder(), partitions=2)
    store.write_all("n-1", [Numbered(number=n) for n in range(3)])
    stream.projector.run()
    made = [StreamBrowser(store, live=False), PartitionMap(stream, live=False)]
    made.append(SubscriptionStepper(subscription, live=False))
    try:
        for widget in made:
            bundle = widget._repr_mimebundle_(include=None, exclude=None)
            assert "application/vnd.jupyter.widget-view+json" in bundle
            assert bundle["text/plain"] == repr(widget)
            assert bundle["text/plain"].startswith(type(widget).__name__ + "(")
            page = bundle["text/html"]
            assert page == widget._repr_html_()
            assert page.startswith('<div class="dnb">') and "<script" not in page.lower()
            assert "<table" in page and len(page) < 60_000
        assert "n-1" in made[0]._repr_html_() and ">0-2<" in made[1]._repr_html_()
        assert "lag 3" in text(made[2]._repr_html_())
        # Read as plain text (what a sanitiser that strips the style leaves), each says what it
        # shows: the facts stay apart, the partition map's keys stand for colours, a bar has
        # its percentage.
        browser, pmap, stepper = (text(widget.snapshot_html()) for widget in made)
        assert f"StreamBrowser {store.name} · % messages 1-3 of 3 global position stream version" in browser
        assert "partition positions 1 0-2 A A A A n-1 Latest assignments" in pmap
        assert f"stream {stream.name} · 1 partition · lag 3 · parked 0 · initialised no" in stepper
        assert "partition position head lag 1 0% -1 2 lag 3" in stepper
        subscription.runner.step(1)
        made[2].refresh()
        assert "partition position head lag 1 33% 0 2 lag 2" in text(made[2].snapshot_html())
    finally:
        for widget in made:
            widget.close()


# -- live refresh ---------------------------------------------------------------------------------


def test_live_browser_follows_writes_and_close_stops_everything(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    store.write("s-1", Numbered(number=0))
    before = listener_pids(engine)
    browser = StreamBrowser(store, live=True)
    try:
        assert browser.live
        thread = browser.live_thread
        assert thread is not None and thread.is_alive()
        pid = browser._live._listener.backend_pid  # type: ignore[union-attr]
        assert pid in listener_pids(engine)
        assert browser.total == 1

        # Written from another thread (its own connection); no refresh() call here.
        writer = threading.Thread(
            target=lambda: store.write_all("s-2", [Numbered(number=n) for n in range(3)])
        )
        writer.start()
        writer.join()
        assert wait_for(lambda: browser.total == 4), browser.total
        assert data_rows(browser.table.value) == 4
    finally:
        browser.close()
    assert not browser.live and not thread.is_alive()
    assert wait_for(lambda: pid not in listener_pids(engine))
    assert listener_pids(engine) <= before


def test_live_partition_map_and_stepper_follow_projection(engine: sa.Engine, unique_name: str) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=2)
    pmap = PartitionMap(stream, live=True)
    stepper = SubscriptionStepper(subscription, live=True)
    try:
        assert pmap.projected == 0 and stepper.states == []
        store.write_all("n-1", [Numbered(number=n) for n in range(2)])
        projector = threading.Thread(target=stream.projector.run)
        projector.start()
        projector.join()
        assert wait_for(lambda: pmap.projected == 2)
        assert "n-1" in pmap.grid.value
        assert wait_for(lambda: [(s.partition, s.lag) for s in stepper.states] == [(1, 2)])
        assert "lag 2" in stepper.bars.value
    finally:
        threads = [pmap.live_thread, stepper.live_thread]
        pmap.close()
        stepper.close()
    assert all(t is not None and not t.is_alive() for t in threads)


def test_live_refresh_is_throttled_and_coalesced(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    calls: list[float] = []
    seen: list[int] = []

    def refresh() -> None:
        calls.append(time.monotonic())
        with engine.connect() as conn:
            seen.append(conn.exec_driver_sql(f"SELECT count(*) FROM {store._storage.table}").scalar_one())

    refresher = LiveRefresher(engine, [store.notification_channel], refresh)
    refresher.start()
    try:
        started = time.monotonic()
        for n in range(40):  # 40 commits, 40 notifications
            store.write("s-1", Numbered(number=n))
        elapsed = time.monotonic() - started
        # No wake-up is lost: a refresh eventually sees the last write.
        assert wait_for(lambda: seen[-1:] == [40]), seen
        time.sleep(2 * refresher.min_interval)
        assert seen[-1] == 40
        # At most one refresh per interval (the first one comes at once).
        assert 1 <= len(calls) <= 2 + (calls[-1] - started) / refresher.min_interval, (calls, elapsed)
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert all(gap >= refresher.min_interval * 0.9 for gap in gaps), gaps
    finally:
        refresher.stop()
    assert not refresher.is_running and refresher.error is None


class FakeLoop:
    """Stands in for the kernel's io_loop: callbacks wait until the main thread runs them."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def add_callback(self, callback: Callable[[], None]) -> None:
        with self.lock:
            self.callbacks.append(callback)

    def run_pending(self) -> int:
        with self.lock:
            pending, self.callbacks = self.callbacks, []
        for callback in pending:
            callback()
        return len(pending)


def test_in_a_kernel_widgets_update_on_the_main_thread_only(
    engine: sa.Engine, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = FakeLoop()
    monkeypatch.setattr(live_module, "kernel_io_loop", lambda: loop)
    store = _store(engine, unique_name)
    browser = StreamBrowser(store)  # live by default when a kernel loop is found
    refreshed_on: list[threading.Thread] = []
    original = browser._refresh

    def spy() -> None:
        refreshed_on.append(threading.current_thread())
        original()

    browser._refresh = spy  # type: ignore[method-assign]
    try:
        assert browser.live
        for n in range(5):
            store.write("s-1", Numbered(number=n))
        assert wait_for(lambda: bool(loop.callbacks))
        time.sleep(0.3)
        assert browser.total == 0 and refreshed_on == []  # nothing touched from the thread
        assert len(loop.callbacks) == 1  # coalesced: one pending callback at a time
        assert loop.run_pending() == 1
        assert browser.total == 5 and refreshed_on == [threading.main_thread()]
    finally:
        browser.close()
    assert loop.run_pending() <= 1 and browser.total == 5  # a late callback after close does nothing


def test_live_defaults_to_off_outside_a_kernel(engine: sa.Engine, unique_name: str) -> None:
    browser = StreamBrowser(_store(engine, unique_name))
    try:
        assert not browser.live and browser.live_thread is None
    finally:
        browser.close()


# -- progress bars --------------------------------------------------------------------------------


def test_runs_with_a_progress_bar(
    engine: sa.Engine, unique_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=4)
    with engine.begin() as conn:
        for k in range(4):
            store.write_all(f"n-{k}", [Numbered(number=k * 1000 + i) for i in range(500)], conn=conn)
    capsys.readouterr()
    stream.projector.run(progress=True)
    assert stream.projector.step().projected == []
    err = capsys.readouterr().err
    assert "2000/2000" in err and "projecting" in err

    subscription.runner.run(progress=True)
    assert len(recorder.seen) == 2000 and len(set(recorder.seen)) == 2000
    err = capsys.readouterr().err
    assert "2000/2000" in err and "handling" in err

    # Auto (None): outside IPython no bar; False: never.
    store.write_all("n-0", [Numbered(number=-n) for n in range(1, 1500)])
    stream.projector.run()
    subscription.runner.run_once(progress=False)
    assert len(recorder.seen) == 3499
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError):
        stream.projector.run(progress="yes")  # type: ignore[arg-type]


# -- plots ----------------------------------------------------------------------------------------


def test_plots_return_figures(engine: sa.Engine, unique_name: str) -> None:
    from matplotlib.figure import Figure

    recorder = Recorder()
    store, stream, subscription = _subscription(engine, unique_name, recorder, partitions=3)
    store.write_all("n-0", [Numbered(number=n) for n in range(4)])
    store.write_all("n-2", [Numbered(number=n) for n in range(2)])
    store.write("n-1", Numbered(number=9))
    stream.projector.run()
    subscription.runner.step(3)

    figure = plot_partition_sizes(stream)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    assert [p.get_height() for p in ax.patches] == [4, 1, 2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]

    lag_figure = plot_subscription_lag(subscription)
    (lag_ax,) = lag_figure.axes
    handled, waiting = lag_ax.containers
    assert len(handled) == len(waiting) == 3
    assert [b.get_height() for b in handled] + [b.get_height() for b in waiting] == [3, 0, 0, 1, 1, 2]
    assert "lag 4" in lag_ax.get_title()
    # Acknowledged, not "handled": the position also moves past messages without a handler.
    assert [t.get_text() for t in lag_ax.get_legend().get_texts()] == ["acknowledged", "waiting (lag)"]

    import matplotlib.pyplot as plt

    own, own_ax = plt.subplots()
    try:
        assert plot_subscription_lag(subscription, ax=own_ax) is own
        assert len(own_ax.patches) == 6
    finally:
        plt.close(own)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")

    empty = _subscription(engine, unique_name + "e", Recorder())[1]
    assert len(plot_partition_sizes(empty).axes[0].patches) == 0


# -- AggregateTimeline ----------------------------------------------------------------------------


class _BasketEvent(pydantic.BaseModel):
    basket_id: str
    event_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)

    def get_message_id(self) -> uuid.UUID:
        return self.event_id

    def get_message_time(self) -> dt.datetime:
        return dt.datetime(2024, 5, 6, tzinfo=dt.timezone.utc)


class BasketOpened(_BasketEvent):
    owner: str


class ItemAdded(_BasketEvent):
    item: str
    price: int


class ItemRemoved(_BasketEvent):
    item: str


BasketEvent = BasketOpened | ItemAdded | ItemRemoved


@dataclasses.dataclass
class LastAdded:
    item: str
    price: int


class Basket(EventSourcedAggregateRoot[str, BasketEvent]):
    def __init__(self) -> None:
        super().__init__()
        self.id: str | None = None
        self.owner = ""
        self.items: dict[str, int] = {}
        self.total = 0
        self.last_added: LastAdded | None = None

    def get_id(self) -> str | None:
        return self.id

    def _apply(self, event: BasketEvent) -> None:
        if isinstance(event, BasketOpened):
            self.id, self.owner = event.basket_id, event.owner
        elif isinstance(event, ItemAdded):
            self.items[event.item] = event.price
            self.total += event.price
            self.last_added = LastAdded(event.item, event.price)
        else:
            self.total -= self.items.pop(event.item)


def highlighted(page: str) -> dict[str, str]:
    """The highlighted rows of a timeline's state table: field -> its mark (changed / removed)."""
    rows = re.findall(r'<tr class="dnb-changed"><td>([^<]*)</td>.*?dnb-changed-mark">(\w+)<', page)
    return {html.unescape(name): mark for name, mark in rows}


def test_aggregate_timeline_slides_through_versions_and_follows_new_events(
    engine: sa.Engine, unique_name: str
) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(BasketEvent))
    repo: EventStoreRepo[BasketEvent, Basket, str] = EventStoreRepo(store, Basket, "basket")
    basket = Basket()
    for event in [
        BasketOpened(basket_id="b1", owner=HOSTILE),
        ItemAdded(basket_id="b1", item="apple", price=3),
        ItemAdded(basket_id="b1", item="pear", price=2),
        ItemRemoved(basket_id="b1", item="apple"),
    ]:
        basket.apply(event)
    repo.add(basket)

    timeline = AggregateTimeline(repo, "b1", live=True)
    try:
        assert timeline.live
        assert (timeline.slider.min, timeline.slider.max, timeline.slider.value) == (1, 4, 4)
        assert highlighted(timeline.state_view.value) == {"items": "changed", "total": "changed"}
        assert "Event 4: ItemRemoved" in text(timeline.event_view.value)

        timeline.slider.value = 2
        assert timeline.shown is not None and timeline.shown.event_type == "ItemAdded"
        # A dataclass attribute is spelled out field by field; its None before is gone.
        assert timeline.changed_fields == (
            "items",
            "total",
            "last_added.item",
            "last_added.price",
            "last_added",
        )
        assert highlighted(timeline.state_view.value) == {
            "items": "changed",
            "total": "changed",
            "last_added.item": "changed",
            "last_added.price": "changed",
            "last_added": "removed",
        }
        state_text = text(timeline.state_view.value)
        assert "State after version 2 (5 fields changed)" in state_text
        assert "total 3 changed 0" in state_text  # the value, and the one before
        assert "version 2 of 4" in text(timeline.header.value)
        assert "apple" in text(timeline.event_view.value)

        timeline.slider.value = 1
        assert highlighted(timeline.state_view.value) == {"id": "changed", "owner": "changed"}
        assert HOSTILE_ESCAPED in timeline.state_view.value and HOSTILE not in timeline.state_view.value

        timeline.play.value = 3  # what Play's ticks do
        assert timeline.slider.value == 3
        assert highlighted(timeline.state_view.value) == {
            "items": "changed",
            "total": "changed",
            "last_added.item": "changed",
            "last_added.price": "changed",
        }
        assert "last_added.item pear changed apple" in text(timeline.state_view.value)

        # A new event while an earlier version is shown: it appears at the end, the view stays.
        basket.apply(ItemAdded(basket_id="b1", item="plum", price=7))
        repo.save(basket, expected_version=4)
        assert wait_for(lambda: timeline.slider.max == 5), timeline.slider.max
        assert timeline.play.max == 5 and timeline.slider.value == 3
        timeline.show_version(5)
        assert "Event 5: ItemAdded" in text(timeline.event_view.value)

        # At the end, the widget follows the new event.
        basket.apply(ItemRemoved(basket_id="b1", item="pear"))
        repo.save(basket, expected_version=5)
        assert wait_for(lambda: timeline.slider.value == 6), timeline.slider.value
        assert "Event 6: ItemRemoved" in text(timeline.event_view.value)
        assert highlighted(timeline.state_view.value) == {"items": "changed", "total": "changed"}
        with pytest.raises(ValueError, match="at most 6"):
            timeline.show_version(7)

        columns = set(repo.history("b1").columns)
        assert {"state.items", "state.last_added.item", "state.last_added.price"} <= columns

        bundle = timeline._repr_mimebundle_(include=None, exclude=None)
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert bundle["text/plain"] == "AggregateTimeline(stream='basket-b1', version=6 of 6)"
        static = bundle["text/html"]
        assert data_rows(static) == 6 and "<script" not in static.lower()
        assert "state.total" in static and HOSTILE_ESCAPED in static
        assert timeline.last_error is None
    finally:
        timeline.close()
    assert not timeline.live


def test_aggregate_timeline_refuses_bad_arguments(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(BasketEvent))
    repo: EventStoreRepo[BasketEvent, Basket, str] = EventStoreRepo(store, Basket, "basket")
    with pytest.raises(NotFound):
        AggregateTimeline(repo, "nobody", live=False)
    with pytest.raises(TypeError, match="EventStoreRepo"):
        AggregateTimeline(store, "b1", live=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval_ms"):
        AggregateTimeline(repo, "b1", interval_ms=0, live=False)

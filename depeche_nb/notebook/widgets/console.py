"""`OperationsConsole(engine_or_store)`: one widget over a whole database (every recorded
store, aggregated stream and subscription) or one store, for watching and unblocking workers
from a notebook.

It shows (read by `engine.operations`, see there for what each number is and costs):

* every aggregated stream: partitions, projected messages, projection lag, the age of the
  projector's last step, dead letters;
* every subscription: per partition its position, head, lag and the session holding the
  partition's lock right now (pid, application_name, client, session start, last
  statement: PostgreSQL keeps no grant time for advisory locks, the two bound it);
* unresolved parked messages, each with Replay and Discard. Nothing happens on the first
  click: it opens a confirm row naming the message and what will happen, and only its
  Confirm button acts (Cancel, or another request, drops it). Replay runs the subscription's
  handler in this kernel (`Subscription.replay_parked`), so it needs the `Subscription`
  object: pass it in `subscriptions=`, `add_subscription()`, or run it in an Executor of this
  process; Discard marks the message dealt with (`ParkedMessages.resolve`);
* "why is partition N behind?": the next message and its age, the lock holder, the
  partition's parked messages, what this process's Executors report. By default the
  partition furthest behind, else the one picked with "Why behind?";
* the health of the Executors of this process: those running on the same database are
  found by themselves (`engine.executor.running_executors`), others are added with
  `add_executor()`. Executors in other processes report health only to themselves; their
  partition locks show in the subscriptions' tables.

Read-only unless Confirm is pressed: a refresh runs one READ ONLY transaction of bounded
statements, takes no lock and creates nothing. Live (default: in a kernel) it refreshes on
the notifications of every shown store and stream, and every `refresh_every` seconds,
since acknowledgements, lock changes and parking send no notification.
"""

from __future__ import annotations

import dataclasses as _dc
from collections.abc import Iterable
from typing import Any

import ipywidgets as widgets
import sqlalchemy as sa

from depeche_nb.engine.executor import Executor, running_executors
from depeche_nb.engine.message_store import MessageStore
from depeche_nb.engine.operations import (
    OperationsSnapshot,
    PartitionDiagnosis,
    check_partition,
    diagnose_partition,
    read_operations,
)
from depeche_nb.engine.parking import DISCARDED, ParkedMessage, ParkedMessages
from depeche_nb.engine.subscription import Subscription
from depeche_nb.notebook import html as h
from depeche_nb.notebook import operations_html as oh
from depeche_nb.notebook.reprs import render_executor_health
from depeche_nb.notebook.widgets.base import DnbWidget, make_button, page, positive_int
from depeche_nb.postgres.connection import same_database
from depeche_nb.postgres.names import StoreNames
from depeche_nb.postgres.stream_tables import StreamNames

REPLAY = "replay"
DISCARD = "discard"
BUSY = "busy: the previous action is still running"
NO_HANDLER = (
    "Replay runs the subscription's handler in this kernel: give the console the Subscription "
    "(OperationsConsole(..., subscriptions=[sub]) or console.add_subscription(sub))"
)
ERROR_CHARS = 300


@_dc.dataclass(frozen=True)
class PendingAction:
    """A Replay or Discard waiting for its confirmation."""

    kind: str  # REPLAY or DISCARD
    subscription: str
    parked_id: int
    message: ParkedMessage

    def describe(self) -> str:
        m = self.message
        what = (
            "runs the handler now; on success the message is marked replayed, on an error it stays parked"
            if self.kind == REPLAY
            else "marks it discarded without handling it"
        )
        return (
            f"{self.kind.capitalize()} parked message #{m.id} of {self.subscription} ({m.message_type} "
            f"at partition {m.partition}, position {m.position}; {h.cut(m.error, 120)})? This {what}."
        )


def _target(target: object) -> tuple[sa.Engine, str | None]:
    if isinstance(target, sa.Engine):
        return target, None
    if isinstance(target, MessageStore):
        return target.engine, target.name
    raise TypeError(
        "OperationsConsole takes a SQLAlchemy Engine (the whole database, e.g. depeche_nb.connect()) "
        f"or a MessageStore (its aggregated streams), got {type(target).__name__}"
    )


def _seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, or None, got {value!r}")
    return float(value)


class _ParkedRow(widgets.HBox):  # type: ignore[misc]
    """One parked message: what it is, and its Replay and Discard buttons."""

    def __init__(self, console: OperationsConsole, subscription: str, parked_id: int) -> None:
        self.text = widgets.HTML(value="")
        self.text.add_class("dnb-console-parked-text")
        self.replay = make_button(
            "Replay", "dnb-console-replay", "run the handler again (asks to confirm)", "redo"
        )
        self.discard = make_button(
            "Discard", "dnb-console-discard", "mark it dealt with (asks to confirm)", "trash"
        )
        self.replay.on_click(lambda _: console.request_replay(subscription, parked_id))
        self.discard.on_click(lambda _: console.request_discard(subscription, parked_id))
        for button in (self.replay, self.discard):
            button.layout.flex = "0 0 auto"
        super().__init__([self.replay, self.discard, self.text])
        self.add_class("dnb-console-parked-row")

    def show(self, subscription: str, message: ParkedMessage, can_replay: bool) -> None:
        text = (
            f"{subscription} #{message.id} · partition {message.partition} position {message.position} · "
            f"{message.message_type} · {message.status} after {h.count(message.attempts, 'attempt')} · "
            f"{h.cut(message.error, ERROR_CHARS)} · recorded {h.plain(message.recorded_at)}"
        )
        html = f'<span class="dnb-name">{h.esc(text)}</span>'
        if self.text.value != html:
            self.text.value = html
        self.replay.disabled = not can_replay
        self.replay.tooltip = "run the handler again (asks to confirm)" if can_replay else NO_HANDLER


class OperationsConsole(DnbWidget):
    """Operations view of a database (`engine`) or one store: streams, subscriptions and who
    holds their partitions, parked messages with Replay/Discard (confirmed), "why is
    partition N behind?" and this process's Executors (see the module notes)."""

    def __init__(
        self,
        target: sa.Engine | MessageStore[Any],
        *,
        subscriptions: Iterable[Subscription[Any]] = (),
        executors: Iterable[Executor] = (),
        max_partitions: int = 20,
        max_parked: int = 20,
        live: bool | None = None,
        refresh_every: float | None = 10.0,
    ) -> None:
        # Every argument is checked before the database is touched.
        self.engine, self.store_name = _target(target)
        if isinstance(subscriptions, (str, Subscription)) or isinstance(executors, Executor):
            raise TypeError("subscriptions and executors take iterables (e.g. a list) of them")
        given_subscriptions = list(subscriptions)
        given_executors = list(executors)
        for item in given_subscriptions:
            self._check_subscription(item)
        for executor in given_executors:
            self._check_executor(executor)
        self.max_partitions = positive_int("max_partitions", max_partitions, 1000)
        self.max_parked = positive_int("max_parked", max_parked, 1000)
        idle = _seconds("refresh_every", refresh_every)
        super().__init__()
        self._subscriptions = {s.name: s for s in given_subscriptions}
        self._executors = given_executors
        self.snapshot: OperationsSnapshot | None = None
        self.diagnosis: PartitionDiagnosis | None = None
        self.pending: PendingAction | None = None
        self._drill: tuple[str, int] | None = None  # None: the partition furthest behind
        self.last_outcome = ""  # what the last Confirm or Cancel did, as the console shows it
        self._refresh_every = idle
        self.parked_rows: dict[tuple[str, int], _ParkedRow] = {}

        self.header = widgets.HTML(value="")
        self.streams_view = widgets.HTML(value="")
        self.streams_view.add_class("dnb-console-streams")
        self.subscriptions_view = widgets.HTML(value="")
        self.subscriptions_view.add_class("dnb-console-subscriptions")
        self.parked_title = widgets.HTML(value="")
        self.parked_box = widgets.VBox([])
        self.parked_box.add_class("dnb-console-parked")
        self.confirm_text = widgets.HTML(value="")
        self.confirm_button = make_button("Confirm", "dnb-console-confirm", "do it now", "check")
        self.cancel_button = make_button("Cancel", "dnb-console-cancel", "do nothing", "times")
        self.confirm_button.on_click(lambda _: self.confirm())
        self.cancel_button.on_click(lambda _: self.cancel())
        for button in (self.confirm_button, self.cancel_button):
            button.layout.flex = "0 0 auto"  # never squeezed by a long question
        self.confirm_row = widgets.HBox([self.confirm_text, self.confirm_button, self.cancel_button])
        self.confirm_row.add_class("dnb-console-confirm-row")
        self.confirm_row.layout.display = "none"
        self.outcome = widgets.HTML(value="")
        self.outcome.add_class("dnb-console-outcome")
        self.drill_subscription = widgets.Dropdown(options=[], description="subscription")
        self.drill_subscription.layout.width = "max-content"
        self.drill_partition = widgets.BoundedIntText(value=0, min=0, max=2**31 - 1, description="partition")
        self.drill_partition.layout.width = "200px"
        self.drill_button = make_button(
            "Why behind?", "dnb-console-why", "explain this partition's lag", "search"
        )
        self.drill_button.on_click(
            lambda _: self._run_locked(
                lambda: self._choose(
                    str(self.drill_subscription.value or ""), int(self.drill_partition.value)
                ),
                BUSY,
            )
        )
        self.diagnosis_view = widgets.HTML(value="")
        self.diagnosis_view.add_class("dnb-console-diagnosis")
        self.executors_view = widgets.HTML(value="")
        self.executors_view.add_class("dnb-console-executors")
        self.refresh_button = make_button(
            "Refresh", "dnb-console-refresh", "read everything again", "refresh"
        )
        self.refresh_button.on_click(lambda _: self._run_locked(self._refresh, BUSY))
        self.children = (
            self.header,
            widgets.HBox([self.refresh_button]),
            self.error,
            self.status,
            self.streams_view,
            self.subscriptions_view,
            self.parked_title,
            self.confirm_row,
            self.outcome,
            self.parked_box,
            widgets.HBox([self.drill_subscription, self.drill_partition, self.drill_button]),
            self.diagnosis_view,
            self.executors_view,
        )
        self.refresh()
        self._start_live(live, self.engine, self._channels(), idle_interval=idle)
        # The header says whether the console is live, known only now.
        self._run_locked(lambda: setattr(self.header, "value", page(self._header_html())))

    # -- what the console knows besides the database ------------------------------------------

    def _check_subscription(self, subscription: object) -> Subscription[Any]:
        if not isinstance(subscription, Subscription):
            raise TypeError(f"subscriptions must be Subscription objects, got {type(subscription).__name__}")
        if not same_database(subscription.stream.engine, self.engine):
            raise ValueError(f"subscription {subscription.name!r} is on another database than this console")
        return subscription

    def _check_executor(self, executor: object) -> Executor:
        if not isinstance(executor, Executor):
            raise TypeError(f"executors must be Executor objects, got {type(executor).__name__}")
        return executor

    def add_subscription(self, subscription: Subscription[Any]) -> None:
        """Let Replay run `subscription`'s handler (and read its own lock and state providers)."""
        checked = self._check_subscription(subscription)
        self._subscriptions[checked.name] = checked
        self.refresh()

    def add_executor(self, executor: Executor) -> None:
        """Show `executor`'s health (one running on this database in this process is shown anyway)."""
        checked = self._check_executor(executor)
        if not any(e is checked for e in self._executors):
            self._executors.append(checked)
        self.refresh()

    @property
    def executors(self) -> list[Executor]:
        """The given Executors, then those running on this database in this process."""
        found = list(self._executors)
        for executor in running_executors():
            if same_database(executor.engine, self.engine) and not any(e is executor for e in found):
                found.append(executor)
        return found

    def known_subscriptions(self) -> dict[str, Subscription[Any]]:
        """The `Subscription` objects Replay can run, by name: the given ones, and those whose
        runners an Executor of this process runs."""
        known: dict[str, Subscription[Any]] = {}
        for executor in self.executors:
            for handler in executor.handlers:
                subscription = getattr(handler, "subscription", None)
                if isinstance(subscription, Subscription) and same_database(
                    subscription.stream.engine, self.engine
                ):
                    known[subscription.name] = subscription
        known.update(self._subscriptions)
        return known

    def _channels(self) -> list[str]:
        if self.snapshot is None:
            return []
        channels = {StoreNames(s.store).channel for s in self.snapshot.streams}
        channels |= {StreamNames(s.name, StoreNames(s.store)).channel for s in self.snapshot.streams}
        return sorted(channels)

    # -- actions (public for code and tests; the buttons call the same under the lock) --------

    def request_replay(self, subscription: str, parked_id: int) -> bool:
        """Ask to replay a parked message: shows the confirm row; nothing runs until `confirm()`."""
        return self._run_locked(lambda: self._request(REPLAY, subscription, parked_id), BUSY)

    def request_discard(self, subscription: str, parked_id: int) -> bool:
        """Ask to discard a parked message: shows the confirm row; nothing changes until `confirm()`."""
        return self._run_locked(lambda: self._request(DISCARD, subscription, parked_id), BUSY)

    def confirm(self) -> bool:
        """Do the pending Replay or Discard (False if another action was running)."""
        return self._run_locked(self._confirm, BUSY)

    def cancel(self) -> bool:
        """Drop the pending Replay or Discard."""
        return self._run_locked(self._cancel, BUSY)

    def why_behind(self, subscription: str, partition: int) -> PartitionDiagnosis | None:
        """Explain `partition` of `subscription` (and keep showing it); the diagnosis."""
        self._run_locked(lambda: self._choose(subscription, partition), BUSY)
        return self.diagnosis

    def _request(self, kind: str, subscription: str, parked_id: int) -> None:
        self.pending = None
        message = self._parked_message(subscription, parked_id)
        if kind == REPLAY and subscription not in self.known_subscriptions():
            self._draw_confirm()
            raise ValueError(NO_HANDLER)
        self.pending = PendingAction(kind, subscription, parked_id, message)
        self.last_outcome = ""
        self._draw_confirm()
        self._draw_outcome()

    def _parked_message(self, subscription: str, parked_id: int) -> ParkedMessage:
        if not isinstance(subscription, str):
            raise TypeError(f"subscription must be a name (str), got {type(subscription).__name__}")
        if isinstance(parked_id, bool) or not isinstance(parked_id, int):
            raise TypeError(f"parked_id must be an int, got {type(parked_id).__name__}")
        shown = [] if self.snapshot is None else self.snapshot.subscriptions
        for status in shown:
            if status.name == subscription:
                for message in status.parked:
                    if message.id == parked_id:
                        return message
        raise KeyError(
            f"parked message {parked_id} of {subscription!r} is not among the unresolved ones shown"
        )

    def _confirm(self) -> None:
        pending, self.pending = self.pending, None
        self._draw_confirm()
        if pending is None:
            self.last_outcome = "nothing to confirm: press Replay or Discard first"
            self._draw_outcome()
            return
        what = f"parked message #{pending.parked_id} of {pending.subscription}"
        try:
            if pending.kind == REPLAY:
                outcome = self.known_subscriptions()[pending.subscription].replay_parked(pending.parked_id)
                self.last_outcome = f"Replayed {what}: the handler returned ({outcome})"
            else:
                ParkedMessages(self.engine, pending.subscription).resolve(pending.parked_id, DISCARDED)
                self.last_outcome = f"Discarded {what}"
        except Exception as error:
            self.last_outcome = ""
            self._show_error(error, f"{pending.kind.capitalize()} of {what} failed; it stays as it was")
        self._draw_outcome()
        self._refresh()

    def _cancel(self) -> None:
        if self.pending is not None:
            self.last_outcome = f"Cancelled: {self.pending.kind} of parked message #{self.pending.parked_id}"
        self.pending = None
        self._draw_confirm()
        self._draw_outcome()

    def _choose(self, subscription: str, partition: int) -> None:
        if not isinstance(subscription, str) or not subscription:
            raise TypeError(f"subscription must be a subscription's name, got {subscription!r}")
        self._drill = (subscription, check_partition(partition))
        self._refresh()

    # -- reading and drawing ------------------------------------------------------------------

    def _refresh(self) -> None:
        known = self.known_subscriptions()
        snapshot = read_operations(self.engine, self.store_name, known=known, parked_limit=self.max_parked)
        self.snapshot = snapshot
        target = self._drill or snapshot.most_behind()
        self.diagnosis = (
            None
            if target is None
            else diagnose_partition(self.engine, *target, known=known, executors=self.executors)
        )
        self._draw(known)

    def _draw(self, known: dict[str, Subscription[Any]]) -> None:
        snapshot = self.snapshot
        assert snapshot is not None
        self.header.value = page(self._header_html())
        self.streams_view.value = page(oh.streams_html(snapshot))
        self.subscriptions_view.value = page(oh.subscriptions_html(snapshot, self.max_partitions))
        self.parked_title.value = page(self._parked_title_html())
        self._draw_parked(snapshot, known)
        self._draw_confirm()
        names = [s.name for s in snapshot.subscriptions]
        if list(self.drill_subscription.options) != names:
            self.drill_subscription.options = names
        chosen = self._drill[0] if self._drill else (self.diagnosis.subscription if self.diagnosis else None)
        if chosen in names:
            self.drill_subscription.value = chosen
        if self.diagnosis is not None:
            self.drill_partition.value = self.diagnosis.partition
        self.diagnosis_view.value = page(self._diagnosis_html())
        self.executors_view.value = page(self._executors_html())

    def _draw_parked(self, snapshot: OperationsSnapshot, known: dict[str, Subscription[Any]]) -> None:
        # Rows are kept by (subscription, id): a row (and the button under the pointer) stays
        # put across refreshes while its message is unresolved.
        shown: dict[tuple[str, int], _ParkedRow] = {}
        for status in snapshot.subscriptions:
            for message in status.parked:
                key = (status.name, message.id)
                row = self.parked_rows.get(key) or _ParkedRow(self, status.name, message.id)
                row.show(status.name, message, status.name in known)
                shown[key] = row
        for key, row in self.parked_rows.items():
            if key not in shown:
                row.close()
        self.parked_rows = shown
        children = tuple(shown.values())
        if tuple(self.parked_box.children) != children:
            self.parked_box.children = children

    def _draw_confirm(self) -> None:
        pending = self.pending
        if pending is None:
            self.confirm_row.layout.display = "none"
            self.confirm_text.value = ""
            return
        self.confirm_button.description = f"Confirm {pending.kind}"
        self.confirm_text.value = page(f'<span class="dnb-warn">{h.esc(pending.describe())}</span>')
        self.confirm_row.layout.display = "flex"

    def _draw_outcome(self) -> None:
        self.outcome.value = page(h.note(self.last_outcome)) if self.last_outcome else ""

    def _header_html(self) -> str:
        snapshot = self.snapshot
        if snapshot is None:
            return h.title("OperationsConsole", self.store_name or "database")
        if self.live:
            every = f" and every {self._refresh_every:g} s" if self._refresh_every else ""
            live = f"live: on notifications{every}"
        else:
            live = "not live: press Refresh"
        return h.title("OperationsConsole", snapshot.store or snapshot.database) + h.facts(
            [
                ("database", snapshot.database),
                ("schema", snapshot.schema),
                ("store", snapshot.store or "all"),
                h.count(len(snapshot.streams), "aggregated stream"),
                h.count(len(snapshot.subscriptions), "subscription"),
                ("lag", f"{sum(s.lag for s in snapshot.subscriptions):,}"),
                ("parked", sum(s.parked_count or 0 for s in snapshot.subscriptions)),
                ("read at", snapshot.read_at),
                live,
            ],
            css={"lag": "dnb-warn" if any(s.lag for s in snapshot.subscriptions) else "dnb-ok"},
        )

    def _parked_title_html(self) -> str:
        subscriptions = [] if self.snapshot is None else self.snapshot.subscriptions
        total = sum(s.parked_count or 0 for s in subscriptions)
        if total == 0:
            return h.section("Parked messages") + h.note(
                "none: no subscription has an unresolved parked message"
            )
        shown = sum(len(s.parked) for s in subscriptions)
        more = f"; the first {self.max_parked} of each subscription shown" if shown < total else ""
        return h.section(f"Parked messages ({total:,}{more})") + h.note(
            "Replay and Discard ask to confirm first; nothing changes before Confirm"
        )

    def _diagnosis_html(self) -> str:
        if self.diagnosis is None:
            return h.section("Why is a partition behind?") + h.note(
                "no partition is behind; pick a subscription and a partition and press Why behind?"
            )
        how = "" if self._drill else h.note("the partition furthest behind (pick another with Why behind?)")
        return oh.diagnosis_html(self.diagnosis) + how

    def _executors_html(self) -> str:
        executors = self.executors
        title = h.section("Executors of this process")
        if not executors:
            return title + h.note(
                "none on this database: an Executor started here shows up by itself (or "
                "console.add_executor(executor)); Executors of other processes report only there, "
                "their partition locks show above"
            )
        return title + "".join(render_executor_health(executor.health()) for executor in executors)

    def snapshot_html(self) -> str:
        if self.snapshot is None:
            return page(self._header_html())
        return page(
            self._header_html(),
            oh.streams_html(self.snapshot),
            oh.subscriptions_html(self.snapshot, self.max_partitions),
            oh.parked_html(self.snapshot),
            self._diagnosis_html(),
            self._executors_html(),
        )

    def __repr__(self) -> str:
        if self.snapshot is None:
            return f"OperationsConsole({self.store_name or 'database'}, not read)"
        return f"OperationsConsole({self.snapshot.summary()})"


__all__ = ["DISCARD", "REPLAY", "OperationsConsole", "PendingAction"]

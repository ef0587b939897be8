"""Subscription runners: lock a partition, handle its next messages, acknowledge, unlock.

`SubscriptionRunner` acknowledges each message right after its handler
returned (or lets the handler do it inside its own transaction);
`BatchedAckSubscriptionRunner` stores the position once per batch, after the
last successfully handled message. Both are steppable for notebooks and
implement `RunOnNotification` for the executor.
"""

from __future__ import annotations

import dataclasses as _dc
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from depeche_nb.core.display import RichRepr, run_view
from depeche_nb.core.errors import PartitionLostError
from depeche_nb.core.identifiers import check_positive_int
from depeche_nb.core.interfaces import (
    ErrorAction,
    RunOnNotificationResult,
    SubscriptionMessage,
    TimeBudget,
)
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.acks import AckOp, BatchAck
from depeche_nb.engine.handlers import HANDLED, IGNORED, NO_HANDLER, PARKED, SubscriptionMessageHandler
from depeche_nb.engine.notification_driven import NotificationDriven
from depeche_nb.engine.parking import IGNORED as STATUS_IGNORED
from depeche_nb.engine.parking import PARKED as STATUS_PARKED
from depeche_nb.engine.progress import open_progress

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.protocols import Claimed, ClaimSource, HandingOver, PartitionClaim

E = TypeVar("E")

FAILED = "failed"
# The handler called `message.ack.rollback()`: not acknowledged, delivered again.
ROLLED_BACK = "rolled back"
# Every outcome, in the order reports list their counts; all but the last two store the
# message's position, so the message is not delivered again.
OUTCOMES = (HANDLED, NO_HANDLER, PARKED, IGNORED, ROLLED_BACK, FAILED)
CONTENTION_RETRY_S = 0.5


# slots: a catch-up run's report holds one of these per delivery.
@_dc.dataclass(frozen=True, slots=True)
class HandledMessage:
    """One message as a runner step dealt with it."""

    partition: int
    position: int
    message_id: uuid.UUID
    message_type: str
    outcome: str
    attempts: int = 1
    error: str | None = None


@_dc.dataclass
class RunnerReport(RichRepr):
    """What one runner step (or run) did: one record per delivery, whatever its outcome.

    `handled` keeps Depeche DB-era naming but lists every outcome (handled, no
    handler, parked, ..., failed); `counts()` tells them apart, and every
    display of a report (its repr, its HTML, the stepper) words them through
    `describe()`, so a failed attempt is never counted as handled.
    """

    subscription_name: str
    handled: list[HandledMessage] = _dc.field(default_factory=list)
    # Partitions with work that another runner had locked at the time.
    contended_partitions: list[int] = _dc.field(default_factory=list)
    # Partitions whose claim ended mid-batch (lock session gone, taken over): abandoned.
    lost_partitions: list[int] = _dc.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.handled)

    def to_dataframe(self) -> pd.DataFrame:
        return run_view("runner_report", self)  # type: ignore[no-any-return]

    def counts(self) -> dict[str, int]:
        """Deliveries per outcome (only outcomes that occurred), in the order of `OUTCOMES`."""
        counts = {outcome: 0 for outcome in OUTCOMES}
        for item in self.handled:
            counts[item.outcome] = counts.get(item.outcome, 0) + 1
        return {outcome: n for outcome, n in counts.items() if n}

    def without_handler(self) -> dict[str, int]:
        """Message type -> how many of its messages were acknowledged without a handler
        (skipped for good: the position moved past them)."""
        types: dict[str, int] = {}
        for item in self.handled:
            if item.outcome == NO_HANDLER:
                types[item.message_type] = types.get(item.message_type, 0) + 1
        return types

    def without_handler_words(self) -> str:
        """'ItemRemoved ×3, ItemRenamed ×1': `without_handler()` in words."""
        return ", ".join(f"{name} ×{n}" for name, n in self.without_handler().items())

    def describe(self) -> str:
        """The counts in words: '4 handled, 1 failed', 'nothing to do', or with
        '3 acknowledged without a handler (ItemRemoved ×3)'."""
        parts = []
        for outcome, n in self.counts().items():
            if outcome == NO_HANDLER:
                parts.append(f"{n} acknowledged without a handler ({self.without_handler_words()})")
            else:
                parts.append(f"{n} {outcome}")
        return ", ".join(parts) or "nothing to do"

    def summary(self) -> str:
        return f"{self.subscription_name}: {self.describe()}"

    def __repr__(self) -> str:
        return f"<RunnerReport {self.summary()}>"


class SubscriptionRunner(NotificationDriven, Generic[E]):
    """Handles a subscription's messages, one acknowledgement per message."""

    def __init__(
        self,
        subscription: ClaimSource[E],
        message_handler: SubscriptionMessageHandler[E],
        batch_size: int | None = None,
    ) -> None:
        self.subscription = subscription
        self.message_handler = message_handler
        self.batch_size = batch_size or subscription.batch_size
        self._keep_running = True
        # The claim `_handle_batch` released itself (with its last ack, see the batched runner).
        self._released: PartitionClaim | None = None
        # The claim whose batch was just handled, with the position its batch still has to
        # acknowledge (None: nothing): the next claim of the step takes them along.
        self._handing_over: HandingOver | None = None
        # What was sent ahead to the lock session (see `_handle_partition`): the hand-over
        # it carries, the partition it claims (None: none) and how many messages.
        self._ahead: tuple[HandingOver | None, int | None, int] | None = None
        # Partitions a projector in this process just advanced (see `take_handoff`).
        self._hinted: dict[int, int] = {}
        self._hint_lock = threading.Lock()
        self.last_report: RunnerReport | None = None
        # Message types already logged as acknowledged without a handler (once each).
        self._logged_without_handler: set[str] = set()

    # -- RunOnNotification --------------------------------------------------------------------

    @property
    def notification_channel(self) -> str:
        return self.subscription.stream.notification_channel

    def run(
        self, budget: TimeBudget | None = None, *, progress: bool | None = None
    ) -> RunOnNotificationResult:
        """Handle messages until none are left (or the budget is spent).

        `progress`: show a tqdm bar over the backlog (True), never (False), or
        only in a notebook with more than 1,000 messages waiting (None).
        """
        return self.run_once(budget, progress=progress)

    def run_once(
        self, budget: TimeBudget | None = None, *, progress: bool | None = None
    ) -> RunOnNotificationResult:
        bar = open_progress(progress, self._backlog, f"handling {self.subscription.name}")
        self._keep_running = True
        total = RunnerReport(self.subscription.name)
        try:
            while self._keep_running:
                hinted = self._take_hints()
                report = self._step(None, hinted)
                total.handled.extend(report.handled)
                if bar is not None:
                    bar.update(len(report.handled))
                if not report.handled and hinted is not None:
                    continue  # nothing in the partitions handed over: look at every partition
                if not report.handled:
                    if report.contended_partitions:
                        # Work is left in partitions another runner holds. If that
                        # runner dies, its locks vanish with its session and nobody
                        # will notify us: look again shortly instead of waiting
                        # for the next write or the safety-net timer.
                        time.sleep(CONTENTION_RETRY_S)
                        return RunOnNotificationResult.WORK_REMAINING
                    return RunOnNotificationResult.DONE_FOR_NOW
                if budget is not None and budget.over_budget():
                    return RunOnNotificationResult.WORK_REMAINING
            return RunOnNotificationResult.DONE_FOR_NOW
        except BaseException:
            # The failing step's report (what it handled before the error) is
            # `last_report`; fold it in so the run's report shows everything.
            if self.last_report is not None:
                total.handled.extend(self.last_report.handled)
            raise
        finally:
            self.last_report = total
            if bar is not None:
                bar.close()

    def take_handoff(self, heads: dict[int, int]) -> None:
        """A projector in this process committed new messages to these partitions
        ({partition: head}): the next run starts with them, without first asking the
        database which partitions have work. Only a hint: the messages are read under the
        partition's claim, as always, and the other partitions are looked at right after."""
        with self._hint_lock:
            for partition, head in heads.items():
                if head > self._hinted.get(partition, -1):
                    self._hinted[partition] = head

    def _take_hints(self) -> list[int] | None:
        with self._hint_lock:
            if not self._hinted:
                return None
            hinted, self._hinted = self._hinted, {}
        return sorted(hinted)

    def handle(self, message: SubscriptionMessage[E]) -> None:
        """Depeche DB's per-message entry point: call the handler, apply the error handler
        (EXIT re-raises); no retries, parking or acknowledgement."""
        self.message_handler.handle(message)

    def _backlog(self) -> int:
        return sum(p.lag for p in self.subscription.partitions_with_work())

    # -- stepping -----------------------------------------------------------------------------

    def step(self, max_messages: int | None = None) -> RunnerReport:
        """Handle at most `max_messages` (default: one batch per partition with work).

        A handler error that the error handler turns into EXIT propagates; the
        message stays un-acknowledged and is delivered again next time, and
        `last_report` still lists what was handled before it.
        """
        if max_messages is not None:
            check_positive_int("max_messages", max_messages)
        return self._step(max_messages, None)

    def _step(self, max_messages: int | None, hinted: list[int] | None) -> RunnerReport:
        """`step`, over the `hinted` partitions only when given (see `take_handoff`)."""
        subscription = self.subscription
        report = RunnerReport(subscription.name)
        self.last_report = report
        subscription.ensure_initialized()
        remaining = max_messages
        if hinted is None:
            partitions = [candidate.partition for candidate in subscription.partitions_with_work()]
        else:
            partitions = hinted
        # Without a message limit, the next partition is claimed while this one is handled.
        claim_ahead = remaining is None
        try:
            for index, partition in enumerate(partitions):
                if remaining is not None and remaining <= 0:
                    break
                if not self._keep_running:
                    break
                count = self.batch_size if remaining is None else min(self.batch_size, remaining)
                following = partitions[index + 1] if claim_ahead and index + 1 < len(partitions) else None
                handled = self._handle_partition(partition, count, report, following)
                if remaining is not None:
                    remaining -= handled
        finally:
            self._drop_ahead(report)
            handing_over, self._handing_over = self._handing_over, None
            if handing_over is not None:
                claim, position = handing_over
                if not subscription.release_after(claim, position):
                    report.lost_partitions.append(claim.partition)
        return report

    def _handle_partition(
        self, partition: int, count: int, report: RunnerReport, following: int | None
    ) -> int:
        """Claim `partition` and handle its batch; `following`: the partition to claim while
        doing so, where the driver can send a script ahead (see `Subscription.send_ahead`)."""
        subscription = self.subscription
        # The state is read under the claim: another runner may have moved on meanwhile.
        if self._ahead is not None:  # sent for this partition, the step's next one
            claimed = self._collect_ahead(report)
        else:
            handing_over, self._handing_over = self._handing_over, None
            if handing_over is None:
                claimed = subscription.claim_batch(partition, count)
            else:
                # The previous partition's ack and release go in the same round trip.
                acked, claimed = subscription.hand_over(*handing_over, partition, count)
                if not acked:
                    report.lost_partitions.append(handing_over[0].partition)
        if claimed is None:
            report.contended_partitions.append(partition)
            return 0
        claim, batch = claimed
        handing_over = self._handing_over
        if (handing_over is not None or following is not None) and subscription.send_ahead(
            handing_over, following, count
        ):
            # The server acknowledges the previous batch and claims the next one meanwhile.
            self._ahead = (handing_over, following, count)
            self._handing_over = None
        handled_before = len(report.handled)
        try:
            handled, to_ack = self._handle_batch(claim, batch, report)
        except BaseException as error:
            self._drop_ahead(report)
            if self._released is not claim:
                subscription.release(claim)
            if not isinstance(error, PartitionLostError):
                raise
            # Whoever holds the partition now delivers the rest (and the refused ack's message).
            report.lost_partitions.append(partition)
            return len(report.handled) - handled_before
        # Acknowledged and released with the next partition's claim, or at the step's end.
        self._handing_over = (claim, to_ack)
        return handled

    def _collect_ahead(self, report: RunnerReport) -> Claimed[E] | None:
        """The outcome of what was sent ahead: the previous batch's ack (a refused one is
        reported) and the claim of the partition sent with it, if any and granted."""
        sent, self._ahead = self._ahead, None
        if sent is None:
            return None
        handing_over, partition, count = sent
        acked, claimed = self.subscription.collect_ahead(handing_over, partition, count)
        if not acked and handing_over is not None:
            report.lost_partitions.append(handing_over[0].partition)
        return claimed

    def _drop_ahead(self, report: RunnerReport) -> None:
        """`_collect_ahead` when the step does not go on to the partition claimed ahead."""
        claimed = self._collect_ahead(report)
        if claimed is not None:
            self.subscription.release(claimed[0])

    def _check_claim(self, claim: PartitionClaim) -> None:
        """Before each delivery: a claim whose lock session ended is abandoned at once."""
        if not self.subscription.still_holds(claim):
            raise PartitionLostError(
                f"subscription {self.subscription.name!r} lost the lock of partition {claim.partition} "
                "(its session ended); the batch is abandoned"
            )

    def _handle_batch(
        self, claim: PartitionClaim, batch: list[tuple[int, int, StoredMessage[E]]], report: RunnerReport
    ) -> tuple[int, int | None]:
        """Deliver `batch` under `claim`: how many messages it delivered, and the position
        still to acknowledge when the claim is released (None: nothing left to)."""
        subscription = self.subscription
        for done, (partition, position, stored) in enumerate(batch):
            self._check_claim(claim)
            ack = subscription.ack_op(claim, position)
            message = SubscriptionMessage(partition, position, stored, ack)
            if not self._deliver(message, report, park_ack=ack.execute):
                # Not acknowledged (the handler rolled it back, or its own transaction did
                # not commit within the retry policy): it comes again.
                return done + 1, None
            if not ack.executed:
                ack.execute()
        return len(batch), None

    def _deliver(self, message: SubscriptionMessage[E], report: RunnerReport, park_ack: Any) -> bool:
        """Call the handler with retries and record the outcome; False if the message must
        not be acknowledged (the handler rolled it back). Raises on EXIT, and
        `PartitionLostError` when the claim ended.

        A handler that acknowledged in its own transaction which then did not commit
        has failed that attempt (`AckRolledback`): the retry policy and the error
        handler apply, so it is not re-delivered in a tight loop."""
        policy = self.subscription.retry_policy
        attempts_allowed = policy.attempts if policy is not None else 1
        ack = message.ack
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = self.message_handler.call(message)
                if isinstance(ack, AckOp):
                    if ack.rolled_back:
                        report.handled.append(self._record(message, ROLLED_BACK, attempt, None))
                        return False
                    if ack.in_caller_transaction:
                        ack.verify()
            except PartitionLostError:
                raise
            except Exception as error:
                if attempt < attempts_allowed and policy is not None:
                    time.sleep(policy.delay_before(attempt))
                    continue
                action = self.message_handler.error_handler.handle_error(error, message)
                if action is ErrorAction.EXIT:
                    report.handled.append(self._record(message, FAILED, attempt, error))
                    _name_the_message(error, message, self.subscription.name, attempt)
                    raise
                status = STATUS_PARKED if action is ErrorAction.PARK else STATUS_IGNORED
                self._park(message, status, attempt, error, park_ack)
                outcome = PARKED if action is ErrorAction.PARK else IGNORED
                report.handled.append(self._record(message, outcome, attempt, error))
                return True
            if outcome == NO_HANDLER:
                self._log_without_handler(message)
            report.handled.append(self._record(message, outcome, attempt, None))
            return True

    def _log_without_handler(self, message: SubscriptionMessage[E]) -> None:
        """A forgotten handler loses messages silently (the position moves past them), so say
        it once per message type: the report shows it in a notebook, this line in a
        worker's log (and, with logging unconfigured, on a notebook cell's stderr)."""
        type_name = type(message.stored_message.message).__name__
        if type_name in self._logged_without_handler:
            return
        self._logged_without_handler.add(type_name)
        name = self.subscription.name
        logging.getLogger(f"depeche_nb.subscription.{name}").warning(
            "subscription %r has no handler for %s: its messages are acknowledged unhandled, skipped "
            "for good (the first at partition %d, position %d); register a handler for %s if this "
            "subscription should see them (logged once per message type)",
            name,
            type_name,
            message.partition,
            message.position,
            type_name,
        )

    def _park(
        self, message: SubscriptionMessage[E], status: str, attempts: int, error: Exception, ack: Any
    ) -> None:
        """Record the message in the parked table and acknowledge it, in one transaction
        when the state provider can join one."""
        subscription = self.subscription
        with subscription.stream.engine.begin() as conn:
            subscription.parked_messages.record(conn, message, status, attempts, error)
            if ack is not None:
                ack(conn=conn)

    @staticmethod
    def _record(
        message: SubscriptionMessage[E], outcome: str, attempts: int, error: Exception | None
    ) -> HandledMessage:
        stored = message.stored_message
        return HandledMessage(
            partition=message.partition,
            position=message.position,
            message_id=stored.message_id,
            message_type=type(stored.message).__name__,
            outcome=outcome,
            attempts=attempts,
            error=None if error is None else f"{type(error).__name__}: {error}",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(subscription={self.subscription.name!r})"


def _name_the_message(
    error: BaseException, message: SubscriptionMessage[Any], subscription: str, attempts: int
) -> None:
    """Add to the traceback which message failed, so nobody has to dig for it."""
    add_note = getattr(error, "add_note", None)  # Python >= 3.11
    if add_note is None:
        return
    stored = message.stored_message
    add_note(
        f"while subscription {subscription!r} handled message {stored.message_id} "
        f"({type(stored.message).__name__}, stream {stored.stream!r} version {stored.version}, "
        f"partition {message.partition} position {message.position}, global position "
        f"{stored.global_position}; {attempts} attempt(s))"
    )


class BatchedAckSubscriptionRunner(SubscriptionRunner[E]):
    """Stores the position once per batch, after the last successfully handled message."""

    def _handle_batch(
        self, claim: PartitionClaim, batch: list[tuple[int, int, StoredMessage[E]]], report: RunnerReport
    ) -> tuple[int, int | None]:
        subscription = self.subscription
        acked: int | None = None
        batch_ack = BatchAck()  # holds nothing: one for the whole batch
        try:
            for partition, position, stored in batch:
                self._check_claim(claim)
                message = SubscriptionMessage(partition, position, stored, batch_ack)
                # A parked message is acknowledged with the rest of the batch.
                self._deliver(message, report, park_ack=None)
                acked = position
        except BaseException:
            # Also on EXIT: what was handled stays handled (never rewind to -1). Fenced:
            # after a takeover this raises PartitionLostError and the new holder re-delivers.
            # The ack and the release go in one round trip, once the lock session is free.
            self._drop_ahead(report)
            if acked is not None:
                self._released = claim
                subscription.ack_and_release(claim, acked)
            raise
        return len(batch), acked


__all__ = [
    "FAILED",
    "HANDLED",
    "OUTCOMES",
    "ROLLED_BACK",
    "BatchedAckSubscriptionRunner",
    "HandledMessage",
    "RunnerReport",
    "SubscriptionRunner",
]

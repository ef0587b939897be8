"""Subscriptions: a named reader of an aggregated stream with per-partition state and locks.

At-least-once: a message is acknowledged (its position stored) only after
its handler returned, so a crash at any point before the ack re-delivers
it. A partition is processed only under a claim (`claim()`): its lock,
plus, with the database state provider, a fencing token bumped under the
lock. The state is read after the claim is made, and every acknowledgement
of the claim is a compare-and-set on its token, so a runner whose lock
vanished cannot acknowledge once another runner took over, and positions
never go backwards except through `reset()`.
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
import enum
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from depeche_nb.core.display import RichRepr, run_view
from depeche_nb.core.errors import AckRolledback, PartitionLostError
from depeche_nb.core.identifiers import check_positive_int, validate_name
from depeche_nb.core.interfaces import (
    CallMiddleware,
    LockProvider,
    MessageHandlerRegisterProtocol,
    SubscriptionErrorHandler,
    SubscriptionMessage,
    SubscriptionMessageBatch,
    SubscriptionStartPoint,
    SubscriptionStateProvider,
)
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.acks import AckOp, BatchAck
from depeche_nb.engine.definitions import check_subscription
from depeche_nb.engine.error_handlers import RetryPolicy
from depeche_nb.engine.handlers import MessageHandlerRegister, SubscriptionMessageHandler
from depeche_nb.engine.parking import DISCARDED, IGNORED, PARKED, REPLAYED, ParkedMessage, ParkedMessages
from depeche_nb.engine.protocols import Claimed, HandingOver, PartitionClaim
from depeche_nb.engine.runner import BatchedAckSubscriptionRunner, SubscriptionRunner
from depeche_nb.engine.start_points import StartAtBeginning, StartAtNextMessage, StartAtPointInTime
from depeche_nb.engine.state import DbSubscriptionStateProvider, check_fenced
from depeche_nb.postgres.locks import DbLockProvider, Locking, Unlocking
from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.rawconn import Prepared, prepared_sql

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.protocols import StreamSource

E = TypeVar("E")

DEFAULT_BATCH_SIZE = 100
_UNKNOWN = object()
_INIT_WAIT_S = 30.0


def partition_lock_name(subscription_name: str, partition: int) -> str:
    """The lock a runner holds while it handles `partition` (under a lock provider named like
    the subscription, by default); views that have no `Subscription` object look it up too."""
    return f"subscription-{subscription_name}-{partition}"


def _named_partitions(to: Mapping[Any, Any], known: list[int]) -> list[int]:
    """The partitions of a `{partition: next_position}` reset, checked before any lock."""
    for partition, next_position in to.items():
        for what, value in (("partition", partition), ("position", next_position)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"reset {what} must be an int >= 0, got {value!r}")
        if partition not in known:
            raise ValueError(f"partition {partition} has no messages and no state; known partitions: {known}")
    return sorted(to)


def _claim_of(batch: SubscriptionMessageBatch[Any]) -> PartitionClaim:
    return PartitionClaim(batch.partition, batch.lock_key, batch.token)


class AckStrategy(enum.Enum):
    SINGLE = "single"
    BATCHED = "batched"


@_dc.dataclass(frozen=True)
class PartitionProgress:
    """A partition as a subscription sees it."""

    partition: int
    position: int  # last acknowledged position, -1 before the first
    head: int  # highest projected position

    @property
    def lag(self) -> int:
        return self.head - self.position


class Subscription(RichRepr, Generic[E]):
    """A named subscription to an aggregated stream; `runner` does the work."""

    def __init__(
        self,
        name: str,
        stream: StreamSource[E],
        message_handler: SubscriptionMessageHandler[E],
        batch_size: int | None = None,
        state_provider: SubscriptionStateProvider | None = None,
        lock_provider: LockProvider | None = None,
        start_point: SubscriptionStartPoint | None = None,
        ack_strategy: AckStrategy = AckStrategy.SINGLE,
        retry_policy: RetryPolicy | None = None,
        *,
        rebuild: bool = False,
    ) -> None:
        """`rebuild=True`: when `name` is recorded on another aggregated stream (an error
        otherwise), move it to this one and reset its positions to `start_point`."""
        validate_name(name, "subscription name")
        if start_point is not None and not isinstance(start_point, SubscriptionStartPoint):
            raise TypeError(
                "start_point must be a SubscriptionStartPoint such as StartAtNextMessage() or "
                f"StartAtPointInTime(datetime), got {type(start_point).__name__}"
            )
        if not isinstance(ack_strategy, AckStrategy):
            raise TypeError(f"ack_strategy must be an AckStrategy, got {ack_strategy!r}")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"retry_policy must be a RetryPolicy, got {type(retry_policy).__name__}")
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        engine = stream.engine
        moved = getattr(state_provider, "records_definition", True) and check_subscription(
            engine, name, stream.name, rebuild=rebuild
        )
        self.name = name
        self.stream = stream
        self._stream = stream
        self.message_handler = message_handler
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.ack_strategy = ack_strategy
        self.retry_policy = retry_policy
        self._state_provider: SubscriptionStateProvider = state_provider or DbSubscriptionStateProvider(
            name, engine
        )
        self._lock_provider: LockProvider = lock_provider or DbLockProvider(name, engine)
        self._start_point = start_point or StartAtBeginning()
        self.parked_messages = ParkedMessages(engine, name)
        self._claim_sql: Prepared | object | None = _UNKNOWN  # see _claim_statement
        runner_class = (
            BatchedAckSubscriptionRunner if ack_strategy is AckStrategy.BATCHED else SubscriptionRunner
        )
        self.runner: SubscriptionRunner[E] = runner_class(self, message_handler, self.batch_size)
        if moved:
            # The stored positions are the old stream's partitions' (parked rows stay as records).
            self.reset(self._start_point)

    # -- state ------------------------------------------------------------------------------

    @property
    def state_provider(self) -> SubscriptionStateProvider:
        return self._state_provider

    @property
    def lock_provider(self) -> LockProvider:
        return self._lock_provider

    def partition_lock_name(self, partition: int) -> str:
        return partition_lock_name(self.name, partition)

    def ensure_initialized(self) -> None:
        """Apply the start point once, even when many runners start at the same time."""
        if self._state_provider.initialized(self.name):
            return
        init_lock = f"subscription-{self.name}-init"
        deadline = time.monotonic() + _INIT_WAIT_S
        while not self._lock_provider.lock(init_lock):
            if self._state_provider.initialized(self.name):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"subscription {self.name!r} was not initialised by another runner in time"
                )
            time.sleep(0.05)
        try:
            if not self._state_provider.initialized(self.name):
                self._start_point.init_state(self.name, self._stream, self._state_provider)
                self._state_provider.initialize(self.name)
        finally:
            self._lock_provider.unlock(init_lock)

    def progress(self) -> list[PartitionProgress]:
        """Every partition's acknowledged position and head, by partition."""
        self.ensure_initialized()
        provider = self._state_provider
        if isinstance(provider, DbSubscriptionStateProvider):
            # Heads and state side by side in one statement.
            heads_table = quote_ident(self._stream.names.heads_table)
            return [PartitionProgress(*row) for row in provider.progress(self.name, heads_table)]
        heads = self._stream.get_max_aggregated_stream_positions()
        positions = self._state_provider.read(self.name).positions
        return [PartitionProgress(p, positions.get(p, -1), heads[p]) for p in sorted(heads)]

    def claim(self, partition: int) -> PartitionClaim | None:
        """Lock `partition` and take its fencing token; None if another runner holds it."""
        lock_name = self.partition_lock_name(partition)
        if not self._lock_provider.lock(lock_name):
            return None
        token = None
        provider = self._state_provider
        try:
            if isinstance(provider, DbSubscriptionStateProvider):
                token = provider.take(self.name, partition)
        except BaseException:
            self._lock_provider.unlock(lock_name)
            raise
        return PartitionClaim(partition, lock_name, token)

    def claim_batch(self, partition: int, count: int) -> Claimed[E] | None:
        """`claim(partition)` and then `next_batch(partition, count)` under it; None if
        another runner holds the partition. With the database's lock and state providers
        on the stream's database, both are one statement on the lock session
        (`StreamStatements.claim_slice_sql`): one round trip instead of three."""
        statement = self._claim_statement()
        if statement is None:
            claim = self.claim(partition)
            if claim is None:
                return None
            try:
                return claim, self.next_batch(partition, count)
            except BaseException:
                self.release(claim)
                raise
        lock_name = self.partition_lock_name(partition)
        provider = self._lock_provider
        assert isinstance(provider, DbLockProvider)
        rows = provider.lock_with(
            lock_name, statement, {"subscription": self.name, "partition": partition, "count": count}
        )
        if rows is None:
            return None
        return self._claimed_from_rows(partition, lock_name, rows)

    def _claimed_from_rows(self, partition: int, lock_name: str, rows: list[Any]) -> Claimed[E]:
        """The claim and batch in the rows of `claim_slice_sql`, whose lock was granted."""
        claim = PartitionClaim(partition, lock_name, int(rows[0][1]))
        try:
            batch = self._stream.slice_from_rows([row[4:] for row in rows if row[4] is not None])
        except BaseException:
            self.release(claim)
            raise
        return claim, batch

    def _claim_statement(self) -> Prepared | None:
        if self._claim_sql is _UNKNOWN:
            lock, state, engine = self._lock_provider, self._state_provider, self._stream.engine
            self._claim_sql = None
            if (
                type(lock) is DbLockProvider
                and type(state) is DbSubscriptionStateProvider
                and lock.engine.url == engine.url
                and state.engine.url == engine.url
            ):
                self._claim_sql = Prepared(self._stream.statements.claim_slice_sql(state.sql))
        return self._claim_sql  # type: ignore[return-value]

    def ack_and_release(self, claim: PartitionClaim, position: int) -> None:
        """`ack_op(claim, position).execute()` then `release(claim)`; with the database's lock
        and state providers (see `claim_batch`) in one round trip on the lock session, the
        ack committed synchronously before the unlock. `PartitionLostError` as from the ack;
        the partition is released either way."""
        provider = self._lock_provider
        if self._claim_statement() is None or claim.token is None or not isinstance(provider, DbLockProvider):
            try:
                self.ack_op(claim, position).execute()
            finally:
                self.release(claim)
            return
        sql = self._state_provider.sql  # type: ignore[attr-defined]
        row = provider.run_then_unlock(
            claim.lock_name,
            lambda cursor: sql.ack_then_unlock_sql(prepared_sql(cursor, sql.fenced_recording)),
            (position, self.name, claim.partition, claim.token, position),
        )
        if row is None:  # the lock session ended: ack on its own, the release is a no-op
            try:
                self.ack_op(claim, position).execute()
            finally:
                self.release(claim)
            return
        check_fenced(int(row[1]), self.name, claim.partition, position, claim.token)

    def hand_over(
        self, claim: PartitionClaim, position: int | None, partition: int, count: int
    ) -> tuple[bool, Claimed[E] | None]:
        """A runner done with `claim`'s batch goes on to the next partition:
        `ack_and_release(claim, position)` (only `release(claim)` when `position` is None),
        then `claim_batch(partition, count)`. With the database's providers (see
        `claim_batch`) all in one round trip on the lock session. Returns whether the
        acknowledgement held (False: the partition was lost, as `PartitionLostError` from
        `ack_and_release` says) and the claim, None if another runner holds `partition`."""
        provider = self._handing_over_provider(claim)
        rows = None
        if provider is not None:
            rows = provider.run_then_unlock_and_lock_with(
                self._unlocking(claim, position), self._locking(partition, count)
            )
        if rows is None:
            return self.release_after(claim, position), self.claim_batch(partition, count)
        return self._handed_over((claim, position), partition, rows)

    def send_ahead(self, handing_over: HandingOver | None, partition: int | None, count: int) -> bool:
        """`hand_over` (or only its release, or only its claim when `handing_over` is None)
        sent to the server without waiting, where the driver can (see
        `DbLockProvider.send_ahead`): a runner claims its next partition while it handles
        the current one. Take the outcome with `collect_ahead` before anything else on this
        subscription's lock session. False when nothing was sent: do it the usual way."""
        provider = self._handing_over_provider(None if handing_over is None else handing_over[0])
        if provider is None or not provider.sends_ahead:
            return False
        return provider.send_ahead(
            None if handing_over is None else self._unlocking(*handing_over),
            None if partition is None else self._locking(partition, count),
        )

    def collect_ahead(
        self, handing_over: HandingOver | None, partition: int | None, count: int
    ) -> tuple[bool, Claimed[E] | None]:
        """The outcome of `send_ahead` with these arguments, as `hand_over` returns it.
        When the lock session ended meanwhile, it is done again the usual way (an
        acknowledgement can be made twice: the position it stores stays the same)."""
        provider = self._lock_provider
        assert isinstance(provider, DbLockProvider)
        rows = provider.collect_ahead()
        if rows is None:
            acked = True if handing_over is None else self.release_after(*handing_over)
            return acked, None if partition is None else self.claim_batch(partition, count)
        return self._handed_over(handing_over, partition, rows)

    def _handing_over_provider(self, claim: PartitionClaim | None) -> DbLockProvider | None:
        """The lock provider, when a hand-over can go in one script on its session."""
        provider = self._lock_provider
        if self._claim_statement() is None or not isinstance(provider, DbLockProvider):
            return None
        if claim is not None and claim.token is None:
            return None
        return provider

    def _unlocking(self, claim: PartitionClaim, position: int | None) -> Unlocking:
        if position is None:
            return Unlocking(claim.lock_name, lambda cursor: "SELECT pg_advisory_unlock(%s::bigint)", ())
        sql = self._state_provider.sql  # type: ignore[attr-defined]

        def build(cursor: Any) -> str:
            return str(sql.ack_then_unlock_sql(prepared_sql(cursor, sql.fenced_recording)))

        params = (position, self.name, claim.partition, claim.token, position)
        return Unlocking(claim.lock_name, build, params)

    def _locking(self, partition: int, count: int) -> Locking:
        statement = self._claim_statement()
        assert statement is not None
        params = {"subscription": self.name, "partition": partition, "count": count}
        return Locking(self.partition_lock_name(partition), statement, params)

    def _handed_over(
        self, handing_over: HandingOver | None, partition: int | None, rows: list[Any]
    ) -> tuple[bool, Claimed[E] | None]:
        """`hand_over`'s outcome from the rows of its script: those of the claim, or without
        one, those of `ack_then_unlock_sql` (or of the plain unlock)."""
        acked = True
        if handing_over is not None:
            claim, position = handing_over
            if position is not None:
                outcome = rows[0][3] if partition is not None else rows[0][1]
                try:
                    check_fenced(int(outcome), self.name, claim.partition, position, claim.token or 0)
                except PartitionLostError:
                    acked = False
        if partition is None or not rows[0][0]:
            return acked, None
        return acked, self._claimed_from_rows(partition, self.partition_lock_name(partition), rows)

    def release_after(self, claim: PartitionClaim, position: int | None) -> bool:
        """`ack_and_release(claim, position)`, only `release(claim)` when `position` is None;
        False when the acknowledgement was refused (`PartitionLostError`)."""
        if position is None:
            self.release(claim)
            return True
        try:
            self.ack_and_release(claim, position)
        except PartitionLostError:
            return False
        return True

    def release(self, claim: PartitionClaim) -> None:
        self._lock_provider.unlock(claim.lock_name)

    def still_holds(self, claim: PartitionClaim) -> bool:
        """False once the claim's lock session is known to have ended."""
        check = getattr(self._lock_provider, "still_holds", None)
        return True if check is None else bool(check(claim.lock_name))

    def ack_op(self, claim: PartitionClaim, position: int) -> AckOp:
        return AckOp(self.name, claim.partition, position, self._state_provider, token=claim.token)

    def partitions_with_work(self) -> list[PartitionProgress]:
        """Partitions with unhandled messages, most behind first."""
        pending = [p for p in self.progress() if p.lag > 0]
        return sorted(pending, key=lambda p: (-p.lag, p.partition))

    # -- Depeche DB style fetching ----------------------------------------------------------

    def next_batch(self, partition: int, count: int) -> list[tuple[int, int, StoredMessage[E]]]:
        """The next `count` unacknowledged messages of a partition (call with its lock held)."""
        provider = self._state_provider
        if isinstance(provider, DbSubscriptionStateProvider):
            return self._stream.read_slice_after_state(partition, provider.sql, self.name, count)
        start = provider.read(self.name).positions.get(partition, -1) + 1
        return self._stream.read_slice_messages(partition, start, count)

    def get_next_message_batch(self, count: int) -> SubscriptionMessageBatch[E] | None:
        """Lock the partition with the most work and return up to `count` of its next
        messages, or None when no unlocked partition has any.

        The partition stays locked until the batch is handed back with
        `ack_message_batch` (or `unlock_message_batch`); handle the messages in
        order and `batch.ack(message)` each handled one. The messages' own
        `ack` cannot be executed (acknowledgement is per batch).
        """
        check_positive_int("count", count)
        self.ensure_initialized()
        for candidate in self.partitions_with_work():
            claim = self.claim(candidate.partition)
            if claim is None:
                continue
            try:
                # Read the state under the claim: another runner may have moved on meanwhile.
                rows = self.next_batch(candidate.partition, count)
            except BaseException:
                self.release(claim)
                raise
            if not rows:
                self.release(claim)
                continue
            messages = [
                SubscriptionMessage(partition, position, stored, BatchAck())
                for partition, position, stored in rows
            ]
            return SubscriptionMessageBatch(
                partition=candidate.partition,
                first_position=messages[0].position,
                last_position=messages[-1].position,
                lock_key=claim.lock_name,
                messages=messages,
                token=claim.token,
            )
        return None

    def ack_message_batch(self, message_batch: SubscriptionMessageBatch[E], success: bool) -> None:
        """Store the batch's last acknowledged position (if `success` and any message was
        acknowledged; fenced: `PartitionLostError` if the partition was taken over) and
        release the partition."""
        try:
            if success and message_batch.ackd_position >= message_batch.first_position:
                self.ack_op(_claim_of(message_batch), message_batch.ackd_position).execute()
        finally:
            self.unlock_message_batch(message_batch)

    def unlock_message_batch(self, message_batch: SubscriptionMessageBatch[E]) -> None:
        """Release the batch's partition without storing anything."""
        self.release(_claim_of(message_batch))

    def get_next_messages(self, count: int) -> Iterator[SubscriptionMessage[E]]:
        """Yield up to `count` messages of one partition; each is acked when the consumer
        asks for the next one (at-least-once), and the partition is unlocked at the end."""
        batch = self.get_next_message_batch(count)
        if batch is None:
            return
        try:
            claim = _claim_of(batch)
            for message in batch.messages:
                ack = self.ack_op(claim, message.position)
                yield SubscriptionMessage(message.partition, message.position, message.stored_message, ack)
                if ack.rolled_back:
                    return  # not acknowledged: delivered again
                if ack.in_caller_transaction:
                    ack.verify()
                elif not ack.executed:
                    ack.execute()
        except AckRolledback:
            return
        finally:
            self.unlock_message_batch(batch)

    # -- resets -----------------------------------------------------------------------------

    def reset(
        self,
        to: SubscriptionStartPoint | Mapping[int, int] | None = None,
        *,
        timeout: float = 10.0,
    ) -> dict[int, int]:
        """Move the subscription: to the beginning (default), a start point, or explicit
        `{partition: next_position}` (only the partitions named there move). Waits for
        each moved partition's lock, so it is safe while runners work, and bumps their
        fencing tokens, so a runner that lost its lock cannot acknowledge over it;
        returns every partition's acknowledged position afterwards."""
        heads = self._stream.get_max_aggregated_stream_positions()
        current = self._state_provider.read(self.name).positions
        known = sorted(set(heads) | set(current))
        # {partition: next_position} moves only the partitions it names.
        partitions = _named_partitions(to, known) if isinstance(to, Mapping) else known
        locked: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            for partition in partitions:
                lock_name = self.partition_lock_name(partition)
                while not self._lock_provider.lock(lock_name):
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"could not lock partition {partition} of {self.name!r} within {timeout} s"
                        )
                    time.sleep(0.02)
                locked.append(lock_name)
            # Targets computed under the locks: no runner moves these partitions meanwhile.
            target = self._reset_targets(to, heads, partitions)
            provider = self._state_provider
            if isinstance(provider, DbSubscriptionStateProvider):
                # Bumps the fencing tokens too: a runner that lost its lock cannot ack over this.
                provider.reset_positions(self.name, target)
            else:
                for partition in partitions:
                    provider.store(self.name, partition, target[partition])
            if not provider.initialized(self.name):
                provider.initialize(self.name)
        finally:
            for lock_name in locked:
                self._lock_provider.unlock(lock_name)
        return {**{p: current.get(p, -1) for p in known}, **target}

    def _reset_targets(self, to: object, heads: dict[int, int], partitions: list[int]) -> dict[int, int]:
        if to is None or isinstance(to, StartAtBeginning):
            return {p: -1 for p in partitions}
        if isinstance(to, StartAtNextMessage):
            return {p: heads.get(p, -1) for p in partitions}
        if isinstance(to, StartAtPointInTime):
            first = self._stream.time_to_positions(to.point_in_time)
            return {p: first.get(p, 0) - 1 for p in partitions}
        if isinstance(to, _dt.datetime):
            return self._reset_targets(StartAtPointInTime(to), heads, partitions)
        if isinstance(to, Mapping):
            return {partition: to[partition] - 1 for partition in partitions}
        raise TypeError(
            "reset(to=...) takes None (beginning), StartAtNextMessage(), StartAtPointInTime(dt), "
            f"a datetime or {{partition: next_position}}, got {type(to).__name__}"
        )

    # -- parked messages --------------------------------------------------------------------

    def parked(self, include_resolved: bool = False) -> list[ParkedMessage]:
        """Messages parked (or ignored after errors) by this subscription."""
        return self.parked_messages.list(include_resolved)

    def parked_dataframe(self, include_resolved: bool = False) -> pd.DataFrame:
        return self.parked_messages.to_dataframe(include_resolved)

    def replay_parked(self, parked_id: int) -> str:
        """Run the handler on a parked message now; on success mark it replayed.
        A handler error propagates and leaves it parked.

        A handler that calls `message.ack.execute(conn=c)` marks it replayed inside its
        own transaction, so the effect and the status commit together. One replay of
        a message runs at a time: a concurrent one raises `ReplayInProgressError`, a
        later one `KeyError` (already replayed)."""
        with self.parked_messages.replay_guard(parked_id):
            # Read under the guard: a replay that just finished has marked it resolved.
            parked = self.parked_messages.get(parked_id)
            if parked.status not in (PARKED, IGNORED):
                raise KeyError(f"parked message {parked_id} is already {parked.status}")
            with self._stream.store.reader() as reader:
                stored = reader.get_message_by_id(parked.message_id)
            ack = _ReplayAck(self.parked_messages, parked_id)
            message = SubscriptionMessage(parked.partition, parked.position, stored, ack)
            outcome = self.message_handler.call(message)
            if not ack.executed:
                ack.execute()
            return outcome

    def discard_parked(self, parked_id: int) -> None:
        """Mark a parked message as dealt with, without handling it."""
        self.parked_messages.resolve(parked_id, DISCARDED)

    # -- DataFrame view (built by `notebook.views`; pandas loads on first use) -----------------

    def state_dataframe(self) -> pd.DataFrame:
        """One row per partition: acknowledged position, head, lag, whether a runner holds
        it right now, last ack time. Read-only (does not initialise the subscription)."""
        return run_view("subscription_state", self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Subscription(name={self.name!r}, stream={self._stream.name!r})"


class _ReplayAck:
    """The ack of a replayed message marks it replayed: inside the handler's transaction
    (`execute(conn=c)`), so its effect and its status commit together, or after it."""

    def __init__(self, parked: ParkedMessages, parked_id: int) -> None:
        self._parked = parked
        self._parked_id = parked_id
        self.executed = False

    def execute(self, **kwargs: Any) -> None:
        self._parked.resolve(self._parked_id, REPLAYED, conn=kwargs.get("conn"))
        self.executed = True


class SubscriptionFactory(Generic[E]):
    """`aggregated_stream.subscription(...)`."""

    def __init__(self, stream: StreamSource[E]) -> None:
        self.stream = stream

    def __call__(
        self,
        name: str,
        handlers: MessageHandlerRegisterProtocol[E] | None = None,
        batch_size: int | None = None,
        call_middleware: CallMiddleware[E] | None = None,
        error_handler: SubscriptionErrorHandler[E] | None = None,
        state_provider: SubscriptionStateProvider | None = None,
        lock_provider: LockProvider | None = None,
        start_point: SubscriptionStartPoint | None = None,
        ack_strategy: AckStrategy | None = None,
        retry_policy: RetryPolicy | None = None,
        *,
        rebuild: bool = False,
    ) -> Subscription[E]:
        if isinstance(handlers, type):
            raise TypeError(
                f"handlers must be an instance: you passed the class {handlers.__name__}; "
                f"write handlers={handlers.__name__}()"
            )
        register: MessageHandlerRegisterProtocol[E] = (
            handlers if handlers is not None else MessageHandlerRegister()
        )
        if not callable(getattr(register, "get_handler", None)):
            raise TypeError(
                f"handlers must be a MessageHandler or MessageHandlerRegister, got {type(handlers).__name__}"
            )
        message_handler = SubscriptionMessageHandler(
            handler_register=register, error_handler=error_handler, call_middleware=call_middleware
        )
        return Subscription(
            name,
            self.stream,
            message_handler,
            batch_size=batch_size,
            state_provider=state_provider,
            lock_provider=lock_provider,
            start_point=start_point,
            ack_strategy=ack_strategy or AckStrategy.SINGLE,
            retry_policy=retry_policy,
            rebuild=rebuild,
        )

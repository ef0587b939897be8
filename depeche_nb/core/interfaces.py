"""Engine-level data types and protocols (Depeche DB's `_interfaces`), free of I/O."""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
import enum
import functools as _ft
import time
import uuid as _uuid
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from depeche_nb.core.errors import BatchAckError
from depeche_nb.core.messages import StoredMessage

E = TypeVar("E")


# -- aggregated streams --------------------------------------------------------------------------


@_dc.dataclass
class AggregatedStreamMessage:
    """A pointer from a partition position to a stored message."""

    partition: int
    position: int
    message_id: _uuid.UUID


@_dc.dataclass
class StreamPartitionStatistic:
    """A partition's first message and its head position."""

    partition_number: int
    next_message_id: _uuid.UUID
    next_message_position: int
    next_message_occurred_at: _dt.datetime
    max_position: int


class MessagePartitioner(Protocol[E]):
    """User code: which partition (an int >= 0, deterministic) a message belongs to."""

    def get_partition(self, message: StoredMessage[E]) -> int: ...


# -- subscriptions -------------------------------------------------------------------------------


class AckOpProtocol(Protocol):
    def execute(self, **kwargs: Any) -> None: ...


@_dc.dataclass(frozen=True)
class SubscriptionMessage(Generic[E]):
    """A stored message as delivered to a subscription, with its place and its ack."""

    partition: int
    position: int
    stored_message: StoredMessage[E]
    ack: AckOpProtocol = _dc.field(repr=False, compare=False)


@_dc.dataclass
class SubscriptionMessageBatch(Generic[E]):
    """Messages of one locked partition, from `Subscription.get_next_message_batch`.

    Handle them in order, `ack(message)` each handled one, then hand the batch
    back with `Subscription.ack_message_batch`, which stores `ackd_position`
    and releases the partition's lock.
    """

    partition: int
    first_position: int
    last_position: int
    lock_key: str
    messages: list[SubscriptionMessage[E]]
    ackd_position: int = -1  # the last acknowledged position; -1: none yet
    token: int | None = None  # the claim's fencing token (see `Subscription.claim`)

    @_ft.cached_property
    def message_ids(self) -> set[_uuid.UUID]:
        return {message.stored_message.message_id for message in self.messages}

    def ack(self, message: SubscriptionMessage[E]) -> None:
        """Mark `message` as handled, and with it every earlier message of the batch.

        As in Depeche DB, the first ack may be any message of the batch (acking
        only the last one acknowledges all); after that, acks go one position
        at a time.
        """
        if message.partition != self.partition or message.stored_message.message_id not in self.message_ids:
            raise BatchAckError(f"message {message.stored_message.message_id} is not part of this batch")
        if self.ackd_position != -1 and message.position != self.ackd_position + 1:
            raise BatchAckError(
                "you cannot leave gaps in the acknowledged messages: expected position "
                f"{self.ackd_position + 1}, got {message.position}"
            )
        self.ackd_position = message.position


@_dc.dataclass
class SubscriptionState:
    """Per partition: the position of the last acknowledged message."""

    positions: dict[int, int]


class SubscriptionStateProvider(Protocol):
    def store(self, subscription_name: str, partition: int, position: int) -> None: ...

    def read(self, subscription_name: str) -> SubscriptionState: ...

    def initialize(self, subscription_name: str) -> None: ...

    def initialized(self, subscription_name: str) -> bool: ...

    def session(self, **kwargs: Any) -> SubscriptionStateProvider: ...


class LockProvider(Protocol):
    """Non-blocking named locks: `lock` returns True if acquired."""

    def lock(self, name: str) -> bool: ...

    def unlock(self, name: str) -> None: ...


class SubscriptionStartPoint:
    """Where a new subscription starts; `init_state` writes its initial positions."""

    def init_state(
        self, subscription_name: str, stream: Any, state_provider: SubscriptionStateProvider
    ) -> None:
        raise NotImplementedError


class ErrorAction(enum.Enum):
    IGNORE = "ignore"
    EXIT = "exit"
    # Beyond Depeche DB: move the message to the subscription's parked table.
    PARK = "park"


class SubscriptionErrorHandler(Generic[E]):
    """Decides what happens when a handler raises."""

    def handle_error(self, error: Exception, message: SubscriptionMessage[E]) -> ErrorAction:
        raise NotImplementedError


class CallMiddleware(Generic[E]):
    """Calls handlers, e.g. to inject dependencies into their extra parameters."""

    def call(
        self,
        handler: Callable[..., Any],
        message: SubscriptionMessage[E] | StoredMessage[E] | E,
    ) -> Any:
        raise NotImplementedError


@_dc.dataclass
class HandlerDescriptor(Generic[E]):
    """A registered handler and what form of the message it wants."""

    handler: Callable[..., Any]
    pass_subscription_message: bool
    pass_stored_message: bool
    requires_middleware: bool

    def adapt_message_type(
        self, message: SubscriptionMessage[E] | StoredMessage[E] | E
    ) -> SubscriptionMessage[E] | StoredMessage[E] | E:
        if isinstance(message, SubscriptionMessage):
            if self.pass_subscription_message:
                return message
            stored = message.stored_message
            return stored if self.pass_stored_message else stored.message
        if isinstance(message, StoredMessage):
            if self.pass_subscription_message:
                raise ValueError("this handler needs a SubscriptionMessage, got a StoredMessage")
            return message if self.pass_stored_message else message.message
        if self.pass_subscription_message or self.pass_stored_message:
            raise ValueError("this handler needs a wrapped message, got a plain message")
        return message


class MessageHandlerRegisterProtocol(Protocol[E]):
    def get_all_handlers(self) -> Iterator[HandlerDescriptor[E]]: ...

    def get_handler(self, message_type: type[E]) -> HandlerDescriptor[E] | None: ...


# -- running on notifications --------------------------------------------------------------------


class TimeBudget(Protocol):
    def over_budget(self) -> bool: ...


class FixedTimeBudget:
    """A budget of `seconds` from construction."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start_time = time.time()

    def over_budget(self) -> bool:
        return time.time() - self.start_time > self.seconds


class RunOnNotificationResult(enum.Enum):
    WORK_REMAINING = "work_remaining"
    DONE_FOR_NOW = "done_for_now"


class RunOnNotification(Protocol):
    """Something the executor runs when a notification arrives on its channel."""

    @property
    def notification_channel(self) -> str: ...

    def interested_in_notification(self, notification: dict[str, Any]) -> bool: ...

    def take_notification_hint(self, notification: dict[str, Any]) -> None: ...

    def run(self, budget: TimeBudget | None = None) -> RunOnNotificationResult | None: ...

    def stop(self) -> None: ...

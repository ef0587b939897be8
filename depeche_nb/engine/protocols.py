"""What the engine's parts need of each other, as small protocols at the bottom of the engine.

The aggregated stream creates its projector, subscriptions, readers and rebuilds; they in
turn need a few of its members. Typing them against these protocols instead of the
concrete classes keeps the import graph a tree: `aggregated_stream` imports the parts,
no part imports `aggregated_stream` (likewise the runner and its `Subscription`).
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import sqlalchemy as sa

    from depeche_nb.core.interfaces import LockProvider, SubscriptionStateProvider
    from depeche_nb.core.messages import MessageSerializer, StoredMessage
    from depeche_nb.engine.acks import AckOp
    from depeche_nb.engine.decoded import RecentlyDecoded
    from depeche_nb.engine.error_handlers import RetryPolicy
    from depeche_nb.engine.parking import ParkedMessages
    from depeche_nb.postgres.state_table import StateTable
    from depeche_nb.postgres.stream_tables import StreamNames, StreamStatements, StreamViews
    from depeche_nb.store.storage import Storage

E = TypeVar("E")


@_dc.dataclass(frozen=True)
class PartitionClaim:
    """One runner's hold on a partition: its lock and, where the state provider fences
    (`DbSubscriptionStateProvider`), the token every acknowledgement presents."""

    partition: int
    lock_name: str
    token: int | None


# A claim and its batch: (partition, position, stored message) per message.
Claimed = tuple[PartitionClaim, list[tuple[int, int, "StoredMessage[E]"]]]
# A claim whose batch was handled, and the position still to acknowledge (None: nothing).
HandingOver = tuple[PartitionClaim, "int | None"]


class StoreSource(Protocol[E]):
    """A message store as the aggregated streams over it and the trace see it (the store
    itself, `engine.message_store.MessageStore`, makes both)."""

    name: str
    engine: sa.Engine
    _storage: Storage

    @property
    def serializer(self) -> MessageSerializer[E]: ...

    @property
    def notification_channel(self) -> str: ...

    def reader(self, conn: sa.Connection | None = None) -> AbstractContextManager[Any]: ...


class StreamSource(Protocol[E]):
    """An aggregated stream as its projector, subscriptions, readers and rebuilds see it."""

    name: str
    names: StreamNames
    store: StoreSource[E]
    notification_channel: str
    statements: StreamStatements
    views: StreamViews
    projector: Any  # StreamProjector[E]; Any keeps this module free of the projector
    recently_decoded: RecentlyDecoded[E]

    @property
    def engine(self) -> sa.Engine: ...

    @property
    def store_channel(self) -> str: ...

    @property
    def stream_wildcards(self) -> list[str]: ...

    def get_max_aggregated_stream_positions(self, conn: sa.Connection | None = None) -> dict[int, int]: ...

    def time_to_positions(self, time: _dt.datetime) -> dict[int, int]: ...

    def global_position_to_positions(self, global_position: int) -> dict[int, int]: ...

    def read_slice_messages(
        self, partition: int, start: int, count: int
    ) -> list[tuple[int, int, StoredMessage[E]]]: ...

    def slice_from_rows(self, rows: list[Any]) -> list[tuple[int, int, StoredMessage[E]]]: ...

    def read_slice_after_state(
        self, partition: int, state: StateTable, subscription_name: str, count: int
    ) -> list[tuple[int, int, StoredMessage[E]]]: ...

    def _beside(self, names: StreamNames) -> StreamSource[E]: ...


class ClaimSource(Protocol[E]):
    """A subscription as its runners see it: claims, batches and acknowledgements."""

    name: str
    batch_size: int
    retry_policy: RetryPolicy | None
    parked_messages: ParkedMessages

    @property
    def stream(self) -> StreamSource[E]: ...

    @property
    def state_provider(self) -> SubscriptionStateProvider: ...

    @property
    def lock_provider(self) -> LockProvider: ...

    def ensure_initialized(self) -> None: ...

    def claim(self, partition: int) -> PartitionClaim | None: ...

    def claim_batch(self, partition: int, count: int) -> Claimed[E] | None: ...

    def release(self, claim: PartitionClaim) -> None: ...

    def ack_and_release(self, claim: PartitionClaim, position: int) -> None: ...

    def release_after(self, claim: PartitionClaim, position: int | None) -> bool: ...

    def hand_over(
        self, claim: PartitionClaim, position: int | None, partition: int, count: int
    ) -> tuple[bool, Claimed[E] | None]: ...

    def send_ahead(self, handing_over: HandingOver | None, partition: int | None, count: int) -> bool: ...

    def collect_ahead(
        self, handing_over: HandingOver | None, partition: int | None, count: int
    ) -> tuple[bool, Claimed[E] | None]: ...

    def still_holds(self, claim: PartitionClaim) -> bool: ...

    def ack_op(self, claim: PartitionClaim, position: int) -> AckOp: ...

    def partitions_with_work(self) -> list[Any]: ...

    def next_batch(self, partition: int, count: int) -> list[tuple[int, int, StoredMessage[E]]]: ...


__all__ = ["ClaimSource", "Claimed", "HandingOver", "PartitionClaim", "StoreSource", "StreamSource"]

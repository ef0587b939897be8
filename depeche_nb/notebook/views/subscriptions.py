"""DataFrame views and the bounded overview of subscriptions.

Cost: rows in proportion to the partitions, never to the messages.

"Locked right now": `DbLockProvider` holds a partition as a session advisory
lock on the 64-bit key `advisory_key(provider.name, lock_name)`. PostgreSQL
shows such a lock in `pg_locks` as locktype 'advisory' with objsubid 1,
classid = the key's high 32 bits and objid = its low 32 bits (as unsigned
oids), in the lock holder's database. All partitions are checked in one query.
Other lock providers cannot be inspected; their partitions report None/NA.
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from depeche_nb.engine.state import DbSubscriptionStateProvider
from depeche_nb.notebook.views.kit import INT64, NULLABLE_BOOL, UTC, frame_from_rows
from depeche_nb.postgres.locks import DbLockProvider

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.subscription import Subscription


@_dc.dataclass(frozen=True)
class PartitionState:
    """A partition as a subscription sees it right now."""

    partition: int
    position: int  # last acknowledged position, -1 before the first
    head: int  # highest projected position, -1 if none
    lag: int  # head - position: messages waiting
    locked: bool | None  # held by a runner right now; None if the lock provider cannot tell
    last_acked_at: _dt.datetime | None  # None if unknown (not a DB state provider) or never


@_dc.dataclass(frozen=True)
class SubscriptionOverview:
    name: str
    stream: str
    initialized: bool
    partitions: list[PartitionState]  # by partition number
    parked: int | None  # unresolved parked/ignored messages; None: no parked table yet

    @property
    def lag(self) -> int:
        return sum(max(p.lag, 0) for p in self.partitions)

    @property
    def locked(self) -> int | None:
        if any(p.locked is None for p in self.partitions):
            return None
        return sum(1 for p in self.partitions if p.locked)


def locked_partitions(subscription: Subscription[Any], partitions: Sequence[int]) -> dict[int, bool | None]:
    """For each partition: is its lock held right now (by anyone)? None if unknowable."""
    provider = subscription.lock_provider
    if not isinstance(provider, DbLockProvider):
        return {p: None for p in partitions}
    names = {p: subscription.partition_lock_name(p) for p in partitions}
    held = provider.held_by_anyone(list(names.values()))
    return {p: names[p] in held for p in partitions}


def partition_states(subscription: Subscription[Any]) -> list[PartitionState]:
    """Position, head, lag, lock and last ack of every partition, read-only.

    Unlike `Subscription.progress()` this never initialises the subscription:
    a display must not apply a start point. Before initialisation positions
    read as -1.
    """
    heads = subscription.stream.get_max_aggregated_stream_positions()
    provider = subscription.state_provider
    acked_at: dict[int, _dt.datetime] = {}
    if isinstance(provider, DbSubscriptionStateProvider):
        stored = provider.read_with_times(subscription.name)
        positions = {p: position for p, (position, _) in stored.items()}
        acked_at = {p: at for p, (_, at) in stored.items()}
    else:
        positions = dict(provider.read(subscription.name).positions)
    partitions = sorted(set(heads) | set(positions))
    locked = locked_partitions(subscription, partitions)
    states = []
    for p in partitions:
        position, head = positions.get(p, -1), heads.get(p, -1)
        states.append(PartitionState(p, position, head, head - position, locked[p], acked_at.get(p)))
    return states


_STATE_KINDS = (
    ("partition", INT64),
    ("position", INT64),
    ("head", INT64),
    ("lag", INT64),
    ("locked", NULLABLE_BOOL),
    ("last_acked_at", UTC),
)


def subscription_state_dataframe(subscription: Subscription[Any]) -> pd.DataFrame:
    """One row per partition: `partition`, `position` (last acknowledged, -1 before the
    first), `head` (highest projected position), `lag` (`head - position`), `locked`
    (held by a runner right now; nullable boolean, NA when the lock provider is not a
    `DbLockProvider`), `last_acked_at` (NaT when unknown). Read-only: it does not
    initialise the subscription (`frame.attrs["initialized"]` says whether it is)."""
    frame = frame_from_rows([_dc.astuple(s) for s in partition_states(subscription)], _STATE_KINDS)
    frame.attrs = {"initialized": subscription.state_provider.initialized(subscription.name)}
    return frame


def parked_count(subscription: Subscription[Any]) -> int | None:
    """Unresolved parked/ignored messages, or None when nothing was ever parked."""
    return subscription.parked_messages.count_unresolved()


def subscription_overview(subscription: Subscription[Any]) -> SubscriptionOverview:
    """Everything a subscription's repr shows."""
    return SubscriptionOverview(
        name=subscription.name,
        stream=subscription.stream.name,
        initialized=subscription.state_provider.initialized(subscription.name),
        partitions=partition_states(subscription),
        parked=parked_count(subscription),
    )

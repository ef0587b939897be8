"""DataFrame views and bounded overviews of aggregated streams and subscriptions.

Below the notebook layer for the same reason as `store.frames` (whose
column conventions and helpers this module shares): `AggregatedStream` and
`Subscription` offer the views as thin methods. pandas is imported inside
the DataFrame functions only; the `*_overview` functions return plain
dataclasses, which the HTML reprs use without loading pandas.

Projection lag: which partition a waiting message will land in is only known
once the projector has run the partitioner on it, so lag cannot be given per
partition. What can be known exactly is how many stored messages match the
stream's wildcards but the projector has not taken yet (`unprojected_count`:
neither projected nor dead-lettered), reported per aggregated stream.

Cost: the overviews, `partitions_dataframe` and `subscription_state_dataframe`
read rows in proportion to the partitions, and the projection lag in proportion
to itself (see `StreamViews`), never in proportion to the messages stored or
projected. A repr counts the lag up to `UNPROJECTED_CAP` and then says "more than".

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
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from depeche_nb.engine.state import DbSubscriptionStateProvider
from depeche_nb.postgres.locks import DbLockProvider
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.store.frames import (
    DEFAULT_LIMIT,
    EPOCH_US,
    INT64,
    NULLABLE_BOOL,
    STRING,
    UTC,
    Count,
    check_limit,
    frame_from_rows,
    stream_chunks,
    typed_frame_from_chunks,
)

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.aggregated_stream import AggregatedStream
    from depeche_nb.engine.subscription import Subscription

_MASK32 = 0xFFFFFFFF
# A repr counts the projection lag up to this many messages.
UNPROJECTED_CAP = 10_000


# -- aggregated streams -------------------------------------------------------------------------

ASSIGNMENT_KINDS = (
    ("message_id", STRING),
    ("origin_stream", STRING),
    ("version", INT64),
    ("global_position", INT64),
    ("partition", INT64),
    ("position", INT64),
    ("message_occurred_at", EPOCH_US),
    ("projected_at", EPOCH_US),
)


def assignments_dataframe(
    stream: AggregatedStream[Any], partition: int | None = None, limit: int | None = DEFAULT_LIMIT
) -> pd.DataFrame:
    """Which message landed in which partition at which position.

    Columns: `message_id`, `origin_stream`, `version` (in the origin stream),
    `global_position`, `partition`, `position`, `message_occurred_at`,
    `projected_at`. All partitions by global position, or one `partition` by
    position. `limit`: the first rows only (default 10,000; None = all);
    `frame.attrs["more_available"]` tells whether rows were cut off.
    """

    row_limit = check_limit(limit)
    if partition is None:
        where, params, order = "TRUE", (), "global_position"
    elif isinstance(partition, bool) or not isinstance(partition, numbers.Integral):
        raise TypeError(f"partition must be an int or None, got {type(partition).__name__}")
    else:
        where, params, order = "partition = %s", (int(partition),), "position"
    sql = stream.views.assignments_sql(where, order)
    fetch = None if row_limit is None else row_limit + 1
    chunks = stream_chunks(stream.engine, sql, (*params, fetch))
    return typed_frame_from_chunks(chunks, row_limit, ASSIGNMENT_KINDS)


@_dc.dataclass(frozen=True)
class PartitionSummary:
    """One partition of an aggregated stream. Positions are gapless from 0 (except where
    adopted from Depeche DB), so `messages == head_position + 1`. The global positions
    and the time are those of the messages at the partition's first position and at its
    head: a late commit can be projected after messages with higher global positions."""

    partition: int
    messages: int
    head_position: int
    first_global_position: int
    last_global_position: int
    last_projected_at: _dt.datetime


@_dc.dataclass(frozen=True)
class AggregatedStreamOverview:
    name: str
    store: str
    wildcards: list[str]
    partitions: list[PartitionSummary]  # by partition number
    projected: int  # messages in all partitions
    unprojected: Count  # stored messages matching the wildcards not taken yet, up to a cap
    last_projected_at: _dt.datetime | None
    checkpoint_updated_at: _dt.datetime | None  # when a projector step last finished
    dead_letters: int = 0  # unresolved messages the projector parked or holds back


def partition_summaries(stream: AggregatedStream[Any]) -> list[PartitionSummary]:
    with autocommit_cursor(stream.engine) as cursor:
        cursor.execute(stream.views.partition_summaries_sql)
        return [PartitionSummary(*row) for row in cursor.fetchall()]


def unprojected_count(stream: AggregatedStream[Any], limit: int | None = None) -> int:
    """Stored messages matching the stream's wildcards that the projector has neither
    projected nor dead-lettered yet: exactly its backlog. Reads only the backlog (see
    `StreamViews.unprojected_count`), and counts at most `limit` of it (None: all)."""
    return stream.views.unprojected_count(stream.engine, list(stream.stream_wildcards), limit)


_PARTITION_KINDS = (
    ("partition", INT64),
    ("messages", INT64),
    ("head_position", INT64),
    ("first_global_position", INT64),
    ("last_global_position", INT64),
    ("last_projected_at", UTC),
)


def dead_letters_dataframe(stream: AggregatedStream[Any], include_resolved: bool = False) -> pd.DataFrame:
    """The projector's dead letters (see `StreamProjector.dead_letters_dataframe`), by
    global position: `global_position`, `message_id`, `origin_stream`, `version`, `status`,
    `error`, `recorded_at`, `resolved_at` (timezone-aware)."""
    import pandas as pd

    letters = stream.statements.dead_letters
    with autocommit_cursor(stream.engine) as cursor:
        cursor.execute(letters.list_all_sql if include_resolved else letters.list_sql)
        rows = cursor.fetchall()
    columns = ["global_position", "message_id", "origin_stream", "version", "status", "error"]
    frame: pd.DataFrame = pd.DataFrame(
        [tuple(row) for row in rows], columns=[*columns, "recorded_at", "resolved_at"]
    )
    for name in ("recorded_at", "resolved_at"):
        frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame


def partitions_dataframe(stream: AggregatedStream[Any]) -> pd.DataFrame:
    """One row per partition: `partition`, `messages`, `head_position`,
    `first_global_position`, `last_global_position`, `last_projected_at` (the last three of
    the messages at its first position and at its head, see `PartitionSummary`).

    `frame.attrs["unprojected_messages"]`: stored messages matching the wildcards that
    the projector has neither projected nor dead-lettered yet (the stream's projection
    lag, exact; it has no per-partition split before the partitioner ran, see the module
    notes). Reading it costs in proportion to the lag, the rest in proportion to the
    partitions.
    """
    summaries = partition_summaries(stream)
    frame = frame_from_rows([_dc.astuple(s) for s in summaries], _PARTITION_KINDS)
    frame.attrs = {"unprojected_messages": unprojected_count(stream)}
    return frame


def aggregated_stream_overview(stream: AggregatedStream[Any]) -> AggregatedStreamOverview:
    """Everything an aggregated stream's repr shows (a few statements, each bounded by the
    partitions or by `UNPROJECTED_CAP`)."""
    summaries = partition_summaries(stream)
    unprojected = Count.capped(unprojected_count(stream, UNPROJECTED_CAP + 1), UNPROJECTED_CAP)
    with autocommit_cursor(stream.engine) as cursor:
        cursor.execute(stream.views.checkpoint_updated_sql)
        row = cursor.fetchone()
        cursor.execute(stream.statements.dead_letters.count_sql)
        dead_letters = int(cursor.fetchone()[0])
    return AggregatedStreamOverview(
        name=stream.name,
        store=stream.store.name,
        wildcards=list(stream.stream_wildcards),
        partitions=summaries,
        projected=sum(s.messages for s in summaries),
        unprojected=unprojected,
        last_projected_at=max((s.last_projected_at for s in summaries), default=None),
        checkpoint_updated_at=None if row is None else row[0],
        dead_letters=dead_letters,
    )


# -- subscriptions ------------------------------------------------------------------------------


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


__all__ = [
    "UNPROJECTED_CAP",
    "AggregatedStreamOverview",
    "PartitionState",
    "PartitionSummary",
    "SubscriptionOverview",
    "aggregated_stream_overview",
    "assignments_dataframe",
    "locked_partitions",
    "parked_count",
    "partition_states",
    "partition_summaries",
    "partitions_dataframe",
    "subscription_overview",
    "subscription_state_dataframe",
    "unprojected_count",
]

"""DataFrame views and the bounded overview of aggregated streams.

Projection lag: which partition a waiting message will land in is only known
once the projector has run the partitioner on it, so lag cannot be given per
partition. What can be known exactly is how many stored messages match the
stream's wildcards but the projector has not taken yet (`unprojected_count`:
neither projected nor dead-lettered), reported per aggregated stream.

Cost: the overview and `partitions_dataframe` read rows in proportion to the
partitions, and the projection lag in proportion to itself (see `StreamViews`), never
in proportion to the messages stored or projected. A repr counts the lag up to
`UNPROJECTED_CAP` and then says "more than".
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
import numbers
from typing import TYPE_CHECKING, Any

from depeche_nb.core.display import DEFAULT_LIMIT, Count
from depeche_nb.engine.projector import UNPROJECTED_CAP, unprojected_count
from depeche_nb.notebook.views.kit import (
    EPOCH_US,
    INT64,
    STRING,
    UTC,
    check_limit,
    frame_from_rows,
    stream_chunks,
    typed_frame_from_chunks,
)
from depeche_nb.postgres.rawconn import autocommit_cursor

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.aggregated_stream import AggregatedStream


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

"""Aggregated streams: many origin streams merged and partitioned, read by partition position."""

from __future__ import annotations

import contextlib
import datetime as _dt
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import sqlalchemy as sa

from depeche_nb.core.display import DEFAULT_LIMIT, RichRepr, run_view
from depeche_nb.core.identifiers import check_positive_int, validate_name, validate_wildcard
from depeche_nb.core.interfaces import (
    AggregatedStreamMessage,
    MessagePartitioner,
    StreamPartitionStatistic,
    SubscriptionStartPoint,
)
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.decoded import RecentlyDecoded
from depeche_nb.engine.definitions import check_aggregated_stream
from depeche_nb.engine.projector import StreamProjector
from depeche_nb.engine.protocols import StoreSource
from depeche_nb.engine.rebuild import RebuildReport, run_rebuild
from depeche_nb.engine.subscription import SubscriptionFactory
from depeche_nb.postgres.rawconn import autocommit_cursor, callers_or_own
from depeche_nb.postgres.state_table import StateTable
from depeche_nb.postgres.stream_tables import StreamNames, StreamStatements, StreamViews, ensure_stream_schema
from depeche_nb.store.reading import stored_or_unreadable_decoder

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.reader import AggregatedStreamReader, AsyncAggregatedStreamReader

E = TypeVar("E")


def validate_wildcards(stream_wildcards: object) -> list[str]:
    if isinstance(stream_wildcards, str) or not isinstance(stream_wildcards, (list, tuple)):
        raise TypeError(
            "stream_wildcards must be a list of SQL LIKE patterns such as ['order-%'], got "
            f"{type(stream_wildcards).__name__}"
        )
    if not stream_wildcards:
        raise ValueError("stream_wildcards must not be empty")
    for pattern in stream_wildcards:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"every stream wildcard must be a non-empty str, got {pattern!r}")
        validate_wildcard(pattern)
    return list(stream_wildcards)


class AggregatedStream(RichRepr, Generic[E]):
    """Messages of the store's streams matching `stream_wildcards`, split into partitions."""

    def __init__(
        self,
        name: str,
        store: StoreSource[E],
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        update_batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
        *,
        rebuild: bool = False,
    ) -> None:
        """`rebuild=True`: when `name` is recorded with another store, wildcards or partitioner
        (an error otherwise), re-project every matching message under this definition beside
        the old projection, then switch to it and move the subscriptions' positions along
        (see `rebuild`); the outcome is kept in `last_rebuild`."""
        validate_name(name, "aggregated stream name")
        wildcards = validate_wildcards(stream_wildcards)
        if not callable(getattr(partitioner, "get_partition", None)):
            raise TypeError(
                f"partitioner must have a get_partition(message) method, got {type(partitioner).__name__}"
            )
        if update_batch_size is not None:
            check_positive_int("update_batch_size", update_batch_size)
        # `lookback_for_gaps_hours` is accepted for Depeche DB compatibility and
        # ignored: projection is exact, there is no look-back window to size.
        del lookback_for_gaps_hours
        recorded_store = check_aggregated_stream(
            store.engine, name, store.name, wildcards, partitioner, rebuild=rebuild
        )
        self._open(
            name, store, StreamNames(name, store._storage.names), partitioner, wildcards, update_batch_size
        )
        self.subscription: SubscriptionFactory[E] = SubscriptionFactory(self)
        self.last_rebuild: RebuildReport | None = None
        if recorded_store is not None:
            self.last_rebuild = run_rebuild(self, same_store=recorded_store == store.name, progress=None)

    def _open(
        self,
        name: str,
        store: StoreSource[E],
        names: StreamNames,
        partitioner: MessagePartitioner[E],
        wildcards: list[str],
        batch_size: int | None,
    ) -> None:
        self.name = name
        self.store = store
        self.names = names
        self.notification_channel = names.channel
        ensure_stream_schema(store.engine, names)
        self.views = StreamViews(names)
        self.projector: StreamProjector[E] = StreamProjector(
            self, partitioner, wildcards, batch_size=batch_size
        )
        self.statements = StreamStatements(names)
        # Filled by the projector while an Executor links it to runners in this process.
        self.recently_decoded: RecentlyDecoded[E] = RecentlyDecoded()

    def _beside(self, names: StreamNames) -> AggregatedStream[E]:
        """This stream's definition projected into other tables (`names`, which must exist):
        a rebuild's new projection. Its reports and errors carry this stream's name."""
        beside: AggregatedStream[E] = AggregatedStream.__new__(AggregatedStream)
        beside.name = self.name
        beside.store = self.store
        beside.names = names
        beside.notification_channel = names.channel
        beside.views = StreamViews(names)
        beside.projector = StreamProjector(
            beside, self.projector.partitioner, self.stream_wildcards, batch_size=self.projector.batch_size
        )
        beside.statements = StreamStatements(names)
        beside.recently_decoded = RecentlyDecoded()
        return beside

    def rebuild(self, *, progress: bool | None = None) -> RebuildReport:
        """Re-project every matching message under this object's wildcards and partitioner
        (e.g. after the partitioner's code changed), beside the current projection, which
        projectors and runners keep using meanwhile; then switch to the new one in one
        transaction and move every subscription's positions so that no unhandled message is
        skipped (handled ones behind an unhandled one in its new partition are delivered
        again). Projectors of another definition are refused from then on.

        `progress`: a tqdm bar over the messages (True), none (False), or in a notebook with
        more than 1,000 messages (None)."""
        self.last_rebuild = run_rebuild(self, same_store=True, progress=progress)
        return self.last_rebuild

    @property
    def engine(self) -> sa.Engine:
        return self.store.engine

    @property
    def store_channel(self) -> str:
        return self.store.notification_channel

    @property
    def stream_wildcards(self) -> list[str]:
        return self.projector.stream_wildcards

    @staticmethod
    def stream_table_name(name: str) -> str:
        return f"{validate_name(name, 'aggregated stream name')}_stream"

    @staticmethod
    def notification_channel_name(name: str) -> str:
        """The channel the projector notifies for stream `name` (see `StreamNames.channel`)."""
        return f"{validate_name(name, 'aggregated stream name')}_stream"

    # -- reading ------------------------------------------------------------------------------

    def read(self, partition: int, conn: sa.Connection | None = None) -> Iterator[AggregatedStreamMessage]:
        """All pointers of one partition, by position."""
        _check_int("partition", partition)
        with self._connection(conn) as c:
            rows = c.exec_driver_sql(self.statements.read_sql, (partition,)).all()
        for row in rows:
            yield AggregatedStreamMessage(row[0], row[1], _as_uuid(row[2]))

    def read_slice(
        self, partition: int, start: int, count: int, conn: sa.Connection | None = None
    ) -> Iterator[AggregatedStreamMessage]:
        """Up to `count` pointers of one partition from position `start` on."""
        _check_int("partition", partition)
        _check_int("start", start)
        _check_int("count", count)
        with self._connection(conn) as c:
            rows = c.exec_driver_sql(self.statements.read_slice_sql, (partition, start, count)).all()
        for row in rows:
            yield AggregatedStreamMessage(row[0], row[1], _as_uuid(row[2]))

    def read_slice_messages(
        self, partition: int, start: int, count: int
    ) -> list[tuple[int, int, StoredMessage[E]]]:
        """(partition, position, stored message) from `start` on, in one round trip."""
        return self._slice(self.statements.slice_messages_sql("%s"), (partition, start, count))

    def read_slice_after_state(
        self, partition: int, state: StateTable, subscription_name: str, count: int
    ) -> list[tuple[int, int, StoredMessage[E]]]:
        """The next `count` messages after a subscription's stored position (in `state`, a
        `DbSubscriptionStateProvider`'s table), with the position read in the same
        statement: one round trip per batch on the hot path."""
        sql = self.statements.slice_after_state_sql(state)
        return self._slice(sql, (partition, subscription_name, partition, count))

    def _slice(self, sql: str, params: tuple[object, ...]) -> list[tuple[int, int, StoredMessage[E]]]:
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return self.slice_from_rows(rows)

    def slice_from_rows(self, rows: list[Any]) -> list[tuple[int, int, StoredMessage[E]]]:
        """Rows (partition, position, message row...) as (partition, position, stored message)."""
        decode = stored_or_unreadable_decoder(self.store.serializer)
        # A payload that cannot be deserialised travels as an `UnreadableMessage`, so the
        # runner's retry and parking decide on it instead of every read failing.
        # A message its projector just decoded in this process is taken, not decoded again.
        take = self.recently_decoded.take
        return [(row[0], row[1], take(row[2:]) or decode(row[2:])) for row in rows]

    def reader(self, start_point: SubscriptionStartPoint | None = None) -> AggregatedStreamReader[E]:
        from depeche_nb.engine.reader import AggregatedStreamReader

        return AggregatedStreamReader(self, start_point)

    def async_reader(
        self, start_point: SubscriptionStartPoint | None = None
    ) -> AsyncAggregatedStreamReader[E]:
        """A reader for asyncio code (`async for m in reader.get_messages()`)."""
        from depeche_nb.engine.reader import AsyncAggregatedStreamReader

        return AsyncAggregatedStreamReader(self, start_point)

    def get_max_aggregated_stream_positions(self, conn: sa.Connection | None = None) -> dict[int, int]:
        """Partition -> head position (highest assigned position)."""
        sql = self.statements.heads_sql
        if conn is not None:
            return {row[0]: row[1] for row in conn.exec_driver_sql(sql).all()}
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(sql)
            return {row[0]: row[1] for row in cursor.fetchall()}

    def get_partition_statistics(
        self, result_limit: int | None = None, conn: sa.Connection | None = None
    ) -> Iterator[StreamPartitionStatistic]:
        """Per partition: its first message and its head position (Depeche DB's shape:
        `next_message_occurred_at` is a naive UTC datetime)."""
        limit = None if result_limit is None else int(result_limit)
        with self._connection(conn) as c:
            rows = c.exec_driver_sql(self.statements.first_messages_sql, (limit,)).all()
        for row in rows:
            yield StreamPartitionStatistic(row[0], _as_uuid(row[1]), row[2], row[3], row[4])

    def time_to_positions(self, time: _dt.datetime) -> dict[int, int]:
        """Per partition: the first position whose message occurred at or after `time`
        (head + 1 if none did)."""
        if not isinstance(time, _dt.datetime):
            raise TypeError(f"time must be a datetime, got {type(time).__name__}")
        if time.tzinfo is None:
            raise ValueError("time must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return self._per_partition(
            "min(s.position)", "s.message_occurred_at >= %s", "h.max_position + 1", time
        )

    def global_position_to_positions(self, global_position: int) -> dict[int, int]:
        """Per partition: the last position whose message is at or before `global_position`
        in the store (-1 if none)."""
        _check_int("global_position", global_position)
        return self._per_partition("max(s.position)", "s.global_position <= %s", "-1", global_position)

    def _per_partition(self, aggregate: str, condition: str, default: str, value: object) -> dict[int, int]:
        """For every partition: `aggregate` over its rows meeting `condition`, else `default`."""
        with self._connection(None) as c:
            rows = c.exec_driver_sql(
                self.statements.per_partition_sql(aggregate, condition, default), (value,)
            ).all()
        return {row[0]: row[1] for row in rows}

    def truncate(self, conn: sa.Connection | None = None) -> None:
        """Forget every assignment and the projector's checkpoint (re-projects from scratch)."""
        with self._connection(conn) as c:
            for statement in self.statements.truncate_sql:
                c.exec_driver_sql(statement)

    def _connection(self, conn: sa.Connection | None) -> contextlib.AbstractContextManager[sa.Connection]:
        return callers_or_own(self.engine, conn)

    # -- DataFrame views (built by `notebook.views`; pandas loads on first use) ----------------

    def assignments_dataframe(
        self, partition: int | None = None, limit: int | None = DEFAULT_LIMIT
    ) -> pd.DataFrame:
        """Which message is at which partition/position (all partitions by global position, or
        one `partition` by position); at most `limit` rows (None = all)."""
        return run_view("assignments", self, partition=partition, limit=limit)  # type: ignore[no-any-return]

    def partitions_dataframe(self) -> pd.DataFrame:
        """One row per partition (messages, head position, last projected time);
        `attrs["unprojected_messages"]` is the stream's projection lag."""
        return run_view("partitions", self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return (
            f"AggregatedStream(name={self.name!r}, store={self.store.name!r}, "
            f"wildcards={self.stream_wildcards!r})"
        )


class AggregatedStreamFactory(Generic[E]):
    """`store.aggregated_stream(...)`: creates aggregated streams over one store."""

    def __init__(self, store: StoreSource[E]) -> None:
        self.store = store

    def __call__(
        self,
        name: str,
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        update_batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
        *,
        rebuild: bool = False,
    ) -> AggregatedStream[E]:
        return AggregatedStream(
            name,
            self.store,
            partitioner,
            stream_wildcards,
            update_batch_size,
            lookback_for_gaps_hours,
            rebuild=rebuild,
        )


def _check_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


__all__ = ["AggregatedStream", "AggregatedStreamFactory", "validate_wildcards"]

"""A read-only look at a Depeche DB 0.13 database: `depeche_nb.open_depeche_db(engine)`.

Everything here reads through `postgres.depeche_db_tables` inside a
`REPEATABLE READ, READ ONLY` transaction that is rolled back at the end, so a
view can neither change the database nor see it change half-way: any write
would fail. Nothing is created, not even depeche-nb's own tables.

The DataFrames follow the library's column conventions (positions and counts
int64, ids and names strings, timestamps tz-aware UTC). Depeche DB stores
times without a time zone; they are read as local time of the explorer's
`timezone` (default: the session's `TimeZone`, normally the server's).
"""

from __future__ import annotations

import contextlib
import dataclasses as _dc
import numbers
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import sqlalchemy as sa

from depeche_nb.core.display import DEFAULT_LIMIT
from depeche_nb.engine.depeche_db_adoption import (
    STATE,
    STORE,
    STREAM,
    AdoptionReport,
    adopt_depeche_db,
    infer_subscription_streams,
)
from depeche_nb.notebook import html as h
from depeche_nb.notebook.reprs import guarded
from depeche_nb.notebook.views.kit import (
    CHUNK_ROWS,
    EPOCH_US,
    INT64,
    NULLABLE_BOOL,
    NULLABLE_INT,
    STRING,
    UTC,
    check_limit,
    frame_from_rows,
    typed_frame_from_chunks,
)
from depeche_nb.notebook.views.store import messages_frame_from_chunks
from depeche_nb.notebook.views.streams import ASSIGNMENT_KINDS
from depeche_nb.postgres import depeche_db_tables as ddb

if TYPE_CHECKING:
    import pandas as pd


@_dc.dataclass(frozen=True)
class _StreamInfo:
    name: str
    store: str | None  # None: cannot be told (no store holds its messages, or several do)
    messages: int
    partitions: int
    last_global_position: int | None
    unprojected: int | None  # in origin streams it already holds (see the gateway)
    heads: dict[int, int]


@_dc.dataclass(frozen=True)
class _SubscriptionInfo:
    provider: str
    name: str
    stream: str | None  # the stream its positions fit, if exactly one does (or as given)
    initialized: bool
    positions: dict[int, int]


class DepecheDbExplorer:
    """Stores, aggregated streams and subscription state of a Depeche DB database, read-only.

    `stream_stores` ({stream: store}) and `subscription_streams` ({subscription:
    stream}) say what Depeche DB does not record, where the data cannot tell.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        timezone: str | None = None,
        stream_stores: Mapping[str, str] | None = None,
        subscription_streams: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self._stream_stores = dict(stream_stores or {})
        self._subscription_streams = dict(subscription_streams or {})
        with self._read() as conn:
            self.timezone = ddb.check_timezone(conn, timezone) if timezone else ddb.session_timezone(conn)
        self.refresh()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            ddb.begin_read_only(conn)
            try:
                yield conn
            finally:
                conn.rollback()

    def refresh(self) -> None:
        """Look for Depeche DB's tables again."""
        with self._read() as conn:
            self.catalog = ddb.discover(conn)

    # -- names --------------------------------------------------------------------------------

    @property
    def stores(self) -> list[str]:
        return [s.name for s in self.catalog.stores]

    @property
    def aggregated_streams(self) -> list[str]:
        return [s.name for s in self.catalog.streams]

    @property
    def state_providers(self) -> list[str]:
        return [t.provider for t in self.catalog.state_tables]

    @property
    def subscriptions(self) -> list[str]:
        with self._read() as conn:
            return sorted({s.name for s in self._subscription_infos(conn)})

    # -- gathering ----------------------------------------------------------------------------

    def _stream_infos(self, conn: sa.Connection) -> list[_StreamInfo]:
        infos = []
        for stream in self.catalog.streams:
            heads = ddb.stream_heads(conn, stream)
            store_name = self._store_of(conn, stream)
            partitions = ddb.stream_partitions(conn, stream, self.timezone)
            unprojected = None
            if store_name is not None:
                unprojected = ddb.unprojected_in_known_streams(conn, stream, self.catalog.store(store_name))
            infos.append(
                _StreamInfo(
                    stream.name,
                    store_name,
                    sum(p.messages for p in partitions),
                    len(partitions),
                    max((p.last_global_position for p in partitions), default=None),
                    unprojected,
                    heads,
                )
            )
        return infos

    def _store_of(self, conn: sa.Connection, stream: ddb.DdbStream) -> str | None:
        if stream.name in self._stream_stores:
            return self._stream_stores[stream.name]
        fitting, empty = [], True
        for store in self.catalog.stores:
            total, matched = ddb.stream_store_matches(conn, stream, store)
            empty = total == 0
            if total and total == matched:
                fitting.append(store.name)
        if empty and len(self.catalog.stores) == 1:
            return self.catalog.stores[0].name
        return fitting[0] if len(fitting) == 1 else None

    def _subscription_infos(self, conn: sa.Connection) -> list[_SubscriptionInfo]:
        heads = {s.name: ddb.stream_heads(conn, s) for s in self.catalog.streams}
        infos = []
        for table in self.catalog.state_tables:
            positions: dict[str, dict[int, int]] = {}
            initialised: set[str] = set()
            for name, partition, position in ddb.state_rows(conn, table):
                positions.setdefault(name, {})
                if partition == ddb.INIT_PARTITION:
                    initialised.add(name)
                else:
                    positions[name][partition] = position
            fits = infer_subscription_streams(positions, heads)
            for name in sorted(positions):
                stream = self._subscription_streams.get(name)
                if stream is None and len(fits[name]) == 1:
                    stream = fits[name][0]
                infos.append(
                    _SubscriptionInfo(table.provider, name, stream, name in initialised, positions[name])
                )
        return infos

    def _adopted(self, conn: sa.Connection) -> set[tuple[str, str]]:
        return set(ddb.register_entries(conn))

    # -- DataFrames ---------------------------------------------------------------------------

    def stores_dataframe(self) -> pd.DataFrame:
        """One row per message store: `store`, `table`, `messages`, `streams`,
        `first_global_position`, `last_global_position` (nullable), `last_added_at`,
        `adopted` (recorded by `adopt_depeche_db`)."""
        with self._read() as conn:
            adopted = self._adopted(conn)
            rows = []
            for store in self.catalog.stores:
                st = ddb.store_stats(conn, store, self.timezone)
                rows.append(
                    (
                        store.name,
                        str(store.table),
                        st.messages,
                        st.streams,
                        st.first_global_position,
                        st.last_global_position,
                        st.last_added_at,
                        (STORE, store.name) in adopted,
                    )
                )
        return frame_from_rows(rows, _STORE_KINDS)

    def streams_dataframe(self, store: str) -> pd.DataFrame:
        """One row per origin stream of a store: `stream`, `messages`, `first_global_position`,
        `last_global_position`, `last_added_at`."""
        source = self.catalog.store(store)
        with self._read() as conn:
            rows = ddb.store_streams(conn, source, self.timezone)
        return frame_from_rows(rows, _ORIGIN_STREAM_KINDS)

    def messages_dataframe(
        self,
        store: str,
        stream: str | None = None,
        wildcard: str | None = None,
        limit: int | None = DEFAULT_LIMIT,
        *,
        flatten: bool = True,
    ) -> pd.DataFrame:
        """Messages of a store, like `MessageStore.to_dataframe()`: one `stream` (by version),
        a `wildcard` (SQL LIKE) or all (by global position); payload flattened into columns.
        `limit` rows at most (None = all); `frame.attrs["more_available"]`."""

        if stream is not None and wildcard is not None:
            raise ValueError("pass either stream or wildcard, not both")
        source = self.catalog.store(store)
        row_limit = check_limit(limit)
        fetch = None if row_limit is None else row_limit + 1
        with self._read() as conn:
            chunks = ddb.store_message_chunks(
                conn,
                source,
                self.timezone,
                stream=stream,
                wildcard=wildcard,
                limit=fetch,
                chunk_rows=CHUNK_ROWS,
            )
            return messages_frame_from_chunks(chunks, row_limit, flatten=flatten)

    def aggregated_streams_dataframe(self) -> pd.DataFrame:
        """One row per aggregated stream: `stream`, `store` (inferred from the data; missing
        when it cannot be told), `messages`, `partitions`, `last_global_position`,
        `unprojected` (store messages of origin streams it already holds that it has not
        projected; Depeche DB records no wildcards, so streams it never projected are not
        counted), `adopted`."""
        with self._read() as conn:
            adopted = self._adopted(conn)
            rows = [
                (
                    i.name,
                    i.store,
                    i.messages,
                    i.partitions,
                    i.last_global_position,
                    i.unprojected,
                    (STREAM, i.name) in adopted,
                )
                for i in self._stream_infos(conn)
            ]
        return frame_from_rows(rows, _AGG_KINDS)

    def partitions_dataframe(self, stream: str) -> pd.DataFrame:
        """One row per partition: `partition`, `messages`, `head_position` (highest assigned),
        `recorded_max_position` (Depeche DB's `_maxpos` table; missing where it has no row),
        `gaps` (positions missing below the head), `first_global_position`,
        `last_global_position`, `last_occurred_at`."""
        source = self.catalog.stream(stream)
        with self._read() as conn:
            parts = ddb.stream_partitions(conn, source, self.timezone)
        rows = [
            (
                p.partition,
                p.messages,
                p.head_position,
                p.recorded_max_position,
                p.gaps,
                p.first_global_position,
                p.last_global_position,
                p.last_occurred_at,
            )
            for p in parts
        ]
        return frame_from_rows(rows, _PARTITION_KINDS)

    def assignments_dataframe(
        self, stream: str, partition: int | None = None, limit: int | None = DEFAULT_LIMIT
    ) -> pd.DataFrame:
        """Which message is at which partition/position: `message_id`, `origin_stream`,
        `version`, `global_position`, `partition`, `position`, `message_occurred_at`; all
        partitions by global position or one `partition` by position."""

        if partition is not None and (
            isinstance(partition, bool) or not isinstance(partition, numbers.Integral)
        ):
            raise TypeError(f"partition must be an int or None, got {type(partition).__name__}")
        source = self.catalog.stream(stream)
        row_limit = check_limit(limit)
        fetch = None if row_limit is None else row_limit + 1
        with self._read() as conn:
            chunks = ddb.assignment_chunks(
                conn,
                source,
                self.timezone,
                partition=None if partition is None else int(partition),
                limit=fetch,
                chunk_rows=CHUNK_ROWS,
            )
            return typed_frame_from_chunks(chunks, row_limit, _ASSIGNMENT_KINDS)

    def subscriptions_dataframe(self) -> pd.DataFrame:
        """One row per subscription found in a state table: `provider`, `subscription`,
        `stream` (the one its positions fit, or as given; missing if it cannot be told),
        `initialized`, `partitions` (with a stored position), `lag` (messages after the
        stored positions; missing without a stream), `adopted`."""
        with self._read() as conn:
            adopted = self._adopted(conn)
            heads = {s.name: ddb.stream_heads(conn, s) for s in self.catalog.streams}
            rows = []
            for info in self._subscription_infos(conn):
                lag = None
                if info.stream in heads:
                    lag = sum(
                        max(head - info.positions.get(p, -1), 0) for p, head in heads[info.stream].items()
                    )
                rows.append(
                    (
                        info.provider,
                        info.name,
                        info.stream,
                        info.initialized,
                        len(info.positions),
                        lag,
                        (STATE, info.provider) in adopted,
                    )
                )
        return frame_from_rows(rows, _SUBSCRIPTION_KINDS)

    def subscription_state_dataframe(
        self, subscription: str, stream: str | None = None, provider: str | None = None
    ) -> pd.DataFrame:
        """Per partition: `partition`, `position` (last acknowledged, -1 before the first),
        `head` (highest assigned position; -1 if none), `lag` (`head - position`). `stream`
        defaults to the one the positions fit; `provider` to the state table holding the
        subscription. `frame.attrs` has `stream`, `provider`, `initialized`."""
        with self._read() as conn:
            infos = [
                i
                for i in self._subscription_infos(conn)
                if i.name == subscription and (provider is None or i.provider == provider)
            ]
            if not infos:
                raise KeyError(f"no Depeche DB subscription state for {subscription!r}")
            if len(infos) > 1:
                raise ValueError(
                    f"subscription {subscription!r} has state in several tables "
                    f"({', '.join(i.provider for i in infos)}); pass provider="
                )
            info = infos[0]
            stream_name = stream or info.stream
            heads = ddb.stream_heads(conn, self.catalog.stream(stream_name)) if stream_name else {}
        rows = []
        for p in sorted(set(heads) | set(info.positions)):
            position, head = info.positions.get(p, -1), heads.get(p, -1)
            rows.append((p, position, head, head - position))
        frame = frame_from_rows(rows, _STATE_KINDS)
        frame.attrs = {"stream": stream_name, "provider": info.provider, "initialized": info.initialized}
        return frame

    # -- adoption preview ---------------------------------------------------------------------

    def adoption_plan(self) -> AdoptionReport:
        """What `adopt_depeche_db` would do (a dry run: read-only, nothing changes)."""
        return adopt_depeche_db(
            self.engine, dry_run=True, timezone=self.timezone, stream_stores=self._stream_stores
        )

    # -- display ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"<DepecheDbExplorer stores={self.stores} aggregated_streams={self.aggregated_streams} "
            f"state_providers={self.state_providers}>"
        )

    def _repr_html_(self) -> str:
        return render_explorer(self)


def open_depeche_db(
    engine: sa.Engine,
    *,
    timezone: str | None = None,
    stream_stores: Mapping[str, str] | None = None,
    subscription_streams: Mapping[str, str] | None = None,
) -> DepecheDbExplorer:
    """A read-only explorer of the Depeche DB 0.13 tables in `engine`'s database (see
    `DepecheDbExplorer`); it changes nothing. Adopt the database with `adopt_depeche_db`."""
    return DepecheDbExplorer(
        engine, timezone=timezone, stream_stores=stream_stores, subscription_streams=subscription_streams
    )


_STORE_KINDS = (
    ("store", STRING),
    ("table", STRING),
    ("messages", INT64),
    ("streams", INT64),
    ("first_global_position", NULLABLE_INT),
    ("last_global_position", NULLABLE_INT),
    ("last_added_at", UTC),
    ("adopted", NULLABLE_BOOL),
)
_ORIGIN_STREAM_KINDS = (
    ("stream", STRING),
    ("messages", INT64),
    ("first_global_position", INT64),
    ("last_global_position", INT64),
    ("last_added_at", EPOCH_US),
)
_AGG_KINDS = (
    ("stream", STRING),
    ("store", STRING),
    ("messages", INT64),
    ("partitions", INT64),
    ("last_global_position", NULLABLE_INT),
    ("unprojected", NULLABLE_INT),
    ("adopted", NULLABLE_BOOL),
)
_PARTITION_KINDS = (
    ("partition", INT64),
    ("messages", INT64),
    ("head_position", INT64),
    ("recorded_max_position", NULLABLE_INT),
    ("gaps", INT64),
    ("first_global_position", INT64),
    ("last_global_position", INT64),
    ("last_occurred_at", UTC),
)
# Depeche DB records no projection time: ours without `projected_at`.
_ASSIGNMENT_KINDS = ASSIGNMENT_KINDS[:-1]
_SUBSCRIPTION_KINDS = (
    ("provider", STRING),
    ("subscription", STRING),
    ("stream", STRING),
    ("initialized", NULLABLE_BOOL),
    ("partitions", INT64),
    ("lag", NULLABLE_INT),
    ("adopted", NULLABLE_BOOL),
)
_STATE_KINDS = (("partition", INT64), ("position", INT64), ("head", INT64), ("lag", INT64))


# -- HTML -------------------------------------------------------------------------------------


@guarded
def render_explorer(explorer: DepecheDbExplorer) -> str:
    with explorer._read() as conn:
        adopted = explorer._adopted(conn)
        stores = [(s, ddb.store_stats(conn, s, explorer.timezone)) for s in explorer.catalog.stores]
        streams = explorer._stream_infos(conn)
        subscriptions = explorer._subscription_infos(conn)
    heads = {s.name: s.heads for s in streams}
    parts = [
        h.title("Depeche DB database", "read-only"),
        h.facts(
            [
                h.count(len(stores), "store"),
                h.count(len(streams), "aggregated stream"),
                h.count(len(subscriptions), "subscription"),
                ("times read as", explorer.timezone),
                ("adopted", f"{len(adopted)} object(s)" if adopted else "not yet"),
            ]
        ),
    ]
    if not (stores or streams or subscriptions):
        parts.append(
            h.note("no Depeche DB tables (depeche_msgs_*, depeche_stream_*, depeche_subscriptions_*)")
        )
        return h.box(*parts)
    if stores:
        parts.append(h.section("Message stores"))
        parts.append(
            h.table(
                ("store", "messages", "streams", "last global position", "last write", "adopted"),
                [
                    (
                        s.name,
                        st.messages,
                        st.streams,
                        st.last_global_position,
                        st.last_added_at,
                        (STORE, s.name) in adopted,
                    )
                    for s, st in stores
                ],
                keep="first",
                noun="store",
                hint="explorer.stores_dataframe()",
            )
        )
    if streams:
        parts.append(
            section_with_hint("Aggregated streams", "unprojected: in origin streams it already holds")
        )
        parts.append(
            h.table(
                ("stream", "store", "messages", "partitions", "unprojected", "adopted"),
                [
                    (i.name, i.store, i.messages, i.partitions, i.unprojected, (STREAM, i.name) in adopted)
                    for i in streams
                ],
                keep="first",
                noun="stream",
                hint="explorer.aggregated_streams_dataframe()",
            )
        )
    if subscriptions:
        parts.append(h.section("Subscriptions"))
        rows = []
        for info in subscriptions:
            lag = None
            if info.stream in heads:
                lag = sum(max(hd - info.positions.get(p, -1), 0) for p, hd in heads[info.stream].items())
            rows.append(
                (
                    info.name,
                    info.provider,
                    info.stream,
                    info.initialized,
                    lag,
                    (STATE, info.provider) in adopted,
                )
            )
        parts.append(
            h.table(
                ("subscription", "state provider", "stream", "initialised", "lag", "adopted"),
                rows,
                keep="first",
                noun="subscription",
                hint="explorer.subscriptions_dataframe()",
            )
        )
    parts.append(
        h.note(
            "This view changes nothing. explorer.adoption_plan() shows what adopt_depeche_db(engine) "
            "(or `depeche-nb adopt-depeche-db`) would do; stop Depeche DB's writers and workers first."
        )
    )
    return h.box(*parts)


def section_with_hint(title: str, hint: str) -> str:
    return h.section(title) + h.note(hint)


@guarded
def render_adoption_report(report: AdoptionReport) -> str:
    actions: dict[str, int] = {}
    for item in report.items:
        actions[item.action] = actions.get(item.action, 0) + 1
    parts = [
        h.title("AdoptionReport", "dry run" if report.dry_run else None),
        h.facts(
            [*actions.items(), ("times read as", report.timezone)]
            if report.items
            else ["no Depeche DB tables"],
            css={"adopted": "dnb-ok", "skipped": "dnb-warn"},
        ),
    ]
    if report.items:
        parts.append(
            h.table(
                ("action", "kind", "name", "rows", "Depeche DB table", "depeche-nb table(s)", "note"),
                [(i.action, i.kind, i.name, i.rows, i.source, i.target, i.note) for i in report.items],
                keep="first",
                noun="object",
                hint="report.to_dataframe()",
            )
        )
    for warning in report.warnings:
        parts.append(f'<div class="dnb-warn">{h.esc("warning: " + warning)}</div>')
    parts.append(h.note(report.kept))
    return h.box(*parts)


__all__ = ["DepecheDbExplorer", "open_depeche_db", "render_adoption_report", "render_explorer"]

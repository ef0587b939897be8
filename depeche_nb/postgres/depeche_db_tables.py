"""The one place that knows the tables of a Depeche DB 0.13 database, and the SQL to adopt them.

Depeche DB (the published library) keeps, in the schema its engine resolves
unqualified names in:

* per message store `S`: `depeche_msgs_S` (message_id uuid primary key,
  global_position int from the sequence `depeche_msgs_S_global_seq`,
  added_at timestamp *without* time zone, stream, version, message jsonb);
* per aggregated stream `A`: `depeche_stream_A` (one row per projected
  message: message_id, origin_stream, origin_stream_version, partition,
  position, message_occurred_at, origin_stream_global_position,
  origin_stream_added_at) and `depeche_stream_A_maxpos` (partition ->
  max_position, since 0.12.3). Which store a stream reads is recorded
  nowhere; it is inferred from the data (see `stream_store_matches`);
* per `DbSubscriptionStateProvider` `P` (by default named like its
  subscription): `depeche_subscriptions_P` (subscription_name, partition,
  position; partition -1 marks an initialised subscription).

Tables are recognised by name prefix *and* columns, so a stream named
`x_maxpos` is not mistaken for the position table of stream `x`. Every
statement here is a single statement with driver parameters (`%s`), runs on
a SQLAlchemy connection the caller owns (psycopg 3 and psycopg2 alike), and
quotes every name it splices in. Reads never write; the `adopt_*`
statements write only to depeche-nb's tables and to the adoption register
`depeche_nb_adoptions`, never to Depeche DB's.

Depeche DB's timestamps have no time zone: `now()` and the message times
were stored as the writing session's local time. They are read as local
time of `timezone` (an IANA name; callers default it to the reading
session's `TimeZone`, which is the server's unless a client changed it).
"""

from __future__ import annotations

import dataclasses as _dc
import json
from collections.abc import Generator, Sequence
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.stream_tables import CLUSTER_IDENTITY_SQL

STORE_PREFIX = "depeche_msgs_"
STREAM_PREFIX = "depeche_stream_"
STATE_PREFIX = "depeche_subscriptions_"
MAXPOS_SUFFIX = "_maxpos"
SEQUENCE_SUFFIX = "_global_seq"
INIT_PARTITION = -1  # Depeche DB's "initialised" marker row

_STORE_COLUMNS = frozenset({"message_id", "global_position", "added_at", "stream", "version", "message"})
_STREAM_COLUMNS = frozenset(
    {
        "message_id",
        "origin_stream",
        "origin_stream_version",
        "partition",
        "position",
        "message_occurred_at",
        "origin_stream_global_position",
        "origin_stream_added_at",
    }
)
_MAXPOS_COLUMNS = frozenset({"partition", "max_position"})
_STATE_COLUMNS = frozenset({"subscription_name", "partition", "position"})

# The register of adoptions: which Depeche DB table became which depeche-nb object, when,
# and what the source held then (to notice Depeche DB writing on after the adoption).
REGISTER_TABLE = "depeche_nb_adoptions"
REGISTER_DDL = f"""
    CREATE TABLE IF NOT EXISTS {REGISTER_TABLE} (
        kind text NOT NULL,
        name text NOT NULL,
        source_table text NOT NULL,
        adopted_at timestamptz NOT NULL DEFAULT now(),
        source_state jsonb NOT NULL,
        details jsonb NOT NULL,
        PRIMARY KEY (kind, name)
    )
"""


@_dc.dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: dict[str, str] = _dc.field(default_factory=dict, compare=False)  # name -> SQL type

    @property
    def sql(self) -> str:
        """The schema-qualified, quoted name."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@_dc.dataclass(frozen=True)
class DdbStore:
    name: str
    table: Table
    sequence: Table | None


@_dc.dataclass(frozen=True)
class DdbStream:
    name: str
    table: Table
    maxpos: Table | None


@_dc.dataclass(frozen=True)
class DdbStateTable:
    provider: str
    table: Table


@_dc.dataclass(frozen=True)
class DdbCatalog:
    stores: list[DdbStore]
    streams: list[DdbStream]
    state_tables: list[DdbStateTable]

    def store(self, name: str) -> DdbStore:
        for store in self.stores:
            if store.name == name:
                return store
        raise KeyError(f"no Depeche DB message store {name!r}; found: {[s.name for s in self.stores]}")

    def stream(self, name: str) -> DdbStream:
        for stream in self.streams:
            if stream.name == name:
                return stream
        raise KeyError(f"no Depeche DB aggregated stream {name!r}; found: {[s.name for s in self.streams]}")

    def state_table(self, provider: str) -> DdbStateTable:
        for table in self.state_tables:
            if table.provider == provider:
                return table
        raise KeyError(
            f"no Depeche DB subscription state table of provider {provider!r}; found: "
            f"{[t.provider for t in self.state_tables]}"
        )


# -- session helpers --------------------------------------------------------------------------


def begin_read_only(conn: sa.Connection) -> None:
    """Make the connection's (just begun) transaction a read-only, repeatable-read one: every
    statement sees one snapshot and any write fails. Must be the first statement."""
    conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def session_timezone(conn: sa.Connection) -> str:
    return str(conn.exec_driver_sql("SELECT current_setting('TimeZone')").scalar_one())


def check_timezone(conn: sa.Connection, timezone: str) -> str:
    """`timezone` if PostgreSQL knows it (else a ValueError naming it)."""
    known = conn.exec_driver_sql(
        "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = %s) "
        "OR EXISTS (SELECT 1 FROM pg_timezone_abbrevs WHERE abbrev = %s)",
        (timezone, timezone),
    ).scalar_one()
    if not known:
        raise ValueError(f"unknown time zone {timezone!r} (use an IANA name such as 'Europe/Berlin')")
    return timezone


def _local(column: str) -> str:
    """A Depeche DB timestamp column read as local time of the `%s` time zone (-> timestamptz)."""
    return f"({column} AT TIME ZONE %s::text)"


def _epoch_us(expression: str) -> str:
    return f"(extract(epoch FROM {expression}) * 1000000)::int8"


def _uuid(column: str, table: Table) -> str:
    """A message id column as uuid (Depeche DB's UUIDType is native uuid on PostgreSQL; other
    storages of it are hex text)."""
    return column if table.columns.get(column) == "uuid" else f"{column}::text::uuid"


# -- discovery --------------------------------------------------------------------------------


def discover(conn: sa.Connection) -> DdbCatalog:
    """Every Depeche DB table visible on the search path, recognised by name and columns."""
    rows = conn.exec_driver_sql(
        "SELECT n.nspname::text, c.relname::text, "
        "array_agg(a.attname::text ORDER BY a.attnum), "
        "array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE c.relkind IN ('r', 'p') AND pg_table_is_visible(c.oid) "
        "AND (starts_with(c.relname::text, %s) OR starts_with(c.relname::text, %s) "
        "OR starts_with(c.relname::text, %s)) "
        "GROUP BY n.nspname, c.relname ORDER BY c.relname",
        (STORE_PREFIX, STREAM_PREFIX, STATE_PREFIX),
    ).all()
    tables = [Table(row[0], row[1], dict(zip(row[2], row[3], strict=True))) for row in rows]
    by_name = {t.name: t for t in tables}
    stores, streams, states = [], [], []
    for table in tables:
        columns = set(table.columns)
        if table.name.startswith(STORE_PREFIX) and _STORE_COLUMNS <= columns:
            name = table.name[len(STORE_PREFIX) :]
            stores.append(DdbStore(name, table, _sequence(conn, table.schema, table.name + SEQUENCE_SUFFIX)))
        elif table.name.startswith(STREAM_PREFIX) and _STREAM_COLUMNS <= columns:
            maxpos = by_name.get(table.name + MAXPOS_SUFFIX)
            if maxpos is not None and set(maxpos.columns) != _MAXPOS_COLUMNS:
                maxpos = None
            streams.append(DdbStream(table.name[len(STREAM_PREFIX) :], table, maxpos))
        elif table.name.startswith(STATE_PREFIX) and _STATE_COLUMNS <= columns:
            states.append(DdbStateTable(table.name[len(STATE_PREFIX) :], table))
    return DdbCatalog(stores, streams, states)


def _sequence(conn: sa.Connection, schema: str, name: str) -> Table | None:
    found = conn.exec_driver_sql(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'S' AND n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).first()
    return None if found is None else Table(schema, name)


def table_exists(conn: sa.Connection, name: str) -> bool:
    """Whether an (unqualified) table name resolves on the search path."""
    return bool(conn.exec_driver_sql("SELECT to_regclass(%s) IS NOT NULL", (quote_ident(name),)).scalar_one())


# -- reading a store --------------------------------------------------------------------------


@_dc.dataclass(frozen=True)
class StoreStats:
    messages: int
    streams: int
    first_global_position: int | None
    last_global_position: int | None
    last_added_at: Any  # tz-aware datetime or None
    sequence_last_value: int | None  # the highest global position the sequence handed out


def store_stats(conn: sa.Connection, store: DdbStore, timezone: str) -> StoreStats:
    row = conn.exec_driver_sql(
        f"SELECT count(*), count(DISTINCT stream), min(global_position)::int8, "
        f"max(global_position)::int8, max({_local('added_at')}) FROM {store.table.sql}",
        (timezone,),
    ).one()
    last_value = None
    if store.sequence is not None:
        seq = conn.exec_driver_sql(f"SELECT last_value, is_called FROM {store.sequence.sql}").one()
        last_value = int(seq[0]) if seq[1] else None
    return StoreStats(int(row[0]), int(row[1]), row[2], row[3], row[4], last_value)


def store_streams(conn: sa.Connection, store: DdbStore, timezone: str) -> list[tuple[Any, ...]]:
    """Per origin stream: stream, messages, first/last global position, last added_at (epoch us)."""
    rows = conn.exec_driver_sql(
        f"SELECT stream::text, count(*), min(global_position)::int8, max(global_position)::int8, "
        f"{_epoch_us('max(' + _local('added_at') + ')')} FROM {store.table.sql} "
        "GROUP BY stream ORDER BY stream",
        (timezone,),
    ).all()
    return [tuple(r) for r in rows]


def store_message_chunks(
    conn: sa.Connection,
    store: DdbStore,
    timezone: str,
    *,
    stream: str | None,
    wildcard: str | None,
    limit: int | None,
    chunk_rows: int,
) -> Generator[list[tuple[Any, ...]], None, None]:
    """Messages as (global_position, stream, version, message_id text, added_at epoch us,
    payload JSON text), by version for one `stream`, else by global position; in chunks
    from a server-side cursor."""
    where, params, order = "TRUE", [], "global_position"
    if stream is not None:
        where, params, order = "stream = %s", [stream], "version"
    elif wildcard is not None:
        where, params = "stream LIKE %s", [wildcard]
    sql = (
        f"SELECT global_position::int8, stream::text, version::int8, message_id::text, "
        f"{_epoch_us(_local('added_at'))}, message::text FROM {store.table.sql} "
        f"WHERE {where} ORDER BY {order} LIMIT %s"
    )
    yield from _chunks(conn, sql, (timezone, *params, limit), chunk_rows)


# -- reading an aggregated stream -------------------------------------------------------------


def stream_store_matches(conn: sa.Connection, stream: DdbStream, store: DdbStore) -> tuple[int, int]:
    """(assignments, assignments whose message is in `store` with the same global position,
    origin stream and version): equal and non-zero means the stream reads that store."""
    row = conn.exec_driver_sql(
        f"SELECT count(*), count(m.message_id) FROM {stream.table.sql} s "
        f"LEFT JOIN {store.table.sql} m ON m.message_id = s.message_id "
        "AND m.global_position = s.origin_stream_global_position "
        "AND m.stream = s.origin_stream AND m.version = s.origin_stream_version"
    ).one()
    return int(row[0]), int(row[1])


@_dc.dataclass(frozen=True)
class PartitionRow:
    partition: int
    messages: int
    first_position: int
    head_position: int  # max(position) in the table
    recorded_max_position: int | None  # what the _maxpos table says
    first_global_position: int
    last_global_position: int
    last_occurred_at: Any

    @property
    def gaps(self) -> int:
        """Positions missing between the first and the head."""
        return self.head_position - self.first_position + 1 - self.messages


def stream_partitions(conn: sa.Connection, stream: DdbStream, timezone: str) -> list[PartitionRow]:
    maxpos_join = f"LEFT JOIN {stream.maxpos.sql} x ON x.partition = s.partition" if stream.maxpos else ""
    maxpos_value = "max(x.max_position)" if stream.maxpos else "NULL::int"
    rows = conn.exec_driver_sql(
        f"SELECT s.partition, count(*), min(s.position), max(s.position), {maxpos_value}, "
        f"min(s.origin_stream_global_position)::int8, max(s.origin_stream_global_position)::int8, "
        f"max({_local('s.message_occurred_at')}) FROM {stream.table.sql} s {maxpos_join} "
        "GROUP BY s.partition ORDER BY s.partition",
        (timezone,),
    ).all()
    return [PartitionRow(*row) for row in rows]


def stream_heads(conn: sa.Connection, stream: DdbStream) -> dict[int, int]:
    """Partition -> highest assigned position (from the stream table itself)."""
    rows = conn.exec_driver_sql(
        f"SELECT partition, max(position) FROM {stream.table.sql} GROUP BY partition"
    ).all()
    return {int(r[0]): int(r[1]) for r in rows}


def recorded_max_positions(conn: sa.Connection, stream: DdbStream) -> dict[int, int]:
    if stream.maxpos is None:
        return {}
    rows = conn.exec_driver_sql(f"SELECT partition, max_position FROM {stream.maxpos.sql}").all()
    return {int(r[0]): int(r[1]) for r in rows}


def assignment_chunks(
    conn: sa.Connection,
    stream: DdbStream,
    timezone: str,
    *,
    partition: int | None,
    limit: int | None,
    chunk_rows: int,
) -> Generator[list[tuple[Any, ...]], None, None]:
    """(message_id text, origin_stream, version, global_position, partition, position,
    message_occurred_at epoch us), all by global position or one partition by position."""
    where, params, order = "TRUE", [], "origin_stream_global_position"
    if partition is not None:
        where, params, order = "partition = %s", [partition], "position"
    sql = (
        "SELECT message_id::text, origin_stream::text, origin_stream_version::int8, "
        "origin_stream_global_position::int8, partition::int8, position::int8, "
        f"{_epoch_us(_local('message_occurred_at'))} FROM {stream.table.sql} "
        f"WHERE {where} ORDER BY {order} LIMIT %s"
    )
    yield from _chunks(conn, sql, (timezone, *params, limit), chunk_rows)


def unprojected_in_known_streams(conn: sa.Connection, stream: DdbStream, store: DdbStore) -> int:
    """Store messages of origin streams the aggregated stream already holds, not projected into
    it. Depeche DB records no wildcards, so streams it never projected cannot be counted."""
    return int(
        conn.exec_driver_sql(
            f"SELECT count(*) FROM {store.table.sql} m WHERE m.stream IN "
            f"(SELECT DISTINCT origin_stream FROM {stream.table.sql}) AND NOT EXISTS "
            f"(SELECT 1 FROM {stream.table.sql} s WHERE s.message_id = m.message_id)"
        ).scalar_one()
    )


def skipped_behind_later_versions(conn: sa.Connection, stream: DdbStream, store: DdbStore) -> int:
    """Unprojected messages older (lower version) than a projected message of the same origin
    stream: what Depeche DB's look-back window left behind. Projecting them now puts them
    after the later versions."""
    return int(
        conn.exec_driver_sql(
            f"WITH heads AS (SELECT origin_stream, max(origin_stream_version) AS v "
            f"FROM {stream.table.sql} GROUP BY origin_stream) "
            f"SELECT count(*) FROM {store.table.sql} m JOIN heads h ON h.origin_stream = m.stream "
            f"WHERE m.version < h.v AND NOT EXISTS "
            f"(SELECT 1 FROM {stream.table.sql} s WHERE s.message_id = m.message_id)"
        ).scalar_one()
    )


def bad_assignments(conn: sa.Connection, stream: DdbStream) -> int:
    """Rows that depeche-nb's stream table cannot hold (negative partition or position)."""
    return int(
        conn.exec_driver_sql(
            f"SELECT count(*) FROM {stream.table.sql} WHERE partition < 0 OR position < 0"
        ).scalar_one()
    )


# -- reading subscription state ---------------------------------------------------------------


def state_rows(conn: sa.Connection, table: DdbStateTable) -> list[tuple[str, int, int]]:
    """(subscription_name, partition, position) including the -1 'initialised' rows."""
    rows = conn.exec_driver_sql(
        f"SELECT subscription_name::text, partition, position FROM {table.table.sql} "
        "ORDER BY subscription_name, partition"
    ).all()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


# -- what a source held (to notice writes after an adoption) ----------------------------------


def store_fingerprint(conn: sa.Connection, store: DdbStore) -> dict[str, int]:
    row = conn.exec_driver_sql(
        f"SELECT count(*), coalesce(max(global_position), 0)::int8 FROM {store.table.sql}"
    ).one()
    return {"rows": int(row[0]), "max_global_position": int(row[1])}


def stream_fingerprint(conn: sa.Connection, stream: DdbStream) -> dict[str, int]:
    row = conn.exec_driver_sql(
        f"SELECT count(*), coalesce(max(origin_stream_global_position), 0)::int8, "
        f"coalesce(sum(position), 0)::int8 FROM {stream.table.sql}"
    ).one()
    return {"rows": int(row[0]), "max_global_position": int(row[1]), "position_sum": int(row[2])}


def state_fingerprint(conn: sa.Connection, table: DdbStateTable) -> dict[str, Any]:
    row = conn.exec_driver_sql(
        "SELECT count(*), coalesce(md5(string_agg(subscription_name || ':' || partition || ':' "
        f"|| position, ',' ORDER BY subscription_name, partition)), '') FROM {table.table.sql}"
    ).one()
    return {"rows": int(row[0]), "digest": str(row[1])}


# -- the adoption register --------------------------------------------------------------------


@_dc.dataclass(frozen=True)
class RegisterEntry:
    kind: str
    name: str
    source_table: str
    adopted_at: Any
    source_state: dict[str, Any]
    details: dict[str, Any]


def register_entries(conn: sa.Connection) -> dict[tuple[str, str], RegisterEntry]:
    """Every recorded adoption, by (kind, name); empty if nothing was ever adopted."""
    if not table_exists(conn, REGISTER_TABLE):
        return {}
    rows = conn.exec_driver_sql(
        f"SELECT kind, name, source_table, adopted_at, source_state::text, details::text "
        f"FROM {REGISTER_TABLE}"
    ).all()
    entries = [RegisterEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in rows]
    return {(e.kind, e.name): e for e in entries}


def create_register(conn: sa.Connection) -> None:
    conn.exec_driver_sql(REGISTER_DDL)


def record_adoption(
    conn: sa.Connection,
    kind: str,
    name: str,
    source: Table,
    source_state: dict[str, Any],
    details: dict[str, Any],
) -> None:
    conn.exec_driver_sql(
        f"INSERT INTO {REGISTER_TABLE} (kind, name, source_table, source_state, details) "
        "VALUES (%s, %s, %s, %s::jsonb, %s::jsonb)",
        (kind, name, str(source), json.dumps(source_state), json.dumps(details)),
    )


# -- locking ----------------------------------------------------------------------------------


def lock_source(conn: sa.Connection, table: Table) -> None:
    """SHARE lock without waiting: fails (SQLSTATE 55P03) while a Depeche DB writer, projector
    or runner has the table open for writing, and keeps them out until commit."""
    conn.exec_driver_sql(f"LOCK TABLE {table.sql} IN SHARE MODE NOWAIT")


def lock_target(conn: sa.Connection, table: str) -> None:
    """EXCLUSIVE lock without waiting on a depeche-nb table: readers may go on, no writer."""
    conn.exec_driver_sql(f"LOCK TABLE {quote_ident(table)} IN EXCLUSIVE MODE NOWAIT")


def row_count(conn: sa.Connection, table: str) -> int:
    return int(conn.exec_driver_sql(f"SELECT count(*) FROM {quote_ident(table)}").scalar_one())


# -- adopting ---------------------------------------------------------------------------------


def membership_mask_sql(streams: Sequence[DdbStream]) -> str:
    """Per message row `m`: a bitmask of the given aggregated streams that hold it
    (bit i for streams[i]); 0 when none does."""
    if not streams:
        return "0::int8"
    terms = [
        f"(CASE WHEN EXISTS (SELECT 1 FROM {s.table.sql} s WHERE s.message_id = m.message_id) "
        f"THEN {1 << i} ELSE 0 END)::int8"
        for i, s in enumerate(streams)
    ]
    return " + ".join(terms)


def membership_masks(conn: sa.Connection, store: DdbStore, streams: Sequence[DdbStream]) -> list[int]:
    """The distinct membership masks present among the store's messages, ascending."""
    rows = conn.exec_driver_sql(
        f"SELECT DISTINCT {membership_mask_sql(streams)} AS mask FROM {store.table.sql} m ORDER BY mask"
    ).all()
    return [int(r[0]) for r in rows]


def oldest_running_xid(conn: sa.Connection) -> int:
    """xmin of the current snapshot: every transaction running now or later has an id >= it."""
    return int(conn.exec_driver_sql("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").scalar_one())


def adopt_messages(
    conn: sa.Connection,
    store: DdbStore,
    target_table: str,
    timezone: str,
    streams: Sequence[DdbStream],
    txid_of_mask: dict[int, int],
) -> int:
    """Copy every message into depeche-nb's table, keeping id, stream, version, payload and
    global position; `txid` is `txid_of_mask[mask]` for the row's membership mask."""
    masks = sorted(txid_of_mask)
    result = conn.exec_driver_sql(
        f"INSERT INTO {quote_ident(target_table)} "
        "(global_position, message_id, stream, version, message, added_at, txid) "
        "OVERRIDING SYSTEM VALUE "
        f"SELECT m.global_position, {_uuid('m.message_id', store.table)}, m.stream, m.version, "
        f"m.message::jsonb, {_local('m.added_at')}, f.txid::xid8 "
        f"FROM {store.table.sql} m JOIN unnest(%s::int8[], %s::text[]) AS f(mask, txid) "
        f"ON f.mask = ({membership_mask_sql(streams)}) ORDER BY m.global_position",
        (timezone, masks, [str(txid_of_mask[k]) for k in masks]),
    )
    return int(result.rowcount)


def continue_global_positions(conn: sa.Connection, target_table: str, after: int) -> None:
    """Make the identity of depeche-nb's table hand out positions after `after`."""
    if after < 1:
        return
    conn.exec_driver_sql(
        "SELECT setval(pg_get_serial_sequence(%s, 'global_position'), %s, true)",
        (quote_ident(target_table), after),
    )


def adopt_assignments(
    conn: sa.Connection, stream: DdbStream, target_table: str, store_target_table: str, timezone: str
) -> int:
    """Copy every assignment (partition and position of each projected message); the origin
    fields come from the adopted message row (they are equal, checked before)."""
    result = conn.exec_driver_sql(
        f"INSERT INTO {quote_ident(target_table)} (global_position, message_id, origin_stream, "
        "origin_stream_version, partition, position, message_occurred_at, origin_added_at) "
        f"SELECT m.global_position, m.message_id, m.stream, m.version, s.partition, s.position, "
        f"{_local('s.message_occurred_at')}, m.added_at FROM {stream.table.sql} s "
        f"JOIN {quote_ident(store_target_table)} m ON m.global_position = s.origin_stream_global_position "
        "ORDER BY m.global_position",
        (timezone,),
    )
    return int(result.rowcount)


def adopt_heads(conn: sa.Connection, heads_table: str, stream_table: str) -> None:
    # Depeche DB's positions may have gaps; the heads record them (see `stream_tables`).
    conn.exec_driver_sql(
        f"INSERT INTO {quote_ident(heads_table)} (partition, max_position, gaps) "
        f"SELECT partition, max(position), max(position) + 1 - count(*) FROM {quote_ident(stream_table)} "
        "GROUP BY partition"
    )


def set_checkpoint(conn: sa.Connection, checkpoint_table: str, seen: str | None) -> None:
    conn.exec_driver_sql(
        f"UPDATE {quote_ident(checkpoint_table)} SET seen = %s::pg_snapshot, pending = NULL, "
        f"pending_after = NULL, cluster = {CLUSTER_IDENTITY_SQL}, updated_at = now()",
        (seen,),
    )


def adopt_state(conn: sa.Connection, table: DdbStateTable, target_table: str) -> int:
    result = conn.exec_driver_sql(
        f"INSERT INTO {quote_ident(target_table)} (subscription_name, partition, position) "
        f"SELECT subscription_name, partition, position FROM {table.table.sql} "
        "ORDER BY subscription_name, partition"
    )
    return int(result.rowcount)


def target_state_names(conn: sa.Connection, target_table: str) -> set[str]:
    rows = conn.exec_driver_sql(f"SELECT DISTINCT subscription_name FROM {quote_ident(target_table)}").all()
    return {str(r[0]) for r in rows}


def checkpoint_seen(conn: sa.Connection, checkpoint_table: str) -> str | None:
    row = conn.exec_driver_sql(f"SELECT seen::text FROM {quote_ident(checkpoint_table)}").first()
    return None if row is None or row[0] is None else str(row[0])


def notify(conn: sa.Connection, channel: str) -> None:
    conn.exec_driver_sql("SELECT pg_notify(%s, '')", (channel,))


def _chunks(
    conn: sa.Connection, sql: str, params: tuple[Any, ...], chunk_rows: int
) -> Generator[list[tuple[Any, ...]], None, None]:
    """The rows of `sql` in chunks of `chunk_rows`, streamed from a server-side cursor."""
    result = conn.execution_options(stream_results=True, max_row_buffer=chunk_rows).exec_driver_sql(
        sql, params
    )
    try:
        for chunk in result.partitions(chunk_rows):
            yield [tuple(r) for r in chunk]
    finally:
        result.close()


__all__ = [
    "REGISTER_TABLE",
    "DdbCatalog",
    "DdbStateTable",
    "DdbStore",
    "DdbStream",
    "PartitionRow",
    "RegisterEntry",
    "StoreStats",
    "Table",
    "discover",
]

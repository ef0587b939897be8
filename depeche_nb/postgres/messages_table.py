"""Gateway of a store's messages table: its DDL, its write function and every statement
about it, for the store, the projector, the DataFrame views and the widgets.

Write protocol (`<store>_write`): a transaction-level advisory lock per
(store, stream) serialises writers of one stream and nobody else; under it the
head version is read (a fresh snapshot per statement in a VOLATILE plpgsql
function under READ COMMITTED) and the batch is inserted with consecutive
versions in one statement. Consequences:

* versions are gapless from 1: each writer sees the committed head and
  appends directly after it, and a failed batch leaves no row;
* global positions increase within a stream: the next writer of a stream
  draws its sequence values only after the previous one committed;
* `txid` records the writing transaction, which the projector needs to
  project exactly (see the engine's projector).

The unique (stream, version) constraint is the backstop: under REPEATABLE
READ a caller's stale snapshot may compute a taken version, which then fails
and is reported as an optimistic-concurrency conflict.

The function takes a batch's ids as one comma-separated text and its payloads
as one JSON array, not as two array parameters: quoting arrays element by
element costs psycopg 3 (client-side binding, see `driver`) about 14 us per
message in Python, a plain string is quoted once in C by both drivers.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.postgres.rawconn import Prepared, autocommit_cursor

# Custom SQLSTATE raised by the write function on an expected-version mismatch.
VERSION_CONFLICT_SQLSTATE = "DN409"

# Column order of every full row read from the table (`added_at` as naive UTC, as
# Depeche DB returns it, converted by the server so no row pays for it in Python).
ROW_COLUMNS = "message_id, stream, version, message, global_position, added_at AT TIME ZONE 'UTC' AS added_at"
# The same, with the payload as JSON text: serializers that parse JSON
# themselves (pydantic's parser) skip the generic JSON decoding.
TEXT_ROW_COLUMNS = ROW_COLUMNS.replace("message,", "message::text AS message,")


def text_row_columns(alias: str) -> str:
    """`TEXT_ROW_COLUMNS` of the table under `alias`, for statements that join it."""
    return ", ".join(f"{alias}.{column}" for column in TEXT_ROW_COLUMNS.split(", "))


class NaiveUtcDateTime(sa.types.TypeDecorator[_dt.datetime]):
    """A `timestamptz` column seen as Depeche DB's naive `DateTime`: results come back as
    naive UTC datetimes; naive parameters are taken as UTC, aware ones are kept."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: _dt.datetime | None, dialect: sa.Dialect) -> _dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=_dt.timezone.utc)
        return value

    def process_result_value(self, value: _dt.datetime | None, dialect: sa.Dialect) -> _dt.datetime | None:
        if value is not None and value.tzinfo is not None:
            return value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return value


class Xid8(sa.types.UserDefinedType[str]):
    """PostgreSQL's `xid8` (the writing transaction's id); values arrive as text."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


def message_table(names: StoreNames, metadata: sa.MetaData) -> sa.Table:
    """The SQLAlchemy description of a store's messages table (`store_ddl` creates it;
    this never does): Depeche DB's `Storage.message_table`."""
    return sa.Table(
        names.messages_table,
        metadata,
        sa.Column("global_position", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("message_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("stream", sa.Text(collation="C"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("message", JSONB, nullable=False),
        sa.Column("added_at", NaiveUtcDateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("txid", Xid8, nullable=False, server_default=sa.func.pg_current_xact_id()),
    )


class MessagesStatements:
    """The statements the store runs on its messages table (parameters in `%s` style)."""

    def __init__(self, names: StoreNames) -> None:
        table = quote_ident(names.messages_table)
        fn = quote_ident(names.write_function)
        # (stream, expected version, ids joined by ',', payloads as a JSON array, notify)
        self.write_sql = f"SELECT version, global_position FROM {fn}(%s, %s::bigint, %s, %s::jsonb, %s)"
        self.notify_sql = f"NOTIFY {quote_ident(names.channel)}"
        # The data statement of the store's own writes (see `write_and_notify_sql`),
        # prepared once per session on our own connections (see `rawconn.Prepared`); its
        # result travels in a session setting, since a script keeps only its last result.
        self.write_recording = Prepared(
            "SELECT set_config('depeche_nb.last_write', (SELECT max(w.version)::text || ',' || "
            f"max(w.global_position)::text FROM ({self.write_sql}) w), false)"
        )

        self.text_read_sql = (
            f"SELECT {TEXT_ROW_COLUMNS} FROM {table} WHERE stream = %s AND version >= %s ORDER BY version"
        )
        # On our own connections (see `rawconn.Prepared`): planned once per session.
        self.text_read = Prepared(self.text_read_sql)
        self.text_wildcard_sql = (
            f"SELECT {TEXT_ROW_COLUMNS} FROM {table} WHERE stream LIKE %s ORDER BY global_position"
        )
        self.global_position_sql = f"SELECT max(global_position) FROM {table}"
        columns = text_row_columns("m")
        self._table = table
        # Re-anchoring after a move to another cluster (see `StreamProjector.reanchor`): ids of
        # the old cluster's transactions mean nothing in this one's snapshots. Every row this
        # statement sees is committed (here or on the old cluster); those whose id is not visible in its own
        # snapshot are foreign and become "committed before any snapshot" (the first normal
        # xid, below every xmin). Rows of transactions still running are not seen, not touched.
        self.retire_foreign_txids_sql = (
            f"UPDATE {table} m SET txid = '3'::xid8 "
            "WHERE m.txid >= pg_snapshot_xmin(pg_current_snapshot()) "
            "AND NOT pg_visible_in_snapshot(m.txid, pg_current_snapshot())"
        )
        # Messages by global position (the projector's dead letters, replayed).
        self.rows_at_sql = (
            f"SELECT {columns} FROM {table} m WHERE m.global_position = ANY(%s::bigint[]) "
            "ORDER BY m.global_position"
        )
        self.max_version_sql = (
            f"SELECT version, global_position FROM {table} WHERE stream = %s ORDER BY version DESC LIMIT 1"
        )

    def write_and_notify_sql(self, execute_write: str) -> str:
        """One round trip for the store's own writes (`execute_write`: the `EXECUTE` of
        `write_recording`): the data transaction without NOTIFY, then the NOTIFY in a
        transaction that waits for no flush (see `store.message_store`), then the result.
        READ COMMITTED whatever the server's default: under REPEATABLE READ a write whose
        snapshot predates a concurrent append to the same stream fails."""
        return (
            f"BEGIN ISOLATION LEVEL READ COMMITTED; {execute_write}; COMMIT; "
            f"BEGIN; SET LOCAL synchronous_commit TO off; {self.notify_sql}; COMMIT; "
            "SELECT current_setting('depeche_nb.last_write')"
        )

    def projection_reads(
        self,
        projected_table: str,
        *,
        pending: str,
        after: str,
        wildcards: str,
        limit: str,
        seen_xmax: str,
        seen_xip: str,
    ) -> ProjectionReads:
        """The projector's reads (see `engine.projector` for why they are exact): rows of
        snapshot `pending` matching the `wildcards` after global position `after`, at most
        `limit`, in `TEXT_ROW_COLUMNS` order. Each argument is an SQL expression (the
        projector's plpgsql function passes its variables, see `postgres.stream_tables`);
        `projected_table` is the quoted stream table of the re-anchored first round."""
        table, columns = self._table, text_row_columns("m")
        visible = f"pg_visible_in_snapshot(m.txid, {pending}) AND m.stream LIKE ANY({wildcards})"
        order = f"ORDER BY global_position LIMIT {limit}"
        return ProjectionReads(
            # First round: walk the primary key in order (everything is new).
            first=f"SELECT {columns} FROM {table} m WHERE m.global_position > {after} AND {visible} {order}",
            # Later rounds: the two halves of "not visible in seen" as separate index
            # scans on txid; an OR would let the planner fall back to a scan of the
            # whole table in global-position order.
            delta=(
                f"SELECT * FROM (SELECT {columns} FROM {table} m "
                f"WHERE m.txid >= {seen_xmax} AND {visible} "
                f"UNION ALL SELECT {columns} FROM {table} m "
                f"WHERE m.txid = ANY({seen_xip}) AND {visible}) d "
                f"WHERE d.global_position > {after} {order}"
            ),
            # The first round after a re-anchoring: without the rows already projected.
            unprojected=(
                f"SELECT {columns} FROM {table} m WHERE m.global_position > {after} "
                f"AND {visible} AND NOT EXISTS (SELECT 1 FROM {projected_table} p "
                f"WHERE p.global_position = m.global_position) {order}"
            ),
        )


class ProjectionReads(NamedTuple):
    first: str
    delta: str
    unprojected: str


def store_ddl(names: StoreNames) -> list[str]:
    table = quote_ident(names.messages_table)
    fn = quote_ident(names.write_function)
    channel = names.channel.replace("'", "''")
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {table} (
            global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            message_id uuid NOT NULL,
            stream text COLLATE "C" NOT NULL,
            version integer NOT NULL CHECK (version > 0),
            message jsonb NOT NULL,
            added_at timestamptz NOT NULL DEFAULT now(),
            txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            CONSTRAINT {quote_ident(names.message_id_constraint)} UNIQUE (message_id),
            CONSTRAINT {quote_ident(names.stream_version_constraint)} UNIQUE (stream, version)
        )
        """,
        f"CREATE INDEX IF NOT EXISTS {quote_ident(names.txid_index)} ON {table} (txid)",
        f"""
        CREATE OR REPLACE FUNCTION {fn}(
            p_stream text, p_expected bigint, p_ids text, p_messages jsonb,
            p_notify boolean
        ) RETURNS TABLE (version integer, global_position bigint)
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE
            v_head integer;
        BEGIN
            PERFORM pg_advisory_xact_lock({names.stream_lock_namespace}, hashtext(p_stream));
            SELECT max(m.version) INTO v_head FROM {table} m WHERE m.stream = p_stream;
            v_head := coalesce(v_head, 0);
            IF p_expected IS NOT NULL AND p_expected <> v_head THEN
                RAISE EXCEPTION 'stream % is at version %, expected version %',
                    p_stream, v_head, p_expected
                    USING ERRCODE = '{VERSION_CONFLICT_SQLSTATE}';
            END IF;
            RETURN QUERY
                INSERT INTO {table} AS m (message_id, stream, version, message)
                SELECT u.id, p_stream, v_head + u.ord::integer, u.msg
                FROM ROWS FROM (unnest(string_to_array(p_ids, ',')::uuid[]),
                                jsonb_array_elements(p_messages)) WITH ORDINALITY AS u(id, msg, ord)
                ORDER BY u.ord
                RETURNING m.version, m.global_position;
            IF p_notify THEN
                PERFORM pg_notify('{channel}', '');
            END IF;
        END
        $fn$
        """,
    ]


def ensure_store_schema(engine: sa.Engine, names: StoreNames) -> None:
    run_ddl_once(engine, f"store:{names.store}", store_ddl(names))


def epoch_us_sql(column: str) -> str:
    """SQL for a timestamptz as integer epoch microseconds: cheaper to transfer and convert
    than per-row datetime objects, and exact (numeric, not float)."""
    return f"(extract(epoch FROM {column}) * 1000000)::int8"


# A payload as the views show it (parameter: the type key): jsonb's own text without the type
# key, except that fields holding a UUID string (the message's id, other ids) come last, so a
# preview cut after a hundred characters shows the fields that tell messages apart instead of
# an id. Payloads are objects (the store refuses anything else); other JSON is shown as is.
PAYLOAD_TEXT_SQL = (
    "CASE WHEN jsonb_typeof(message) = 'object' THEN coalesce(("
    "SELECT '{' || string_agg(to_jsonb(f.key)::text || ': ' || f.value::text, ', ' ORDER BY "
    "jsonb_typeof(f.value) = 'string' AND length(f.value #>> '{}') = 36 AND (f.value #>> '{}') ~* "
    "'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$', f.ord) || '}' "
    "FROM jsonb_each(message - %s) WITH ORDINALITY AS f(key, value, ord)), '{}') "
    "ELSE message::text END"
)


class MessagesViews:
    """The read-only statements of the notebook views on one store's messages table.

    Payload previews are cut server-side, so a huge payload is never transferred
    for a display; `type_key` is the payload key holding the message type.
    """

    def __init__(self, names: StoreNames, type_key: str) -> None:
        table = quote_ident(names.messages_table)
        self.table = table
        self._type_key = type_key
        # Streams by name without reading their messages: a loose index scan of the (stream,
        # version) key, one probe per stream. A stream's first row there is its first
        # message; global positions increase with versions, and versions are gapless from 1,
        # so the head row has the last global position and the version is the message count.
        by_name = f"""
            WITH RECURSIVE s AS (
                (SELECT stream, global_position FROM {table} ORDER BY stream, version LIMIT 1)
                UNION ALL
                SELECT n.stream, n.global_position FROM s CROSS JOIN LATERAL (
                    SELECT m.stream, m.global_position FROM {table} m WHERE m.stream > s.stream
                    ORDER BY m.stream, m.version LIMIT 1) n
            )
        """
        head = (
            f"CROSS JOIN LATERAL (SELECT version, global_position, added_at FROM {table} m "
            "WHERE m.stream = f.stream ORDER BY version DESC LIMIT 1) h"
        )
        # (limit or None for all) -> stream, messages, first and last global position, last
        # added at (of the head) as epoch microseconds.
        self.streams_sql = f"""
            {by_name}
            SELECT f.stream, h.version, f.global_position, h.global_position,
                   {epoch_us_sql("h.added_at")}
            FROM (SELECT stream, global_position FROM s LIMIT %s) f {head}
            ORDER BY f.stream
        """
        # The streams of the latest `window` messages, most recently written first: every
        # other stream was last written before all of them, so they are the first ones of that
        # order. Beside each, the totals, all read through indexes: the last and first global
        # position, and the messages and streams counted up to a cap each.
        self.overview_streams_sql = f"""
            WITH w AS (
                SELECT stream, global_position FROM {table} ORDER BY global_position DESC
                LIMIT %(window)s
            ), f AS (
                SELECT stream FROM w GROUP BY stream ORDER BY max(global_position) DESC
                LIMIT %(streams)s
            ), totals AS MATERIALIZED (
                SELECT (SELECT max(global_position) FROM {table}) AS last_gp,
                       (SELECT min(global_position) FROM {table}) AS first_gp,
                       (SELECT count(*) FROM (SELECT FROM {table} LIMIT %(messages_cap)s) c) AS messages,
                       ({by_name} SELECT count(*) FROM (SELECT FROM s LIMIT %(streams_cap)s) c) AS streams
            )
            SELECT f.stream, h.version, o.global_position, h.global_position, h.added_at,
                   t.last_gp, t.first_gp, t.messages, t.streams
            FROM f {head}
            CROSS JOIN LATERAL (SELECT global_position FROM {table} m WHERE m.stream = f.stream
                                ORDER BY version LIMIT 1) o
            CROSS JOIN totals t
            ORDER BY h.global_position DESC
        """
        preview = f"message->>%s, left({PAYLOAD_TEXT_SQL}, %s)"
        self.overview_messages_sql = (
            f"SELECT global_position, stream, version, message_id::text, added_at, {preview} "
            f"FROM {table} ORDER BY global_position DESC LIMIT %s"
        )
        self._page_sql = (
            f"SELECT global_position, stream, version, message_id::text, added_at, {preview} FROM {table} "
            "WHERE stream LIKE %s AND global_position >= %s ORDER BY global_position LIMIT %s"
        )
        self._last_page_sql = (
            f"SELECT global_position, stream, version, message_id::text, added_at, {preview} FROM {table} "
            "WHERE stream LIKE %s ORDER BY global_position DESC LIMIT %s"
        )
        self._page_start_before_sql = (
            f"SELECT min(global_position) FROM (SELECT global_position FROM {table} "
            "WHERE stream LIKE %s AND global_position < %s ORDER BY global_position DESC LIMIT %s) p"
        )
        self._count_sql = (
            f"SELECT count(*), count(*) FILTER (WHERE global_position < %s) FROM {table} WHERE stream LIKE %s"
        )
        # One message by id (the unique index): where it is and its type.
        self.trace_sql = (
            f"SELECT stream, version, global_position, added_at, message->>%s FROM {table} "
            "WHERE message_id = %s::uuid"
        )
        self._message_sql = (
            f"SELECT stream, version, message_id::text, added_at, {preview}, "
            f"length((message - %s)::text) FROM {table} WHERE global_position = %s"
        )

    def frame_sql(self, where: str, condition: str, order: str) -> str:
        """Rows for a messages DataFrame; `where`, `condition` and `order` are fixed SQL
        fragments of the caller's (values travel as parameters), the last parameter the limit."""
        return (
            f"SELECT global_position, stream, version, message_id::text, {epoch_us_sql('added_at')}, "
            f"message::text FROM {self.table} WHERE {where} AND {condition} ORDER BY {order} LIMIT %s"
        )

    def overview(
        self,
        engine: sa.Engine,
        *,
        window: int,
        max_streams: int,
        max_messages: int,
        preview_chars: int,
        messages_cap: int,
        streams_cap: int,
    ) -> tuple[list[Any], list[Any]]:
        """The most recently written streams among the latest `window` messages, each with
        the totals (see `overview_streams_sql`), and the latest messages."""
        key = self._type_key
        params = {
            "window": window,
            "streams": max_streams,
            "messages_cap": messages_cap,
            "streams_cap": streams_cap,
        }
        with autocommit_cursor(engine) as cursor:
            cursor.execute(self.overview_streams_sql, params)
            streams = cursor.fetchall()
            cursor.execute(self.overview_messages_sql, (key, key, preview_chars, max_messages))
            return streams, cursor.fetchall()

    def page(
        self, engine: sa.Engine, pattern: str, start: int | None, size: int, preview_chars: int
    ) -> tuple[list[Any], int, int]:
        """A page of messages of streams matching `pattern` from global position `start`
        (None: the last page), at most `size` + 1 rows (one more tells there is a next
        page), with the count of all matches and of those before the page."""
        key = self._type_key
        with autocommit_cursor(engine) as cursor:
            if start is None:
                cursor.execute(self._last_page_sql, (key, key, preview_chars, pattern, size))
                rows = list(reversed(cursor.fetchall()))
            else:
                cursor.execute(self._page_sql, (key, key, preview_chars, pattern, start, size + 1))
                rows = cursor.fetchall()
            first = rows[0][0] if rows else (start or 0)
            cursor.execute(self._count_sql, (first, pattern))
            total, before = cursor.fetchone()
        return rows, int(total), int(before)

    def page_start_before(self, engine: sa.Engine, pattern: str, before: int, size: int) -> int | None:
        """The global position a page of `size` matches ending just before `before` starts at."""
        with autocommit_cursor(engine) as cursor:
            cursor.execute(self._page_start_before_sql, (pattern, before, size))
            start: int | None = cursor.fetchone()[0]
            return start

    def message(self, engine: sa.Engine, global_position: int, payload_chars: int) -> Any:
        """(stream, version, id, added_at, type, payload text cut, payload length) or None."""
        key = self._type_key
        with autocommit_cursor(engine) as cursor:
            cursor.execute(self._message_sql, (key, key, payload_chars, key, global_position))
            return cursor.fetchone()

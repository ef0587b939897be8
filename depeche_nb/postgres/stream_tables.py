"""Gateway of an aggregated stream's tables: partition assignments, heads, checkpoint.
Their DDL and every statement about them live here.

Tables of aggregated stream `A` over store `S`:

* `A_stream`: one row per projected message (a pointer, not a copy): origin
  stream/version/global position, partition and gapless position. Keyed by
  the message's global position (so a message is projected at most once) and
  unique on (partition, position).
* `A_heads`: per partition the highest position, so positions continue
  without scanning, and the positions missing below it (`gaps`: only a
  partition adopted from Depeche DB can have any; the projector never makes
  one), so a partition's size is known without counting it.
* `A_dead_letters`: messages the projector could not read or partition, see
  `postgres.dead_letter_table`.
* `A_checkpoint`: the projector's progress as PostgreSQL snapshots, see
  `engine.projector`, and the identity of the cluster whose transaction ids they hold.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.dead_letter_table import DeadLetterTable
from depeche_nb.postgres.messages_table import MessagesStatements, epoch_us_sql, text_row_columns
from depeche_nb.postgres.names import StoreNames, lock_namespace, quote_ident
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.postgres.state_table import INIT_PARTITION, StateTable

# The cluster a checkpoint's transaction ids belong to: set by initdb, kept by physical
# replicas (whose ids continue the primary's), new after a dump/restore or logical
# replication into another cluster. Readable by any role.
CLUSTER_IDENTITY_SQL = "(SELECT system_identifier::text FROM pg_control_system())"


@dataclass(frozen=True)
class StreamNames:
    stream: str
    store: StoreNames

    def __post_init__(self) -> None:
        validate_name(self.stream, "aggregated stream name")

    @property
    def table(self) -> str:
        return f"{self.stream}_stream"

    @property
    def heads_table(self) -> str:
        return f"{self.stream}_heads"

    @property
    def checkpoint_table(self) -> str:
        return f"{self.stream}_checkpoint"

    @property
    def channel(self) -> str:
        # Distinct from the store's `<name>_messages`, so a store and a stream
        # may share a name without sharing a channel.
        return f"{self.stream}_stream"

    @property
    def projector_lock(self) -> tuple[int, int]:
        return lock_namespace("projector", self.stream), 0

    # The projector's two functions (see `StreamStatements`). They read the store's messages
    # table, so their names carry the store's: a stream recreated over another store gets
    # functions of its own, and a projector of the old definition keeps its old ones.
    @property
    def project_begin_function(self) -> str:
        return f"{self.stream}_pb{self._store_tag}"

    @property
    def project_commit_function(self) -> str:
        return f"{self.stream}_pc{self._store_tag}"

    @property
    def _store_tag(self) -> str:
        return f"{zlib.crc32(self.store.store.encode()):08x}"


def stream_ddl(names: StreamNames) -> list[str]:
    table = quote_ident(names.table)
    heads = quote_ident(names.heads_table)
    checkpoint = quote_ident(names.checkpoint_table)
    lock_a, lock_b = names.projector_lock
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {table} (
            global_position bigint PRIMARY KEY,
            message_id uuid NOT NULL,
            origin_stream text COLLATE "C" NOT NULL,
            origin_stream_version integer NOT NULL,
            partition integer NOT NULL CHECK (partition >= 0),
            position integer NOT NULL CHECK (position >= 0),
            message_occurred_at timestamptz NOT NULL,
            origin_added_at timestamptz NOT NULL,
            projected_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT {quote_ident(names.stream + "_s_pp_uq")} UNIQUE (partition, position)
        )
        """,
        f"CREATE INDEX IF NOT EXISTS {quote_ident(names.stream + '_s_occ')} "
        f"ON {table} (partition, message_occurred_at)",
        f"""
        CREATE TABLE IF NOT EXISTS {heads} (
            partition integer PRIMARY KEY,
            max_position integer NOT NULL,
            gaps integer NOT NULL DEFAULT 0
        )
        """,
        # Heads of earlier releases have no `gaps`: count them once, under the projector's
        # lock (a projector of any release takes it), so that no head moves meanwhile.
        f"""
        DO $ddl$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = '{heads}'::regclass
                           AND attname = 'gaps' AND NOT attisdropped) THEN
                PERFORM pg_advisory_xact_lock({lock_a}, {lock_b});
                ALTER TABLE {heads} ADD COLUMN gaps integer NOT NULL DEFAULT 0;
                UPDATE {heads} h SET gaps = h.max_position + 1 - c.n
                FROM (SELECT partition, count(*) AS n FROM {table} GROUP BY partition) c
                WHERE c.partition = h.partition AND c.n <> h.max_position + 1;
            END IF;
        END $ddl$
        """,
        f"""
        CREATE TABLE IF NOT EXISTS {checkpoint} (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            seen pg_snapshot,
            pending pg_snapshot,
            pending_after bigint,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """,
        # Checkpoints written before clusters were recorded have none; the projector
        # records the current one on its next step.
        f"ALTER TABLE {checkpoint} ADD COLUMN IF NOT EXISTS cluster text",
        # The definition (wildcards, partitioner) the projection was made under, recorded by
        # the first step: a projector of another definition (a worker still running old code
        # after a rebuild) is refused instead of mixing two partitionings in one table.
        f"ALTER TABLE {checkpoint} ADD COLUMN IF NOT EXISTS definition text",
        f"INSERT INTO {checkpoint} (singleton) VALUES (true) ON CONFLICT DO NOTHING",
        *DeadLetterTable(names.stream).ddl,
        *projector_functions_ddl(names),
    ]


def projector_functions_ddl(names: StreamNames) -> list[str]:
    """The projector's step as two plpgsql functions, one round trip each (see
    `engine.projector`): PostgreSQL keeps their statements' plans for the session, where
    separate statements bound on the client would be parsed and planned on every step.

    `begin(wildcards, limit)`, inside the step's transaction: takes the projector's
    transaction lock without waiting and, if it got it, reads the checkpoint and the
    rows to project. It returns a first row whose stream column is 'locked' (nothing
    else follows) or 'checkpoint', whose message column is a JSON array: seen, pending,
    continue after (global position), recorded cluster, this cluster, whether a first
    round must skip projected rows, the origin streams held back, the recorded
    definition. The message rows follow, in `TEXT_ROW_COLUMNS` order; every statement
    reads a fresh snapshot, so all of them see what committed before the lock was granted.

    `commit(global positions, partitions, message times, channel, seen, pending, after,
    cluster, definition, advance)`, the first three as comma-separated text (one string,
    quoted once in C, where psycopg 3 dumps a list element by element in Python; the rest
    of each row comes from the messages table by global position): inserts the rows with
    gapless positions continuing from the heads, moves the heads, notifies one message per
    touched partition, advances the checkpoint (if `advance`) and returns the new heads as
    'partition:head,...', also left in the session setting `depeche_nb.projected`."""
    table = quote_ident(names.table)
    heads = quote_ident(names.heads_table)
    checkpoint = quote_ident(names.checkpoint_table)
    lock_a, lock_b = names.projector_lock
    blocked = DeadLetterTable(names.stream).blocked_streams_sql
    reads = MessagesStatements(names.store).projection_reads(
        table,
        pending="v_pending",
        after="v_after",
        wildcards="p_wildcards",
        limit="p_limit",
        seen_xmax="pg_snapshot_xmax(c.seen)",
        seen_xip="v_xip",
    )
    begin = quote_ident(names.project_begin_function)
    commit = quote_ident(names.project_commit_function)
    messages = quote_ident(names.store.messages_table)
    return [
        f"""
        CREATE OR REPLACE FUNCTION {begin}(p_wildcards text[], p_limit integer)
        RETURNS TABLE (r_id uuid, r_stream text, r_version integer, r_message text,
                       r_global_position bigint, r_added_at timestamp)
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE
            c record;
            v_pending pg_snapshot;
            v_after bigint;
            v_anchored boolean;
            v_xip xid8[];
        BEGIN
            IF NOT pg_try_advisory_xact_lock({lock_a}, {lock_b}) THEN
                RETURN QUERY SELECT NULL::uuid, 'locked'::text, NULL::integer, NULL::text,
                    NULL::bigint, NULL::timestamp;
                RETURN;
            END IF;
            SELECT cp.seen, cp.pending, cp.pending_after, cp.cluster, cp.definition INTO c
                FROM {checkpoint} cp;
            v_pending := coalesce(c.pending, pg_current_snapshot());
            v_after := coalesce(c.pending_after, 0);
            IF c.seen IS NULL THEN
                v_anchored := EXISTS (SELECT 1 FROM {heads});
            END IF;
            RETURN QUERY SELECT NULL::uuid, 'checkpoint'::text, NULL::integer,
                json_build_array(c.seen::text, v_pending::text, v_after, c.cluster,
                    {CLUSTER_IDENTITY_SQL}, v_anchored, {blocked}, c.definition)::text,
                NULL::bigint, NULL::timestamp;
            IF c.seen IS NOT NULL THEN
                v_xip := array(SELECT pg_snapshot_xip(c.seen));
                RETURN QUERY {reads.delta};
            ELSIF v_anchored THEN
                RETURN QUERY {reads.unprojected};
            ELSE
                RETURN QUERY {reads.first};
            END IF;
        END
        $fn$
        """,
        f"""
        CREATE OR REPLACE FUNCTION {commit}(
            p_gps text, p_partitions text, p_occurred text,
            p_channel text, p_seen pg_snapshot, p_pending pg_snapshot, p_after bigint,
            p_cluster text, p_definition text, p_advance boolean
        ) RETURNS text
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE
            v_heads text := '';
            v_notified bigint;
        BEGIN
            IF p_gps <> '' THEN
                WITH new AS (
                    SELECT n.gp, m.message_id AS id, m.stream AS origin,
                           m.version AS origin_version, n.part, n.occurred, m.added_at
                    FROM unnest(string_to_array(p_gps, ',')::bigint[],
                                string_to_array(p_partitions, ',')::integer[],
                                string_to_array(p_occurred, ',')::timestamptz[])
                        AS n(gp, part, occurred)
                    JOIN {messages} m ON m.global_position = n.gp
        ), numbered AS (
                    SELECT n.*, coalesce(h.max_position, -1)
                           + row_number() OVER (PARTITION BY n.part ORDER BY n.gp) AS pos
                    FROM new n LEFT JOIN {heads} h ON h.partition = n.part
                ), ins AS (
                    INSERT INTO {table} (global_position, message_id, origin_stream,
                        origin_stream_version, partition, position, message_occurred_at,
                        origin_added_at)
                    SELECT gp, id, origin, origin_version, part, pos::int, occurred, added_at
                    FROM numbered
                    RETURNING partition AS part, position AS pos
                ), up AS (
                    INSERT INTO {heads} AS h (partition, max_position)
                    SELECT part, max(pos) FROM ins GROUP BY part
                    ON CONFLICT (partition) DO UPDATE SET max_position = EXCLUDED.max_position
                    RETURNING h.partition AS part, h.max_position AS head
                )
                SELECT string_agg(part || ':' || head, ','),
                       count(pg_notify(p_channel, json_build_object(
                           'partition', part, 'position', head)::text))
                INTO v_heads, v_notified FROM up;
            END IF;
            IF p_advance THEN
                UPDATE {checkpoint} SET seen = p_seen, pending = p_pending,
                    pending_after = p_after, cluster = p_cluster,
                    definition = coalesce(definition, p_definition), updated_at = now();
            END IF;
            PERFORM set_config('depeche_nb.projected', coalesce(v_heads, ''), false);
            RETURN v_heads;
        END
        $fn$
        """,
    ]


def projector_function_names(names: StreamNames) -> list[str]:
    return [names.project_begin_function, names.project_commit_function]


def ensure_stream_schema(engine: sa.Engine, names: StreamNames) -> None:
    # Per store too: the projector's functions read its messages table.
    run_ddl_once(engine, f"stream:{names.stream}:{names.store.store}", stream_ddl(names))


class StreamStatements:
    """The statements the engine runs on an aggregated stream's tables: the projector's
    lock, checkpoint and insert, and the reads of partitions."""

    def __init__(self, names: StreamNames) -> None:
        table = quote_ident(names.table)
        heads = quote_ident(names.heads_table)
        checkpoint = quote_ident(names.checkpoint_table)
        messages = quote_ident(names.store.messages_table)
        lock_a, lock_b = names.projector_lock
        # The projector's step in two round trips (see `projector_functions_ddl`).
        # Asynchronous commit: see "Durability" in `engine.projector`. READ COMMITTED
        # whatever the server's default: the heads and the new snapshot must be read
        # after the lock is granted, not from a snapshot taken when the step began.
        self.project_begin_sql = (
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL synchronous_commit TO off; "
            f"SELECT * FROM {quote_ident(names.project_begin_function)}(%(wildcards)s::text[], %(limit)s)"
        )
        self.dead_letters = DeadLetterTable(names.stream)
        # psycopg2 keeps only the last statement's result: the new heads come back in a
        # session setting read after the commit.
        # Parameters in this order: gps, partitions, occurred, channel, seen, pending, after,
        # cluster, definition (positional: `driver.script_value` runs it).
        self.project_commit_sql = (
            f"SELECT {quote_ident(names.project_commit_function)}(%s::text, %s::text, %s::text, %s, "
            "%s::pg_snapshot, %s::pg_snapshot, %s::bigint, %s, %s, true); "
            "COMMIT; SELECT current_setting('depeche_nb.projected')"
        )
        # The insert alone, in a caller's transaction under the projector's lock (replayed
        # dead letters): the checkpoint stays.
        self.project_insert_sql = (
            f"SELECT {quote_ident(names.project_commit_function)}(%(gps)s::text, %(partitions)s::text, "
            "%(occurred)s::text, %(channel)s, NULL, NULL, NULL, NULL, NULL, false)"
        )
        self.projector_wait_lock_sql = f"SELECT pg_advisory_xact_lock({lock_a}, {lock_b})"
        # Re-anchoring (see `StreamProjector.reanchor`): forget the foreign snapshots; the
        # next rounds project what is visible and not yet in the stream table.
        self.reanchor_sql = (
            f"UPDATE {checkpoint} SET seen = NULL, pending = NULL, pending_after = NULL, "
            f"cluster = {CLUSTER_IDENTITY_SQL}, updated_at = now()"
        )
        # Truncation waits for the projector's lock: a step in flight would otherwise
        # commit its checkpoint over the reset one, marking the deleted messages seen.
        self.truncate_sql = [
            self.projector_wait_lock_sql,
            f"DELETE FROM {table}",
            f"DELETE FROM {heads}",
            f"DELETE FROM {self.dead_letters.table}",
            f"UPDATE {checkpoint} SET seen = NULL, pending = NULL, pending_after = NULL, cluster = NULL, "
            "updated_at = now()",
        ]
        self.read_sql = (
            f"SELECT partition, position, message_id FROM {table} WHERE partition = %s ORDER BY position"
        )
        self.read_slice_sql = (
            f"SELECT partition, position, message_id FROM {table} "
            "WHERE partition = %s AND position >= %s ORDER BY position LIMIT %s"
        )
        self.heads_sql = f"SELECT partition, max_position FROM {heads}"
        self.first_messages_sql = (
            "SELECT h.partition, s.message_id, s.position, "
            "s.message_occurred_at AT TIME ZONE 'UTC', h.max_position "
            f"FROM {heads} h CROSS JOIN LATERAL (SELECT * FROM {table} s "
            "WHERE s.partition = h.partition ORDER BY s.position LIMIT 1) s "
            "ORDER BY s.message_occurred_at LIMIT %s"
        )
        self._table, self._heads, self._messages = table, heads, messages

    def slice_messages_sql(self, start: str) -> str:
        """(partition, position, message row...) of one partition from position `start`
        (an SQL expression) on; parameters: partition, start's parameters, count.

        The slice is cut first (an ordered scan of the (partition, position) index),
        then each pointer is looked up by primary key: a plan that stays right even
        before the planner has statistics for new tables."""
        return (
            f"SELECT s.partition, s.position, {text_row_columns('m')} "
            f"FROM (SELECT partition, position, global_position FROM {self._table} "
            f"WHERE partition = %s AND position >= {start} ORDER BY position LIMIT %s) s "
            f"CROSS JOIN LATERAL (SELECT * FROM {self._messages} m0 "
            "WHERE m0.global_position = s.global_position) m ORDER BY s.position"
        )

    def slice_after_state_sql(self, state: StateTable) -> str:
        """The slice after a subscription's stored position, read in the same statement;
        parameters: partition, subscription name, partition, count."""
        return self.slice_messages_sql(state.position_subquery("%s", "%s") + " + 1")

    def claim_slice_sql(self, state: StateTable) -> str:
        """A runner's claim of a partition and its next messages in one statement, run on the
        lock session (see `postgres.locks.DbLockProvider.lock_with`): the session lock
        (`%(lock_key)s`, taken without waiting), then, only if granted, the fencing token's
        bump (`StateTable.take_if_got_sql`) and the `%(count)s` messages after the
        acknowledged position that bump returns. Rows: (got the lock, token, acknowledged
        position, outcome of the acknowledgement before it, partition, position, message
        row...), one row without a message when there is none (or no lock). The outcome is
        the session's `depeche_nb.acked` setting (`StateTable.fenced_recording`), for a
        script that acknowledges another partition's batch first
        (`DbLockProvider.run_then_unlock_and_lock_with`). The messages come from the
        statement's snapshot, taken before the lock: all of them committed, possibly fewer
        than committed by now."""
        return (
            "WITH got AS MATERIALIZED (SELECT pg_try_advisory_lock(%(lock_key)s::bigint) AS ok), "
            f"taken AS ({state.take_if_got_sql}) "
            "SELECT got.ok, t.token, t.position, current_setting('depeche_nb.acked', true), "
            f"s.partition, s.position, {text_row_columns('m')} "
            "FROM got LEFT JOIN taken t ON true "
            f"LEFT JOIN LATERAL (SELECT partition, position, global_position FROM {self._table} "
            "WHERE partition = %(partition)s AND position > t.position ORDER BY position "
            "LIMIT %(count)s::int) s ON true "
            f"LEFT JOIN LATERAL (SELECT * FROM {self._messages} m0 "
            "WHERE m0.global_position = s.global_position) m ON true ORDER BY s.position"
        )

    def per_partition_sql(self, aggregate: str, condition: str, default: str) -> str:
        """For every partition: `aggregate` over its rows meeting `condition` (one
        parameter), else `default`; all three are fixed SQL of the caller's."""
        return (
            f"SELECT h.partition, coalesce((SELECT {aggregate} FROM {self._table} s "
            f"WHERE s.partition = h.partition AND {condition}), {default}) FROM {self._heads} h"
        )


class StreamViews:
    """The read-only statements of the notebook views on one aggregated stream. The
    partition summaries and the backlog count read rows in proportion to the partitions
    and to the projector's backlog, never to the messages projected."""

    def __init__(self, names: StreamNames) -> None:
        table = quote_ident(names.table)
        heads = quote_ident(names.heads_table)
        messages = quote_ident(names.store.messages_table)
        checkpoint = quote_ident(names.checkpoint_table)
        letters = DeadLetterTable(names.stream).table
        self.table = table
        # Per partition from its head row and two lookups on the (partition, position) key:
        # its first message and the one at the head. LIMIT keeps each a lookup, however few
        # rows the planner expects in the heads table (it is rarely analysed).
        self.partition_summaries_sql = (
            "SELECT h.partition, h.max_position + 1 - h.gaps, h.max_position, f.global_position, "
            f"l.global_position, l.projected_at FROM {heads} h "
            f"CROSS JOIN LATERAL (SELECT global_position FROM {table} s WHERE s.partition = h.partition "
            "ORDER BY s.position LIMIT 1) f "
            f"CROSS JOIN LATERAL (SELECT global_position, projected_at FROM {table} s "
            "WHERE s.partition = h.partition ORDER BY s.position DESC LIMIT 1) l "
            "ORDER BY h.partition"
        )
        # Exactly the projector's backlog: the stored messages matching its wildcards (the
        # same LIKE ANY) that it has neither projected nor dead-lettered. Every message visible
        # in the checkpoint's `seen` snapshot is one of those, so only the others are read,
        # through the txid index as the projector reads them (see `engine.projector`): the
        # rows of transactions at or after its xmax, and of those it saw in progress. Without
        # a usable `seen` (before the first round, after a truncation or a re-anchoring, or
        # holding another cluster's ids, which the projector refuses) every message is read.
        # The checkpoint is read first and its values are passed as literals (client-side
        # binding), so the planner sees how few rows they select; one snapshot for both.
        self._backlog_checkpoint_select = (
            "SELECT pg_snapshot_xmax(seen)::text, array(SELECT pg_snapshot_xip(seen))::text[], "
            f"seen IS NULL OR coalesce(cluster <> {CLUSTER_IDENTITY_SQL}, false) FROM {checkpoint}"
        )
        self._backlog_checkpoint_sql = (
            f"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {self._backlog_checkpoint_select}"
        )
        unprocessed = (
            "m.stream LIKE ANY(%(wildcards)s) "
            f"AND NOT EXISTS (SELECT FROM {table} s WHERE s.global_position = m.global_position) "
            f"AND NOT EXISTS (SELECT FROM {letters} d WHERE d.global_position = m.global_position)"
        )
        # (xmax, xip, wildcards, limit or None for all)
        self._backlog_delta_sql = (
            f"SELECT count(*) FROM (SELECT FROM {messages} m WHERE m.txid >= %(xmax)s::xid8 "
            f"AND {unprocessed} UNION ALL SELECT FROM {messages} m "
            f"WHERE m.txid = ANY(%(xip)s::xid8[]) AND {unprocessed} LIMIT %(limit)s) u"
        )
        # (wildcards, limit or None for all)
        self._backlog_all_sql = (
            f"SELECT count(*) FROM (SELECT FROM {messages} m WHERE {unprocessed} LIMIT %(limit)s) u"
        )
        self.checkpoint_updated_sql = f"SELECT updated_at FROM {checkpoint}"
        # Positions are gapless, so "the last N" is a range on the (partition, position) key.
        self._cells_sql = (
            f"WITH h AS (SELECT partition, max_position FROM {heads} ORDER BY partition LIMIT %s) "
            "SELECT h.partition, h.max_position, s.position, s.origin_stream, s.origin_stream_version, "
            f"s.global_position FROM h CROSS JOIN LATERAL (SELECT * FROM {table} s "
            "WHERE s.partition = h.partition AND s.position > h.max_position - %s) s "
            "ORDER BY h.partition, s.position"
        )
        self._totals_sql = f"SELECT count(*), coalesce(sum(max_position + 1 - gaps), 0) FROM {heads}"
        self._latest_sql = (
            "SELECT global_position, origin_stream, origin_stream_version, partition, position "
            f"FROM {table} ORDER BY global_position DESC LIMIT %s"
        )
        # One message (by global position and id, parameters in that order): its partition,
        # position, projection time and the partition's head if it is projected, and its
        # dead letter's status and error if the projector set it aside; primary-key lookups.
        self.trace_sql = (
            "SELECT s.partition, s.position, s.projected_at, h.max_position, d.status, d.error "
            "FROM (SELECT %s::bigint AS global_position, %s::uuid AS message_id) m "
            f"LEFT JOIN {table} s ON s.global_position = m.global_position "
            "AND s.message_id = m.message_id "
            f"LEFT JOIN {heads} h ON h.partition = s.partition "
            f"LEFT JOIN {DeadLetterTable(names.stream).table} d ON d.global_position = m.global_position "
            "AND d.message_id = m.message_id"
        )
        # The operations console's line of the stream: partitions and projected messages from
        # the heads (rows in proportion to the partitions), when the projector last finished
        # a step, and the unresolved dead letters.
        self.status_sql = (
            "SELECT count(*), coalesce(sum(max_position + 1 - gaps), 0), "
            f"(SELECT updated_at FROM {checkpoint}), ({DeadLetterTable(names.stream).count_sql}) "
            f"FROM {heads}"
        )
        # (partition, position): the message there, by the (partition, position) key.
        self.at_position_sql = (
            "SELECT global_position, message_id::text, origin_stream, origin_stream_version, "
            f"origin_added_at, projected_at FROM {table} WHERE partition = %s AND position = %s"
        )

    def unprojected_count(self, engine: sa.Engine, wildcards: list[str], limit: int | None) -> int:
        """The projector's backlog (see the notes in `__init__`), counted up to `limit` (None:
        all)."""
        with autocommit_cursor(engine) as cursor:
            try:
                cursor.execute(self._backlog_checkpoint_sql)
                counted = self._count_after_checkpoint(cursor, wildcards, limit)
                cursor.execute("COMMIT")
            except BaseException:
                if not cursor.connection.closed:
                    cursor.execute("ROLLBACK")
                raise
        return counted

    def unprojected_count_in(self, cursor: Any, wildcards: list[str], limit: int | None) -> int:
        """`unprojected_count` on the caller's cursor, inside its transaction (REPEATABLE READ,
        so that the checkpoint and the count see one snapshot)."""
        cursor.execute(self._backlog_checkpoint_select)
        return self._count_after_checkpoint(cursor, wildcards, limit)

    def _count_after_checkpoint(self, cursor: Any, wildcards: list[str], limit: int | None) -> int:
        params: dict[str, Any] = {"wildcards": wildcards, "limit": limit}
        row = cursor.fetchone()
        if row is None or row[2]:
            cursor.execute(self._backlog_all_sql, params)
        else:
            cursor.execute(self._backlog_delta_sql, {**params, "xmax": row[0], "xip": row[1]})
        return int(cursor.fetchone()[0])

    def assignments_sql(self, where: str, order: str) -> str:
        """Rows for an assignments DataFrame; `where` and `order` are fixed SQL fragments of
        the caller's (values travel as parameters), the last parameter the limit."""
        return (
            "SELECT message_id::text, origin_stream, origin_stream_version, global_position, partition, "
            f"position, {epoch_us_sql('message_occurred_at')}, {epoch_us_sql('projected_at')} "
            f"FROM {self.table} WHERE {where} ORDER BY {order} LIMIT %s"
        )

    def partition_map(
        self, engine: sa.Engine, max_partitions: int, positions: int, latest: int
    ) -> tuple[list[Any], tuple[int, int], list[Any]]:
        """The last `positions` cells of the first `max_partitions` partitions, the totals
        (partitions, projected messages) and the `latest` assignments, oldest first."""
        with autocommit_cursor(engine) as cursor:
            cursor.execute(self._cells_sql, (max_partitions, positions))
            cells = cursor.fetchall()
            cursor.execute(self._totals_sql)
            partition_count, projected = cursor.fetchone()
            cursor.execute(self._latest_sql, (latest,))
            newest = list(reversed(cursor.fetchall()))
        return cells, (int(partition_count), int(projected)), newest


class RebuildStatements:
    """A rebuild (see `engine.rebuild`) projects into a second set of tables (`beside`) and
    then swaps them for the stream's own (`names`) in one transaction."""

    def __init__(self, names: StreamNames, beside: StreamNames) -> None:
        self.names, self.beside = names, beside
        self._old = quote_ident(names.table)
        self._new = quote_ident(beside.table)
        self._new_heads = quote_ident(beside.heads_table)
        # The new projection's functions read its own tables, gone after the switch (the
        # stream's functions read the tables by the names the new ones take).
        self.drop_beside_functions_sql = [
            f"DROP FUNCTION IF EXISTS {quote_ident(f)}" for f in projector_function_names(beside)
        ]
        self.drop_beside_sql = [
            *(f"DROP TABLE IF EXISTS {quote_ident(t)}" for t in _tables(beside)),
            *self.drop_beside_functions_sql,
        ]
        self.drop_old_sql = [f"DROP TABLE IF EXISTS {quote_ident(t)}" for t in _tables(names)]
        self.partitions_sql = (
            f"SELECT partition FROM {quote_ident(names.heads_table)} "
            f"UNION SELECT partition FROM {self._new_heads} ORDER BY 1"
        )
        # Each index and constraint of a table (to carry the stream's names after the swap).
        self.indexes_sql = (
            "SELECT i.relname, con.conname IS NOT NULL FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid "
            "LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid AND con.conrelid = x.indrelid "
            "WHERE x.indrelid = to_regclass(%s) ORDER BY 1"
        )
        self.new_partitions_sql = f"SELECT count(*) FROM {self._new_heads}"
        # After the switch (the heads table has the stream's name again); the channel.
        self.notify_heads_sql = (
            "SELECT count(pg_notify(%s, json_build_object('partition', partition, "
            f"'position', max_position)::text)) FROM {quote_ident(names.heads_table)}"
        )

    def subscriptions_with_rows_sql(self, state: StateTable) -> str:
        """Which of the given subscription names (one text[] parameter) have rows in `state`."""
        return f"SELECT DISTINCT subscription_name FROM {state.table} WHERE subscription_name = ANY(%s)"

    def move_positions_sql(self, state: StateTable) -> str:
        """Set a subscription's positions for the new partitions and bump their tokens; one
        parameter, the subscription's name, used three times (`%(subscription)s`).

        A message was handled when its old position is at or before the acknowledged
        position of its old partition. In each new partition the acknowledged position
        becomes the one before its first unhandled message, so no unhandled message is
        skipped; handled messages after that one are delivered again (at least once).
        Partitions that exist no more keep a row without a position (and a new token)."""
        st = state.table
        return f"""
            WITH handled AS (
                SELECT o.global_position FROM {self._old} o JOIN {st} s
                    ON s.subscription_name = %(subscription)s AND s.partition = o.partition
                    AND o.position <= s.position
            ), first_open AS (
                SELECT n.partition, min(n.position) AS position FROM {self._new} n
                WHERE NOT EXISTS (SELECT 1 FROM handled h WHERE h.global_position = n.global_position)
                GROUP BY n.partition
            ), targets AS (
                SELECT nh.partition,
                       nullif(coalesce(f.position, nh.max_position + 1) - 1, -1) AS position
                FROM {self._new_heads} nh LEFT JOIN first_open f ON f.partition = nh.partition
                UNION ALL
                SELECT s.partition, NULL FROM {st} s
                WHERE s.subscription_name = %(subscription)s AND s.partition >= 0
                    AND NOT EXISTS (SELECT 1 FROM {self._new_heads} nh WHERE nh.partition = s.partition)
            ), moved AS (
                INSERT INTO {st} AS st (subscription_name, partition, position, token)
                SELECT %(subscription)s, partition, position, 1 FROM targets
                ON CONFLICT (subscription_name, partition) DO UPDATE
                    SET position = EXCLUDED.position, token = st.token + 1, updated_at = now()
                RETURNING partition, position
            )
            SELECT (SELECT count(*) FROM {self._new} n JOIN handled h
                        ON h.global_position = n.global_position),
                   (SELECT coalesce(sum(position + 1), 0) FROM moved)
        """

    def start_over_sql(self, state: StateTable) -> str:
        """Forget a subscription's positions and initialisation (its start point applies
        again), bumping the tokens; parameter `%(subscription)s`."""
        return (
            f"WITH forgotten AS (UPDATE {state.table} SET position = NULL, token = token + 1, "
            "updated_at = now() WHERE subscription_name = %(subscription)s AND partition >= 0 "
            f"RETURNING 1) DELETE FROM {state.table} WHERE subscription_name = %(subscription)s "
            f"AND partition = {INIT_PARTITION}"
        )

    def rename_sql(self, cursor: Any) -> list[str]:
        """The statements giving the new tables, their indexes and constraints the stream's
        own names (each name starts with the stream's name; the rest is kept)."""
        statements = []
        old_prefix, new_prefix = self.beside.stream, self.names.stream
        for beside_table, own_table in zip(_tables(self.beside), _tables(self.names), strict=True):
            cursor.execute(self.indexes_sql, (quote_ident(beside_table),))
            for index, is_constraint in cursor.fetchall():
                if not index.startswith(old_prefix):
                    continue
                renamed = quote_ident(new_prefix + index[len(old_prefix) :])
                if is_constraint:
                    statements.append(
                        f"ALTER TABLE {quote_ident(beside_table)} RENAME CONSTRAINT "
                        f"{quote_ident(index)} TO {renamed}"
                    )
                else:
                    statements.append(f"ALTER INDEX {quote_ident(index)} RENAME TO {renamed}")
            statements.append(f"ALTER TABLE {quote_ident(beside_table)} RENAME TO {quote_ident(own_table)}")
        return statements


def _tables(names: StreamNames) -> list[str]:
    return [names.table, names.heads_table, names.checkpoint_table, DeadLetterTable(names.stream).name]

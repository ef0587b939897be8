"""DDL and SQL functions of a message store: the one place its SQL shape is defined.

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
"""

from __future__ import annotations

import sqlalchemy as sa

from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.names import StoreNames, quote_ident

# Custom SQLSTATE raised by the write function on an expected-version mismatch.
VERSION_CONFLICT_SQLSTATE = "DN409"


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
            p_stream text, p_expected bigint, p_ids uuid[], p_messages jsonb[],
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
                FROM unnest(p_ids, p_messages) WITH ORDINALITY AS u(id, msg, ord)
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

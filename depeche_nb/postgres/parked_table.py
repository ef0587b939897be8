"""Gateway of a subscription's parked (dead-letter) messages: every statement about
`<subscription>_parked` lives here; `engine.parking` runs them."""

from __future__ import annotations

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.names import lock_namespace, quote_ident

PARKED = "parked"
IGNORED = "ignored"  # skipped after an error by LogAndIgnoreSubscriptionErrorHandler
REPLAYED = "replayed"
DISCARDED = "discarded"
UNRESOLVED = (PARKED, IGNORED)
COLUMNS = (
    "id, partition, position, message_id, global_position, message_type, status, attempts, "
    "error, traceback, recorded_at, resolved_at"
)
_UNRESOLVED_SQL = f"status IN ('{PARKED}', '{IGNORED}')"


class ParkedTable:
    def __init__(self, subscription_name: str) -> None:
        self.subscription_name = validate_name(subscription_name, "subscription name")
        self.name = f"{subscription_name}_parked"
        self.table = quote_ident(self.name)
        table = self.table
        self.insert_sql = (
            f"INSERT INTO {table} (partition, position, message_id, global_position, "
            "message_type, status, attempts, error, traceback) "
            "VALUES (%s, %s, %s::uuid, %s, %s, %s, %s, %s, %s) RETURNING id"
        )
        self.list_unresolved_sql = f"SELECT {COLUMNS} FROM {table} WHERE {_UNRESOLVED_SQL} ORDER BY id"
        self.list_all_sql = f"SELECT {COLUMNS} FROM {table} ORDER BY id"
        self.get_sql = f"SELECT {COLUMNS} FROM {table} WHERE id = %s"
        self.resolve_sql = (
            f"UPDATE {table} SET status = %s, resolved_at = now() WHERE id = %s AND {_UNRESOLVED_SQL}"
        )
        # Transaction-level, so it ends with the replaying session's transaction, even if
        # that session dies.
        self.replay_guard_sql = (
            f"SELECT pg_try_advisory_xact_lock({lock_namespace('replay', subscription_name)}, %s::int)"
        )
        # A display must not create the table (it exists only after first use): ask first.
        self.exists_sql = "SELECT to_regclass(%s) IS NOT NULL"
        self.count_unresolved_sql = f"SELECT count(*) FROM {table} WHERE {_UNRESOLVED_SQL}"
        # (limit): the oldest unresolved records, for a display that shows a bounded list.
        self.first_unresolved_sql = f"{self.list_unresolved_sql} LIMIT %s"
        # (partition, limit): the latest unresolved records of one partition.
        self.partition_unresolved_sql = (
            f"SELECT {COLUMNS} FROM {table} WHERE partition = %s AND {_UNRESOLVED_SQL} "
            "ORDER BY id DESC LIMIT %s"
        )
        # The latest record of one message (global position, id): status, error, attempts
        # and when it was recorded; by the global-position index.
        self.trace_sql = (
            f"SELECT status, error, attempts, recorded_at FROM {table} "
            "WHERE global_position = %s AND message_id = %s::uuid ORDER BY id DESC LIMIT 1"
        )

    def ddl(self) -> list[str]:
        return [
            f"""
            CREATE TABLE IF NOT EXISTS {self.table} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                partition integer NOT NULL,
                position integer NOT NULL,
                message_id uuid NOT NULL,
                global_position bigint NOT NULL,
                message_type text NOT NULL,
                status text NOT NULL CHECK (status IN ('parked', 'ignored', 'replayed', 'discarded')),
                attempts integer NOT NULL,
                error text NOT NULL,
                traceback text NOT NULL,
                recorded_at timestamptz NOT NULL DEFAULT now(),
                resolved_at timestamptz
            )
            """,
            # `trace` looks a message up by its global position.
            f"CREATE INDEX IF NOT EXISTS {quote_ident(self.name + '_gp')} ON {self.table} (global_position)",
        ]

    def ensure(self, engine: sa.Engine) -> None:
        run_ddl_once(engine, f"parked:{self.subscription_name}", self.ddl())


__all__ = ["COLUMNS", "DISCARDED", "IGNORED", "PARKED", "REPLAYED", "UNRESOLVED", "ParkedTable"]

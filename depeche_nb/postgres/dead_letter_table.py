"""Gateway of an aggregated stream's dead letters, `<stream>_dead_letters`: the messages its
projector could not deserialise or partition, and those held behind them. Every statement
about the table lives here; `engine.projector` runs them.

A row is `parked` (this message failed, with the error) or `held` (a later message of an
origin stream with a parked one, kept back so the stream's order survives), then
`replayed` (projected after all) or `skipped` (never to be projected).
"""

from __future__ import annotations

from depeche_nb.postgres.names import quote_ident

PARKED = "parked"
HELD = "held"
REPLAYED = "replayed"
SKIPPED = "skipped"
COLUMNS = (
    "global_position, message_id::text, origin_stream, origin_stream_version, status, error, "
    "recorded_at, resolved_at"
)
_UNRESOLVED = f"status IN ('{PARKED}', '{HELD}')"


class DeadLetterTable:
    def __init__(self, stream: str) -> None:
        self.name = f"{stream}_dead_letters"
        table = self.table = quote_ident(self.name)
        self.ddl = [
            f"""
            CREATE TABLE IF NOT EXISTS {table} (
                global_position bigint PRIMARY KEY,
                message_id uuid NOT NULL,
                origin_stream text COLLATE "C" NOT NULL,
                origin_stream_version integer NOT NULL,
                status text NOT NULL CHECK (status IN ('parked', 'held', 'replayed', 'skipped')),
                error text,
                recorded_at timestamptz NOT NULL DEFAULT now(),
                resolved_at timestamptz
            )
            """
        ]
        # The origin streams the projector holds back (a subquery of its checkpoint read).
        self.blocked_streams_sql = f"array(SELECT DISTINCT origin_stream FROM {table} WHERE {_UNRESOLVED})"
        self.insert_sql = (
            f"INSERT INTO {table} (global_position, message_id, origin_stream, origin_stream_version, "
            "status, error) SELECT * FROM unnest(%(gps)s::bigint[], %(ids)s::uuid[], %(streams)s::text[], "
            "%(versions)s::int[], %(statuses)s::text[], %(errors)s::text[]) "
            # A re-anchored first round meets its unresolved letters again.
            "ON CONFLICT (global_position) DO NOTHING"
        )
        self.repark_sql = f"UPDATE {table} SET status = '{PARKED}', error = %s WHERE global_position = %s"
        self.list_sql = f"SELECT {COLUMNS} FROM {table} WHERE {_UNRESOLVED} ORDER BY global_position"
        self.list_all_sql = f"SELECT {COLUMNS} FROM {table} ORDER BY global_position"
        # A stream's unresolved letters in order, locked for the replay deciding on them.
        self.stream_letters_sql = (
            f"SELECT global_position, status FROM {table} WHERE origin_stream = %s AND {_UNRESOLVED} "
            "ORDER BY global_position FOR UPDATE"
        )
        self.stream_of_sql = f"SELECT origin_stream, status FROM {table} WHERE global_position = %s"
        self.resolve_sql = (
            f"UPDATE {table} SET status = %s, resolved_at = now() "
            f"WHERE global_position = ANY(%s::bigint[]) AND {_UNRESOLVED}"
        )
        self.count_sql = f"SELECT count(*) FROM {table} WHERE {_UNRESOLVED}"


__all__ = ["COLUMNS", "HELD", "PARKED", "REPLAYED", "SKIPPED", "DeadLetterTable"]

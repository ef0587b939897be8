"""DDL and statements of an aggregated stream: partition assignments, heads, checkpoint.

Tables of aggregated stream `A` over store `S`:

* `A_stream`: one row per projected message (a pointer, not a copy): origin
  stream/version/global position, partition and gapless position. Keyed by
  the message's global position (so a message is projected at most once) and
  unique on (partition, position).
* `A_heads`: per partition the highest position, so positions continue
  without scanning.
* `A_checkpoint`: the projector's progress as PostgreSQL snapshots, see
  `engine.projector`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.names import StoreNames, lock_namespace, quote_ident


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


def stream_ddl(names: StreamNames) -> list[str]:
    table = quote_ident(names.table)
    heads = quote_ident(names.heads_table)
    checkpoint = quote_ident(names.checkpoint_table)
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
            max_position integer NOT NULL
        )
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
        f"INSERT INTO {checkpoint} (singleton) VALUES (true) ON CONFLICT DO NOTHING",
    ]


def ensure_stream_schema(engine: sa.Engine, names: StreamNames) -> None:
    run_ddl_once(engine, f"stream:{names.stream}", stream_ddl(names))

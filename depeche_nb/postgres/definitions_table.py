"""Gateway of the definitions table: what each aggregated-stream and subscription name was
defined as. Every statement about `depeche_nb_definitions` lives here; `engine.definitions`
compares.

One row per (kind, name): aggregated-stream and subscription names name tables of their own
(`<stream>_stream`, `<subscription>_parked`) and state rows, so within a schema each name
is one thing. `owner` is the store of an aggregated stream and the aggregated stream of a
subscription; `definition` the rest of what the name stands for (JSON).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.rawconn import autocommit_cursor

TABLE = "depeche_nb_definitions"

_DDL = [
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        kind text NOT NULL,
        name text NOT NULL,
        owner text NOT NULL,
        definition jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, name)
    )
    """
]
# The recorded row, inserting (owner, definition) when there is none. The outer SELECT does
# not see a row inserted by the same statement, so exactly one branch answers, except when
# a concurrent definer committed in between: then neither does and the caller asks again.
_CLAIM_SQL = f"""
    WITH ins AS (
        INSERT INTO {TABLE} (kind, name, owner, definition) VALUES (%s, %s, %s, %s::jsonb)
        ON CONFLICT (kind, name) DO NOTHING RETURNING owner, definition::text
    )
    SELECT owner, definition FROM ins
    UNION ALL SELECT owner, definition::text FROM {TABLE} WHERE kind = %s AND name = %s
"""
_REPLACE_SQL = (
    f"UPDATE {TABLE} SET owner = %s, definition = %s::jsonb, recorded_at = now() "
    "WHERE kind = %s AND name = %s"
)


def claim(engine: sa.Engine, kind: str, name: str, owner: str, definition: dict[str, Any]) -> tuple[str, Any]:
    """The recorded (owner, definition) of `name`; records the given ones if none are."""
    run_ddl_once(engine, "definitions", _DDL)
    text = json.dumps(definition, sort_keys=True)
    with autocommit_cursor(engine) as cursor:
        while True:  # a second round sees a concurrent definer's row (a new snapshot)
            cursor.execute(_CLAIM_SQL, (kind, name, owner, text, kind, name))
            row = cursor.fetchone()
            if row is not None:
                return str(row[0]), json.loads(row[1])


def replace(engine: sa.Engine, kind: str, name: str, owner: str, definition: dict[str, Any]) -> None:
    with autocommit_cursor(engine) as cursor:
        replace_in(cursor, kind, name, owner, definition)


def replace_in(cursor: Any, kind: str, name: str, owner: str, definition: dict[str, Any]) -> None:
    """`replace` inside the caller's transaction (a rebuild's switch)."""
    cursor.execute(_REPLACE_SQL, (owner, json.dumps(definition, sort_keys=True), kind, name))


def exists(cursor: Any) -> bool:
    """Whether the table exists (a read-only caller must not create it)."""
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
    return bool(cursor.fetchone()[0])


def wildcard_matches(cursor: Any, kind: str, owner: str, stream: str) -> list[tuple[str, list[str], bool]]:
    """The recorded names of `kind` owned by `owner` (a store's aggregated streams) with
    their wildcards, and whether `stream` matches one of them (LIKE, as the projector
    selects)."""
    cursor.execute(
        f"SELECT name, (definition->'wildcards')::text, %s LIKE ANY(ARRAY(SELECT "
        f"jsonb_array_elements_text(definition->'wildcards'))) FROM {TABLE} "
        "WHERE kind = %s AND owner = %s ORDER BY name",
        (stream, kind, owner),
    )
    return [(row[0], json.loads(row[1]), bool(row[2])) for row in cursor.fetchall()]


def recorded(cursor: Any, kind: str, owner: str | None = None) -> list[tuple[str, str, Any]]:
    """Every recorded (name, owner, definition) of `kind`, of `owner` only if given, by name:
    what exists in the schema, for views that have no objects of their own (the table holds
    one row per defined name, so this is small)."""
    cursor.execute(
        f"SELECT name, owner, definition::text FROM {TABLE} WHERE kind = %s "
        "AND (%s::text IS NULL OR owner = %s) ORDER BY name",
        (kind, owner, owner),
    )
    return [(row[0], row[1], json.loads(row[2])) for row in cursor.fetchall()]


def names_owned_by(cursor: Any, kind: str, owner: str) -> list[str]:
    """The recorded names of `kind` whose owner is `owner` (e.g. a stream's subscriptions)."""
    cursor.execute(f"SELECT name FROM {TABLE} WHERE kind = %s AND owner = %s ORDER BY name", (kind, owner))
    return [row[0] for row in cursor.fetchall()]

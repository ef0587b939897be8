"""DDL of subscription state and of parked (dead-letter) messages."""

from __future__ import annotations

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.names import quote_ident

# The state row that marks a subscription as initialised (Depeche DB's convention).
INIT_PARTITION = -1


def state_table(provider_name: str) -> str:
    return f"{validate_name(provider_name, 'state provider name')}_subscription_state"


def parked_table(subscription_name: str) -> str:
    return f"{validate_name(subscription_name, 'subscription name')}_parked"


def ensure_state_schema(engine: sa.Engine, provider_name: str) -> None:
    table = quote_ident(state_table(provider_name))
    run_ddl_once(
        engine,
        f"state:{provider_name}",
        [
            f"""
            CREATE TABLE IF NOT EXISTS {table} (
                subscription_name text NOT NULL,
                partition integer NOT NULL,
                position integer NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (subscription_name, partition)
            )
            """
        ],
    )


def ensure_parked_schema(engine: sa.Engine, subscription_name: str) -> None:
    table = quote_ident(parked_table(subscription_name))
    run_ddl_once(
        engine,
        f"parked:{subscription_name}",
        [
            f"""
            CREATE TABLE IF NOT EXISTS {table} (
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
            """
        ],
    )

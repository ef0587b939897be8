"""Gateway of subscription state: one row per (subscription, partition) with its acknowledged
position. Every statement about the table lives here; `engine.state` runs them.

The row with partition `INIT_PARTITION` marks a subscription as initialised
(Depeche DB's convention).

Fencing. A partition's lock is a session advisory lock, and a session can end
while its runner works (a terminated backend, a network drop, a failover).
So each row also holds a fencing `token`: a runner that takes a partition's
lock bumps it (`take_sql`) and remembers the new value, and every
acknowledgement it makes is a compare-and-set on that token (`fenced_store_sql`,
also inside a handler's own transaction). Once another runner took the
partition, the first one's token is stale: its acks update no row, the caller
raises, and a handler's transaction rolls back with its side effects. The
bump takes the row lock, so it waits for an acknowledgement still in flight;
the claim's reads of the position come after it. The set is also
refused when it would lower the position: positions go back only by an
explicit reset (`reset_sql`), which bumps the token too. A row that a claim
created before any acknowledgement has a NULL position, so reads still show
"nothing acknowledged" as no row at all, as they did before.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.errors import InvalidIdentifierError
from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.ddl import run_ddl_once
from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.rawconn import Prepared

INIT_PARTITION = -1
SUFFIX = "_subscription_state"
# The tables of every `DbSubscriptionStateProvider` in the current schema (a catalog read).
_STATE_TABLES_SQL = (
    "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' "
    "AND c.relnamespace = current_schema()::regnamespace "
    "AND c.relname LIKE '%\\_subscription\\_state' ORDER BY c.relname"
)


def state_tables(cursor: Any) -> list[StateTable]:
    """The state tables of the current schema. A table whose prefix is no valid provider
    name was not made by a provider (their names are checked), so it is left out."""
    cursor.execute(_STATE_TABLES_SQL)
    tables = []
    for (name,) in cursor.fetchall():
        try:
            tables.append(StateTable(name[: -len(SUFFIX)]))
        except InvalidIdentifierError:
            continue
    return tables


class StateTableCatalog:
    """The schema's state tables, listed once (a catalog read) for a read that looks for the
    state of several subscriptions."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self._tables: list[StateTable] | None = None
        # subscription -> (the table holding its rows, initialized), from `locate`.
        self._located: dict[str, tuple[StateTable, bool]] | None = None

    def locate(self, subscriptions: list[str]) -> None:
        """Find, with one statement per state table, where each of `subscriptions` has rows,
        for `holding` to answer without a statement per (subscription, table): seconds in a
        database of a few hundred subscriptions."""
        holding: dict[str, list[tuple[StateTable, bool]]] = {}
        for table in self._all():
            self._cursor.execute(table.summaries_sql, (subscriptions,))
            for name, initialized in self._cursor.fetchall():
                holding.setdefault(name, []).append((table, bool(initialized)))
        self._located = {}
        for name, found in holding.items():
            default = StateTable(name).name
            # The order of `candidates`: the default provider's table first.
            self._located[name] = next((f for f in found if f[0].name == default), found[0])

    def holding(
        self, subscription: str, tables: list[StateTable] | None = None
    ) -> tuple[StateTable, bool] | None:
        """The table holding the subscription's rows, among `tables` (default: its
        `candidates`), and whether it is initialised; None if none holds any."""
        if tables is None and self._located is not None:
            return self._located.get(subscription)
        for table in self.candidates(subscription) if tables is None else tables:
            self._cursor.execute(table.summary_sql, (subscription,))
            has_rows, initialized = self._cursor.fetchone()
            if has_rows:
                return table, bool(initialized)
        return None

    def _all(self) -> list[StateTable]:
        if self._tables is None:
            self._tables = state_tables(self._cursor)
        return self._tables

    def candidates(self, subscription: str) -> list[StateTable]:
        """Where a subscription's state can be: the default provider's table (named like the
        subscription) first, then every other state table."""
        default = StateTable(subscription).name
        return sorted(self._all(), key=lambda table: table.name != default)


class StateTable:
    """The SQL of one state provider's table (`<provider>_subscription_state`)."""

    def __init__(self, provider_name: str) -> None:
        self.provider_name = validate_name(provider_name, "state provider name")
        self.name = provider_name + SUFFIX
        self.table = quote_ident(self.name)
        table = self.table
        self.upsert_sql = (
            f"INSERT INTO {table} (subscription_name, partition, position) VALUES (%s, %s, %s) "
            "ON CONFLICT (subscription_name, partition) "
            "DO UPDATE SET position = EXCLUDED.position, updated_at = now()"
        )
        acked = "subscription_name = %s AND partition >= 0 AND position IS NOT NULL"
        self.read_sql = f"SELECT partition, position FROM {table} WHERE {acked}"
        self.read_with_times_sql = f"SELECT partition, position, updated_at FROM {table} WHERE {acked}"
        self.initialized_sql = (
            f"SELECT 1 FROM {table} WHERE subscription_name = %s AND partition = {INIT_PARTITION}"
        )
        # (partition, subscription, partition): whether the subscription has any row here,
        # is initialised, and its acknowledged position in the partition (NULL: none); two
        # primary-key lookups.
        self.trace_sql = (
            f"SELECT count(*) > 0, bool_or(partition = {INIT_PARTITION}), "
            f"max(position) FILTER (WHERE partition = %s) FROM {table} "
            f"WHERE subscription_name = %s AND partition IN (%s, {INIT_PARTITION})"
        )
        # (subscription, initialised) for those of the names (one text[]) with rows here.
        self.summaries_sql = (
            f"SELECT subscription_name, bool_or(partition = {INIT_PARTITION}) FROM {table} "
            "WHERE subscription_name = ANY(%s::text[]) GROUP BY subscription_name"
        )
        # (subscription): whether the subscription has any row here and is initialised; its
        # rows are one per partition, read by the primary key.
        self.summary_sql = (
            f"SELECT count(*) > 0, coalesce(bool_or(partition = {INIT_PARTITION}), false) FROM {table} "
            "WHERE subscription_name = %s"
        )
        # (subscription, partition) -> the new token; a new row's NULL position means
        # nothing is acknowledged yet.
        self.take_sql = (
            f"INSERT INTO {table} AS st (subscription_name, partition, position, token) "
            "VALUES (%s, %s, NULL, 1) ON CONFLICT (subscription_name, partition) "
            "DO UPDATE SET token = st.token + 1 RETURNING st.token"
        )
        # The same as a statement's CTE, taken only when the one-row relation `got` (column
        # `ok`) says so; parameters %(subscription)s and %(partition)s. Returns the token and
        # the acknowledged position (-1 before the first), as they are after the bump: it
        # waits for an acknowledgement in flight and then sees it.
        self.take_if_got_sql = (
            f"INSERT INTO {table} AS st (subscription_name, partition, position, token) "
            "SELECT %(subscription)s::text, %(partition)s::int, NULL, 1 FROM got WHERE got.ok "
            "ON CONFLICT (subscription_name, partition) DO UPDATE SET token = st.token + 1 "
            "RETURNING st.token, coalesce(st.position, -1) AS position"
        )
        # (position, subscription, partition, token, position)
        self.fenced_store_sql = (
            f"UPDATE {table} SET position = %s, updated_at = now() "
            "WHERE subscription_name = %s AND partition = %s AND token = %s "
            "AND coalesce(position, -1) <= %s"
        )
        # The fenced store, its outcome (1 or 0 rows) left in a session setting for a script
        # that reads it after its COMMIT (`ack_then_unlock_sql`); for our own connections.
        self.fenced_recording = Prepared(
            f"WITH up AS ({self.fenced_store_sql} RETURNING 1) "
            "SELECT set_config('depeche_nb.acked', count(*)::text, false) FROM up"
        )
        # (subscription, partition, position)
        self.reset_sql = (
            f"INSERT INTO {table} AS st (subscription_name, partition, position, token) "
            "VALUES (%s, %s, %s, 1) ON CONFLICT (subscription_name, partition) "
            "DO UPDATE SET position = EXCLUDED.position, token = st.token + 1, updated_at = now()"
        )

    @staticmethod
    def ack_then_unlock_sql(execute_fenced: str) -> str:
        """A runner's last acknowledgement of a batch and the release of its partition in one
        round trip on the lock session (`DbLockProvider.run_then_unlock`): the fenced store
        (`execute_fenced`, the EXECUTE of `fenced_recording`) committed synchronously, then
        the unlock; its row is (released, rows the store updated)."""
        return (
            f"BEGIN; SET LOCAL synchronous_commit TO on; {execute_fenced}; COMMIT; "
            "SELECT pg_advisory_unlock(%s::bigint), current_setting('depeche_nb.acked')"
        )

    def ddl(self) -> list[str]:
        return [
            f"""
            CREATE TABLE IF NOT EXISTS {self.table} (
                subscription_name text NOT NULL,
                partition integer NOT NULL,
                position integer,
                updated_at timestamptz NOT NULL DEFAULT now(),
                token bigint NOT NULL DEFAULT 0,
                PRIMARY KEY (subscription_name, partition)
            )
            """,
            # Tables made before fencing existed.
            f"ALTER TABLE {self.table} ADD COLUMN IF NOT EXISTS token bigint NOT NULL DEFAULT 0",
            f"ALTER TABLE {self.table} ALTER COLUMN position DROP NOT NULL",
        ]

    def ensure(self, engine: sa.Engine) -> None:
        run_ddl_once(engine, f"state:{self.provider_name}", self.ddl())

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a handful of streams per provider, kept for life
    def progress_sql(self, heads_table: str) -> str:
        """Each partition's head (from an aggregated stream's quoted heads table) beside the
        subscription's position there (-1 before its first ack), in one statement."""
        return (
            f"SELECT h.partition, coalesce(st.position, -1), h.max_position FROM {heads_table} h "
            f"LEFT JOIN {self.table} st ON st.subscription_name = %s AND st.partition = h.partition "
            "ORDER BY h.partition"
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 - as progress_sql
    def positions_sql(self, heads_table: str) -> str:
        """Every partition that has a head or an acknowledged position of the subscription
        (parameter): partition, position (-1 before the first ack), head (-1: none) and the
        time of the last ack; rows in proportion to the partitions."""
        return (
            "SELECT coalesce(h.partition, st.partition), coalesce(st.position, -1), "
            f"coalesce(h.max_position, -1), st.updated_at FROM {heads_table} h FULL JOIN "
            f"(SELECT partition, position, updated_at FROM {self.table} WHERE subscription_name = %s "
            "AND partition >= 0 AND position IS NOT NULL) st ON st.partition = h.partition ORDER BY 1"
        )

    def position_subquery(self, partition_sql: str, subscription_sql: str) -> str:
        """A scalar subquery: the stored position of a partition (-1 before its first ack),
        for statements of other tables that read "after the acknowledged position"."""
        return (
            f"coalesce((SELECT st.position FROM {self.table} st WHERE st.subscription_name = "
            f"{subscription_sql} AND st.partition = {partition_sql}), -1)"
        )


__all__ = ["INIT_PARTITION", "SUFFIX", "StateTable", "StateTableCatalog", "state_tables"]

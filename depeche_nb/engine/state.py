"""`DbSubscriptionStateProvider`: per-partition positions of subscriptions, in PostgreSQL."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.errors import PartitionLostError
from depeche_nb.core.identifiers import validate_name
from depeche_nb.core.interfaces import SubscriptionState
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.postgres.state_table import INIT_PARTITION, StateTable


class DbSubscriptionStateProvider:
    """Stores each ack as an upsert; `session(conn=...)` stores inside the caller's transaction."""

    SPECIAL_PARTITION_FOR_INIT_STATE = INIT_PARTITION

    def __init__(self, name: str, engine: sa.Engine) -> None:
        self.name = validate_name(name, "state provider name")
        self.engine = engine
        self.sql = StateTable(name)
        self.sql.ensure(engine)
        self._initialized: set[str] = set()

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self.sql.upsert_sql, (subscription_name, partition, position))

    def read(self, subscription_name: str) -> SubscriptionState:
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self.sql.read_sql, (subscription_name,))
            return SubscriptionState({row[0]: row[1] for row in cursor.fetchall()})

    def take(self, subscription_name: str, partition: int) -> int:
        """Bump the partition's fencing token (call with its lock held) and return it; every
        fenced store of this claim must present it (see `postgres.state_table`)."""
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self.sql.take_sql, (subscription_name, partition))
            (token,) = cursor.fetchone()
            return int(token)

    def store_fenced(self, subscription_name: str, partition: int, position: int, token: int) -> None:
        """Store `position` only if `token` is still the partition's and the position does
        not go back; else `PartitionLostError`."""
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(
                self.sql.fenced_store_sql, (position, subscription_name, partition, token, position)
            )
            check_fenced(cursor.rowcount, subscription_name, partition, position, token)

    def reset_positions(self, subscription_name: str, positions: dict[int, int]) -> None:
        """Set partitions' positions in one transaction, bumping their fencing tokens so a
        runner that lost its lock cannot acknowledge over the reset (call with the locks held)."""
        with self.engine.begin() as conn:
            for partition, position in positions.items():
                conn.exec_driver_sql(self.sql.reset_sql, (subscription_name, partition, position))

    def read_with_times(self, subscription_name: str) -> dict[int, tuple[int, _dt.datetime]]:
        """Each partition's position and when it was stored (for displays)."""
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self.sql.read_with_times_sql, (subscription_name,))
            return {row[0]: (row[1], row[2]) for row in cursor.fetchall()}

    def progress(self, subscription_name: str, heads_table: str) -> list[tuple[int, int, int]]:
        """(partition, position, head) beside an aggregated stream's quoted heads table."""
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self.sql.progress_sql(heads_table), (subscription_name,))
            return [tuple(row) for row in cursor.fetchall()]

    def initialize(self, subscription_name: str) -> None:
        self.store(subscription_name, INIT_PARTITION, INIT_PARTITION)
        self._initialized.add(subscription_name)

    def initialized(self, subscription_name: str) -> bool:
        if subscription_name in self._initialized:
            return True
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self.sql.initialized_sql, (subscription_name,))
            found = cursor.fetchone() is not None
        if found:
            self._initialized.add(subscription_name)
        return found

    def session(self, conn: sa.Connection | None = None, **kwargs: Any) -> _StateSession:
        if conn is None or kwargs:
            raise TypeError("session() takes exactly one argument: conn=<SQLAlchemy Connection>")
        return _StateSession(self, conn)


def check_fenced(updated: int, subscription_name: str, partition: int, position: int, token: int) -> None:
    if updated != 1:
        raise PartitionLostError(
            f"subscription {subscription_name!r} lost partition {partition}: its fencing token "
            f"{token} is stale (another runner took the partition over) or position {position} "
            "would go back; the acknowledgement was refused"
        )


class _StateSession:
    """The provider bound to a caller's transaction: nothing here commits."""

    def __init__(self, provider: DbSubscriptionStateProvider, conn: sa.Connection) -> None:
        self._provider = provider
        self._conn = conn

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        self._conn.exec_driver_sql(self._provider.sql.upsert_sql, (subscription_name, partition, position))

    def store_fenced(self, subscription_name: str, partition: int, position: int, token: int) -> None:
        result = self._conn.exec_driver_sql(
            self._provider.sql.fenced_store_sql, (position, subscription_name, partition, token, position)
        )
        check_fenced(result.rowcount, subscription_name, partition, position, token)

    def read(self, subscription_name: str) -> SubscriptionState:
        rows = self._conn.exec_driver_sql(self._provider.sql.read_sql, (subscription_name,)).all()
        return SubscriptionState({row[0]: row[1] for row in rows})

    def initialize(self, subscription_name: str) -> None:
        self._provider.initialize(subscription_name)

    def initialized(self, subscription_name: str) -> bool:
        return self._provider.initialized(subscription_name)

    def session(self, **kwargs: Any) -> _StateSession:
        return self._provider.session(**kwargs)

"""The dead-letter table of a subscription: parked and ignored messages, never silent."""

from __future__ import annotations

import contextlib
import dataclasses as _dc
import datetime as _dt
import traceback as _traceback
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from depeche_nb.core.display import run_view
from depeche_nb.core.errors import ReplayInProgressError
from depeche_nb.core.interfaces import SubscriptionMessage
from depeche_nb.postgres.parked_table import (
    DISCARDED,
    IGNORED,
    PARKED,
    REPLAYED,
    ParkedTable,
)
from depeche_nb.postgres.rawconn import autocommit_cursor, callers_or_own

if TYPE_CHECKING:
    import pandas as pd


@_dc.dataclass(frozen=True)
class ParkedMessage:
    id: int
    partition: int
    position: int
    message_id: uuid.UUID
    global_position: int
    message_type: str
    status: str
    attempts: int
    error: str
    traceback: str
    recorded_at: _dt.datetime
    resolved_at: _dt.datetime | None


class ParkedMessages:
    """Reads and writes one subscription's parked table."""

    def __init__(self, engine: sa.Engine, subscription_name: str) -> None:
        self.engine = engine
        self.subscription_name = subscription_name
        self._sql = ParkedTable(subscription_name)
        self.table = self._sql.table

    def record(
        self,
        conn: sa.Connection,
        message: SubscriptionMessage[Any],
        status: str,
        attempts: int,
        error: BaseException,
    ) -> int:
        self._ensure()
        stored = message.stored_message
        row = conn.exec_driver_sql(
            self._sql.insert_sql,
            (
                message.partition,
                message.position,
                str(stored.message_id),
                stored.global_position,
                type(stored.message).__name__,
                status,
                attempts,
                f"{type(error).__name__}: {error}",
                "".join(_traceback.format_exception(type(error), error, error.__traceback__)),
            ),
        ).scalar_one()
        return int(row)

    def list(self, include_resolved: bool = False) -> list[ParkedMessage]:
        self._ensure()
        sql = self._sql.list_all_sql if include_resolved else self._sql.list_unresolved_sql
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql).all()
        return [parked_from_row(row) for row in rows]

    def _ensure(self) -> None:
        # Created on first use: most subscriptions never park anything.
        self._sql.ensure(self.engine)

    def get(self, parked_id: int) -> ParkedMessage:
        self._ensure()
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(self._sql.get_sql, (parked_id,)).first()
        if row is None:
            raise KeyError(f"no parked message with id {parked_id}")
        return parked_from_row(row)

    def resolve(self, parked_id: int, status: str, conn: sa.Connection | None = None) -> None:
        """Mark an unresolved parked message `status` (in `conn`'s transaction if given);
        `KeyError` if it is not unresolved (any more)."""
        self._ensure()
        with callers_or_own(self.engine, conn) as c:
            updated = c.exec_driver_sql(self._sql.resolve_sql, (status, parked_id)).rowcount
        if updated != 1:
            raise KeyError(f"no unresolved parked message with id {parked_id}")

    @contextlib.contextmanager
    def replay_guard(self, parked_id: int) -> Iterator[None]:
        """Held while one session replays a parked message: a second replay of the same one
        fails at once instead of running the handler twice."""
        self._ensure()
        with self.engine.begin() as conn:
            if not conn.exec_driver_sql(self._sql.replay_guard_sql, (parked_id,)).scalar_one():
                raise ReplayInProgressError(
                    f"parked message {parked_id} of {self.subscription_name!r} is being replayed "
                    "by another session"
                )
            yield

    def count_unresolved(self) -> int | None:
        """Unresolved parked/ignored messages, or None when nothing was ever parked (the
        table does not exist yet; a display must not create it)."""
        with autocommit_cursor(self.engine) as cursor:
            cursor.execute(self._sql.exists_sql, (self.table,))
            if not cursor.fetchone()[0]:
                return None
            cursor.execute(self._sql.count_unresolved_sql)
            return int(cursor.fetchone()[0])

    def to_dataframe(self, include_resolved: bool = False) -> pd.DataFrame:
        return run_view("parked", self, include_resolved)  # type: ignore[no-any-return]


def parked_from_row(row: Any) -> ParkedMessage:
    """A `ParkedMessage` from a row of the table's `COLUMNS`."""
    values = list(row)
    values[3] = values[3] if isinstance(values[3], uuid.UUID) else uuid.UUID(str(values[3]))
    return ParkedMessage(*values)


__all__ = ["DISCARDED", "IGNORED", "PARKED", "REPLAYED", "ParkedMessage", "ParkedMessages", "parked_from_row"]

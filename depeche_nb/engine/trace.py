"""One message's journey: where a stored message went after it was written (`store.trace`).

A trace reads, in one read-only snapshot (so its parts agree with each other):

1. the message by id: its stream, version and global position;
2. every aggregated stream recorded over the store (`depeche_nb_definitions`) and whether
   the message's stream matches its wildcards (LIKE, as the projector selects);
3. for each matching one, the message's partition and position, or that it is not
   projected yet (and whether the projector set it aside as a dead letter);
4. for each subscription recorded on such a stream, its acknowledged position in that
   partition, and the subscription's parked-message record of the message, if any.

Every statement is a lookup by a primary key or unique index (plus one catalog read for
the state tables), so a trace costs the same on a store of a billion messages; the
statements live in the tables' gateways. Nothing is created or written.

Where the subscription's state is: the table of the `DbSubscriptionStateProvider` named
like the subscription (the default), else whichever state table holds rows of it. A
subscription with no stored state has not run yet (or keeps its state outside PostgreSQL):
it is reported pending, with a note, since its start point decides whether it will ever
get the message.
"""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
import uuid
from typing import TYPE_CHECKING, Any

from depeche_nb.core.display import RichRepr, run_view
from depeche_nb.core.errors import MessageNotFound
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.definitions import AGGREGATED_STREAM, SUBSCRIPTION
from depeche_nb.engine.handlers import HANDLED, IGNORED, PARKED
from depeche_nb.postgres import definitions_table, parked_table
from depeche_nb.postgres.ddl import tables_exist
from depeche_nb.postgres.dead_letter_table import HELD, SKIPPED, DeadLetterTable
from depeche_nb.postgres.dead_letter_table import PARKED as DEAD_LETTER_PARKED
from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.parked_table import ParkedTable
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.postgres.state_table import StateTableCatalog
from depeche_nb.postgres.stream_tables import StreamNames, StreamViews
from depeche_nb.store.serializers import TYPE_KEY

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.protocols import StoreSource

# What happened to the message in one subscription (also HANDLED, PARKED, IGNORED).
PENDING = "pending"
DISCARDED = "discarded"
NOT_PROJECTED = "not projected yet"
# What happened to it in one aggregated stream.
PROJECTED = "projected"
HELD_BACK = "held back by the projector"
SKIPPED_BY_PROJECTOR = "skipped by the projector"

_PARKED_STATUS = {
    parked_table.PARKED: PARKED,
    parked_table.IGNORED: IGNORED,
    parked_table.DISCARDED: DISCARDED,
    parked_table.REPLAYED: HANDLED,
}


@_dc.dataclass(frozen=True)
class SubscriptionTrace:
    """The message in one subscription."""

    subscription: str
    status: str  # HANDLED, PENDING, PARKED, IGNORED, DISCARDED or NOT_PROJECTED
    # The subscription's acknowledged position in the message's partition (-1: none yet);
    # None when the message has no partition (not projected).
    acknowledged_position: int | None
    # Pending: the messages of the partition it still handles up to and including this
    # one (1: it is next).
    behind: int | None
    error: str | None  # the handler's error, for a parked, ignored or discarded message
    attempts: int | None
    initialized: bool
    note: str = ""


@_dc.dataclass(frozen=True)
class StreamTrace:
    """The message in one aggregated stream whose wildcards match its stream."""

    aggregated_stream: str
    wildcards: list[str]
    status: str  # PROJECTED, NOT_PROJECTED, HELD_BACK or SKIPPED_BY_PROJECTOR
    partition: int | None
    position: int | None
    head: int | None  # the partition's highest position
    projected_at: _dt.datetime | None
    error: str | None  # why the projector set the message aside
    subscriptions: list[SubscriptionTrace]


@_dc.dataclass(frozen=True)
class MessageTrace(RichRepr):
    """Where one stored message went: its place in the store, in every aggregated stream that
    matches it, and in their subscriptions."""

    message_id: uuid.UUID
    store: str
    stream: str
    version: int
    global_position: int
    added_at: _dt.datetime  # tz-aware UTC
    message_type: str | None
    streams: list[StreamTrace]  # the matching aggregated streams, by name
    # The store's other aggregated streams (their wildcards do not match the stream).
    unmatched_streams: list[str]

    def summary(self) -> str:
        where = f"{self.stream!r} v{self.version}, global position {self.global_position}"
        if not self.streams:
            return f"{self.message_type or 'message'} {where}: no aggregated stream matches {self.stream!r}"
        parts = []
        for s in self.streams:
            place = f"partition {s.partition} position {s.position}" if s.status == PROJECTED else s.status
            subs = ", ".join(f"{t.subscription} {_status_text(t)}" for t in s.subscriptions)
            parts.append(f"{s.aggregated_stream} {place}" + (f" -> {subs}" if subs else ""))
        return f"{self.message_type or 'message'} {where}: " + "; ".join(parts)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (aggregated stream, subscription); a stream without subscriptions has
        one row without one, a message no stream matches a single row of its own place."""
        return run_view("trace", self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<MessageTrace {self.summary()}>"


def _status_text(t: SubscriptionTrace) -> str:
    if t.status == PENDING:
        return f"pending ({t.behind} behind)"
    if t.error and t.status != HANDLED:
        return f"{t.status} ({t.error})"
    return t.status


def message_id_of(message: object) -> uuid.UUID:
    """The id to trace: a UUID, its text, or a `StoredMessage`; checked before any SQL."""
    if isinstance(message, StoredMessage):
        return message.message_id
    if isinstance(message, uuid.UUID):
        return message
    if isinstance(message, str):
        try:
            return uuid.UUID(message)
        except ValueError:
            raise ValueError(f"message id {message!r} is not a UUID") from None
    raise TypeError(
        f"trace() takes a message id (uuid.UUID or its text) or a StoredMessage, got {type(message).__name__}"
    )


def trace_message(store: StoreSource[Any], message: object) -> MessageTrace:
    """Trace one message of `store` (see the module notes); `MessageNotFound` if no stored
    message has the id."""
    message_id = message_id_of(message)
    with autocommit_cursor(store.engine) as cursor:
        # One snapshot for every read: a runner acknowledging meanwhile cannot make the
        # trace show a position from before and a parked record from after.
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            return _trace(cursor, store, message_id)
        finally:
            if not cursor.connection.closed:
                cursor.execute("ROLLBACK")


def _trace(cursor: Any, store: StoreSource[Any], message_id: uuid.UUID) -> MessageTrace:
    cursor.execute(store._storage.views.trace_sql, (TYPE_KEY, str(message_id)))
    row = cursor.fetchone()
    if row is None:
        raise MessageNotFound(f"no message with id {message_id} in store {store.name!r}")
    stream, version, global_position, added_at, message_type = row
    recorded = (
        definitions_table.wildcard_matches(cursor, AGGREGATED_STREAM, store.name, stream)
        if definitions_table.exists(cursor)
        else []
    )
    found = StateTableCatalog(cursor)
    streams = [
        _stream_trace(
            cursor, StreamNames(name, store._storage.names), wildcards, global_position, message_id, found
        )
        for name, wildcards, matches in recorded
        if matches
    ]
    return MessageTrace(
        message_id=message_id,
        store=store.name,
        stream=stream,
        version=int(version),
        global_position=int(global_position),
        added_at=added_at.astimezone(_dt.timezone.utc),
        message_type=message_type,
        streams=streams,
        unmatched_streams=[name for name, _, matches in recorded if not matches],
    )


def _stream_trace(
    cursor: Any,
    names: StreamNames,
    wildcards: list[str],
    global_position: int,
    message_id: uuid.UUID,
    state: StateTableCatalog,
) -> StreamTrace:
    partition = position = head = projected_at = error = None
    status = NOT_PROJECTED
    tables = (names.table, names.heads_table, DeadLetterTable(names.stream).name)
    # A stream whose tables are gone (dropped by hand) has projected nothing.
    if tables_exist(cursor, *(quote_ident(t) for t in tables)):
        cursor.execute(StreamViews(names).trace_sql, (global_position, str(message_id)))
        partition, position, projected_at, head, letter_status, error = cursor.fetchone()
        if partition is not None:
            status = PROJECTED
        elif letter_status in (DEAD_LETTER_PARKED, HELD):
            status = HELD_BACK
        elif letter_status == SKIPPED:
            status = SKIPPED_BY_PROJECTOR
    subscriptions = [
        _subscription_trace(cursor, name, partition, position, global_position, message_id, state)
        for name in definitions_table.names_owned_by(cursor, SUBSCRIPTION, names.stream)
    ]
    return StreamTrace(
        aggregated_stream=names.stream,
        wildcards=wildcards,
        status=status,
        partition=partition,
        position=position,
        head=head,
        projected_at=projected_at,
        error=error if status != PROJECTED else None,
        subscriptions=subscriptions,
    )


def _subscription_trace(
    cursor: Any,
    subscription: str,
    partition: int | None,
    position: int | None,
    global_position: int,
    message_id: uuid.UUID,
    state: StateTableCatalog,
) -> SubscriptionTrace:
    has_state, initialized, acknowledged = False, False, None
    for table in state.candidates(subscription):
        cursor.execute(table.trace_sql, (partition, subscription, partition))
        has_state, initialized_row, acknowledged = cursor.fetchone()
        if has_state:
            initialized = bool(initialized_row)
            break
    acked = -1 if acknowledged is None else int(acknowledged)
    if partition is None or position is None:
        return SubscriptionTrace(subscription, NOT_PROJECTED, None, None, None, None, initialized)
    parked = ParkedTable(subscription)
    record = None
    if tables_exist(cursor, parked.table):
        cursor.execute(parked.trace_sql, (global_position, str(message_id)))
        record = cursor.fetchone()
    if record is not None:
        record_status, error, attempts, _ = record
        status = _PARKED_STATUS[record_status]
        note = f"replayed after it was parked ({error})" if record_status == parked_table.REPLAYED else ""
        return SubscriptionTrace(subscription, status, acked, None, error, int(attempts), initialized, note)
    if acked >= position:
        return SubscriptionTrace(subscription, HANDLED, acked, None, None, None, initialized)
    note = (
        ""
        if has_state
        else "no stored state: not started yet (its start point decides whether it gets this "
        "message), or its state is kept outside PostgreSQL"
    )
    return SubscriptionTrace(subscription, PENDING, acked, position - acked, None, None, initialized, note)


__all__ = [
    "DISCARDED",
    "HANDLED",
    "HELD_BACK",
    "IGNORED",
    "NOT_PROJECTED",
    "PARKED",
    "PENDING",
    "PROJECTED",
    "SKIPPED_BY_PROJECTOR",
    "MessageTrace",
    "StreamTrace",
    "SubscriptionTrace",
    "message_id_of",
    "trace_message",
]

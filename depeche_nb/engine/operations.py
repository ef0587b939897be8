"""What an operations console reads about a whole database or one store.

`read_operations(engine)` (or with `store=` one store's part of it) reads, in one read-only
snapshot so that its parts agree:

* every aggregated stream recorded in `depeche_nb_definitions`: partitions and projected
  messages (from its heads table), projection lag, when its projector last finished a
  step, and unresolved dead letters;
* every subscription recorded on those streams: per partition the acknowledged position,
  the head, the lag and the session holding the partition's lock right now (pid,
  application_name, client, from `pg_locks` and `pg_stat_activity`);
* each subscription's unresolved parked messages, the first `parked_limit`.

`diagnose_partition(...)` answers "why is partition N behind?" for one subscription: the
next message to handle (stream, version, global position, type and age by the database's
clock), whether a runner holds the partition and which session, the parked messages of the
partition with their errors, and what the Executors of this process know (a worker backing
off after a database error, or a handler error that stopped the executor). Retries of a
`RetryPolicy` happen inside the runner and are recorded nowhere until they end in a park,
an ignore or an exit.

Safe on a production database while workers run: nothing here takes a lock (advisory or
row; reading `pg_locks` takes none), creates a table or writes; the transaction is READ
ONLY. Statements are lookups by primary or unique keys, or read rows in proportion to the
partitions, the recorded names or the LIMIT; the projection lag reads the projector's
backlog only (the messages after its checkpoint), up to a cap.

What cannot be read from PostgreSQL: a subscription whose `Subscription` object uses a
lock provider other than `DbLockProvider` (its holders are unknown), or keeps its state
outside a `DbSubscriptionStateProvider` table (its positions are unknown). Pass such
objects in `known` so they are reported as unknown instead of guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses as _dc
import datetime as _dt
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from depeche_nb.core.display import Count, RichRepr
from depeche_nb.engine.definitions import AGGREGATED_STREAM, SUBSCRIPTION
from depeche_nb.engine.health import BACKING_OFF, FAILED, WorkerHealth
from depeche_nb.engine.parking import ParkedMessage, parked_from_row
from depeche_nb.engine.projector import UNPROJECTED_CAP
from depeche_nb.engine.state import DbSubscriptionStateProvider
from depeche_nb.engine.subscription import Subscription, partition_lock_name
from depeche_nb.postgres import definitions_table
from depeche_nb.postgres.ddl import tables_exist
from depeche_nb.postgres.dead_letter_table import DeadLetterTable
from depeche_nb.postgres.locks import DbLockProvider, LockHolder, advisory_key, lock_holders
from depeche_nb.postgres.messages_table import MessagesViews
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.postgres.parked_table import ParkedTable
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.postgres.state_table import StateTable, StateTableCatalog
from depeche_nb.postgres.stream_tables import StreamNames, StreamStatements, StreamViews
from depeche_nb.store.serializers import TYPE_KEY

if TYPE_CHECKING:
    import sqlalchemy as sa

    from depeche_nb.engine.executor import Executor

_Named = TypeVar("_Named", "StreamStatus", "SubscriptionStatus")

DEFAULT_PARKED_LIMIT = 20
# Parked messages of one partition a diagnosis lists (the latest).
DIAGNOSIS_PARKED = 5


@_dc.dataclass(frozen=True)
class StreamStatus:
    """One aggregated stream."""

    name: str
    store: str
    wildcards: list[str]
    partitions: int
    projected: int  # messages in all partitions
    # Stored messages matching the wildcards that the projector has neither projected nor
    # dead-lettered, counted up to `UNPROJECTED_CAP` ("more than" beyond).
    unprojected: Count
    checkpoint_updated_at: _dt.datetime | None  # when a projector step last finished
    checkpoint_age: _dt.timedelta | None  # how long ago, by the database's clock
    dead_letters: int  # unresolved messages the projector parked or holds back
    tables_missing: bool = False  # recorded, but its tables are gone (dropped by hand)


@_dc.dataclass(frozen=True)
class PartitionStatus:
    """One partition as a subscription sees it."""

    partition: int
    position: int  # last acknowledged position, -1 before the first
    head: int  # highest projected position, -1 if none
    last_acked_at: _dt.datetime | None
    holder: LockHolder | None  # the session holding the partition's lock right now

    @property
    def lag(self) -> int:
        return self.head - self.position


@_dc.dataclass(frozen=True)
class SubscriptionStatus:
    """One subscription: its partitions, who holds them, its parked messages."""

    name: str
    stream: str
    initialized: bool
    state_table: str | None  # where its positions are; None: no stored state found
    lock_provider: str | None  # whose advisory keys name its partitions; None: unknowable
    partitions: list[PartitionStatus]  # by partition number
    parked_count: int | None  # unresolved parked/ignored messages; None: nothing ever parked
    parked: list[ParkedMessage]  # the oldest unresolved ones, up to the read's limit
    note: str = ""

    @property
    def lag(self) -> int:
        return sum(max(p.lag, 0) for p in self.partitions)

    @property
    def held(self) -> list[int]:
        """The partitions a runner holds right now."""
        return [p.partition for p in self.partitions if p.holder is not None]

    def partition(self, number: int) -> PartitionStatus | None:
        return next((p for p in self.partitions if p.partition == number), None)


@_dc.dataclass(frozen=True)
class OperationsSnapshot(RichRepr):
    """Every recorded aggregated stream and subscription of a database (or of one store), read
    in one snapshot at `read_at` (the database's clock)."""

    database: str
    schema: str
    store: str | None  # None: the whole database
    read_at: _dt.datetime
    streams: list[StreamStatus]
    subscriptions: list[SubscriptionStatus]

    def stream(self, name: str) -> StreamStatus:
        return _by_name(self.streams, name, "aggregated stream")

    def subscription(self, name: str) -> SubscriptionStatus:
        return _by_name(self.subscriptions, name, "subscription")

    def most_behind(self) -> tuple[str, int] | None:
        """(subscription, partition) of the largest lag, None when nothing is behind."""
        behind = [(p.lag, s.name, p.partition) for s in self.subscriptions for p in s.partitions if p.lag > 0]
        if not behind:
            return None
        _, name, partition = min(behind, key=lambda item: (-item[0], item[1], item[2]))
        return name, partition

    def summary(self) -> str:
        where = f"store {self.store!r}" if self.store else f"database {self.database!r}"
        lag = sum(s.lag for s in self.subscriptions)
        return (
            f"{where}: {len(self.streams)} aggregated streams, {len(self.subscriptions)} subscriptions, "
            f"lag {lag}, {sum(s.parked_count or 0 for s in self.subscriptions)} parked"
        )

    def __repr__(self) -> str:
        return f"<OperationsSnapshot {self.summary()}>"


@_dc.dataclass(frozen=True)
class NextMessage:
    """The message a subscription handles next in a partition."""

    position: int
    global_position: int
    message_id: str
    stream: str
    version: int
    message_type: str | None
    added_at: _dt.datetime
    projected_at: _dt.datetime
    age: _dt.timedelta  # since it was written, by the database's clock


@_dc.dataclass(frozen=True)
class PartitionDiagnosis(RichRepr):
    """Why a subscription's partition is (or is not) behind; `reasons()` says it in words."""

    subscription: str
    stream: str
    partition: int
    position: int
    head: int
    initialized: bool
    has_state: bool
    next_message: NextMessage | None
    locks_known: bool
    holder: LockHolder | None
    parked: list[ParkedMessage]  # the partition's latest unresolved ones
    unprojected: Count  # the stream's projection lag
    read_at: _dt.datetime
    # What the Executors of this process know about runners of this subscription.
    workers: list[WorkerHealth] = _dc.field(default_factory=list)
    executor_errors: list[str] = _dc.field(default_factory=list)

    @property
    def lag(self) -> int:
        return self.head - self.position

    def reasons(self) -> list[str]:
        """What the facts say, one finding per line, the most telling first."""
        found: list[str] = []
        if self.head < 0 and self.position < 0:
            found.append(f"partition {self.partition} has no projected messages")
        elif self.lag <= 0:
            found.append(f"not behind: every projected message of partition {self.partition} is acknowledged")
        else:
            found.append(
                f"{self.lag} message{'s' if self.lag != 1 else ''} to handle in partition {self.partition}"
            )
        found += self.executor_errors
        for worker in self.workers:
            if worker.last_error and worker.state in (BACKING_OFF, FAILED):
                found.append(f"a worker of this process is {worker.state}: {worker.last_error}")
        if self.lag > 0:
            if not self.locks_known:
                found.append(
                    "who holds the partition cannot be read: its lock provider is not a DbLockProvider"
                )
            elif self.holder is None:
                found.append(
                    "no runner holds the partition: no worker runs this subscription, or none has "
                    "taken the partition since the messages arrived (runners hold it per batch)"
                )
            else:
                found.append(f"a runner holds the partition: {describe_holder(self.holder)}")
            if self.next_message is not None:
                m = self.next_message
                found.append(
                    f"the next message ({m.stream} v{m.version}, global position {m.global_position}) "
                    f"was written {format_age(m.age)} ago"
                )
        if not self.has_state:
            found.append(
                "no stored state: the subscription has not run yet, or keeps its state outside PostgreSQL"
            )
        if self.parked:
            latest = self.parked[0]
            shown = (
                str(len(self.parked))
                if len(self.parked) < DIAGNOSIS_PARKED
                else f"{DIAGNOSIS_PARKED} or more"
            )
            found.append(
                f"parked in this partition: {shown} (latest at position {latest.position}: "
                f"{latest.error}); parked messages do not hold the partition back, they wait for "
                "Replay or Discard"
            )
        if self.unprojected.value:
            found.append(f"the projector of {self.stream!r} has {self.unprojected} messages to project")
        return found

    def summary(self) -> str:
        return f"{self.subscription} partition {self.partition}: " + "; ".join(self.reasons())

    def __repr__(self) -> str:
        return f"<PartitionDiagnosis {self.summary()}>"


def describe_holder(holder: LockHolder) -> str:
    """A lock holder in words: pid, application_name, client and session start."""
    if holder.state is None and holder.backend_start is None:
        return f"pid {holder.pid} (details hidden from this role: they need pg_read_all_stats)"
    app = holder.application_name or "no application_name"
    since = (
        ""
        if holder.backend_start is None
        else f", session started {holder.backend_start:%Y-%m-%d %H:%M:%S %Z}"
    )
    return f"pid {holder.pid} ({app}) from {holder.client}{since}"


def format_age(age: _dt.timedelta) -> str:
    seconds = max(age.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _by_name(items: Iterable[_Named], name: str, what: str) -> _Named:
    found = [item for item in items if item.name == name]
    if not found:
        raise KeyError(f"no {what} named {name!r} here")
    return found[0]


# -- reading ------------------------------------------------------------------------------------


def check_parked_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ValueError(f"parked_limit must be an int from 1 to 1000, got {limit!r}")
    return limit


def read_operations(
    engine: sa.Engine,
    store: str | None = None,
    *,
    known: Mapping[str, Subscription[Any]] | None = None,
    parked_limit: int = DEFAULT_PARKED_LIMIT,
) -> OperationsSnapshot:
    """Every recorded aggregated stream (of `store`, if given) and subscription on them, in
    one read-only snapshot (see the module notes); `known`: `Subscription` objects by name,
    whose lock and state providers are then used instead of the defaults."""
    limit = check_parked_limit(parked_limit)
    with _snapshot(engine) as cursor:
        database, schema, read_at = _where(cursor)
        if not definitions_table.exists(cursor):
            return OperationsSnapshot(database, schema, store, read_at, [], [])
        streams = [
            _stream_status(cursor, name, owner, definition, read_at)
            for name, owner, definition in definitions_table.recorded(cursor, AGGREGATED_STREAM, store)
        ]
        by_stream = {s.name: s for s in streams}
        recorded = [
            (name, owner)
            for name, owner, _ in definitions_table.recorded(cursor, SUBSCRIPTION)
            if store is None or owner in by_stream
        ]
        catalog = StateTableCatalog(cursor)
        catalog.locate([name for name, _ in recorded])
        positions = [
            _positions(cursor, name, by_stream.get(owner), catalog, known) for name, owner in recorded
        ]
        # Every partition of every subscription in one look at pg_locks.
        holders = lock_holders(cursor, sorted({key for found in positions for key in found.keys.values()}))
        subscriptions = [
            _subscription_status(cursor, name, owner, found, holders, limit)
            for (name, owner), found in zip(recorded, positions, strict=True)
        ]
    return OperationsSnapshot(database, schema, store, read_at, streams, subscriptions)


def check_partition(partition: object) -> int:
    if isinstance(partition, bool) or not isinstance(partition, numbers.Integral):
        raise TypeError(f"partition must be an int, got {type(partition).__name__}")
    if partition < 0:
        raise ValueError(f"partition must be >= 0, got {partition}")
    return int(partition)


def diagnose_partition(
    engine: sa.Engine,
    subscription: str,
    partition: int,
    *,
    known: Mapping[str, Subscription[Any]] | None = None,
    executors: Iterable[Executor] = (),
) -> PartitionDiagnosis:
    """Why `partition` of `subscription` is behind (see the module notes); `KeyError` if no
    subscription of that name is recorded."""
    if not isinstance(subscription, str):
        raise TypeError(
            f"subscription must be a subscription's name (str), got {type(subscription).__name__}"
        )
    number = check_partition(partition)
    with _snapshot(engine) as cursor:
        _, _, read_at = _where(cursor)
        owner = _recorded_stream(cursor, subscription)
        streams = {
            name: (store, d) for name, store, d in definitions_table.recorded(cursor, AGGREGATED_STREAM)
        }
        store, definition = streams.get(owner, (None, {}))
        status = None if store is None else _stream_status(cursor, owner, store, definition, read_at)
        found = _positions(cursor, subscription, status, StateTableCatalog(cursor), known)
        position, head = next(((row[1], row[2]) for row in found.rows if row[0] == number), (-1, -1))
        holder = None
        if found.lock_provider is not None:
            key = advisory_key(found.lock_provider, partition_lock_name(subscription, number))
            holder = lock_holders(cursor, [key]).get(key)
        next_message = None
        if store is not None and status is not None and not status.tables_missing and head > position:
            next_message = _message_at(
                cursor, StreamNames(owner, StoreNames(store)), number, position + 1, read_at
            )
        parked = ParkedTable(subscription)
        latest: list[ParkedMessage] = []
        if tables_exist(cursor, parked.table):
            cursor.execute(parked.partition_unresolved_sql, (number, DIAGNOSIS_PARKED))
            latest = [parked_from_row(row) for row in cursor.fetchall()]
    workers, errors = _in_process(executors, subscription)
    return PartitionDiagnosis(
        subscription=subscription,
        stream=owner,
        partition=number,
        position=position,
        head=head,
        initialized=found.initialized,
        has_state=found.state_table is not None,
        next_message=next_message,
        locks_known=found.lock_provider is not None,
        holder=holder,
        parked=latest,
        unprojected=Count(0) if status is None else status.unprojected,
        read_at=read_at,
        workers=workers,
        executor_errors=errors,
    )


@contextlib.contextmanager
def _snapshot(engine: sa.Engine) -> Iterator[Any]:
    """A cursor inside one REPEATABLE READ READ ONLY transaction, rolled back at the end: the
    parts of a read agree with each other, and nothing can be written by mistake."""
    with autocommit_cursor(engine) as cursor:
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield cursor
        finally:
            if not cursor.connection.closed:
                cursor.execute("ROLLBACK")


def _where(cursor: Any) -> tuple[str, str, _dt.datetime]:
    cursor.execute("SELECT current_database(), current_schema(), now()")
    database, schema, now = cursor.fetchone()
    return str(database), str(schema), now


def _recorded_stream(cursor: Any, subscription: str) -> str:
    names = (
        {name: owner for name, owner, _ in definitions_table.recorded(cursor, SUBSCRIPTION)}
        if definitions_table.exists(cursor)
        else {}
    )
    if subscription not in names:
        raise KeyError(
            f"no subscription named {subscription!r} is recorded in this schema "
            f"(recorded: {', '.join(sorted(names)) or 'none'})"
        )
    return names[subscription]


def _projection_lag(cursor: Any, views: StreamViews, wildcards: list[str]) -> Count:
    """The stream's projection lag: its projector's backlog, read in proportion to itself and
    counted up to `UNPROJECTED_CAP` (as the stream's repr counts it)."""
    return Count.capped(views.unprojected_count_in(cursor, wildcards, UNPROJECTED_CAP + 1), UNPROJECTED_CAP)


def _stream_status(
    cursor: Any, name: str, store: str, definition: Any, read_at: _dt.datetime
) -> StreamStatus:
    wildcards = [str(w) for w in (definition or {}).get("wildcards", [])]
    names = StreamNames(name, StoreNames(store))
    tables = (names.table, names.heads_table, names.checkpoint_table, DeadLetterTable(name).name)
    if not tables_exist(cursor, *(quote_ident(t) for t in (*tables, names.store.messages_table))):
        return StreamStatus(name, store, wildcards, 0, 0, Count(0), None, None, 0, tables_missing=True)
    views = StreamViews(names)
    cursor.execute(views.status_sql)
    partitions, projected, updated_at, dead_letters = cursor.fetchone()
    return StreamStatus(
        name=name,
        store=store,
        wildcards=wildcards,
        partitions=int(partitions),
        projected=int(projected),
        unprojected=_projection_lag(cursor, views, wildcards),
        checkpoint_updated_at=updated_at,
        checkpoint_age=None if updated_at is None else read_at - updated_at,
        dead_letters=int(dead_letters),
    )


@_dc.dataclass(frozen=True)
class _Found:
    """A subscription's partitions as read: rows of (partition, position, head, last ack)."""

    rows: list[tuple[int, int, int, _dt.datetime | None]]
    initialized: bool
    state_table: str | None  # None: no stored state found
    lock_provider: str | None  # None: not a DbLockProvider, holders unknowable
    keys: dict[int, int]  # partition -> the advisory key of its lock


def _positions(
    cursor: Any,
    name: str,
    stream: StreamStatus | None,
    catalog: StateTableCatalog,
    known: Mapping[str, Subscription[Any]] | None,
) -> _Found:
    subscription = (known or {}).get(name)
    lock_provider: str | None = name
    custom_state = None
    tables: list[StateTable] | None = None  # unknown: wherever the catalog finds its rows
    if subscription is not None:
        locks = subscription.lock_provider
        lock_provider = locks.name if isinstance(locks, DbLockProvider) else None
        state = subscription.state_provider
        if isinstance(state, DbSubscriptionStateProvider):
            tables = [StateTable(state.name)]
        else:
            tables, custom_state = [], state
    held = catalog.holding(name, tables)
    table, initialized = held if held is not None else (None, False)
    rows: list[tuple[int, int, int, _dt.datetime | None]] = []
    if stream is not None and not stream.tables_missing:
        names = StreamNames(stream.name, StoreNames(stream.store))
        if table is not None:
            cursor.execute(table.positions_sql(quote_ident(names.heads_table)), (name,))
            rows = [(int(p), int(position), int(head), at) for p, position, head, at in cursor.fetchall()]
        else:
            # No stored state: the heads alone, positions from a state provider kept outside
            # PostgreSQL (asked directly), else -1 (nothing acknowledged).
            stored: Mapping[int, int] = {}
            if custom_state is not None:
                stored = custom_state.read(name).positions
                initialized = bool(custom_state.initialized(name))
            cursor.execute(StreamStatements(names).heads_sql)
            heads = {int(p): int(head) for p, head in cursor.fetchall()}
            rows = [(p, stored.get(p, -1), heads.get(p, -1), None) for p in sorted(set(heads) | set(stored))]
    keys = (
        {}
        if lock_provider is None
        else {row[0]: advisory_key(lock_provider, partition_lock_name(name, row[0])) for row in rows}
    )
    state_table = table.name if table is not None else None
    return _Found(rows, initialized, state_table, lock_provider, keys)


def _subscription_status(
    cursor: Any, name: str, stream: str, found: _Found, holders: Mapping[int, LockHolder], limit: int
) -> SubscriptionStatus:
    partitions = [
        PartitionStatus(p, position, head, acked_at, holders.get(found.keys[p]) if p in found.keys else None)
        for p, position, head, acked_at in found.rows
    ]
    parked = ParkedTable(name)
    count, first = None, []
    # The parked table exists only once something was parked; a display must not create it.
    if tables_exist(cursor, parked.table):
        cursor.execute(parked.count_unresolved_sql)
        count = int(cursor.fetchone()[0])
        cursor.execute(parked.first_unresolved_sql, (limit,))
        first = [parked_from_row(row) for row in cursor.fetchall()]
    note = ""
    if found.state_table is None:
        note = "no stored state: not started yet, or its state is kept outside PostgreSQL"
    if found.lock_provider is None:
        note = (
            note + "; " if note else ""
        ) + "lock holders unknown: its lock provider is not a DbLockProvider"
    return SubscriptionStatus(
        name=name,
        stream=stream,
        initialized=found.initialized,
        state_table=found.state_table,
        lock_provider=found.lock_provider,
        partitions=partitions,
        parked_count=count,
        parked=first,
        note=note,
    )


def _message_at(
    cursor: Any, names: StreamNames, partition: int, position: int, read_at: _dt.datetime
) -> NextMessage | None:
    cursor.execute(StreamViews(names).at_position_sql, (partition, position))
    row = cursor.fetchone()
    if row is None:
        return None
    global_position, message_id, stream, version, added_at, projected_at = row
    # The type from the store's row, by the unique message id.
    cursor.execute(MessagesViews(names.store, TYPE_KEY).trace_sql, (TYPE_KEY, message_id))
    stored = cursor.fetchone()
    return NextMessage(
        position=position,
        global_position=int(global_position),
        message_id=str(message_id),
        stream=stream,
        version=int(version),
        message_type=None if stored is None else stored[4],
        added_at=added_at,
        projected_at=projected_at,
        age=read_at - added_at,
    )


def _in_process(executors: Iterable[Executor], subscription: str) -> tuple[list[WorkerHealth], list[str]]:
    """The health of this process's workers that run `subscription`, and the errors with
    which its runners stopped an executor."""
    workers, errors = [], []
    for executor in executors:
        for handler in executor.handlers:
            owner = getattr(handler, "subscription", None)
            if not isinstance(owner, Subscription) or owner.name != subscription:
                continue
            health = executor.worker_health(handler)
            if health is not None:
                workers.append(health)
            errors += [
                f"its runner stopped an Executor of this process: {type(error).__name__}: {error}"
                for failed, error in executor.errors
                if failed is handler
            ]
    return workers, errors


__all__ = [
    "DEFAULT_PARKED_LIMIT",
    "NextMessage",
    "OperationsSnapshot",
    "PartitionDiagnosis",
    "PartitionStatus",
    "StreamStatus",
    "SubscriptionStatus",
    "check_partition",
    "describe_holder",
    "diagnose_partition",
    "format_age",
    "read_operations",
]

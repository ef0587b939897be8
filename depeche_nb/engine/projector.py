"""The stream projector: assigns every matching stored message to a partition, exactly once.

How it stays exact without a look-back window
---------------------------------------------
Every message row carries `txid`, the id of the transaction that wrote it.
The projector's checkpoint is a PostgreSQL snapshot `seen`: every matching
message visible in `seen` has been projected, and nothing else has.

A round takes a new snapshot `pending` and projects
``D = {rows visible in pending} \\ {rows visible in seen}`` in global-position
order, then sets ``seen := pending``.

* Nothing is skipped. Snapshots only grow: a transaction visible in `seen`
  committed before `pending` was taken, so it is visible there too. A row
  committed at any time, however late or long its transaction ran, is
  invisible in some checkpoint and visible in a later one, so it falls into
  exactly one D. A row of a transaction that rolls back is never visible.
* Nothing is projected twice: the D of successive rounds are disjoint by
  construction, and the stream table is keyed by global position as a backstop.
* Origin-stream order is kept: version v+1 of a stream is written only after
  the writer of v committed *and released the stream lock*, which PostgreSQL
  does after removing it from the running set. So any snapshot showing v+1
  shows v: v is never in a later D than v+1, and inside one D the rows are
  ordered by global position, which increases with version in a stream.
* Reading only D is cheap: a row is invisible in `seen` exactly when its
  txid is >= `pg_snapshot_xmax(seen)` or in `pg_snapshot_xip(seen)`, which an
  index on txid answers; a long-open transaction only stays in `xip` and
  never holds back the rows of others.
* Steps may stop inside a D: the checkpoint then also holds `pending` and the
  global position up to which D was done (`pending_after`), and the next step
  continues there before taking a new snapshot.

Durability: a step commits asynchronously (no wait for the WAL flush), which
keeps a flush off the write-to-handler path. It is safe: a server crash can
only lose a step whose rows nobody depended on, because a subscription that
acknowledged any of its positions did so in a later, synchronous commit, and
flushing that commit flushes the WAL before it, the step included. A lost
step is simply redone (its checkpoint is lost with it).

One projector at a time: each step runs in one transaction that first takes
a transaction-level advisory lock with `pg_try_advisory_xact_lock`; a
projector that does not get it returns at once with `locked=True`. Positions
continue from the `heads` table, read after the lock, so they stay gapless.
"""

from __future__ import annotations

import collections
import dataclasses as _dc
import datetime as _dt
import numbers
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from depeche_nb.core.display import RichRepr
from depeche_nb.core.errors import DepecheError
from depeche_nb.core.identifiers import check_positive_int
from depeche_nb.core.interfaces import (
    MessagePartitioner,
    RunOnNotificationResult,
    TimeBudget,
)
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.notification_driven import NotificationDriven
from depeche_nb.engine.progress import open_progress
from depeche_nb.engine.report_frames import records_dataframe
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.postgres.stream_tables import StreamStatements
from depeche_nb.store.message_store import to_stored_message

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.aggregated_stream import AggregatedStream

E = TypeVar("E")

DEFAULT_BATCH_SIZE = 1000
_MAX_PARTITION = 2**31 - 1


class PartitionerError(DepecheError, ValueError):
    """The partitioner raised or returned something that is not an int >= 0."""


@_dc.dataclass(frozen=True)
class ProjectedMessage:
    """One message placed into a partition by a projector step."""

    message_id: uuid.UUID
    origin_stream: str
    version: int
    global_position: int
    partition: int
    position: int


@_dc.dataclass
class ProjectionReport(RichRepr):
    """What one projector step (or run) moved."""

    stream_name: str
    projected: list[ProjectedMessage] = _dc.field(default_factory=list)
    more_available: bool = False
    locked: bool = False
    # The step finished a stored continuation (see `_step`): commits after its
    # snapshot may be waiting, so "nothing more" is only known after another step.
    continued: bool = False

    @property
    def caught_up(self) -> bool:
        """Nothing was left when this step's snapshot was taken, and it was fresh
        (`summary()` says "caught up" for any step that emptied its snapshot)."""
        return not (self.locked or self.more_available or self.continued)

    def __len__(self) -> int:
        return len(self.projected)

    def to_dataframe(self) -> pd.DataFrame:
        return records_dataframe(
            self.projected, ProjectedMessage, ("version", "global_position", "partition", "position")
        )

    def summary(self) -> str:
        if self.locked:
            return f"{self.stream_name}: another projector is running; nothing done"
        state = "more to project" if self.more_available else "caught up"
        return f"{self.stream_name}: projected {len(self.projected)} message(s), {state}"

    def __repr__(self) -> str:
        return f"<ProjectionReport {self.summary()}>"


class FullUpdateResult(NamedTuple):
    n_updated_messages: int
    more_messages_available: bool


def _validate_partition(value: object, message: StoredMessage[Any]) -> int:
    if type(value) is int and 0 <= value <= _MAX_PARTITION:
        return value  # the common case, checked without building any error text
    where = (
        f"message {message.message_id} (stream {message.stream!r}, version {message.version}, "
        f"global position {message.global_position})"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PartitionerError(
            f"the partitioner returned {value!r} ({type(value).__name__}) for {where}; "
            "it must return an int >= 0"
        )
    partition = int(value)
    if partition < 0 or partition > _MAX_PARTITION:
        raise PartitionerError(
            f"the partitioner returned {partition} for {where}; it must be between 0 and {_MAX_PARTITION}"
        )
    return partition


def _as_utc(moment: _dt.datetime) -> _dt.datetime:
    # Naive message times (e.g. datetime.utcnow()) are taken as UTC.
    return moment.replace(tzinfo=_dt.timezone.utc) if moment.tzinfo is None else moment


class StreamProjector(NotificationDriven, Generic[E]):
    """Projects the store's matching messages into the aggregated stream's partitions."""

    def __init__(
        self,
        stream: AggregatedStream[E],
        partitioner: MessagePartitioner[E],
        stream_wildcards: list[str],
        batch_size: int | None = None,
        lookback_for_gaps_hours: int | None = None,
    ) -> None:
        # `lookback_for_gaps_hours` is accepted for Depeche DB compatibility and
        # ignored: projection is exact, there is no look-back window to size.
        del lookback_for_gaps_hours
        self.stream = stream
        self.partitioner = partitioner
        self.stream_wildcards = list(stream_wildcards)
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self._sql = StreamStatements(stream.names)
        self._reads = stream.store._storage.statements
        self._keep_running = True

    # -- RunOnNotification --------------------------------------------------------------------

    @property
    def notification_channel(self) -> str:
        return self.stream.store_channel

    def run(
        self, budget: TimeBudget | None = None, *, progress: bool | None = None
    ) -> RunOnNotificationResult:
        """Project until caught up (or the budget is spent).

        `progress`: show a tqdm bar over the backlog (True), never (False), or
        only in a notebook with more than 1,000 messages waiting (None).
        """
        bar = open_progress(progress, self._backlog, f"projecting {self.stream.name}")
        self._keep_running = True
        try:
            while self._keep_running:
                report = self.step(self.batch_size)
                if bar is not None:
                    bar.update(len(report))
                if report.locked or report.caught_up:
                    return RunOnNotificationResult.DONE_FOR_NOW
                if budget is not None and budget.over_budget():
                    return RunOnNotificationResult.WORK_REMAINING
            return RunOnNotificationResult.DONE_FOR_NOW
        finally:
            if bar is not None:
                bar.close()

    def _backlog(self) -> int:
        # Lazy: the count is only needed when a progress bar may be shown.
        from depeche_nb.engine.frames import unprojected_count

        return unprojected_count(self.stream)

    def update_full(self, budget: TimeBudget | None = None) -> FullUpdateResult:
        total, more = 0, False
        while True:
            report = self.step(self.batch_size)
            total += len(report)
            more = report.more_available or report.continued
            if report.locked or not more or (budget is not None and budget.over_budget()):
                return FullUpdateResult(total, more)

    # -- stepping -----------------------------------------------------------------------------

    def step(self, max_messages: int | None = None) -> ProjectionReport:
        """Project at most `max_messages` messages in one transaction and report what moved."""
        limit = self.batch_size if max_messages is None else check_positive_int("max_messages", max_messages)
        report = ProjectionReport(self.stream.name)
        with autocommit_cursor(self.stream.engine) as cursor:
            try:
                self._step(cursor, limit, report)
            except BaseException:
                if not cursor.connection.closed:
                    cursor.execute("ROLLBACK")
                raise
        return report

    def _step(self, cursor: Any, limit: int, report: ProjectionReport) -> None:
        cursor.execute(self._sql.projector_lock_sql)
        if not cursor.fetchone()[0]:
            cursor.execute("ROLLBACK")
            report.locked = True
            return
        cursor.execute(self._sql.checkpoint_sql)
        seen, pending, after, seen_xmax, seen_xip = cursor.fetchone()
        # A stored continuation is the only way `after` is not 0 (global positions start at 1).
        report.continued = after > 0
        params = {
            "after": after,
            "pending": pending,
            "wildcards": self.stream_wildcards,
            "limit": limit + 1,
            "seen_xmax": seen_xmax,
            "seen_xip": seen_xip,
        }
        reads = self._reads
        cursor.execute(reads.projection_first_sql if seen is None else reads.projection_delta_sql, params)
        rows = cursor.fetchall()
        report.more_available = len(rows) > limit
        rows = rows[:limit]
        if rows:
            self._project(cursor, rows, report)
        if report.more_available:
            advance = {"seen": seen, "pending": pending, "after": rows[-1][4]}
        else:
            advance = {"seen": pending, "pending": None, "after": None}
        cursor.execute(self._sql.advance_sql, advance)

    def _project(self, cursor: Any, rows: Sequence[Any], report: ProjectionReport) -> None:
        serializer = self.stream.store.serializer
        get_partition = self.partitioner.get_partition
        columns: dict[str, list[Any]] = collections.defaultdict(list)
        message_ids: list[uuid.UUID] = []
        for row in rows:
            stored: StoredMessage[E] = to_stored_message(row, serializer)
            try:
                partition = get_partition(stored)
            except Exception as exc:
                raise PartitionerError(
                    f"the partitioner raised {type(exc).__name__}: {exc} for message "
                    f"{stored.message_id} (stream {stored.stream!r}, version {stored.version}, "
                    f"global position {stored.global_position}); nothing of this batch was projected"
                ) from exc
            columns["partitions"].append(_validate_partition(partition, stored))
            columns["gps"].append(stored.global_position)
            columns["ids"].append(row[0])  # the id column as the database sent it
            message_ids.append(stored.message_id)
            columns["streams"].append(stored.stream)
            columns["versions"].append(stored.version)
            columns["occurred"].append(_as_utc(stored.message.get_message_time()))  # type: ignore[attr-defined]
            columns["added_utc"].append(stored.added_at)  # naive UTC, see store.storage
        cursor.execute(self._sql.project_sql, {**columns, "channel": self.stream.names.channel})
        placed = {gp: (partition, position) for gp, partition, position in cursor.fetchall()}
        for gp, message_id, stream, version in zip(
            columns["gps"], message_ids, columns["streams"], columns["versions"], strict=True
        ):
            partition, position = placed[gp]
            report.projected.append(ProjectedMessage(message_id, stream, version, gp, partition, position))

    def __repr__(self) -> str:
        return f"StreamProjector(stream={self.stream.name!r}, wildcards={self.stream_wildcards!r})"


__all__ = [
    "FullUpdateResult",
    "PartitionerError",
    "ProjectedMessage",
    "ProjectionReport",
    "StreamProjector",
]

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

Tied to its cluster: transaction ids are only meaningful in the cluster that
issued them. After a dump/restore or a logical-replication move into another
cluster, new transactions get ids unrelated to (typically smaller than) the
stored ones, and a snapshot test would take every new message as already
seen. The checkpoint therefore records the cluster's `system_identifier`
(kept by physical replicas and fail-over, new for another cluster); a step on
another cluster raises `CheckpointClusterError` and projects nothing.
`reanchor()` is the explicit fix: the messages' foreign transaction ids
become "committed before every snapshot", the snapshots are forgotten, and
the next rounds project every visible message not already in the stream
table, found by its global position, so nothing is projected twice or lost.

Messages it cannot read: a payload that does not deserialise (a changed
model) or a message the partitioner fails on is parked as a dead letter
(`postgres.dead_letter_table`) with its error, and the later messages of its
origin stream are held behind it, so a stream is never projected out of
order while every other stream flows on. Dead letters are part of the rounds'
D like any row (the checkpoint moves past them); `replay_dead_letters()` and
`skip_dead_letter()` resolve them under the projector's lock.

One projector at a time: each step runs in one transaction that first takes
a transaction-level advisory lock with `pg_try_advisory_xact_lock`; a
projector that does not get it returns at once with `locked=True`. Positions
continue from the `heads` table, read after the lock, so they stay gapless.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses as _dc
import datetime as _dt
import json
import logging
import numbers
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from depeche_nb.core.display import RichRepr, run_view
from depeche_nb.core.errors import (
    CheckpointClusterError,
    DefinitionChangedError,
    PartitionerError,
)
from depeche_nb.core.identifiers import check_positive_int
from depeche_nb.core.interfaces import (
    MessagePartitioner,
    RunOnNotificationResult,
    TimeBudget,
)
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.definitions import definition_text, describe_definition
from depeche_nb.engine.notification_driven import NotificationDriven
from depeche_nb.engine.progress import open_progress
from depeche_nb.postgres.dead_letter_table import HELD, PARKED, REPLAYED, SKIPPED
from depeche_nb.postgres.driver import script_value
from depeche_nb.postgres.names import text_array_literal
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.postgres.stream_tables import StreamStatements
from depeche_nb.store.reading import stored_message_decoder

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.protocols import StreamSource

E = TypeVar("E")
logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
_MAX_PARTITION = 2**31 - 1


# slots: a catch-up run's report holds one of these per message.
@_dc.dataclass(frozen=True, slots=True)
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
    dead_lettered: int = 0  # messages parked or held back (see `StreamProjector._project`)
    # The step finished a stored continuation (see `_step`): commits after its
    # snapshot may be waiting, so "nothing more" is only known after another step.
    continued: bool = False
    # The new head of every partition the step projected into.
    heads: dict[int, int] = _dc.field(default_factory=dict)

    @property
    def caught_up(self) -> bool:
        """Nothing was left when this step's snapshot was taken, and it was fresh
        (`summary()` says "caught up" for any step that emptied its snapshot)."""
        return not (self.locked or self.more_available or self.continued)

    def __len__(self) -> int:
        return len(self.projected)

    def to_dataframe(self) -> pd.DataFrame:
        return run_view("projection_report", self)  # type: ignore[no-any-return]

    def summary(self) -> str:
        if self.locked:
            return f"{self.stream_name}: another projector is running; nothing done"
        state = "more to project" if self.more_available else "caught up"
        dead = f", {self.dead_lettered} dead-lettered" if self.dead_lettered else ""
        return f"{self.stream_name}: projected {len(self.projected)} message(s){dead}, {state}"

    def __repr__(self) -> str:
        return f"<ProjectionReport {self.summary()}>"


@_dc.dataclass(frozen=True)
class _Placement(Generic[E]):
    """A row read and partitioned, ready to insert."""

    stored: StoredMessage[E]
    partition: int
    occurred: _dt.datetime


def _add_letter(letters: dict[str, list[Any]], row: Sequence[Any], status: str, error: str | None) -> None:
    # Row columns in `messages_table.ROW_COLUMNS` order.
    for key, value in (("gps", row[4]), ("ids", row[0]), ("streams", row[1]), ("versions", row[2])):
        letters[key].append(value)
    letters["statuses"].append(status)
    letters["errors"].append(error)


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


def _columns(placed: Sequence[_Placement[Any]]) -> dict[str, str]:
    """The insert's parameters: global positions, partitions and message times, each as one
    comma-separated text (see `postgres.stream_tables.projector_functions_ddl`)."""
    return {
        "gps": ",".join([str(p.stored.global_position) for p in placed]),
        "partitions": ",".join([str(p.partition) for p in placed]),
        "occurred": ",".join([p.occurred.isoformat() for p in placed]),
    }


def _parse_heads(text: str | None) -> dict[int, int]:
    """'partition:head,...' (the projector's commit function) as {partition: head}."""
    heads = {}
    for item in (text or "").split(","):
        if item:
            partition, head = item.split(":")
            heads[int(partition)] = int(head)
    return heads


class StreamProjector(NotificationDriven, Generic[E]):
    """Projects the store's matching messages into the aggregated stream's partitions."""

    def __init__(
        self,
        stream: StreamSource[E],
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
        self.definition = definition_text(self.stream_wildcards, partitioner)
        self._sql = StreamStatements(stream.names)
        self._reads = stream.store._storage.statements
        self._keep_running = True
        self._step_listeners: list[Callable[[dict[int, int]], None]] = []
        # As one text[] literal: a str is quoted once, where psycopg 3 dumps a list in Python.
        self._wildcards = text_array_literal(self.stream_wildcards)

    # -- RunOnNotification --------------------------------------------------------------------

    @property
    def notification_channel(self) -> str:
        return self.stream.store_channel

    @property
    def handoff_channel(self) -> str:
        """The channel this projector's steps notify (the aggregated stream's): an Executor
        that also runs handlers of that channel hands them each step's partitions directly
        (see `add_step_listener`, `SubscriptionRunner.take_handoff`)."""
        return self.stream.notification_channel

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
        if report.heads:  # committed
            for listener in list(self._step_listeners):
                listener(report.heads)
        return report

    def _step(self, cursor: Any, limit: int, report: ProjectionReport) -> None:
        # Two round trips (see `postgres.stream_tables.projector_functions_ddl`): lock,
        # checkpoint and rows in one; insert, heads, notifications, checkpoint and commit
        # in the other.
        cursor.execute(self._sql.project_begin_sql, {"wildcards": self._wildcards, "limit": limit + 1})
        rows = cursor.fetchall()
        if rows[0][1] == "locked":
            cursor.execute("ROLLBACK")
            report.locked = True
            return
        seen, pending, after, cluster, current_cluster, _, blocked, made_under = json.loads(rows[0][3])
        rows = rows[1:]
        # A stored continuation is the only way `after` is not 0 (global positions start at 1).
        report.continued = after > 0
        if cluster is not None and cluster != current_cluster:
            cursor.execute("ROLLBACK")
            raise CheckpointClusterError(
                f"the checkpoint of aggregated stream {self.stream.name!r} holds transaction ids of "
                f"another PostgreSQL cluster (system identifier {cluster}; this one is "
                f"{current_cluster}): the database was restored from a dump or moved by logical "
                "replication. Nothing was projected. Once the move is complete, run "
                f"`{self.stream.name}.projector.reanchor()` to rebuild the checkpoint from the "
                "messages already projected"
            )
        if made_under is not None and made_under != self.definition:
            cursor.execute("ROLLBACK")
            raise DefinitionChangedError(
                f"aggregated stream {self.stream.name!r} was rebuilt under another definition "
                f"({describe_definition(made_under)}); this projector partitions by "
                f"{describe_definition(self.definition)}. Nothing was projected. Create the "
                "aggregated stream again with its current definition (restart workers that run "
                "the old code)"
            )
        report.more_available = len(rows) > limit
        rows = rows[:limit]
        placed = self._project(cursor, rows, report, set(blocked)) if rows else []
        if report.more_available:
            advance = {"seen": seen, "pending": pending, "after": rows[-1][4]}
        else:
            advance = {"seen": pending, "pending": None, "after": None}
        columns = _columns(placed)
        if self._step_listeners:
            # Runners in this process would decode these same messages again (see
            # `engine.decoded`). Before the commit, so that a runner reading the new rows
            # as soon as they are visible finds them; a message is the same whether or
            # not this step commits.
            self.stream.recently_decoded.add(p.stored for p in placed)
        heads = script_value(
            cursor.connection,
            self._sql.project_commit_sql,
            (
                columns["gps"],
                columns["partitions"],
                columns["occurred"],
                self.stream.names.channel,
                advance["seen"],
                advance["pending"],
                advance["after"],
                current_cluster,
                self.definition,
            ),
        )
        report.heads = _parse_heads(heads)
        self._report_positions(placed, report.heads, report)

    def reanchor(self) -> None:
        """Rebuild the checkpoint on this cluster after the database moved to another one
        (dump/restore, logical replication), see `CheckpointClusterError` and the module
        docstring. Waits for a step in flight; run it once the move is complete (rows still
        arriving with the old cluster's transaction ids would need another re-anchoring)."""
        with autocommit_cursor(self.stream.engine) as cursor:
            cursor.execute("BEGIN")
            try:
                cursor.execute(self._sql.projector_wait_lock_sql)
                cursor.execute(self._reads.retire_foreign_txids_sql)
                cursor.execute(self._sql.reanchor_sql)
                cursor.execute("COMMIT")
            except BaseException:
                if not cursor.connection.closed:
                    cursor.execute("ROLLBACK")
                raise

    def _project(
        self, cursor: Any, rows: Sequence[Any], report: ProjectionReport, blocked: set[str]
    ) -> list[_Placement[E]]:
        """Read and partition `rows` for the insert, except those that cannot be read or
        partitioned: each of these becomes a parked dead letter (inserted here) and holds
        back the later rows of its origin stream (`blocked`, updated), so no stream is
        projected out of order."""
        placed: list[_Placement[E]] = []
        letters: dict[str, list[Any]] = collections.defaultdict(list)
        decode = stored_message_decoder(self.stream.store.serializer)
        for row in rows:
            stream = row[1]
            if stream in blocked:
                _add_letter(letters, row, HELD, None)
                continue
            try:
                placed.append(self._place(decode, row))
            except Exception as exc:  # the policy: any failure here parks the message
                blocked.add(stream)
                _add_letter(letters, row, PARKED, f"{type(exc).__name__}: {exc}")
                logger.warning(
                    "%s: parked message %s (stream %r, version %s, global position %s) as a dead "
                    "letter, holding its stream: %s: %s",
                    self.stream.name,
                    row[0],
                    stream,
                    row[2],
                    row[4],
                    type(exc).__name__,
                    exc,
                )
        if letters:
            cursor.execute(self._sql.dead_letters.insert_sql, letters)
            report.dead_lettered += len(letters["gps"])
        return placed

    def _place(
        self, decode: Callable[[Sequence[Any]], StoredMessage[E]], row: Sequence[Any]
    ) -> _Placement[E]:
        """Deserialise and partition one row (raises what went wrong)."""
        stored = decode(row)
        try:
            partition = self.partitioner.get_partition(stored)
        except Exception as exc:
            raise PartitionerError(
                f"the partitioner raised {type(exc).__name__}: {exc} for message "
                f"{stored.message_id} (stream {stored.stream!r}, version {stored.version}, "
                f"global position {stored.global_position})"
            ) from exc
        occurred = _as_utc(stored.message.get_message_time())  # type: ignore[attr-defined]
        return _Placement(stored, _validate_partition(partition, stored), occurred)

    def _insert(self, cursor: Any, placed: Sequence[_Placement[E]], report: ProjectionReport) -> None:
        """Insert `placed` in the caller's transaction, without moving the checkpoint."""
        cursor.execute(
            self._sql.project_insert_sql, {**_columns(placed), "channel": self.stream.names.channel}
        )
        heads = _parse_heads(cursor.fetchone()[0])
        self._report_positions(placed, heads, report)

    @staticmethod
    def _report_positions(
        placed: Sequence[_Placement[E]], heads: dict[int, int], report: ProjectionReport
    ) -> None:
        """Each placed message's position, from its partition's new head: the insert numbers
        a partition's new rows consecutively in global-position order (`placed`'s order)
        after the old head, so the last of them is at the new head."""
        counts = collections.Counter(p.partition for p in placed)
        following = {partition: heads[partition] - n + 1 for partition, n in counts.items()}
        for p in placed:
            stored = p.stored
            position = following[p.partition]
            following[p.partition] = position + 1
            report.projected.append(
                ProjectedMessage(
                    stored.message_id,
                    stored.stream,
                    stored.version,
                    stored.global_position,
                    p.partition,
                    position,
                )
            )

    def add_step_listener(self, listener: Callable[[dict[int, int]], None]) -> None:
        """Call `listener({partition: new head})` after every step that projected something,
        once its transaction committed (an Executor hands the partitions to its runners)."""
        self._step_listeners.append(listener)

    def remove_step_listener(self, listener: Callable[[dict[int, int]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._step_listeners.remove(listener)
        if not self._step_listeners:
            # Nobody left in this process to take them.
            self.stream.recently_decoded.clear()

    # -- dead letters -------------------------------------------------------------------------

    def dead_letters_dataframe(self, include_resolved: bool = False) -> pd.DataFrame:
        """The messages this projector could not read or partition (`parked`, with the error)
        and those held behind them in their origin stream (`held`); with `include_resolved`
        also the `replayed` and `skipped` ones."""
        return run_view("dead_letters", self.stream, include_resolved)  # type: ignore[no-any-return]

    def replay_dead_letters(self, origin_stream: str | None = None) -> ProjectionReport:
        """Project the dead letters of `origin_stream` (default: of every stream) now, in
        order, e.g. after fixing the model or the partitioner; a stream stops at its first
        message that still fails, which stays parked with the new error."""
        return self._resolving(lambda cursor, report: self._replay(cursor, origin_stream, report))

    def skip_dead_letter(self, global_position: int) -> ProjectionReport:
        """Give up on one dead letter for good (it is never projected; the row stays as a
        record), then replay the messages its origin stream held behind it."""
        check_positive_int("global_position", global_position)

        def skip(cursor: Any, report: ProjectionReport) -> None:
            letters = self._sql.dead_letters
            cursor.execute(letters.resolve_sql, (SKIPPED, [global_position]))
            if cursor.rowcount != 1:
                raise KeyError(f"no unresolved dead letter at global position {global_position}")
            cursor.execute(letters.stream_of_sql, (global_position,))
            self._replay(cursor, cursor.fetchone()[0], report)

        return self._resolving(skip)

    def _resolving(self, work: Callable[[Any, ProjectionReport], None]) -> ProjectionReport:
        # Under the projector's lock (waiting for a step in flight), in one transaction.
        report = ProjectionReport(self.stream.name)
        with autocommit_cursor(self.stream.engine) as cursor:
            cursor.execute("BEGIN")
            try:
                cursor.execute(self._sql.projector_wait_lock_sql)
                work(cursor, report)
                cursor.execute("COMMIT")
            except BaseException:
                if not cursor.connection.closed:
                    cursor.execute("ROLLBACK")
                raise
        return report

    def _replay(self, cursor: Any, origin_stream: str | None, report: ProjectionReport) -> None:
        letters = self._sql.dead_letters
        if origin_stream is None:
            cursor.execute(f"SELECT {letters.blocked_streams_sql}")
            streams = list(cursor.fetchone()[0])
        else:
            streams = [origin_stream]
        decode = stored_message_decoder(self.stream.store.serializer)
        for stream in streams:
            cursor.execute(letters.stream_letters_sql, (stream,))
            positions = [row[0] for row in cursor.fetchall()]
            if not positions:
                continue
            cursor.execute(self._reads.rows_at_sql, (positions,))
            placed: list[_Placement[E]] = []
            for row in cursor.fetchall():
                try:
                    placed.append(self._place(decode, row))
                except Exception as exc:
                    cursor.execute(letters.repark_sql, (f"{type(exc).__name__}: {exc}", row[4]))
                    break
            if placed:
                self._insert(cursor, placed, report)
                cursor.execute(letters.resolve_sql, (REPLAYED, [p.stored.global_position for p in placed]))

    def __repr__(self) -> str:
        return f"StreamProjector(stream={self.stream.name!r}, wildcards={self.stream_wildcards!r})"


# A display counts the projection lag up to this many messages.
UNPROJECTED_CAP = 10_000


def unprojected_count(stream: StreamSource[Any], limit: int | None = None) -> int:
    """Stored messages matching the stream's wildcards that the projector has neither
    projected nor dead-lettered yet: exactly its backlog. Reads only the backlog (see
    `StreamViews.unprojected_count`), and counts at most `limit` of it (None: all)."""
    return stream.views.unprojected_count(stream.engine, list(stream.stream_wildcards), limit)


__all__ = [
    "FullUpdateResult",
    "PartitionerError",
    "ProjectedMessage",
    "ProjectionReport",
    "StreamProjector",
]

"""Rebuilding an aggregated stream under a new definition while its workers keep running.

A changed partitioner or new wildcards cannot be applied to the stored projection in
place: a stream's older versions would stay in their old partitions while newer ones go to
new ones, and the subscriptions' positions would point at other messages. A rebuild
therefore

1. projects every matching message, under the new definition, into a second set of
   tables (`<name>__next<hash>_...`) with its own projector lock, checkpoint and
   notification channel, while projectors and runners go on with the current projection;
2. switches in one transaction, holding every partition lock of every subscription of
   the stream (waiting for batches in flight) and the projector's lock: each
   subscription's positions are moved to the new partitions, the old tables are dropped,
   the new ones take their names, and the new definition is recorded;
3. notifies the stream's channel, so runners wake up to the new partitions.

Moving positions keeps at-least-once delivery: a message counts as handled when its old
position is at or before its old partition's acknowledged position; in every new
partition the acknowledged position becomes the one before its first unhandled message.
So no unhandled message is skipped, and handled messages behind an unhandled one are
delivered again (`RebuildReport.delivered_again`). Tokens are bumped, so a runner that
lost its claim cannot acknowledge into the new layout. Messages written after the new
projection's last step are in neither checkpoint's "seen" set yet: the next projector step
(under the new definition) projects them. A projector made with the old definition (a
worker still running old code) is refused from the switch on (its checkpoint records the
definition), instead of mixing two partitionings in one table.

When the stream moved to another store, positions of the old store's messages say
nothing about the new one's: subscriptions start over (their start point applies again).

A rebuild that fails or is interrupted before the switch leaves the current projection
as it was; the next rebuild drops the leftover tables first. One rebuild of a stream runs
at a time (`RebuildInProgressError`). Subscriptions whose state is kept by a custom state
provider (not in a `<provider>_subscription_state` table) are not moved: the report lists
only those it moved.
"""

from __future__ import annotations

import dataclasses as _dc
import hashlib
import time
from typing import TYPE_CHECKING, Any

from depeche_nb.core.display import RichRepr
from depeche_nb.core.errors import RebuildInProgressError
from depeche_nb.engine.definitions import AGGREGATED_STREAM, SUBSCRIPTION, stream_definition
from depeche_nb.engine.progress import open_progress
from depeche_nb.engine.projector import unprojected_count
from depeche_nb.engine.subscription import partition_lock_name
from depeche_nb.postgres import definitions_table
from depeche_nb.postgres.ddl import run_ddl
from depeche_nb.postgres.locks import advisory_key
from depeche_nb.postgres.names import lock_namespace
from depeche_nb.postgres.rawconn import open_dbapi_connection
from depeche_nb.postgres.state_table import StateTable, state_tables
from depeche_nb.postgres.stream_tables import RebuildStatements, StreamNames, stream_ddl

if TYPE_CHECKING:
    from depeche_nb.engine.protocols import StreamSource


@_dc.dataclass
class RebuildReport(RichRepr):
    """What a rebuild did: messages projected under the new definition, and per subscription
    how many acknowledged messages stayed acknowledged and how many will be delivered again."""

    stream_name: str
    projected: int
    partitions: int
    kept: dict[str, int] = _dc.field(default_factory=dict)
    delivered_again: dict[str, int] = _dc.field(default_factory=dict)
    started_over: list[str] = _dc.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        moved = [
            f"{name!r} keeps {self.kept[name]} acknowledged, {self.delivered_again[name]} delivered again"
            for name in self.kept
        ]
        moved += [f"{name!r} starts over" for name in self.started_over]
        subscriptions = "; ".join(moved) if moved else "no subscription had positions to move"
        return (
            f"rebuilt {self.stream_name}: projected {self.projected} message(s) into "
            f"{self.partitions} partition(s) in {self.seconds:.2f} s; {subscriptions}"
        )

    def __repr__(self) -> str:
        return f"<RebuildReport {self.summary()}>"


def beside_names(names: StreamNames) -> StreamNames:
    """The tables a rebuild of `names` projects into: the stream's name (cut to leave room)
    and a hash of it, so the new tables of two streams never share names."""
    digest = hashlib.blake2b(names.stream.encode(), digest_size=2).hexdigest()
    return StreamNames(f"{names.stream[:28]}__next{digest}", names.store)


def run_rebuild(stream: StreamSource[Any], *, same_store: bool, progress: bool | None) -> RebuildReport:
    started = time.monotonic()
    engine = stream.engine
    beside = beside_names(stream.names)
    statements = RebuildStatements(stream.names, beside)
    # One dedicated session for the whole rebuild: its advisory locks (one rebuild at a
    # time; the partitions during the switch) end with it, whatever happens.
    connection = open_dbapi_connection(engine)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, 0)", (lock_namespace("rebuild", stream.name),))
            if not cursor.fetchone()[0]:
                raise RebuildInProgressError(
                    f"aggregated stream {stream.name!r} is being rebuilt by another session; "
                    "nothing was changed"
                )
            run_ddl(engine, [*statements.drop_beside_sql, *stream_ddl(beside)])
            projected = _project_beside(stream, beside, progress)
            report = RebuildReport(stream.name, projected, 0)
            _switch(cursor, stream, statements, same_store, report)
    finally:
        connection.close()
    report.seconds = time.monotonic() - started
    return report


def _project_beside(stream: StreamSource[Any], beside: StreamNames, progress: bool | None) -> int:
    new = stream._beside(beside)
    projector = new.projector

    def backlog() -> int:
        return unprojected_count(new)

    bar = open_progress(progress, backlog, f"rebuilding {stream.name}")
    projected = 0
    try:
        while True:
            step = projector.step()
            projected += len(step)
            if bar is not None:
                bar.update(len(step))
            if step.caught_up:
                return projected
    finally:
        if bar is not None:
            bar.close()


def _switch(
    cursor: Any,
    stream: StreamSource[Any],
    statements: RebuildStatements,
    same_store: bool,
    report: RebuildReport,
) -> None:
    subscriptions = _subscriptions_with_state(cursor, stream.name, statements)
    locked: set[int] = set()

    def lock_partitions() -> None:
        # Blocking: a runner holds a partition for one batch, then releases it. Runners only
        # try their locks, so waiting here cannot deadlock with them. One round trip for all.
        cursor.execute(statements.partitions_sql)
        keys = [
            advisory_key(subscription, partition_lock_name(subscription, row[0]))
            for row in cursor.fetchall()
            for subscription, _ in subscriptions
        ]
        new_keys = sorted(set(keys) - locked)
        if new_keys:
            cursor.execute("SELECT count(pg_advisory_lock(k)) FROM unnest(%s::bigint[]) AS k", (new_keys,))
            locked.update(new_keys)

    lock_partitions()
    cursor.execute("BEGIN")
    try:
        cursor.execute(stream.statements.projector_wait_lock_sql)
        # The current projector may have opened partitions before it was stopped.
        lock_partitions()
        cursor.execute(statements.new_partitions_sql)
        report.partitions = cursor.fetchone()[0]
        for subscription, state in subscriptions:
            if same_store:
                cursor.execute(statements.move_positions_sql(state), {"subscription": subscription})
                handled, kept = cursor.fetchone()
                report.kept[subscription] = int(kept)
                report.delivered_again[subscription] = int(handled) - int(kept)
            else:
                cursor.execute(statements.start_over_sql(state), {"subscription": subscription})
                report.started_over.append(subscription)
        for sql in statements.drop_old_sql:
            cursor.execute(sql)
        for sql in statements.rename_sql(cursor):
            cursor.execute(sql)
        for sql in statements.drop_beside_functions_sql:
            cursor.execute(sql)
        definition = stream_definition(stream.stream_wildcards, stream.projector.partitioner)
        definitions_table.replace_in(cursor, AGGREGATED_STREAM, stream.name, stream.store.name, definition)
        cursor.execute(statements.notify_heads_sql, (stream.names.channel,))
        cursor.execute("COMMIT")
    except BaseException:
        if not cursor.connection.closed:
            cursor.execute("ROLLBACK")
        raise


def _subscriptions_with_state(
    cursor: Any, stream_name: str, statements: RebuildStatements
) -> list[tuple[str, StateTable]]:
    """The stream's recorded subscriptions, each with the state table holding its rows."""
    names = definitions_table.names_owned_by(cursor, SUBSCRIPTION, stream_name)
    if not names:
        return []
    found = []
    for table in state_tables(cursor):
        cursor.execute(statements.subscriptions_with_rows_sql(table), (names,))
        found += [(row[0], table) for row in cursor.fetchall()]
    return found


__all__ = ["RebuildReport", "beside_names", "run_rebuild"]

"""HTML of the operations console's parts (`engine.operations` data), shared by the
`OperationsConsole` widget and the reprs of `OperationsSnapshot` and `PartitionDiagnosis`.

Every part is plain tables, facts and lists, so that with the style stripped, or read as
text, each line still says what it means ("held by pid 4711 (worker-a) from local socket").
"""

from __future__ import annotations

from depeche_nb.engine.operations import (
    OperationsSnapshot,
    PartitionDiagnosis,
    PartitionStatus,
    SubscriptionStatus,
    describe_holder,
    format_age,
)
from depeche_nb.notebook import html as h
from depeche_nb.notebook.reprs import guarded

# Said once under the subscriptions: what the two times of a lock holder mean.
LOCK_TIMES_NOTE = (
    "PostgreSQL keeps no time at which an advisory lock was granted: each was granted by one of "
    "its session's statements, between 'session started' (pg_stat_activity.backend_start) and "
    "'last statement' (state_change, when the session's latest statement ended or began)."
)


def streams_html(snapshot: OperationsSnapshot) -> str:
    title = "Aggregated streams" + (f" of store {snapshot.store}" if snapshot.store else "")
    if not snapshot.streams:
        return h.section(title) + h.note("no aggregated stream is recorded here yet")
    rows = [
        (
            s.name,
            s.store,
            s.partitions,
            s.projected,
            str(s.unprojected),
            "never" if s.checkpoint_age is None else f"{format_age(s.checkpoint_age)} ago",
            s.dead_letters,
            "its tables are gone" if s.tables_missing else "",
        )
        for s in snapshot.streams
    ]
    return h.section(title) + h.table(
        (
            "stream",
            "store",
            "partitions",
            "projected",
            "projection lag",
            "last projector step",
            "dead letters",
            "",
        ),
        rows,
        keep="first",
        noun="stream",
        max_rows=200,
    )


def _holder_cells(p: PartitionStatus, known: bool) -> tuple[object, ...]:
    if not known:
        return ("unknown", None, None, None, None)
    holder = p.holder
    if holder is None:
        return ("nobody", None, None, None, None)
    return (
        f"pid {holder.pid}",
        holder.application_name or None,
        holder.client,
        holder.backend_start,
        holder.state_change,
    )


def subscription_html(s: SubscriptionStatus, max_partitions: int) -> str:
    held = s.held
    parts = [
        h.section(f"Subscription {s.name} on {s.stream}"),
        h.facts(
            [
                h.count(len(s.partitions), "partition"),
                ("lag", f"{s.lag:,}"),
                ("held now", "unknown" if s.lock_provider is None else len(held)),
                ("parked", s.parked_count or 0),
                ("initialised", s.initialized),
            ],
            css={"lag": "dnb-warn" if s.lag else "dnb-ok", "parked": "dnb-warn" if s.parked_count else ""},
        ),
    ]
    if s.note:
        parts.append(h.note(s.note))
    if not s.partitions:
        parts.append(h.note("no partitions yet: nothing projected into the stream"))
        return "".join(parts)
    shown = s.partitions
    if len(shown) > max_partitions:
        # What answers "what is wrong?" first: the partitions behind and those held.
        shown = sorted(shown, key=lambda p: (-p.lag, p.holder is None, p.partition))[:max_partitions]
        parts.append(h.note(f"the {max_partitions} partitions furthest behind or held:"))
    known = s.lock_provider is not None
    parts.append(
        h.table(
            (
                "partition",
                "position",
                "head",
                "lag",
                "held by",
                "application",
                "client",
                "session started",
                "last statement",
                "last ack",
            ),
            [
                (p.partition, p.position, p.head, p.lag, *_holder_cells(p, known), p.last_acked_at)
                for p in shown
            ],
            total=len(s.partitions),
            keep="first",
            noun="partition",
            max_rows=max_partitions,
        )
    )
    return "".join(parts)


def subscriptions_html(snapshot: OperationsSnapshot, max_partitions: int) -> str:
    if not snapshot.subscriptions:
        return h.section("Subscriptions") + h.note("no subscription is recorded on these streams yet")
    parts = [subscription_html(s, max_partitions) for s in snapshot.subscriptions]
    return "".join(parts) + h.note(LOCK_TIMES_NOTE)


def parked_html(snapshot: OperationsSnapshot) -> str:
    rows = [
        (s.name, p.id, p.partition, p.position, p.message_type, p.status, p.attempts, p.error, p.recorded_at)
        for s in snapshot.subscriptions
        for p in s.parked
    ]
    total = sum(s.parked_count or 0 for s in snapshot.subscriptions)
    if not rows:
        return h.section("Parked messages") + h.note("none: no subscription has an unresolved parked message")
    return h.section(f"Parked messages ({total:,})") + h.table(
        (
            "subscription",
            "id",
            "partition",
            "position",
            "type",
            "status",
            "attempts",
            "error",
            "recorded at",
        ),
        rows,
        total=total,
        keep="first",
        noun="parked message",
        max_rows=len(rows),
        hint="subscription.parked() lists them all",
    )


def diagnosis_html(d: PartitionDiagnosis) -> str:
    parts = [
        h.section(f"Why is partition {d.partition} of {d.subscription} behind?"),
        h.facts(
            [("position", d.position), ("head", d.head), ("lag", d.lag), ("stream", d.stream)],
            css={"lag": "dnb-warn" if d.lag > 0 else "dnb-ok"},
        ),
        '<ul class="dnb-console-reasons">'
        + "".join(f"<li>{h.esc(reason)}</li>" for reason in d.reasons())
        + "</ul>",
    ]
    if d.next_message is not None:
        m = d.next_message
        parts.append(h.section("Next message"))
        parts.append(
            h.record_table(
                [
                    ("stream", m.stream),
                    ("version", m.version),
                    ("global position", m.global_position),
                    ("partition position", m.position),
                    ("type", m.message_type),
                    ("written at", m.added_at),
                    ("age", format_age(m.age)),
                    ("projected at", m.projected_at),
                    ("id", m.message_id),
                ]
            )
        )
    if d.holder is not None:
        holder = d.holder
        parts.append(h.section("Lock holder"))
        parts.append(
            h.record_table(
                [
                    ("pid", holder.pid),
                    ("application_name", holder.application_name),
                    ("client", holder.client),
                    ("user", holder.user),
                    ("session started", holder.backend_start),
                    ("state", holder.state),
                    ("last statement", holder.state_change),
                ]
            )
        )
        parts.append(h.note(describe_holder(holder)))
    if d.parked:
        parts.append(h.section("Parked in this partition (latest first)"))
        parts.append(
            h.table(
                ("id", "position", "type", "attempts", "error", "recorded at"),
                [(p.id, p.position, p.message_type, p.attempts, p.error, p.recorded_at) for p in d.parked],
                keep="first",
                noun="parked message",
            )
        )
    return "".join(parts)


@guarded
def render_operations_snapshot(snapshot: OperationsSnapshot) -> str:
    return h.box(
        h.title("OperationsSnapshot", snapshot.store or snapshot.database),
        h.facts([("read at", snapshot.read_at), ("schema", snapshot.schema)]),
        streams_html(snapshot),
        subscriptions_html(snapshot, h.MAX_ROWS),
        parked_html(snapshot),
    )


@guarded
def render_partition_diagnosis(diagnosis: PartitionDiagnosis) -> str:
    return h.box(diagnosis_html(diagnosis))


__all__ = [
    "LOCK_TIMES_NOTE",
    "diagnosis_html",
    "parked_html",
    "render_operations_snapshot",
    "render_partition_diagnosis",
    "streams_html",
    "subscription_html",
    "subscriptions_html",
]

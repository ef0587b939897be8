"""HTML renderers for the library's objects, registered by `depeche_nb.notebook`.

Each renderer reads a bounded overview (a few aggregate statements with
LIMITs, see `notebook.views`), never the full data, and
builds the page with `notebook.html`. None of them imports pandas, so the
first repr in a notebook stays fast. A renderer never raises: if the
database cannot be read, it shows the plain repr and the error instead.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.aggregated_stream import AggregatedStream
from depeche_nb.engine.handlers import HANDLED, NO_HANDLER
from depeche_nb.engine.health import BACKING_OFF, ExecutorHealth
from depeche_nb.engine.health import FAILED as WORKER_FAILED
from depeche_nb.engine.message_store import MessageStore
from depeche_nb.engine.projector import ProjectionReport
from depeche_nb.engine.runner import FAILED, RunnerReport
from depeche_nb.engine.subscription import Subscription
from depeche_nb.engine.trace import HANDLED as TRACE_HANDLED
from depeche_nb.engine.trace import PENDING as TRACE_PENDING
from depeche_nb.engine.trace import PROJECTED, MessageTrace, StreamTrace
from depeche_nb.notebook import html as h
from depeche_nb.notebook.views.store import store_overview
from depeche_nb.notebook.views.streams import aggregated_stream_overview
from depeche_nb.notebook.views.subscriptions import subscription_overview

T = TypeVar("T")

# Rows of the "latest messages" table of a store.
RECENT_MESSAGES = 5


def guarded(render: Callable[[T], str]) -> Callable[[T], str]:
    """Turn an exception while rendering into a readable error box: IPython would otherwise
    print a traceback in place of the output."""

    @functools.wraps(render)
    def wrapper(obj: T) -> str:
        try:
            return render(obj)
        except Exception as error:
            return h.error_box(obj, error)

    return wrapper


@guarded
def render_store(store: MessageStore[Any]) -> str:
    ov = store_overview(store, max_streams=h.MAX_ROWS, max_messages=RECENT_MESSAGES)
    parts = [
        h.title(type(store).__name__, store.name),
        h.facts(
            [
                h.count(ov.messages, "message"),
                h.count(ov.streams, "stream"),
                ("last global position", ov.last_global_position),
                ("last write", ov.last_added_at),
            ]
        ),
    ]
    if not ov.messages.value:
        parts.append(h.note("empty: nothing written yet"))
        return h.box(*parts)
    # The stream count is exact up to the view's default limit and "more than" it beyond,
    # so this names the call that really lists every stream.
    every_stream = "store.streams_dataframe()" if ov.streams.exact else "store.streams_dataframe(limit=None)"
    parts.append(h.section("Streams (most recently written first)"))
    parts.append(
        h.table(
            ("stream", "messages", "first global position", "last global position", "last added at"),
            [
                (s.stream, s.messages, s.first_global_position, s.last_global_position, s.last_added_at)
                for s in ov.recent_streams
            ],
            total=ov.streams,
            keep="first",
            noun="stream",
            hint=f"{every_stream} lists them all",
        )
    )
    parts.append(h.section("Latest messages"))
    parts.append(
        h.table(
            ("global position", "stream", "version", "type", "payload", "added at"),
            [
                (m.global_position, m.stream, m.version, m.message_type, m.payload, m.added_at)
                for m in ov.recent_messages
            ],
            total=ov.messages,
            noun="message",
            hint="store.to_dataframe() loads them",
        )
    )
    return h.box(*parts)


def _as_aware_utc(moment: object) -> object:
    # StoredMessage.added_at is naive UTC (Depeche DB's shape); show it with its offset.
    if isinstance(moment, _dt.datetime) and moment.tzinfo is None:
        return moment.replace(tzinfo=_dt.timezone.utc)
    return moment


@guarded
def render_stored_message(message: StoredMessage[Any]) -> str:
    return h.box(
        h.title("StoredMessage", type(message.message).__name__),
        h.facts(
            [
                ("stream", message.stream),
                ("version", message.version),
                ("global position", message.global_position),
                ("added at", _as_aware_utc(message.added_at)),
                ("id", message.message_id),
            ]
        ),
        h.record_table(h.payload_items(message.message)),
    )


@guarded
def render_aggregated_stream(stream: AggregatedStream[Any]) -> str:
    ov = aggregated_stream_overview(stream)
    lag_class = "dnb-warn" if ov.unprojected.value else "dnb-ok"
    parts = [
        h.title("AggregatedStream", ov.name),
        h.facts(
            [
                ("store", ov.store),
                ("wildcards", ", ".join(ov.wildcards)),
                h.count(len(ov.partitions), "partition"),
                ("projected", f"{ov.projected:,}"),
                ("unprojected", ov.unprojected),
                ("last projected", ov.last_projected_at),
            ],
            css={"unprojected": lag_class},
        ),
    ]
    if ov.unprojected.value:
        parts.append(
            h.note(
                f"{h.count(ov.unprojected, 'stored message')} matching the wildcards not projected "
                "yet (stream.projector.step() or an Executor projects them)"
            )
        )
    if ov.dead_letters:
        parts.append(
            h.note(
                f"{h.count(ov.dead_letters, 'message')} the projector could not read or partition, "
                "or holds back behind one: stream.projector.dead_letters_dataframe()"
            )
        )
    if not ov.partitions:
        parts.append(h.note("no partitions yet: nothing projected"))
        return h.box(*parts)
    parts.append(
        h.table(
            (
                "partition",
                "messages",
                "head position",
                "first global position",
                "last global position",
                "last projected at",
            ),
            [
                (
                    p.partition,
                    p.messages,
                    p.head_position,
                    p.first_global_position,
                    p.last_global_position,
                    p.last_projected_at,
                )
                for p in ov.partitions
            ],
            keep="first",
            noun="partition",
            hint="stream.partitions_dataframe() lists them all",
        )
    )
    return h.box(*parts)


@guarded
def render_subscription(subscription: Subscription[Any]) -> str:
    ov = subscription_overview(subscription)
    states = ov.partitions
    locked = ov.locked
    parts = [
        h.title("Subscription", ov.name),
        h.facts(
            [
                ("stream", ov.stream),
                h.count(len(states), "partition"),
                ("lag", f"{ov.lag:,}"),
                ("locked now", "unknown" if locked is None else locked),
                ("parked", 0 if ov.parked is None else ov.parked),
                ("initialised", ov.initialized),
            ],
            css={
                "lag": "dnb-warn" if ov.lag else "dnb-ok",
                "parked": "dnb-warn" if ov.parked else "",
            },
        ),
    ]
    if not states:
        parts.append(h.note("no partitions yet: nothing projected into the stream"))
        return h.box(*parts)
    shown = states
    if len(states) > h.MAX_ROWS:
        # The rows that answer "what is behind?" first.
        shown = sorted(states, key=lambda s: (-s.lag, s.partition))[: h.MAX_ROWS]
        parts.append(h.note(f"the {h.MAX_ROWS} partitions furthest behind:"))
    parts.append(
        h.table(
            ("partition", "position", "head", "lag", "locked", "last ack"),
            [(s.partition, s.position, s.head, s.lag, s.locked, s.last_acked_at) for s in shown],
            total=len(states),
            keep="first",
            noun="partition",
            hint="subscription.state_dataframe() lists them all",
        )
    )
    return h.box(*parts)


@guarded
def render_projection_report(report: ProjectionReport) -> str:
    if report.locked:
        state, css = "another projector is running; nothing done", "dnb-warn"
    elif report.more_available:
        state, css = "more to project", "dnb-warn"
    else:
        state, css = "caught up", "dnb-ok"
    partitions = {p.partition for p in report.projected}
    parts = [
        h.title("ProjectionReport", report.stream_name),
        h.facts(
            [
                ("projected", h.count(len(report.projected), "message")),
                ("into", h.count(len(partitions), "partition")),
                ("state", state),
            ],
            css={"state": css},
        ),
    ]
    if report.projected:
        parts.append(
            h.table(
                ("message id", "origin stream", "version", "global position", "partition", "position"),
                [
                    (p.message_id, p.origin_stream, p.version, p.global_position, p.partition, p.position)
                    for p in report.projected
                ],
                noun="message",
                hint="report.to_dataframe() has them all",
            )
        )
    return h.box(*parts)


@guarded
def render_runner_report(report: RunnerReport) -> str:
    counts = report.counts()
    parts = [
        h.title("RunnerReport", report.subscription_name),
        h.facts(
            [("messages", len(report.handled)), *counts.items()] if report.handled else ["nothing to do"],
            # Anything but a clean HANDLED deserves a second look (no handler, parked, failed).
            css={name: "dnb-warn" for name in counts if name != HANDLED} | {HANDLED: "dnb-ok"},
        ),
    ]
    if counts.get(NO_HANDLER):
        # Not a muted note: a forgotten handler silently loses these messages for this subscription.
        parts.append(
            h.warning(
                f"{h.count(counts[NO_HANDLER], 'message')} acknowledged without a handler: "
                f"{report.without_handler_words()} — "
                "register a handler for them, or they are skipped for good"
            )
        )
    if counts.get(FAILED):
        parts.append(
            h.warning(
                f"{h.count(counts[FAILED], 'message')} failed: not acknowledged, "
                "delivered again by the next step"
            )
        )
    if report.handled:
        parts.append(
            h.table(
                ("partition", "position", "type", "outcome", "attempts", "error", "message id"),
                [
                    (i.partition, i.position, i.message_type, i.outcome, i.attempts, i.error, i.message_id)
                    for i in report.handled
                ],
                noun="message",
                hint="report.to_dataframe() has them all",
            )
        )
    return h.box(*parts)


@guarded
def render_executor_health(health: ExecutorHealth) -> str:
    state = "running" if health.running else "stopped"
    css = "dnb-ok" if health.healthy else "dnb-warn"
    parts = [
        h.title("ExecutorHealth", state),
        h.facts(
            [
                ("state", "healthy" if health.healthy else state),
                ("reconnects", health.reconnects),
                ("listener reconnects", health.listener_reconnects),
                ("last error", health.last_error or "none"),
                ("at", health.last_error_at),
            ],
            css={"state": css},
        ),
    ]
    if health.workers:
        parts.append(
            h.table(
                ("handler", "channel", "state", "runs", "errors", "recoveries", "last run", "last error"),
                [
                    (
                        w.handler,
                        w.channel,
                        w.state
                        if w.alive or w.state in (BACKING_OFF, WORKER_FAILED)
                        else f"{w.state} (ended)",
                        w.runs,
                        w.errors,
                        w.recoveries,
                        w.last_run_at,
                        w.last_error,
                    )
                    for w in health.workers
                ],
                noun="worker",
            )
        )
    return h.box(*parts)


@guarded
def render_message_trace(trace: MessageTrace) -> str:
    parts = [
        h.title("MessageTrace", trace.message_type or "message"),
        h.facts(
            [
                ("store", trace.store),
                ("stream", trace.stream),
                ("version", trace.version),
                ("global position", trace.global_position),
                ("added at", trace.added_at),
                ("id", trace.message_id),
            ]
        ),
    ]
    if not trace.streams:
        checked = ", ".join(trace.unmatched_streams) or "none recorded"
        parts.append(
            h.note(
                f"no aggregated stream of store {trace.store!r} matches stream {trace.stream!r} "
                f"(its aggregated streams: {checked}): no subscription will see this message"
            )
        )
        return h.box(*parts)
    for stream in trace.streams:
        parts.append(_stream_trace_html(stream))
    if trace.unmatched_streams:
        parts.append(h.note(f"not matching: {', '.join(trace.unmatched_streams)}"))
    return h.box(*parts)


def _stream_trace_html(stream: StreamTrace) -> str:
    if stream.status == PROJECTED:
        where = f"partition {stream.partition}, position {stream.position} (head {stream.head})"
    else:
        where = stream.status + (f": {stream.error}" if stream.error else "")
    parts = [
        h.section(f"Aggregated stream {stream.aggregated_stream}: {where}"),
        h.facts(
            [("wildcards", ", ".join(stream.wildcards)), ("projected at", stream.projected_at)]
            if stream.status == PROJECTED
            else [("wildcards", ", ".join(stream.wildcards))]
        ),
    ]
    if not stream.subscriptions:
        parts.append(h.note("no subscription recorded on this stream"))
        return "".join(parts)
    counts: dict[str, int] = {}
    for t in stream.subscriptions:
        counts[t.status] = counts.get(t.status, 0) + 1
    parts.append(
        h.facts(
            [(status, n) for status, n in counts.items()],
            css={status: "dnb-ok" if status == TRACE_HANDLED else "dnb-warn" for status in counts},
        )
    )
    parts.append(
        h.table(
            ("subscription", "status", "acknowledged position", "behind", "error", "note"),
            [
                (
                    t.subscription,
                    t.status,
                    t.acknowledged_position,
                    t.behind if t.status == TRACE_PENDING else None,
                    t.error,
                    t.note,
                )
                for t in stream.subscriptions
            ],
            keep="first",
            noun="subscription",
            hint="trace.to_dataframe() lists them all",
        )
    )
    return "".join(parts)


__all__ = [
    "guarded",
    "render_aggregated_stream",
    "render_executor_health",
    "render_message_trace",
    "render_projection_report",
    "render_runner_report",
    "render_store",
    "render_stored_message",
    "render_subscription",
]

"""DataFrames of reports and records: a projector's or runner's step, parked messages, an
adoption, a message's trace and an aggregate's history."""

from __future__ import annotations

import dataclasses as _dc
from typing import TYPE_CHECKING, Any

from depeche_nb.notebook.views.kit import (
    INT64,
    NULLABLE_INT,
    STRING,
    UTC,
    frame_from_rows,
    infer_column_dtype,
    records_dataframe,
)

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.depeche_db_adoption import AdoptionReport
    from depeche_nb.engine.parking import ParkedMessages
    from depeche_nb.engine.projector import ProjectionReport
    from depeche_nb.engine.runner import RunnerReport
    from depeche_nb.engine.trace import MessageTrace
    from depeche_nb.event_sourcing.history import AggregateHistory


def projection_report_dataframe(report: ProjectionReport) -> pd.DataFrame:
    from depeche_nb.engine.projector import ProjectedMessage

    return records_dataframe(
        report.projected, ProjectedMessage, ("version", "global_position", "partition", "position")
    )


def runner_report_dataframe(report: RunnerReport) -> pd.DataFrame:
    from depeche_nb.engine.runner import HandledMessage

    return records_dataframe(report.handled, HandledMessage, ("partition", "position", "attempts"))


def parked_dataframe(parked: ParkedMessages, include_resolved: bool = False) -> pd.DataFrame:
    import pandas as pd

    from depeche_nb.engine.parking import ParkedMessage

    columns = [f.name for f in _dc.fields(ParkedMessage)]
    records = [_dc.astuple(p) for p in parked.list(include_resolved)]
    frame: pd.DataFrame = pd.DataFrame(records, columns=columns)
    frame["message_id"] = frame["message_id"].astype(str)
    for name in ("recorded_at", "resolved_at"):
        frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame


def adoption_report_dataframe(report: AdoptionReport) -> pd.DataFrame:
    import pandas as pd

    from depeche_nb.engine.depeche_db_adoption import AdoptionItem

    columns = [f.name for f in _dc.fields(AdoptionItem)]
    frame: pd.DataFrame = pd.DataFrame([_dc.astuple(i) for i in report.items], columns=columns)
    frame["rows"] = frame["rows"].astype("int64")
    return frame


def trace_dataframe(trace: MessageTrace) -> pd.DataFrame:
    """One row per (aggregated stream, subscription); a stream without subscriptions has
    one row without one, a message no stream matches a single row of its own place."""
    message = (str(trace.message_id), trace.stream, trace.version, trace.global_position, trace.added_at)
    rows: list[tuple[Any, ...]] = []
    for s in trace.streams:
        place = (s.aggregated_stream, s.status, s.partition, s.position, s.head)
        rows += [
            (*message, *place, t.subscription, t.status, t.acknowledged_position, t.behind, t.error)
            for t in s.subscriptions
        ]
        if not s.subscriptions:
            rows.append((*message, *place, *(None,) * 5))
    if not rows:
        rows.append((*message, *(None,) * 10))
    return frame_from_rows(
        rows,
        (
            ("message_id", STRING),
            ("stream", STRING),
            ("version", INT64),
            ("global_position", INT64),
            ("added_at", UTC),
            ("aggregated_stream", STRING),
            ("stream_status", STRING),
            ("partition", NULLABLE_INT),
            ("position", NULLABLE_INT),
            ("head", NULLABLE_INT),
            ("subscription", STRING),
            ("status", STRING),
            ("acknowledged_position", NULLABLE_INT),
            ("behind", NULLABLE_INT),
            ("error", STRING),
        ),
    )


def history_dataframe(history: AggregateHistory[Any, Any]) -> pd.DataFrame:
    """One row per event (see `EventStoreRepo.history`), typed like the store's views:
    int64 positions, tz-aware UTC times, string ids; field columns get their dtype from
    their values (int64, or Int64 where some rows have none, float64, bool, string,
    tz-aware datetimes, else object)."""
    import pandas as pd

    from depeche_nb.event_sourcing.history import EVENT_PREFIX, FIXED_COLUMNS, STATE_PREFIX

    fixed = frame_from_rows(
        [(s.version, s.event_type, s.added_at, s.global_position, str(s.message_id)) for s in history.steps],
        (
            ("version", INT64),
            ("event_type", STRING),
            ("added_at", UTC),
            ("global_position", INT64),
            ("message_id", STRING),
        ),
    )
    columns: dict[str, Any] = {name: fixed[name] for name in fixed.columns}
    events = pd.DataFrame([s.event_fields() for s in history.steps], dtype=object)
    for key in events.columns:
        name = str(key)
        while name in columns or name in FIXED_COLUMNS:
            name = EVENT_PREFIX + name
        columns[name] = infer_column_dtype(events[key])
    states = pd.DataFrame([s.state for s in history.steps], dtype=object)
    for key in states.columns:
        columns[STATE_PREFIX + str(key)] = infer_column_dtype(states[key])
    columns["changed"] = pd.Series(
        [[STATE_PREFIX + key for key in s.changed] for s in history.steps], dtype=object
    )
    frame: pd.DataFrame = pd.DataFrame(columns)
    return frame

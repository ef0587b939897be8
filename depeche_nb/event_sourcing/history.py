"""An aggregate's history as data: its state after each of its events.

`AggregateHistory` replays an aggregate's stream once and records, after every event, a
snapshot of the aggregate's public attributes, records in them flattened into
dotted names (`balance`, `address.city` for a dataclass or pydantic model; a dict or
list stays one value). Snapshots are copies, so a list the aggregate keeps
appending to shows at each version what it held then. Each step also names the
fields its event changed, which is what "what did this event do?" asks.

`EventStoreRepo.history(id)` is its DataFrame; the notebook's `AggregateTimeline`
keeps one open and calls `update()` when the store announces a write, which reads
only the events after the last one it has. pandas loads only in `to_dataframe()`.
"""

from __future__ import annotations

import copy
import dataclasses as _dc
import datetime as _dt
import decimal
import enum
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from depeche_nb.core.display import run_view
from depeche_nb.core.errors import NotFound
from depeche_nb.core.messages import StoredMessage, stored_at
from depeche_nb.event_sourcing.aggregate import EventSourcedAggregateRoot

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.store.protocols import MessageStoreProtocol

ID = TypeVar("ID")
AGG = TypeVar("AGG", bound=EventSourcedAggregateRoot[Any, Any])


class HistorySource(Protocol):
    """What a history reads of its repository (`EventStoreRepo`), so that the repository,
    which makes histories, is not imported back."""

    @property
    def event_store(self) -> MessageStoreProtocol[Any]: ...

    @property
    def constructor(self) -> Callable[[], Any]: ...

    def stream_name(self, id: Any) -> str: ...


# The prefix of the state columns of `to_dataframe()`.
STATE_PREFIX = "state."
# An event field named like a fixed column is shown as "event.<name>".
EVENT_PREFIX = "event."
# Levels of nested dataclasses / models spelled out as dotted names; deeper values stay
# whole in one column.
MAX_DEPTH = 3
FIXED_COLUMNS = ("version", "event_type", "added_at", "global_position", "message_id", "changed")

# Values that cannot change in place, kept as they are instead of copied.
_IMMUTABLE = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    decimal.Decimal,
    _dt.date,
    _dt.time,
    _dt.timedelta,
    uuid.UUID,
    enum.Enum,
)


@_dc.dataclass(frozen=True)
class HistoryStep:
    """The aggregate right after one of its events."""

    version: int
    event: Any
    message_id: uuid.UUID
    global_position: int
    added_at: _dt.datetime  # when the store took the event (tz-aware UTC)
    state: dict[str, Any]  # flattened public attributes after the event
    # The keys of `state` the event changed: a new value, or a key it added or removed.
    changed: tuple[str, ...]

    @property
    def event_type(self) -> str:
        return type(self.event).__name__

    def event_fields(self) -> dict[str, Any]:
        return event_fields(self.event)


class AggregateHistory(Generic[AGG, ID]):
    """The states of aggregate `id` of `repo` after each of its events (`steps`, oldest
    first); `NotFound` if its stream is empty.

    `update()` reads the events written since, so the history can follow a live aggregate.
    The aggregate's `_apply` runs once per event, as when the repository loads it; nothing
    is cached or written.
    """

    def __init__(self, repo: HistorySource, id: ID) -> None:
        self.repo = repo
        self.id = id
        self.stream = repo.stream_name(id)
        self.steps: list[HistoryStep] = []
        self._aggregate: AGG = repo.constructor()
        self.update()
        if not self.steps:
            raise NotFound(id, self.stream)

    @property
    def version(self) -> int:
        return len(self.steps)

    @property
    def aggregate_type(self) -> str:
        return type(self._aggregate).__name__

    def update(self) -> int:
        """Read the events stored after the last step; returns how many steps were added.

        The last known event is read again to check it is still there: if the stream was
        rewritten meanwhile (`store.truncate()` in a notebook, then the same ids used
        again), the history starts over from the new stream instead of mixing the two, and
        the count is that of the new history's steps.
        """
        with self.repo.event_store.reader() as reader:
            rows = reader.read(self.stream, min_version=self.version or None)
            if self.steps:
                head = next(rows, None)
                if head is None or head.message_id != self.steps[-1].message_id:
                    self.steps = []
                    self._aggregate = self.repo.constructor()
                    rows = reader.read(self.stream)
            before = len(self.steps)
            self._replay(rows)
        return len(self.steps) - before

    def _replay(self, rows: Iterator[StoredMessage[Any]]) -> None:
        aggregate = self._aggregate
        # Before the first event: the state the constructor set up, so version 1 shows what
        # its event set, not every attribute.
        previous = self.steps[-1].state if self.steps else state_fields(aggregate)
        with aggregate._replaying():
            for stored in rows:
                aggregate.apply(stored.message)
                state = state_fields(aggregate)
                self.steps.append(
                    HistoryStep(
                        version=aggregate.version,
                        event=stored.message,
                        message_id=stored.message_id,
                        global_position=stored.global_position,
                        added_at=stored_at(stored),
                        state=state,
                        changed=changed_fields(previous, state),
                    )
                )
                previous = state

    def to_dataframe(self) -> pd.DataFrame:
        """One row per event (see `EventStoreRepo.history`), typed like the store's views:
        int64 positions, tz-aware UTC times, string ids; field columns get their dtype from
        their values (int64, or Int64 where some rows have none, float64, bool, string,
        tz-aware datetimes, else object)."""
        return run_view("history", self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<AggregateHistory {self.stream!r}: {self.version} version(s)>"


def event_fields(event: object) -> dict[str, Any]:
    """An event's own fields (pydantic model, dataclass, dict or plain object), top level only."""
    dump = getattr(event, "model_dump", None)
    if callable(dump):
        data = dump()
        if isinstance(data, dict):
            return {str(k): v for k, v in data.items()}
    if _dc.is_dataclass(event) and not isinstance(event, type):
        return {f.name: getattr(event, f.name) for f in _dc.fields(event)}
    if isinstance(event, dict):
        return {str(k): v for k, v in event.items()}
    if hasattr(event, "__dict__"):
        return {k: v for k, v in vars(event).items() if not k.startswith("_")}
    return {"value": event}


def state_fields(aggregate: object) -> dict[str, Any]:
    """The aggregate's public attributes (not `_events`, `_version` or any other `_name`),
    dataclasses and pydantic models in them spelled out as dotted names, every value a
    copy."""
    out: dict[str, Any] = {}
    for name, value in vars(aggregate).items():
        if not name.startswith("_"):
            _flatten(name, value, out, 1)
    return out


def _flatten(name: str, value: object, out: dict[str, Any], depth: int) -> None:
    nested = _nested_fields(value) if depth < MAX_DEPTH else None
    if nested:
        for key, item in nested.items():
            _flatten(f"{name}.{key}", item, out, depth + 1)
    else:
        out[name] = _copy(value)


def _nested_fields(value: object) -> dict[str, Any] | None:
    # Records with fixed fields only: a dict's keys are data (one column per customer or
    # order would make a column appear with every new key), so a dict stays one value.
    if _dc.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in _dc.fields(value)}
    model_fields = getattr(type(value), "model_fields", None)
    if isinstance(model_fields, dict) and callable(getattr(value, "model_dump", None)):
        return {name: getattr(value, name) for name in model_fields}
    return None


def _copy(value: object) -> object:
    if isinstance(value, _IMMUTABLE):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:
        # Uncopyable state (a lock, a connection): its text at this version is what can be shown.
        return repr(value)


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> tuple[str, ...]:
    """The keys whose value differs between two states, or that only one of them has."""
    changed = [key for key in after if key not in before or _differs(before[key], after[key])]
    changed += [key for key in before if key not in after]
    return tuple(changed)


def _differs(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return True
    try:
        return bool(a != b)
    except Exception:  # e.g. arrays, whose != is not a bool: count as changed
        return True


__all__ = [
    "MAX_DEPTH",
    "STATE_PREFIX",
    "AggregateHistory",
    "HistoryStep",
    "changed_fields",
    "event_fields",
    "state_fields",
]

"""Message-level data types and the protocols user messages and serializers follow."""

from __future__ import annotations

import dataclasses as _dc
import datetime as _dt
import uuid as _uuid
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from depeche_nb.core.display import RichRepr

E = TypeVar("E")
M = TypeVar("M", covariant=True)


@runtime_checkable
class MessageProtocol(Protocol):
    """What the store needs from a message: a unique id and a point in time."""

    def get_message_id(self) -> _uuid.UUID: ...

    def get_message_time(self) -> _dt.datetime: ...


class MessageSerializer(Protocol[E]):
    """Turns messages into JSON-compatible dicts and back."""

    def serialize(self, message: E) -> dict[str, Any]: ...

    def deserialize(self, message: dict[str, Any]) -> E: ...


def redefines(new: type, old: type) -> bool:
    """Whether `new` is `old` defined again: another class object under the same module and
    qualified name, as a notebook makes when a cell defining a class runs twice. Stored
    messages and registered handlers keep meaning the same type across such a re-run."""
    return (
        new is not old
        and new.__qualname__ == old.__qualname__
        and getattr(new, "__module__", None) == getattr(old, "__module__", None)
    )


@_dc.dataclass(frozen=True)
class MessagePosition:
    """Where a written message landed."""

    stream: str
    version: int
    # None only for the head of an empty stream (version 0).
    global_position: int | None


@_dc.dataclass(frozen=True)
class UnreadableMessage:
    """Stands in a `StoredMessage` for a payload that could not be deserialised, so the
    subscription's error policy (retry, park, ignore, exit) decides on it like on a failing
    handler: delivering it raises `error`."""

    error: Exception


@_dc.dataclass(frozen=True)
class StoredMessage(RichRepr, Generic[E]):
    """A message as it lives in the store, with its place in stream and store."""

    message_id: _uuid.UUID
    stream: str
    version: int
    message: E
    global_position: int
    added_at: _dt.datetime


def stored_at(stored: StoredMessage[Any]) -> _dt.datetime:
    """A stored message's `added_at` as an aware UTC datetime (the store returns it naive UTC,
    as Depeche DB does)."""
    added = stored.added_at
    return added.replace(tzinfo=_dt.timezone.utc) if added.tzinfo is None else added

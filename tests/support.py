"""Message types and helpers shared by tests (importable by worker subprocesses too)."""

from __future__ import annotations

import datetime as dt
import typing
import uuid

import pydantic


class _Message(pydantic.BaseModel):
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


class Numbered(_Message):
    """A message carrying a number (and optionally a text)."""

    number: int
    text: str = ""


class Renamed(_Message):
    """A second message type, for unions."""

    name: str


class Loose(_Message):
    """A message with an untyped field, as notebooks often have."""

    data: typing.Any = None
    text: str = ""


AnyMessage = Numbered | Renamed

"""The JSON-text fast path of PydanticMessageSerializer must agree with the dict path."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import AnyMessage, Numbered, Renamed

pytestmark = pytest.mark.both_drivers


class WithMeta(pydantic.BaseModel):
    meta: dict[str, Any]
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


class Strict(Numbered):
    model_config = pydantic.ConfigDict(extra="forbid")


@pytest.mark.parametrize(
    ("message_type", "message"),
    [
        (Numbered, Numbered(number=1, text='quote " and "__typename__": "Renamed"')),
        (AnyMessage, Renamed(name="x")),
        (WithMeta, WithMeta(meta={"__typename__": "Renamed", "nested": {"__typename__": "y"}})),
        (Strict, Strict(number=3)),
    ],
)
def test_text_and_dict_paths_agree_through_the_database(
    engine: sa.Engine, unique_name: str, message_type: Any, message: Any
) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(message_type))
    store.write("s-1", message)
    (stored,) = store.read("s-1")  # text path
    (from_wildcard,) = store.read_wildcard("s-%")  # text path, server-side cursor
    with store.reader() as reader:
        (from_reader,) = reader.read("s-1")  # dict path
    assert stored.message == message and type(stored.message) is type(message)
    assert from_wildcard.message == message and from_reader.message == message
    assert stored.message_id == message.get_message_id()


def test_unknown_type_in_text_is_still_a_clear_error(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    store.write("s-1", Numbered(number=1))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'UPDATE "{unique_name}_messages" '
            "SET message = jsonb_set(message, '{__typename__}', '\"Ghost\"')"
        )
    with pytest.raises(depeche_nb.UnknownMessageTypeError, match="Ghost"):
        list(store.read("s-1"))

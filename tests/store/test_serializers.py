"""PydanticMessageSerializer through a real store: round trips, the stored JSON, bad messages."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid
from typing import Any, Union

import pydantic
import pytest
import sqlalchemy as sa

from depeche_nb import (
    MessageSerializationError,
    MessageStore,
    Storage,
    UnknownMessageTypeError,
)
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import AnyMessage, Numbered, Renamed


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Rich(Numbered):
    """Field types whose JSON form differs from the Python value."""

    amount: decimal.Decimal
    when: dt.datetime
    day: dt.date
    ref: uuid.UUID
    color: Color
    tags: list[str]
    nested: dict[str, list[int]]
    maybe: int | None = None


class Holder(Numbered):
    """`extra` may hold anything, including values JSON cannot express."""

    extra: object = None


class Opaque:
    """A plain object pydantic does not know how to dump."""


def table(store: MessageStore) -> str:
    return '"' + Storage.message_table_name(store.name) + '"'


def raw_payloads(store: MessageStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return list(
            conn.exec_driver_sql(f"SELECT message FROM {table(store)} ORDER BY global_position").scalars()
        )


def row_count(store: MessageStore) -> int:
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table(store)}").scalar_one())


def insert_raw(store: MessageStore, stream: str, version: int, payload: str) -> uuid.UUID:
    """Put a row into the table behind the store's back, as another program might."""
    message_id = uuid.uuid4()
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {table(store)} (message_id, stream, version, message) "
            "VALUES (%s::uuid, %s, %s, %s::jsonb)",
            (str(message_id), stream, version, payload),
        )
    return message_id


@pytest.fixture
def numbered_store(engine: sa.Engine, unique_name: str) -> MessageStore[Numbered]:
    return MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))


@pytest.fixture
def union_store(engine: sa.Engine, unique_name: str) -> MessageStore[AnyMessage]:
    return MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(AnyMessage))


# -- round trips ----------------------------------------------------------------------------------


def test_single_model_round_trip(numbered_store: MessageStore) -> None:
    messages = [Numbered(number=i, text=f"text {i} ✓") for i in range(3)]
    numbered_store.write_all("s", messages)
    stored = [m.message for m in numbered_store.read("s")]
    assert stored == messages
    assert all(type(m) is Numbered for m in stored)


def test_union_round_trip_preserves_type(union_store: MessageStore) -> None:
    messages: list[AnyMessage] = [Numbered(number=1), Renamed(name="n"), Numbered(number=2, text="t")]
    for m in messages:
        union_store.write("s", m)

    stored = [m.message for m in union_store.read("s")]
    assert stored == messages
    assert [type(m) for m in stored] == [Numbered, Renamed, Numbered]
    with union_store.reader() as reader:
        assert type(reader.get_message_by_id(messages[1].get_message_id()).message) is Renamed
        assert [type(m.message) for m in reader.read_wildcard("%")] == [Numbered, Renamed, Numbered]


def test_typing_union_spelling_is_accepted(engine: sa.Engine, unique_name: str) -> None:
    store = MessageStore(
        name=unique_name,
        engine=engine,
        serializer=PydanticMessageSerializer(Union[Numbered, Renamed]),  # noqa: UP007
    )
    store.write("s", Renamed(name="r"))
    assert type(next(store.read("s")).message) is Renamed


def test_serializer_round_trip_without_database() -> None:
    serializer = PydanticMessageSerializer(AnyMessage)
    for message in (Numbered(number=3), Renamed(name="x")):
        payload = serializer.serialize(message)
        back = serializer.deserialize(payload)
        assert back == message
        assert type(back) is type(message)


def test_rich_field_types_round_trip_and_are_stored_as_json(engine: sa.Engine, unique_name: str) -> None:
    store = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Rich))
    message = Rich(
        number=1,
        amount=decimal.Decimal("12.345"),
        when=dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=dt.timezone.utc),
        day=dt.date(2024, 2, 29),
        ref=uuid.UUID(int=7),
        color=Color.BLUE,
        tags=["a", "b"],
        nested={"x": [1, 2]},
    )
    store.write("s", message)
    (stored,) = store.read("s")
    assert stored.message == message
    (raw,) = raw_payloads(store)
    assert raw["color"] == "blue"
    assert raw["ref"] == str(uuid.UUID(int=7))
    assert raw["day"] == "2024-02-29"
    assert raw["nested"] == {"x": [1, 2]}
    assert raw["maybe"] is None


# -- what is stored -------------------------------------------------------------------------------


def test_typename_is_stored_in_the_jsonb_payload(union_store: MessageStore) -> None:
    first, second = Numbered(number=5, text="five"), Renamed(name="r")
    union_store.write("s", first)
    union_store.write("s", second)

    raw = raw_payloads(union_store)
    assert [p["__typename__"] for p in raw] == ["Numbered", "Renamed"]
    assert raw[0]["number"] == 5
    assert raw[0]["text"] == "five"
    assert raw[0]["message_id"] == str(first.message_id)
    assert raw[1]["name"] == "r"
    with union_store.engine.connect() as conn:
        kind = conn.exec_driver_sql(
            f"SELECT DISTINCT jsonb_typeof(message) FROM {table(union_store)}"
        ).scalar_one()
    assert kind == "object"


def test_serialize_does_not_alter_the_message(numbered_store: MessageStore) -> None:
    message = Numbered(number=1)
    before = message.model_copy(deep=True)
    numbered_store.write("s", message)
    assert message == before
    assert not hasattr(message, "__typename__")


# -- unknown types on read ------------------------------------------------------------------------


def test_unknown_type_on_read_names_the_type(union_store: MessageStore) -> None:
    union_store.write("s", Numbered(number=1))
    ghost_id = insert_raw(union_store, "s", 2, json.dumps({"__typename__": "Ghost", "boo": 1}))

    with pytest.raises(UnknownMessageTypeError) as info:
        list(union_store.read("s"))
    assert "Ghost" in str(info.value)
    assert isinstance(info.value, LookupError)

    with union_store.reader() as reader:
        with pytest.raises(UnknownMessageTypeError, match="Ghost"):
            reader.get_message_by_id(ghost_id)
        with pytest.raises(UnknownMessageTypeError, match="Ghost"):
            list(reader.read_wildcard("%"))
    with pytest.raises(UnknownMessageTypeError, match="Ghost"):
        list(union_store.read_wildcard("s"))
    # the known message before it is still readable
    messages = union_store.read("s")
    assert next(messages).message.number == 1
    messages.close()


def test_payload_without_typename_on_read(numbered_store: MessageStore) -> None:
    insert_raw(numbered_store, "s", 1, '{"number": 1}')
    with pytest.raises(UnknownMessageTypeError):
        list(numbered_store.read("s"))


def test_type_known_to_one_store_object_but_not_another(engine: sa.Engine, unique_name: str) -> None:
    writer = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(AnyMessage))
    reader = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
    writer.write("s", Renamed(name="r"))
    with pytest.raises(UnknownMessageTypeError, match="Renamed"):
        list(reader.read("s"))


# -- bad messages on write ------------------------------------------------------------------------


def test_message_of_other_type_is_rejected(numbered_store: MessageStore) -> None:
    with pytest.raises(MessageSerializationError) as info:
        numbered_store.write("s", Renamed(name="x"))
    assert "Renamed" in str(info.value)
    assert isinstance(info.value, TypeError)  # Depeche DB raises TypeError here
    assert row_count(numbered_store) == 0


@pytest.mark.parametrize("value", [Opaque(), object(), b"\xff\xfe"], ids=["custom", "object", "bad-bytes"])
def test_non_json_value_is_rejected(engine: sa.Engine, unique_name: str, value: object) -> None:
    store = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Holder))
    with pytest.raises(MessageSerializationError):
        store.write("s", Holder(number=1, extra=value))
    with pytest.raises(MessageSerializationError):
        store.write_all("s", [Holder(number=2), Holder(number=3, extra=value)])
    assert row_count(store) == 0


def test_object_without_get_message_id_is_rejected(numbered_store: MessageStore) -> None:
    class NoId(pydantic.BaseModel):
        number: int

        def get_message_time(self) -> dt.datetime:
            return dt.datetime.now(dt.timezone.utc)

    with pytest.raises(MessageSerializationError):
        numbered_store.write("s", NoId(number=1))  # type: ignore[arg-type]
    with pytest.raises(MessageSerializationError):
        numbered_store.write("s", {"message_id": uuid.uuid4(), "number": 1})  # type: ignore[arg-type]
    with pytest.raises(MessageSerializationError):
        numbered_store.write("s", None)  # type: ignore[arg-type]
    assert row_count(numbered_store) == 0


def test_get_message_id_returning_non_uuid_is_rejected(engine: sa.Engine, unique_name: str) -> None:
    class StrId(Numbered):
        def get_message_id(self) -> uuid.UUID:
            return str(self.message_id)  # type: ignore[return-value]

    store = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(StrId))
    with pytest.raises(MessageSerializationError):
        store.write("s", StrId(number=1))
    assert row_count(store) == 0


def test_model_dumping_a_typename_key_of_its_own_is_rejected(engine: sa.Engine, unique_name: str) -> None:
    """A dump that already holds `__typename__` would be misread later; it is refused."""

    class Sneaky(Numbered):
        @pydantic.model_serializer(mode="wrap")
        def _dump(self, handler: Any) -> dict[str, Any]:
            data = dict(handler(self))
            data["__typename__"] = "Renamed"
            return data

    store = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Sneaky))
    with pytest.raises(MessageSerializationError):
        store.write("s", Sneaky(number=1))
    assert row_count(store) == 0


class _DictSerializer:
    """A hand-written serializer returning whatever it is told to, to probe the store's checks."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def serialize(self, message: Numbered) -> Any:
        return self.payload

    def deserialize(self, message: dict[str, Any]) -> Numbered:
        return Numbered(number=message["number"])


@pytest.mark.parametrize(
    "payload",
    [
        {"number": {1, 2}},
        {"number": float("nan")},
        {"number": float("inf")},
        {"number": Opaque()},
        {("tuple", "key"): 1},
        ["not", "a", "dict"],
        None,
    ],
    ids=["set", "nan", "inf", "object", "tuple-key", "list", "none"],
)
def test_custom_serializer_with_non_json_result_is_rejected(
    engine: sa.Engine, unique_name: str, payload: Any
) -> None:
    store = MessageStore(name=unique_name, engine=engine, serializer=_DictSerializer(payload))
    with pytest.raises(MessageSerializationError):
        store.write("s", Numbered(number=1))
    assert row_count(store) == 0


def test_custom_serializer_exception_becomes_serialization_error(engine: sa.Engine, unique_name: str) -> None:
    class Failing(_DictSerializer):
        def serialize(self, message: Numbered) -> Any:
            raise RuntimeError("boom")

    store = MessageStore(name=unique_name, engine=engine, serializer=Failing(None))
    with pytest.raises(MessageSerializationError, match="boom"):
        store.write("s", Numbered(number=1))
    assert row_count(store) == 0


# -- constructing serializers ---------------------------------------------------------------------


def test_serializer_rejects_non_models() -> None:
    with pytest.raises(TypeError):
        PydanticMessageSerializer(int)
    with pytest.raises(TypeError):
        PydanticMessageSerializer(Numbered | int)


def test_union_members_with_the_same_class_name_are_rejected() -> None:
    """Depeche DB: a duplicate name raises ValueError (the name is the discriminator)."""

    def make() -> type:
        class Numbered(pydantic.BaseModel):  # same __name__ as tests.support.Numbered
            x: int

        return Numbered

    other = make()
    with pytest.raises(ValueError):
        PydanticMessageSerializer(Union[Numbered, other])  # type: ignore[valid-type]  # noqa: UP007


def test_aliases_read_messages_stored_under_an_old_type_name(union_store: MessageStore) -> None:
    """Depeche DB: `PydanticMessageSerializer(message_type, aliases={old_name: Type})`."""
    old_payload = {"__typename__": "OldNumbered", "message_id": str(uuid.uuid4()), "number": 3}
    message_id = insert_raw(union_store, "s", 1, json.dumps(old_payload))
    store = MessageStore(
        name=union_store.name,
        engine=union_store.engine,
        serializer=PydanticMessageSerializer(AnyMessage, aliases={"OldNumbered": Numbered}),  # type: ignore[call-arg]
    )
    with store.reader() as reader:
        stored = reader.get_message_by_id(message_id)
    assert type(stored.message) is Numbered
    assert stored.message.number == 3


def test_a_same_named_class_of_another_module_is_refused_with_names_that_tell_them_apart() -> None:
    import types as _types

    other = _types.ModuleType("elsewhere")
    exec(  # a class named like a registered one, defined in another module
        "import pydantic, uuid, datetime as dt\n"
        "class Numbered(pydantic.BaseModel):\n"
        "    number: int\n"
        "    def get_message_id(self): return uuid.uuid4()\n"
        "    def get_message_time(self): return dt.datetime.now(dt.timezone.utc)\n",
        other.__dict__,
    )
    serializer = PydanticMessageSerializer(Numbered)
    with pytest.raises(MessageSerializationError) as caught:
        serializer.serialize(other.Numbered(number=1))
    assert "cannot serialise elsewhere.Numbered" in str(caught.value)
    assert f"handles {Numbered.__module__}.Numbered" in str(caught.value)

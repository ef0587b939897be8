"""Depeche DB's own API surface behaves as Depeche DB 0.13 documents it.

Code written for Depeche DB must run with only the import changed, so these
tests pin what such code observes: the builtin types of the exceptions it may
catch, the row shapes of the low-level `Storage`, naive UTC datetimes where
Depeche DB returns them, `Subscription.get_next_message_batch`, the asyncio
reader, and the names and call shapes of the public classes. They run on
whatever engine the fixtures give (psycopg2 or psycopg 3).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from depeche_nb import (
    DepecheError,
    HandlerRegistrationError,
    MessageHandler,
    MessageHandlerRegister,
    MessageIdMismatchError,
    MessageNotFound,
    MessageStore,
    OptimisticConcurrencyError,
    StartAtPointInTime,
    Storage,
    StoredMessage,
    SubscriptionMessage,
    SubscriptionMessageHandler,
)
from depeche_nb.tools import (
    DbLockProvider,
    DbSubscriptionStateProvider,
    PydanticMessageSerializer,
)
from tests.support import AnyMessage, Numbered, Renamed

UTC = dt.timezone.utc


@pytest.fixture
def store(engine: sa.Engine, unique_name: str) -> MessageStore[Numbered]:
    return MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))


class ByNumber:
    """Partition = number % 3."""

    def get_partition(self, message: StoredMessage[Numbered]) -> int:
        return message.message.number % 3


def utcnow_naive() -> dt.datetime:
    """What `datetime.utcnow()` returns, without its deprecation warning."""
    return dt.datetime.now(UTC).replace(tzinfo=None)


# -- exceptions: the builtin types Depeche DB raises -----------------------------------------------


def test_handler_without_a_message_parameter_is_a_value_error() -> None:
    def no_parameters() -> None:
        pass

    with pytest.raises(ValueError) as info:
        MessageHandlerRegister().register(no_parameters)
    assert not isinstance(info.value, TypeError)
    assert isinstance(info.value, HandlerRegistrationError)
    assert isinstance(info.value, DepecheError)

    class OnlySelf(MessageHandler[Numbered]):
        @MessageHandler.register
        def handle(self) -> None:
            pass

    with pytest.raises(ValueError):
        OnlySelf()


def test_handler_with_a_non_message_annotation_is_a_type_error() -> None:
    def takes_int(message: int) -> None:
        pass

    def unannotated(message):  # type: ignore[no-untyped-def]
        pass

    def takes_stored_str(message: StoredMessage[str]) -> None:
        pass

    for handler in (takes_int, unannotated, takes_stored_str):
        with pytest.raises(TypeError) as info:
            MessageHandlerRegister().register(handler)
        assert not isinstance(info.value, ValueError), handler.__name__
        assert isinstance(info.value, HandlerRegistrationError)


def test_overlapping_handlers_are_a_value_error_and_assert_not_registered_is_public() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def on_numbered(message: SubscriptionMessage[Numbered]) -> None:
        pass

    with pytest.raises(ValueError, match="Numbered"):
        register.register_manual(lambda m: None, Numbered)
    with pytest.raises(ValueError):
        register.assert_not_registered(Numbered)
    with pytest.raises(ValueError):
        register.assert_not_registered(Numbered | Renamed)  # type: ignore[arg-type]
    register.assert_not_registered(Renamed)  # no overlap: returns quietly


def test_serializer_errors_are_type_errors_and_a_missing_type_name_a_key_error() -> None:
    serializer: PydanticMessageSerializer[Numbered] = PydanticMessageSerializer(Numbered)
    with pytest.raises(TypeError, match="Ghost"):
        serializer.deserialize({"__typename__": "Ghost", "number": 1})
    with pytest.raises(TypeError):
        serializer.serialize(Renamed(name="not this serializer's"))  # type: ignore[arg-type]
    # Depeche DB pops "__typename__" from the dict: a missing one is a KeyError.
    with pytest.raises(KeyError):
        serializer.deserialize({"number": 1})


def test_reading_an_unknown_type_from_the_store_is_a_type_error(engine: sa.Engine, unique_name: str) -> None:
    writer = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(AnyMessage))
    reader = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
    writer.write("s", Renamed(name="r"))
    with pytest.raises(TypeError, match="Renamed"):
        list(reader.read("s"))
    with reader.reader() as r, pytest.raises(TypeError, match="Renamed"):
        list(r.read_wildcard("%"))


def test_store_errors_have_depeche_dbs_types(store: MessageStore[Numbered]) -> None:
    store.write("s", Numbered(number=1))
    with pytest.raises(OptimisticConcurrencyError) as conflict:
        store.write("s", Numbered(number=2), expected_version=0)
    assert not isinstance(conflict.value, ValueError)  # Depeche DB: a plain Exception subclass

    with pytest.raises(MessageIdMismatchError) as mismatch:
        store.synchronize("s", expected_version=1, messages=[Numbered(number=9)])
    assert isinstance(mismatch.value, ValueError)

    missing = uuid.uuid4()
    with store.reader() as reader, pytest.raises(MessageNotFound) as not_found:
        reader.get_message_by_id(missing)
    assert str(missing) in str(not_found.value)
    assert [m.version for m in store.read("s")] == [1]  # nothing was written by the failures


@pytest.mark.parametrize("bad_name", ["has space", "1starts_with_digit", "semi;colon", "da-sh"])
def test_bad_names_fail_like_depeche_dbs_asserts(engine: sa.Engine, bad_name: str) -> None:
    serializer: PydanticMessageSerializer[Numbered] = PydanticMessageSerializer(Numbered)
    for make in (
        lambda: MessageStore(name=bad_name, engine=engine, serializer=serializer),
        lambda: Storage(name=bad_name, engine=engine),
        lambda: DbLockProvider(bad_name, engine),
        lambda: DbSubscriptionStateProvider(bad_name, engine),
    ):
        with pytest.raises(AssertionError):
            make()
        with pytest.raises(ValueError):
            make()


def test_bad_stream_and_subscription_names_fail_like_asserts(
    store: MessageStore[Numbered], unique_name: str
) -> None:
    with pytest.raises(AssertionError):
        store.aggregated_stream(name="no way", partitioner=ByNumber(), stream_wildcards=["%"])
    stream = store.aggregated_stream(name=f"{unique_name}_a", partitioner=ByNumber(), stream_wildcards=["%"])
    with pytest.raises(AssertionError):
        stream.subscription(name="no-way")


def test_naive_points_in_time_are_value_errors(store: MessageStore[Numbered], unique_name: str) -> None:
    stream = store.aggregated_stream(name=f"{unique_name}_a", partitioner=ByNumber(), stream_wildcards=["%"])
    with pytest.raises(ValueError):
        StartAtPointInTime(dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        stream.time_to_positions(dt.datetime(2024, 1, 1))


def test_extra_handler_parameters_without_middleware_are_a_value_error() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def needs_more(message: Numbered, service: object) -> None:
        pass

    with pytest.raises(ValueError):
        SubscriptionMessageHandler(handler_register=register)

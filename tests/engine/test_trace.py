"""`store.trace(message)`: one message followed from its stream through every matching
aggregated stream to each subscription's outcome, on the real database."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
import depeche_nb.tools
from depeche_nb import MessageHandlerRegister, MessageNotFound, StoredMessage
from depeche_nb.engine import trace as t
from depeche_nb.postgres.names import quote_ident
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import AnyMessage, Numbered

pytestmark = pytest.mark.both_drivers


class ByNumber:
    """`n-<k>` goes to partition k % 2; number 99 cannot be partitioned."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        if message.message.number == 99:
            raise ValueError("99 has no partition")
        return int(message.stream.rsplit("-", 1)[-1]) % 2


def handlers(fail_on: set[int] | None = None) -> MessageHandlerRegister[Any]:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    def handle(message: Numbered) -> None:
        if message.number in (fail_on or set()):
            raise RuntimeError(f"cannot take {message.number}")

    register.register(handle)
    return register


class Shop:
    """A store whose `n-%` streams feed one aggregated stream with five subscriptions:

    partition 1: n-1 v1..v3 (numbers 10, 11, 12) at positions 0..2;
    partition 0: n-2 v1..v2 (numbers 20, 21) at positions 0..1.
    """

    def __init__(self, engine: sa.Engine, name: str) -> None:
        self.store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(AnyMessage))
        self.numbers = self.store.aggregated_stream(f"{name}_n", ByNumber(), ["n-%"])
        self.others = self.store.aggregated_stream(f"{name}_o", ByNumber(), ["other-%"])
        sub = self.numbers.subscription
        self.done = sub(f"{name}_done", handlers=handlers())
        self.slow = sub(f"{name}_slow", handlers=handlers())
        self.never = sub(f"{name}_never", handlers=handlers())
        park = depeche_nb.ParkSubscriptionErrorHandler()
        self.fussy = sub(f"{name}_fussy", handlers=handlers({11, 20}), error_handler=park)
        ignore = depeche_nb.LogAndIgnoreSubscriptionErrorHandler(f"{name}_lenient")
        self.lenient = sub(f"{name}_lenient", handlers=handlers({12}), error_handler=ignore)
        self.ids: dict[int, uuid.UUID] = {}
        for stream, numbers in (("n-1", (10, 11, 12)), ("n-2", (20, 21))):
            for number in numbers:
                self.write(stream, number)
        self.numbers.projector.run()
        for subscription in (self.done, self.fussy, self.lenient):
            subscription.runner.run()
        # The partition furthest behind first: partition 1 (3 messages), its position 0.
        self.slow.runner.step(max_messages=1)

    def write(self, stream: str, number: int) -> uuid.UUID:
        message = Numbered(number=number, text="<b>hi</b>")
        self.store.write(stream, message)
        self.ids[number] = message.message_id
        return message.message_id

    def trace(self, number: int) -> t.MessageTrace:
        return self.store.trace(self.ids[number])


def outcomes(trace: t.MessageTrace) -> dict[str, tuple[Any, ...]]:
    """Subscription (without the test's prefix) -> (status, acknowledged position, behind)."""
    (stream,) = trace.streams
    return {
        s.subscription.rsplit("_", 1)[1]: (s.status, s.acknowledged_position, s.behind)
        for s in stream.subscriptions
    }


@pytest.fixture
def shop(engine: sa.Engine, unique_name: str) -> Shop:
    return Shop(engine, unique_name)


def test_a_projected_message_in_every_subscription(shop: Shop) -> None:
    trace = shop.trace(12)  # partition 1, position 2
    assert (trace.stream, trace.version, trace.message_type) == ("n-1", 3, "Numbered")
    assert trace.global_position == next(m for m in shop.store.read("n-1") if m.version == 3).global_position
    assert trace.added_at.tzinfo is not None
    (stream,) = trace.streams
    assert (stream.aggregated_stream, stream.status) == (shop.numbers.name, t.PROJECTED)
    assert (stream.partition, stream.position, stream.head) == (1, 2, 2)
    assert stream.wildcards == ["n-%"]
    assert trace.unmatched_streams == [shop.others.name]
    assert outcomes(trace) == {
        "done": (t.HANDLED, 2, None),
        "fussy": (t.HANDLED, 2, None),
        "lenient": (t.IGNORED, 2, None),
        "never": (t.PENDING, -1, 3),
        "slow": (t.PENDING, 0, 2),
    }
    by_name = {s.subscription.rsplit("_", 1)[1]: s for s in stream.subscriptions}
    assert by_name["lenient"].error == "RuntimeError: cannot take 12"
    assert "not started yet" in by_name["never"].note and not by_name["never"].initialized
    assert by_name["slow"].note == "" and by_name["slow"].initialized

    # The next message of a pending partition is one behind; an acknowledged one is handled.
    assert outcomes(shop.trace(10))["slow"] == (t.HANDLED, 0, None)
    assert outcomes(shop.trace(11))["slow"] == (t.PENDING, 0, 1)
    assert outcomes(shop.trace(20))["slow"] == (t.PENDING, -1, 1)


def test_parked_then_discarded_or_replayed(shop: Shop) -> None:
    fussy = outcomes(shop.trace(11))["fussy"]
    assert fussy == (t.PARKED, 2, None)  # parked messages are acknowledged: the partition moved on
    parked = {p.message_id: p.id for p in shop.fussy.parked()}
    (stream,) = shop.trace(11).streams
    record = next(s for s in stream.subscriptions if s.subscription == shop.fussy.name)
    assert (record.error, record.attempts) == ("RuntimeError: cannot take 11", 1)

    shop.fussy.discard_parked(parked[shop.ids[11]])
    assert outcomes(shop.trace(11))["fussy"][0] == t.DISCARDED
    shop.fussy.message_handler = depeche_nb.SubscriptionMessageHandler(handler_register=handlers())
    shop.fussy.replay_parked(parked[shop.ids[20]])
    (stream,) = shop.trace(20).streams
    record = next(s for s in stream.subscriptions if s.subscription == shop.fussy.name)
    assert record.status == t.HANDLED
    assert record.note == "replayed after it was parked (RuntimeError: cannot take 20)"


def test_not_projected_yet_and_held_back_by_the_projector(shop: Shop) -> None:
    late = shop.write("n-1", 13)
    trace = shop.store.trace(late)
    (stream,) = trace.streams
    assert (stream.status, stream.partition, stream.position) == (t.NOT_PROJECTED, None, None)
    assert {s.status for s in stream.subscriptions} == {t.NOT_PROJECTED}
    assert all(s.acknowledged_position is None for s in stream.subscriptions)

    shop.write("n-3", 99)  # the partitioner fails on it
    shop.write("n-3", 30)  # held behind it, keeping n-3 in order
    shop.numbers.projector.run()
    assert shop.trace(13).streams[0].status == t.PROJECTED
    failed = shop.trace(99).streams[0]
    assert failed.status == t.HELD_BACK and "99 has no partition" in (failed.error or "")
    assert shop.trace(30).streams[0].status == t.HELD_BACK
    shop.numbers.projector.skip_dead_letter(shop.trace(99).global_position)
    assert shop.trace(99).streams[0].status == t.SKIPPED_BY_PROJECTOR


def test_a_message_no_aggregated_stream_matches(shop: Shop) -> None:
    trace = shop.store.trace(shop.write("zzz-1", 1))
    assert trace.streams == []
    assert trace.unmatched_streams == sorted([shop.numbers.name, shop.others.name])
    assert "no aggregated stream matches 'zzz-1'" in trace.summary()
    frame = trace.to_dataframe()
    assert len(frame) == 1 and frame["stream"].tolist() == ["zzz-1"]
    assert frame["aggregated_stream"].isna().all()
    page = trace._repr_html_()
    assert "no aggregated stream of store" in page and "no subscription will see this message" in page


def test_a_store_without_aggregated_streams(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(AnyMessage))
    message = Numbered(number=1)
    store.write("n-1", message)
    trace = store.trace(message.message_id)
    assert (trace.streams, trace.unmatched_streams) == ([], [])


def test_unknown_ids_and_bad_input(shop: Shop) -> None:
    missing = uuid.uuid4()
    with pytest.raises(MessageNotFound, match=str(missing)):
        shop.store.trace(missing)
    # Checked before the store is used: an object that is no store at all never gets touched.
    for bad, error, match in [
        (123, TypeError, "takes a message id"),
        (None, TypeError, "takes a message id"),
        ("not-a-uuid", ValueError, "is not a UUID"),
    ]:
        with pytest.raises(error, match=match):
            depeche_nb.MessageStore.trace(object(), bad)  # type: ignore[arg-type]


def test_trace_takes_ids_text_and_stored_messages_and_shows_itself(shop: Shop) -> None:
    stored = next(m for m in shop.store.read("n-1") if m.version == 3)
    assert shop.store.trace(stored) == shop.store.trace(str(stored.message_id)) == shop.trace(12)

    trace = shop.trace(12)
    frame = trace.to_dataframe()
    assert len(frame) == 5
    assert str(frame["version"].dtype) == "int64" and str(frame["partition"].dtype) == "Int64"
    assert str(frame["added_at"].dtype) == "datetime64[us, UTC]"
    slow = frame[frame["subscription"] == shop.slow.name].iloc[0]
    assert (slow["status"], slow["acknowledged_position"], slow["behind"]) == (t.PENDING, 0, 2)
    assert frame["behind"].isna().sum() == 3

    page = trace._repr_html_()
    visible = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", page, flags=re.S)).split())
    assert f"Aggregated stream {shop.numbers.name}: partition 1, position 2 (head 2)" in visible
    assert "RuntimeError: cannot take 12" in visible and "<b>" not in page
    assert repr(trace).startswith("<MessageTrace Numbered 'n-1' v3")
    assert f"{shop.slow.name} pending (2 behind)" in repr(trace)


def test_state_kept_by_another_provider_is_found(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(AnyMessage))
    stream = store.aggregated_stream(f"{unique_name}_n", ByNumber(), ["n-%"])
    provider = depeche_nb.tools.DbSubscriptionStateProvider(f"{unique_name}_shared", engine)
    subscription = stream.subscription(f"{unique_name}_s", handlers=handlers(), state_provider=provider)
    message = Numbered(number=1)
    store.write_all("n-1", [message, Numbered(number=2)])
    stream.projector.run()
    subscription.runner.step(max_messages=1)
    # A table that looks like state but that no provider made (providers' names are
    # lowercase identifiers) is not read.
    odd = quote_ident(f"Odd{unique_name}_subscription_state")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {odd} (x int)")
    try:
        (traced,) = store.trace(message.message_id).streams[0].subscriptions
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {odd}")
    assert (traced.status, traced.acknowledged_position, traced.initialized) == (t.HANDLED, 0, True)

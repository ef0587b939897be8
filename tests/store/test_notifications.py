"""LISTEN/NOTIFY on the store channel: when a listener is woken, and what it can see then."""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa

from depeche_nb import MessageStore, OptimisticConcurrencyError, Storage
from depeche_nb.postgres.driver import open_connection, pending_notifications
from depeche_nb.postgres.names import quote_ident
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers

ARRIVAL_TIMEOUT_S = 2.0  # upper bound for a notification that must come
SILENCE_S = 0.5  # how long we watch for a notification that must not come


class Notified(NamedTuple):
    channel: str
    payload: str


@pytest.fixture
def listener(engine: sa.Engine, store: MessageStore) -> Iterator[Any]:
    """A raw autocommit connection (the engine's driver) LISTENing on the store's channel."""
    conn = open_connection(engine)
    with conn.cursor() as cursor:
        cursor.execute(f"LISTEN {quote_ident(store.notification_channel)}")
    yield conn
    conn.close()


def wait_for_notifications(
    conn: Any,
    timeout: float,
    *,
    until_first: bool = True,
    on_each: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Collect notifications for at most `timeout` seconds (stop at the first one if `until_first`)."""
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([conn], [], [], remaining)
        if not readable:
            continue
        for channel, payload in pending_notifications(conn):
            notification = Notified(channel, payload)
            received.append(notification)
            if on_each is not None:
                on_each(notification)
        if received and until_first:
            break
    return received


def wait_until_quiet(conn: Any, quiet: float, limit: float, **kwargs: Any) -> list[Any]:
    """Collect notifications until none arrived for `quiet` seconds (at most `limit` seconds in all)."""
    received: list[Any] = []
    deadline = time.monotonic() + limit
    while (remaining := deadline - time.monotonic()) > 0:
        batch = wait_for_notifications(conn, min(quiet, remaining), until_first=False, **kwargs)
        if not batch:
            break
        received.extend(batch)
    return received


def visible_ids(conn: Any, store: MessageStore) -> set[uuid.UUID]:
    table = quote_ident(Storage.message_table_name(store.name))
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT message_id::text FROM {table}")
        return {uuid.UUID(row[0]) for row in cursor.fetchall()}


def test_listener_is_quiet_before_any_write(listener: Any) -> None:
    assert wait_for_notifications(listener, SILENCE_S) == []


def test_write_without_conn_notifies(store: MessageStore, listener: Any) -> None:
    store.write("s", Numbered(number=1))
    received = wait_for_notifications(listener, ARRIVAL_TIMEOUT_S)
    assert len(received) >= 1
    assert all(n.channel == store.notification_channel for n in received)


def test_data_is_visible_when_the_notification_arrives(store: MessageStore, listener: Any) -> None:
    message = Numbered(number=1)
    seen: list[bool] = []
    store.write("s", message)
    received = wait_for_notifications(
        listener,
        ARRIVAL_TIMEOUT_S,
        on_each=lambda n: seen.append(message.message_id in visible_ids(listener, store)),
    )
    assert received
    assert seen[0] is True


def test_last_notification_comes_after_the_last_commit(store: MessageStore, listener: Any) -> None:
    """Rapid writes may be coalesced into fewer notifications, but none is lost: when the
    last one arrives, every message is visible."""
    count = 30
    seen_counts: list[int] = []
    for n in range(count):
        store.write("s", Numbered(number=n))
    received = wait_until_quiet(
        listener, SILENCE_S, 5.0, on_each=lambda n: seen_counts.append(len(visible_ids(listener, store)))
    )
    assert 1 <= len(received) <= count
    assert seen_counts[-1] == count


def test_caller_conn_notifies_only_at_commit(engine: sa.Engine, store: MessageStore, listener: Any) -> None:
    message = Numbered(number=1)
    with engine.connect() as conn:
        store.write("s", message, conn=conn)
        assert wait_for_notifications(listener, SILENCE_S) == []  # transaction still open
        conn.commit()
    seen: list[bool] = []
    received = wait_for_notifications(
        listener,
        ARRIVAL_TIMEOUT_S,
        on_each=lambda n: seen.append(message.message_id in visible_ids(listener, store)),
    )
    assert len(received) == 1
    assert seen == [True]
    assert wait_for_notifications(listener, SILENCE_S) == []  # and only one


def test_caller_conn_rollback_does_not_notify(engine: sa.Engine, store: MessageStore, listener: Any) -> None:
    with engine.connect() as conn:
        store.write("s", Numbered(number=1), conn=conn)
        store.write_all("s", [Numbered(number=2), Numbered(number=3)], conn=conn)
        conn.rollback()
    assert wait_for_notifications(listener, 2 * SILENCE_S) == []


def test_many_writes_in_one_transaction_notify_once(
    engine: sa.Engine, store: MessageStore, listener: Any
) -> None:
    with engine.connect() as conn:
        for n in range(20):
            store.write(f"s-{n % 3}", Numbered(number=n), conn=conn)
        conn.commit()
    received = wait_until_quiet(listener, SILENCE_S, ARRIVAL_TIMEOUT_S + SILENCE_S)
    assert len(received) == 1
    assert len(visible_ids(listener, store)) == 20


def test_failed_write_does_not_notify(store: MessageStore, listener: Any) -> None:
    store.write("s", Numbered(number=1))
    assert wait_for_notifications(listener, ARRIVAL_TIMEOUT_S)
    wait_until_quiet(listener, 0.2, 1.0)  # drain any coalesced leftovers

    with pytest.raises(OptimisticConcurrencyError):
        store.write("s", Numbered(number=2), expected_version=0)
    assert wait_for_notifications(listener, SILENCE_S) == []


def test_other_store_writes_do_not_notify_this_channel(
    engine: sa.Engine, unique_name: str, store: MessageStore, listener: Any
) -> None:
    other = MessageStore(
        name=f"{unique_name}_other", engine=engine, serializer=PydanticMessageSerializer(Numbered)
    )
    assert other.notification_channel != store.notification_channel
    other.write("s", Numbered(number=1))
    with engine.connect() as conn:
        other.write("s", Numbered(number=2), conn=conn)
        conn.commit()
    assert wait_for_notifications(listener, SILENCE_S) == []

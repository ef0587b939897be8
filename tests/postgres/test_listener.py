"""The notification listener, `PgNotificationListener`, against the real PostgreSQL of the test
session."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from depeche_nb.core.errors import InvalidIdentifierError
from depeche_nb.postgres.listener import PgNotification, PgNotificationListener
from tests.postgres.support import WAIT_S, backend_alive, notify, wait_until_gone

pytestmark = pytest.mark.both_drivers


def next_message(listener: PgNotificationListener, timeout: float = WAIT_S) -> PgNotification | None:
    return next(listener.messages(timeout=timeout), None)


@pytest.fixture
def listener(engine: sa.Engine, channel: str) -> Iterator[PgNotificationListener]:
    with PgNotificationListener(engine, [channel]) as lst:
        yield lst


# -- PgNotificationListener ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [('{"a": 1, "b": "x"}', {"a": 1, "b": "x"}), ("", {}), ("[1, 2]", {}), ("not json", {})],
)
def test_listener_receives_a_notify_from_another_connection(
    engine: sa.Engine, listener: PgNotificationListener, channel: str, payload: str, expected: dict[str, Any]
) -> None:
    notify(engine, channel, payload)
    assert next_message(listener) == PgNotification(channel, expected)


def test_listener_ignore_payload(engine: sa.Engine, channel: str) -> None:
    with PgNotificationListener(engine, [channel], ignore_payload=True) as lst:
        notify(engine, channel, json.dumps({"a": 1}))
        assert next_message(lst) == PgNotification(channel, {})


def test_listener_only_delivers_its_channels(
    engine: sa.Engine, listener: PgNotificationListener, channel: str
) -> None:
    notify(engine, channel + "_other", "{}")
    notify(engine, channel, '{"n": 2}')
    assert next_message(listener) == PgNotification(channel, {"n": 2})


def test_listener_stop_is_prompt_and_closes_its_connection(engine: sa.Engine, channel: str) -> None:
    lst = PgNotificationListener(engine, [channel])
    lst.start()
    pid = lst.backend_pid
    assert pid is not None and backend_alive(engine, pid)
    started = time.monotonic()
    lst.stop()
    assert time.monotonic() - started < 1.0
    assert not lst.is_running
    assert wait_until_gone(engine, pid)
    assert list(lst.messages()) == []  # ends at once after stop()


def test_listener_stop_ends_a_blocked_messages_loop(listener: PgNotificationListener) -> None:
    threading.Timer(0.2, listener.stop).start()
    started = time.monotonic()
    assert list(listener.messages()) == []
    assert time.monotonic() - started < 1.0


def test_listener_messages_timeout_ends_the_iteration(listener: PgNotificationListener) -> None:
    started = time.monotonic()
    assert list(listener.messages(timeout=0.2)) == []
    assert 0.15 < time.monotonic() - started < 1.0


@pytest.mark.parametrize("form", ["sqlalchemy_url", "libpq_url"])
def test_listener_accepts_dsn_strings(engine: sa.Engine, channel: str, form: str) -> None:
    url = engine.url.render_as_string(hide_password=False)
    if form == "libpq_url":
        url = url.replace(f"postgresql+{engine.dialect.driver}://", "postgresql://", 1)
    with PgNotificationListener(url, [channel]) as lst:
        notify(engine, channel, '{"x": true}')
        assert next_message(lst) == PgNotification(channel, {"x": True})


@pytest.mark.parametrize("bad", ["x; DROP TABLE t", "a" * 64, "", "1abc", 'quo"te', 42])
def test_listener_rejects_invalid_channel_names(engine: sa.Engine, bad: Any) -> None:
    with pytest.raises(InvalidIdentifierError):
        PgNotificationListener(engine, [bad])


def test_listener_reconnects_and_signals_a_possible_gap(
    engine: sa.Engine, listener: PgNotificationListener, channel: str
) -> None:
    old_pid = listener.backend_pid
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": old_pid})
    # Anything sent while disconnected is lost, so a reconnect wakes every channel once.
    assert next_message(listener, timeout=5) == PgNotification(channel, {})
    assert listener.backend_pid not in (None, old_pid)
    notify(engine, channel, '{"after": 1}')
    assert next_message(listener) == PgNotification(channel, {"after": 1})


def test_listener_raises_when_it_cannot_reconnect(engine: sa.Engine, unique_name: str, channel: str) -> None:
    role = f"{unique_name}_role"
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        conn.commit()
    try:
        role_engine = sa.create_engine(engine.url.set(username=role, password="pw"))
        lst = PgNotificationListener(role_engine, [channel], reconnect_delays=(0.05, 0.05))
        lst.start()
        with engine.connect() as conn:
            conn.execute(sa.text(f"ALTER ROLE {role} NOLOGIN"))
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": lst.backend_pid})
            conn.commit()
        with pytest.raises(RuntimeError, match="could not reconnect"):
            list(lst.messages(timeout=5))
        lst.stop()
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
            conn.commit()

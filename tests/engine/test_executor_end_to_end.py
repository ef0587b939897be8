"""Invariant 5: a write reaches its handler through notifications alone, no explicit run call."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


def test_write_reaches_handler_through_notifications(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=StreamNamePartitioner(4), stream_wildcards=["e2e-%"]
    )
    received: list[int] = []
    arrived = threading.Event()

    class Handlers(depeche_nb.MessageHandler[Numbered]):
        @depeche_nb.MessageHandler.register
        def on_numbered(self, message: Numbered) -> None:
            received.append(message.number)
            if len(received) == 3:
                arrived.set()

    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=Handlers())
    # A 60 s safety net: only notifications can explain delivery within the wait below.
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=60)
    executor.register(stream.projector)
    executor.register(subscription.runner)
    executor.start()
    try:
        time.sleep(0.3)  # let the start-up catch-up runs finish with nothing to do
        for number in (1, 2, 3):
            store.write(f"e2e-{number}", Numbered(number=number))
        assert arrived.wait(timeout=10), f"handler saw only {received}"
        assert sorted(received) == [1, 2, 3]
        # The ack follows the handler's return: give it a moment.
        deadline = time.monotonic() + 5
        while any(p.lag for p in subscription.progress()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(p.lag == 0 for p in subscription.progress())
    finally:
        executor.stop()
    assert not executor.errors

"""Code run in child processes by the parallel-consumer tests (spawn imports it by name).

This module uses postponed annotations on purpose: every handler annotation
here is a string, which the handler register has to resolve.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from typing import Any

import depeche_nb
from depeche_nb import MessageHandler, StoredMessage, SubscriptionMessage
from depeche_nb.postgres.rawconn import open_dbapi_connection
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered, Renamed

PARTITIONS = 10
WILDCARD = "par-%"


class TenPartitioner:
    """`par-<n>` goes to partition n % 10."""

    def get_partition(self, message: StoredMessage[Numbered]) -> int:
        return int(message.stream.split("-")[1]) % PARTITIONS


def build_stream(
    engine: Any, store_name: str, stream_name: str
) -> tuple[depeche_nb.MessageStore[Numbered], depeche_nb.AggregatedStream[Numbered]]:
    store = depeche_nb.MessageStore(
        name=store_name, engine=engine, serializer=PydanticMessageSerializer(Numbered)
    )
    stream = store.aggregated_stream(
        name=stream_name, partitioner=TenPartitioner(), stream_wildcards=[WILDCARD]
    )
    return store, stream


def create_log_table(engine: Any, log_table: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'CREATE TABLE "{log_table}" (id bigserial PRIMARY KEY, pid integer NOT NULL, '
            "partition integer NOT NULL, position integer NOT NULL, message_id uuid NOT NULL, "
            "started_at timestamptz NOT NULL, finished_at timestamptz NOT NULL)"
        )


class LoggingHandlers(MessageHandler[Numbered]):
    """Appends one row per handler call to the shared log table, on its own autocommit
    connection; optionally kills its own process right after logging one position."""

    def __init__(
        self, engine: Any, log_table: str, crash_at: tuple[int, int] | None = None, max_sleep: float = 0.001
    ) -> None:
        super().__init__()
        self._conn = open_dbapi_connection(engine)  # autocommit: every row commits on its own
        self._insert = (
            f'INSERT INTO "{log_table}" (pid, partition, position, message_id, started_at, finished_at) '
            "VALUES (%s, %s, %s, %s::uuid, %s, clock_timestamp())"
        )
        self._crash_at = crash_at
        self._max_sleep = max_sleep
        self._pid = os.getpid()

    @MessageHandler.register
    def handle(self, message: SubscriptionMessage[Numbered]) -> None:
        with self._conn.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            started_at = cursor.fetchone()[0]
            time.sleep(random.random() * self._max_sleep)
            cursor.execute(
                self._insert,
                (
                    self._pid,
                    message.partition,
                    message.position,
                    str(message.stored_message.message_id),
                    started_at,
                ),
            )
        if self._crash_at == (message.partition, message.position):
            # The side effect (the log row) is committed, the ack is not: kill -9 now.
            os.kill(os.getpid(), signal.SIGKILL)


def run_consumer(
    store_name: str,
    stream_name: str,
    subscription_name: str,
    log_table: str,
    batch_size: int,
    ready: Any,
    start: Any,
    crash_at: tuple[int, int] | None = None,
    deadline_s: float = 50.0,
) -> None:
    """Run one subscription runner until no partition has work left (or the deadline passes)."""
    engine = depeche_nb.connect()  # DEPECHE_NB_DSN, exported by the test session
    _, stream = build_stream(engine, store_name, stream_name)
    subscription = stream.subscription(
        name=subscription_name,
        handlers=LoggingHandlers(engine, log_table, crash_at=crash_at),
        batch_size=batch_size,
    )
    ready.put(os.getpid())
    if not start.wait(timeout=30):
        sys.exit(4)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        subscription.runner.run()
        if all(p.lag == 0 for p in subscription.progress()):
            break
        time.sleep(0.005)  # the other runners hold the remaining partitions
    else:
        sys.exit(3)
    engine.dispose()


class FutureAnnotatedHandlers(MessageHandler[Any]):
    """Class-based handlers whose annotations are strings (postponed evaluation)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Any] = []

    @MessageHandler.register
    def on_numbered(self, message: SubscriptionMessage[Numbered]) -> None:
        self.received.append(message)

    @MessageHandler.register
    def on_renamed(self, message: StoredMessage[Renamed]) -> None:
        self.received.append(message)

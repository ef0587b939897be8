"""Executor processes for the fail-over test (spawn imports this module by name)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import depeche_nb
from depeche_nb import MessageHandler, SubscriptionMessage
from tests.support import Numbered
from tests.workers import LoggingHandlers, build_stream


class CrashAfter(LoggingHandlers):
    """Logs like LoggingHandlers, and kills its own process after `limit` messages."""

    def __init__(self, engine: Any, log_table: str, limit: int | None, delay: float = 0.0) -> None:
        super().__init__(engine, log_table, max_sleep=0.002)
        self._delay = delay
        self._limit = limit
        self._handled = 0

    @MessageHandler.register
    def handle(self, message: SubscriptionMessage[Numbered]) -> None:
        time.sleep(self._delay)
        super().handle(message)
        self._handled += 1
        if self._limit is not None and self._handled >= self._limit:
            os.kill(os.getpid(), signal.SIGKILL)


def run_executor(
    store_name: str,
    stream_name: str,
    subscription_name: str,
    log_table: str,
    crash_after: int | None,
    delay: float = 0.0,
) -> None:
    """An executor running one subscription's runner, woken only by notifications and lock retries
    (the safety-net timer is set far beyond the test's wait)."""
    engine = depeche_nb.connect()
    _, stream = build_stream(engine, store_name, stream_name)
    subscription = stream.subscription(
        name=subscription_name, handlers=CrashAfter(engine, log_table, crash_after, delay), batch_size=10
    )
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=600)
    executor.register(subscription.runner)
    executor.start()
    time.sleep(120)  # the parent terminates us

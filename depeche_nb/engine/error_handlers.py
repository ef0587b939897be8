"""Error policies for subscriptions: exit (default), log-and-ignore, retry, park."""

from __future__ import annotations

import dataclasses as _dc
import logging
from typing import TypeVar

from depeche_nb.core.interfaces import ErrorAction, SubscriptionErrorHandler, SubscriptionMessage
from depeche_nb.engine.handlers import ExitSubscriptionErrorHandler

E = TypeVar("E")


class LogAndIgnoreSubscriptionErrorHandler(SubscriptionErrorHandler[E]):
    """Log the error and move on; the runner also records the skip in the parked table."""

    def __init__(self, subscription_name: str) -> None:
        self.subscription_name = subscription_name
        self._log = logging.getLogger(f"depeche_nb.subscription.{subscription_name}")

    def handle_error(self, error: Exception, message: SubscriptionMessage[E]) -> ErrorAction:
        self._log.exception(
            "Error while handling message %s:%s",
            message.stored_message.message_id,
            type(message.stored_message.message).__name__,
            exc_info=error,
        )
        return ErrorAction.IGNORE


class ParkSubscriptionErrorHandler(SubscriptionErrorHandler[E]):
    """Move a failing message to the dead-letter (parked) table and continue the partition."""

    def handle_error(self, error: Exception, message: SubscriptionMessage[E]) -> ErrorAction:
        return ErrorAction.PARK


@_dc.dataclass(frozen=True)
class RetryPolicy:
    """Call a failing handler again up to `attempts` times in all, waiting between tries.

    The wait before retry n (1-based) is `backoff_seconds * backoff_factor ** (n - 1)`,
    capped at `max_backoff_seconds`. Only when every attempt failed is the
    subscription's error handler asked what to do.
    """

    attempts: int = 3
    backoff_seconds: float = 0.1
    backoff_factor: float = 2.0
    max_backoff_seconds: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        if self.backoff_seconds < 0 or self.backoff_factor < 1 or self.max_backoff_seconds < 0:
            raise ValueError("backoff values must be >= 0 (and backoff_factor >= 1)")

    def delay_before(self, retry: int) -> float:
        return float(min(self.backoff_seconds * self.backoff_factor ** (retry - 1), self.max_backoff_seconds))


__all__ = [
    "ExitSubscriptionErrorHandler",
    "LogAndIgnoreSubscriptionErrorHandler",
    "ParkSubscriptionErrorHandler",
    "RetryPolicy",
]

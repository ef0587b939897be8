"""`AggregatedStreamReader`: follow an aggregated stream from a start point, woken by NOTIFY.

State lives in memory and no locks are taken: a reader sees every message
of every partition, for inspection and tailing, not for parallel work.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from depeche_nb.core.interfaces import SubscriptionStartPoint, SubscriptionState
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.handlers import MessageHandlerRegister

if TYPE_CHECKING:
    from depeche_nb.engine.aggregated_stream import AggregatedStream

E = TypeVar("E")


class InMemorySubscriptionState:
    """Subscription state in a dict (per process, lost at exit)."""

    def __init__(self) -> None:
        self._states: dict[str, dict[int, int]] = {}
        self._mutex = threading.Lock()

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        with self._mutex:
            self._states.setdefault(subscription_name, {})[partition] = position

    def read(self, subscription_name: str) -> SubscriptionState:
        with self._mutex:
            return SubscriptionState(dict(self._states.get(subscription_name, {})))

    def initialize(self, subscription_name: str) -> None:
        with self._mutex:
            self._states.setdefault(subscription_name, {})

    def initialized(self, subscription_name: str) -> bool:
        with self._mutex:
            return subscription_name in self._states

    def session(self, **kwargs: Any) -> InMemorySubscriptionState:
        return self


class NullLockProvider:
    """Locks that always succeed (a single reader needs none)."""

    def lock(self, name: str) -> bool:
        return True

    def unlock(self, name: str) -> None:
        return None


class AggregatedStreamReader(Generic[E]):
    """`get_messages()` yields stored messages in partition order, then waits for more."""

    def __init__(
        self, stream: AggregatedStream[E], start_point: SubscriptionStartPoint | None = None
    ) -> None:
        self.stream = stream
        self._subscription = stream.subscription(
            name="reader",  # in-memory state, no locks: the name touches no table
            handlers=MessageHandlerRegister(),
            lock_provider=NullLockProvider(),
            state_provider=InMemorySubscriptionState(),
            start_point=start_point,
        )
        self._listener: Any = None

    def start(self) -> None:
        from depeche_nb.postgres.listener import PgNotificationListener

        if self._listener is None:
            self._listener = PgNotificationListener(
                self.stream.engine, [self.stream.notification_channel], select_timeout=0.5
            )
            self._listener.start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def _drain(self) -> Iterator[StoredMessage[E]]:
        while True:
            got = False
            for message in self._subscription.get_next_messages(count=100):
                got = True
                yield message.stored_message
            if not got:
                return

    def get_messages(self, timeout: float = 0) -> Iterator[StoredMessage[E]]:
        """Everything after the start point, then each new message as it is projected;
        ends after `timeout` seconds without news (0: until `stop()`)."""
        self.start()
        yield from self._drain()
        for _ in self._listener.messages(timeout=timeout):
            yield from self._drain()

    async def get_messages_async(self, timeout: float = 0) -> AsyncIterator[StoredMessage[E]]:
        import asyncio

        iterator = self.get_messages(timeout)
        sentinel = object()
        while True:
            item = await asyncio.to_thread(next, iterator, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]

    def __enter__(self) -> AggregatedStreamReader[E]:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AsyncAggregatedStreamReader(Generic[E]):
    """The reader for asyncio code: the same work, run in a worker thread."""

    def __init__(
        self, stream: AggregatedStream[E], start_point: SubscriptionStartPoint | None = None
    ) -> None:
        self._reader = AggregatedStreamReader(stream, start_point)

    async def start(self) -> None:
        import asyncio

        await asyncio.to_thread(self._reader.start)

    async def stop(self) -> None:
        import asyncio

        await asyncio.to_thread(self._reader.stop)

    async def get_messages(self, timeout: float = 0) -> AsyncIterator[StoredMessage[E]]:
        async for message in self._reader.get_messages_async(timeout):
            yield message

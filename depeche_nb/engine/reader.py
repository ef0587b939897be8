"""`AggregatedStreamReader`: follow an aggregated stream from a start point, woken by NOTIFY.

State lives in memory and no locks are taken: a reader sees every message
of every partition, for inspection and tailing, not for parallel work.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from depeche_nb.core.interfaces import SubscriptionStartPoint, SubscriptionState
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.handlers import MessageHandlerRegister
from depeche_nb.engine.subscription import Subscription, SubscriptionFactory

if TYPE_CHECKING:
    from depeche_nb.engine.protocols import StreamSource

E = TypeVar("E")


class InMemorySubscriptionState:
    """Subscription state in a dict (per process, lost at exit)."""

    # Nothing of the subscription's is stored, so its name is not recorded as a definition
    # (every reader uses the same one; see `engine.definitions`).
    records_definition = False

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


def _reader_subscription(
    stream: StreamSource[E], start_point: SubscriptionStartPoint | None
) -> Subscription[E]:
    return SubscriptionFactory(stream)(
        name="reader",  # in-memory state, no locks: the name touches no table
        handlers=MessageHandlerRegister(),
        lock_provider=NullLockProvider(),
        state_provider=InMemorySubscriptionState(),
        start_point=start_point,
    )


READ_BATCH = 100


class AggregatedStreamReader(Generic[E]):
    """`get_messages()` yields stored messages in partition order, then waits for more."""

    def __init__(self, stream: StreamSource[E], start_point: SubscriptionStartPoint | None = None) -> None:
        from depeche_nb.postgres.listener import PgNotificationListener

        self.stream = stream
        self.subscription: Subscription[E] = _reader_subscription(stream, start_point)
        self.notification_listener = PgNotificationListener(
            stream.engine, [stream.notification_channel], select_timeout=0.5
        )
        self._started = False

    def start(self) -> None:
        """Start listening for the stream's notifications (`get_messages` does it if needed)."""
        if not self._started:
            self.notification_listener.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.notification_listener.stop()

    def _drain(self) -> Iterator[StoredMessage[E]]:
        while True:
            got = False
            for message in self.subscription.get_next_messages(count=READ_BATCH):
                got = True
                yield message.stored_message
            if not got:
                return

    def get_messages(self, timeout: float = 0) -> Iterator[StoredMessage[E]]:
        """Everything after the start point, then each new message as it is projected;
        ends after `timeout` seconds without news (0: until `stop()`)."""
        self.start()
        yield from self._drain()
        for _ in self.notification_listener.messages(timeout=timeout):
            yield from self._drain()

    async def get_messages_async(self, timeout: float = 0) -> AsyncIterator[StoredMessage[E]]:
        """`get_messages` stepped in worker threads (prefer `AsyncAggregatedStreamReader`)."""
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
    """The reader for asyncio code: `async for m in reader.get_messages()`.

    Notifications arrive through `AsyncPgNotificationListener` (inside the
    event loop on psycopg 3, from a thread on psycopg2); each batch of
    messages is read in a worker thread, so the loop never waits on the
    database. A message counts as read once the consumer asks for the next
    one: breaking out of the loop and calling `get_messages()` again
    continues with the first message not yet taken past.
    """

    def __init__(self, stream: StreamSource[E], start_point: SubscriptionStartPoint | None = None) -> None:
        from depeche_nb.postgres.async_listener import AsyncPgNotificationListener

        self.stream = stream
        self.subscription: Subscription[E] = _reader_subscription(stream, start_point)
        self.notification_listener = AsyncPgNotificationListener(
            stream.engine, [stream.notification_channel], select_timeout=0.5
        )
        self._started = False

    async def start(self) -> None:
        """Start listening for the stream's notifications (`get_messages` does it if needed)."""
        if not self._started:
            await self.notification_listener.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.notification_listener.stop()

    async def _drain(self) -> AsyncGenerator[StoredMessage[E], None]:
        import asyncio

        subscription = self.subscription
        while True:
            batch = await asyncio.to_thread(subscription.get_next_message_batch, READ_BATCH)
            if batch is None:
                return
            # In-memory state and null locks: acknowledging is cheap enough for the loop.
            try:
                for message in batch.messages:
                    yield message.stored_message
                    batch.ack(message)
            finally:
                subscription.ack_message_batch(batch, success=True)

    async def get_messages(self, timeout: float = 0) -> AsyncIterator[StoredMessage[E]]:
        """Everything after the start point, then each new message as it is projected;
        ends after `timeout` seconds without news (0: until `stop()`)."""
        await self.start()
        # aclosing: when the consumer closes this generator, the drain is closed at
        # once (not at garbage collection), so what was taken is recorded first.
        async with contextlib.aclosing(self._drain()) as messages:
            async for message in messages:
                yield message
        async with contextlib.aclosing(self.notification_listener.messages(timeout=timeout)) as wake_ups:
            async for _ in wake_ups:
                async with contextlib.aclosing(self._drain()) as messages:
                    async for message in messages:
                        yield message

    async def __aenter__(self) -> AsyncAggregatedStreamReader[E]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

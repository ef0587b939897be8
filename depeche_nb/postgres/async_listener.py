"""LISTEN for asyncio code: notifications as an async iterator, never blocking the event loop.

Two ways, chosen by the engine's driver:

* psycopg 3 (`postgresql+psycopg://`): one `psycopg.AsyncConnection` in
  autocommit mode LISTENs on every channel, and a task on the loop reads
  `conn.notifies()` into an `asyncio.Queue`. Waiting is a socket wait inside
  the loop; no thread is involved.
* any other driver (psycopg2 has no asyncio API): the thread-based
  `PgNotificationListener` runs as it is, and a small pump thread hands each
  notification to the loop with `loop.call_soon_threadsafe`. Its blocking
  start (connect, LISTEN) and stop run in worker threads.

The connection is built from `engine.url` alone (rendered with its password,
`+driver` removed, query parameters such as `host=/socket/dir` or `options`
kept); `connect_args` given to `create_engine` are not seen.

As with the sync listener, a dropped connection is re-opened with backoff and
every channel then gets one synthetic notification with an empty payload (a
wake-up that may have been missed); if no reconnect succeeds, `messages()`
raises a `RuntimeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.listener import (
    APPLICATION_NAME,
    DEFAULT_RECONNECT_DELAYS,
    PgNotification,
    PgNotificationListener,
    checked_channels,
)
from depeche_nb.postgres.names import quote_ident

logger = logging.getLogger("depeche_nb.async_listener")

_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()


def libpq_dsn(url: sa.URL) -> str:
    """A libpq connection URI for a SQLAlchemy URL: `postgresql+psycopg2://u:p@h/db?x=y`
    becomes `postgresql://u:p@h/db?x=y` (password included)."""
    rendered = url.render_as_string(hide_password=False)
    _, sep, rest = rendered.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    return "postgresql://" + rest


def _decode(payload: str, ignore_payload: bool) -> dict[str, Any]:
    # Same rule as the sync listener: a JSON object is decoded, anything else is {}.
    if ignore_payload or not payload:
        return {}
    try:
        decoded = json.loads(payload)
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


class AsyncPgNotificationListener:
    """Receives notifications on `channels`; read them with `async for n in listener.messages()`.

    `dsn` is a SQLAlchemy URL, a libpq URL or an `Engine`. `await start()`
    connects and runs LISTEN before returning, so every notification sent
    after it returns is delivered. Also an async context manager.
    """

    def __init__(
        self,
        dsn: str | sa.Engine,
        channels: Sequence[str],
        select_timeout: float = 3.0,
        ignore_payload: bool = False,
        *,
        reconnect_delays: Sequence[float] = DEFAULT_RECONNECT_DELAYS,
    ) -> None:
        self.channels = checked_channels(channels, select_timeout)
        self.select_timeout = select_timeout
        self.ignore_payload = ignore_payload
        self.reconnect_delays = tuple(reconnect_delays)
        self._engine = connect(dsn)
        self.dsn = libpq_dsn(self._engine.url)
        self._queue: asyncio.Queue[object] | None = None
        # psycopg 3: the reading task and its connection.
        self._task: asyncio.Task[None] | None = None
        self._connection: Any = None
        # Other drivers: the sync listener and the thread pumping it into the loop.
        self._sync: PgNotificationListener | None = None
        self._pump: threading.Thread | None = None
        self._stopped = False

    @property
    def uses_asyncio_driver(self) -> bool:
        """True when the listener waits inside the event loop (psycopg 3), False when it
        runs the sync listener in a thread."""
        return self._engine.dialect.driver == "psycopg"

    @property
    def is_running(self) -> bool:
        if self._task is not None:
            return not self._task.done()
        return self._sync is not None and self._sync.is_running

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the listening connection (None when not connected)."""
        if self._sync is not None:
            return self._sync.backend_pid
        connection = self._connection
        return None if connection is None or connection.closed else int(connection.info.backend_pid)

    async def start(self) -> None:
        if self._queue is not None:
            raise RuntimeError("this AsyncPgNotificationListener is already started")
        self._stopped = False
        queue: asyncio.Queue[object] = asyncio.Queue()
        if self.uses_asyncio_driver:
            self._connection = await self._connect()
            self._task = asyncio.get_running_loop().create_task(
                self._read(queue), name="depeche-nb-async-listener"
            )
        else:
            await self._start_threaded(queue)
        self._queue = queue

    async def messages(self, timeout: float = 0) -> AsyncGenerator[PgNotification, None]:
        """Yield notifications as they arrive.

        Ends when `stop()` is called or, with `timeout > 0`, after `timeout`
        seconds without a notification. Starts a listener that was never
        started; after `stop()` it ends at once (until `start()` again).
        """
        if self._queue is None:
            if self._stopped:
                return
            await self.start()
        queue = self._queue
        assert queue is not None
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout) if timeout > 0 else await queue.get()
            except asyncio.TimeoutError:
                return
            if isinstance(item, PgNotification):
                yield item
                continue
            queue.put_nowait(item)  # the end is sticky: every later messages() call ends too
            if isinstance(item, _Failure):
                raise RuntimeError(f"Error in AsyncPgNotificationListener: {item.error}") from item.error
            return

    async def stop(self) -> None:
        """Stop listening and close the connection; safe to call more than once."""
        self._stopped = True
        queue, self._queue = self._queue, None
        task, self._task = self._task, None
        sync, self._sync = self._sync, None
        pump, self._pump = self._pump, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sync is not None:
            await asyncio.to_thread(sync.stop)
        if pump is not None:
            await asyncio.to_thread(pump.join, _JOIN_TIMEOUT_S)
        if queue is not None:
            queue.put_nowait(_END)  # a messages() still waiting ends

    async def __aenter__(self) -> AsyncPgNotificationListener:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"{type(self).__name__}(channels={self.channels!r}, {state})"

    # -- psycopg 3 ------------------------------------------------------------------------------

    async def _connect(self) -> Any:
        import psycopg

        connection = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, application_name=APPLICATION_NAME
        )
        try:
            for channel in self.channels:
                await connection.execute(f"LISTEN {quote_ident(channel)}")
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _read(self, queue: asyncio.Queue[object]) -> None:
        import psycopg

        terminal: object = _END
        try:
            while True:
                try:
                    async for notify in self._connection.notifies():
                        queue.put_nowait(
                            PgNotification(notify.channel, _decode(notify.payload, self.ignore_payload))
                        )
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    logger.warning("async notification listener lost its connection (%s); reconnecting", exc)
                    await self._close_connection()
                    self._connection = await self._reconnect(exc)
                    for channel in self.channels:
                        queue.put_nowait(PgNotification(channel, {}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("the async notification listener gave up: %s", exc)
            terminal = _Failure(exc)
        finally:
            await self._close_connection()
            queue.put_nowait(terminal)

    async def _reconnect(self, cause: Exception) -> Any:
        last_error: Exception = cause
        for attempt, delay in enumerate(self.reconnect_delays, start=1):
            await asyncio.sleep(delay)
            try:
                connection = await self._connect()
            except Exception as exc:
                last_error = exc
                logger.warning("async notification listener: reconnect attempt %d failed: %s", attempt, exc)
                continue
            logger.info("async notification listener reconnected after %d attempt(s)", attempt)
            return connection
        raise RuntimeError(
            f"lost the connection ({cause}) and could not reconnect after "
            f"{len(self.reconnect_delays)} attempt(s): {last_error}"
        ) from last_error

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:
                logger.debug("closing the async listener connection failed", exc_info=True)

    # -- other drivers: the sync listener in a thread -------------------------------------------

    async def _start_threaded(self, queue: asyncio.Queue[object]) -> None:
        sync = PgNotificationListener(
            self._engine,
            self.channels,
            select_timeout=self.select_timeout,
            ignore_payload=self.ignore_payload,
            reconnect_delays=self.reconnect_delays,
        )
        await asyncio.to_thread(sync.start)
        loop = asyncio.get_running_loop()

        def hand_over(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed; nobody is listening any more
                pass

        def pump() -> None:
            terminal: object = _END
            try:
                for notification in sync.messages():
                    hand_over(notification)
            except Exception as exc:
                terminal = _Failure(exc)
            finally:
                hand_over(terminal)

        self._sync = sync
        self._pump = threading.Thread(target=pump, name="depeche-nb-async-listener-pump", daemon=True)
        self._pump.start()


__all__ = ["AsyncPgNotificationListener", "libpq_dsn"]

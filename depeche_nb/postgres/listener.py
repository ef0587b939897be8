"""LISTEN on PostgreSQL channels in a background thread and hand the notifications to a consumer.

Why `select()` on the connection's socket plus a self-pipe: a notification
must wake the consumer at once (the whole point of LISTEN/NOTIFY is no
polling), and `stop()` must too. Blocking in `select()` on both file
descriptors gives both without any sleep loop; `select_timeout` only bounds
one idle wait. Closing the pipe's write end is the stop signal: an end of
file stays readable, so a thread that is busy reconnecting sees it as soon as
it selects again.

A dropped connection is re-opened with backoff. Notifications sent while it
was down are lost, so after a reconnect every channel gets one synthetic
notification with an empty payload: consumers treat a notification as "look
for new work", and this makes them look once more instead of missing a
wake-up. If no reconnect succeeds, `messages()` raises a `RuntimeError`;
with `reconnect_delays=None` (what an Executor uses) it never gives up and
retries on `core.backoff`'s bounded schedule until stopped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.backoff import backoff_delays
from depeche_nb.core.errors import InvalidIdentifierError
from depeche_nb.core.lifecycle import StartStopContext
from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.driver import backend_pid, is_driver_error, pending_notifications
from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.rawconn import open_dbapi_connection

logger = logging.getLogger("depeche_nb.listener")

APPLICATION_NAME = "depeche_nb_listener"
# About 30 s in total: long enough to ride out a server restart.
DEFAULT_RECONNECT_DELAYS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
_STOP_JOIN_TIMEOUT_S = 5.0
# PostgreSQL truncates identifiers at 63 bytes; a longer channel would
# silently listen on a different (truncated) name.
_CHANNEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def validate_channel(channel: object) -> str:
    """Return `channel` if it is a plain identifier of at most 63 characters."""
    if not isinstance(channel, str):
        raise InvalidIdentifierError(f"a channel name must be a str, got {type(channel).__name__}")
    if not _CHANNEL.fullmatch(channel):
        raise InvalidIdentifierError(
            f"channel {channel!r} is not a valid identifier: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return channel


def checked_channels(channels: Sequence[str], select_timeout: float) -> list[str]:
    """A listener's channels, validated and without repeats (and its timeout checked)."""
    if isinstance(channels, str):
        raise TypeError("channels must be a sequence of channel names, not a single str")
    if select_timeout <= 0:
        raise ValueError(f"select_timeout must be > 0, got {select_timeout}")
    return list(dict.fromkeys(validate_channel(c) for c in channels))


@dataclass
class PgNotification:
    """One notification: its channel and its payload (a JSON object decoded, else `{}`)."""

    channel: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()


class _ReconnectFailed(Exception):
    pass


class PgNotificationListener(StartStopContext):
    """Receives notifications on `channels` from a background thread; read them with `messages()`.

    `dsn` is a SQLAlchemy URL (`postgresql+psycopg://...`, `postgresql+psycopg2://...`), a libpq URL
    (`postgresql://...`) or an `Engine`. `start()` connects and runs LISTEN
    before returning, so every notification sent after it returns is
    delivered; it raises if the database cannot be reached.
    """

    def __init__(
        self,
        dsn: str | sa.Engine,
        channels: Sequence[str],
        select_timeout: float = 3.0,
        ignore_payload: bool = False,
        *,
        reconnect_delays: Sequence[float] | None = DEFAULT_RECONNECT_DELAYS,
        on_notification: Callable[[PgNotification], None] | None = None,
    ) -> None:
        self.channels = checked_channels(channels, select_timeout)
        self.select_timeout = select_timeout
        self.ignore_payload = ignore_payload
        # Called on the listener's thread for each notification instead of queueing it for
        # messages() (which then only ends): one thread hand-off less (the Executor's).
        self._on_notification = on_notification
        self.reconnect_delays = None if reconnect_delays is None else tuple(reconnect_delays)
        # Successful reconnects since construction (an Executor reports them).
        self.reconnects = 0
        self._engine = connect(dsn)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_fd: int | None = None
        self._queue: queue.Queue[object] | None = None
        self._backend_pid: int | None = None

    # -- public -------------------------------------------------------------------------------

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the current listening connection (None when not connected)."""
        return self._backend_pid

    @property
    def is_running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this PgNotificationListener is already started")
            connection = self._connect()
            read_fd, self._stop_fd = os.pipe()
            self._queue = queue.Queue()
            self._thread = threading.Thread(
                target=self._thread_main,
                args=(connection, read_fd, self._queue),
                name="depeche-nb-listener",
                daemon=True,  # a forgotten listener must not keep a notebook kernel from exiting
            )
            self._thread.start()

    def messages(self, timeout: float = 0) -> Iterator[PgNotification]:
        """Yield notifications as they arrive.

        Ends when `stop()` is called or, with `timeout > 0`, after `timeout`
        seconds without a notification. Raises `RuntimeError` if the
        connection was lost for good.
        """
        q = self._queue
        if q is None:
            raise RuntimeError("call start() before messages()")
        wait = timeout if timeout > 0 else None
        while True:
            try:
                item = q.get(timeout=wait)
            except queue.Empty:
                return
            if isinstance(item, PgNotification):
                yield item
                continue
            q.put(item)  # the end is sticky: every later messages() call ends too
            if isinstance(item, _Failure):
                raise RuntimeError(f"Error in PgNotificationListener: {item.error}") from item.error
            return

    def stop(self) -> None:
        """Stop the thread and close the connection; safe to call more than once, from any thread."""
        with self._lock:
            thread, stop_fd, q = self._thread, self._stop_fd, self._queue
            self._thread = self._stop_fd = None
            if thread is None or stop_fd is None:
                return
            os.close(stop_fd)
            if thread is threading.current_thread():
                return  # from `on_notification`: the thread ends when the callback returns
            thread.join(timeout=_STOP_JOIN_TIMEOUT_S)
            if thread.is_alive():
                # Stuck in a connect attempt; it closes its connection when that returns.
                logger.warning(
                    "the notification listener thread did not stop within %.0f s", _STOP_JOIN_TIMEOUT_S
                )
                if q is not None:
                    q.put(_END)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"{type(self).__name__}(channels={self.channels!r}, {state})"

    # -- the thread ---------------------------------------------------------------------------

    def _thread_main(self, connection: Any, stop_fd: int, q: queue.Queue[object]) -> None:
        terminal: object = _END
        try:
            self._listen(connection, stop_fd, q)
        except Exception as exc:
            logger.error("the notification listener gave up: %s", exc)
            terminal = _Failure(exc)
        finally:
            os.close(stop_fd)
            q.put(terminal)

    def _listen(self, connection: Any, stop_fd: int, q: queue.Queue[object]) -> None:
        try:
            while True:
                try:
                    if self._stop_requested(connection, stop_fd):
                        return
                    self._drain(connection, q)
                except Exception as exc:
                    # ValueError: select() on a connection whose socket is already closed.
                    if not (is_driver_error(exc) or isinstance(exc, (OSError, ValueError))):
                        raise
                    logger.warning("notification listener lost its connection (%s); reconnecting", exc)
                    _close_quietly(connection)
                    connection = self._reconnect(stop_fd, exc)
                    if connection is None:
                        return
                    for channel in self.channels:
                        self._deliver(q, PgNotification(channel, {}))
        finally:
            _close_quietly(connection)
            self._backend_pid = None

    def _stop_requested(self, connection: Any, stop_fd: int) -> bool:
        """Block until the connection has input or stop() was called; True for the latter."""
        readable, _, _ = select.select([connection, stop_fd], [], [], self.select_timeout)
        return stop_fd in readable

    def _drain(self, connection: Any, q: queue.Queue[object]) -> None:
        for channel, payload in pending_notifications(connection):
            self._deliver(q, PgNotification(channel, self._parse(payload)))

    def _deliver(self, q: queue.Queue[object], notification: PgNotification) -> None:
        if self._on_notification is None:
            q.put(notification)
        else:
            self._on_notification(notification)

    def _parse(self, payload: str) -> dict[str, Any]:
        # Our store sends empty payloads; other senders may send anything.
        # A notification is still a wake-up, so it is delivered either way.
        if self.ignore_payload or not payload:
            return {}
        try:
            decoded = json.loads(payload)
        except ValueError:
            logger.debug("notification payload is not JSON: %.100r", payload)
            return {}
        return decoded if isinstance(decoded, dict) else {}

    def _reconnect(self, stop_fd: int, cause: Exception) -> Any:
        """A new listening connection, or None if stop() was called while waiting."""
        last_error: Exception = cause
        delays = backoff_delays() if self.reconnect_delays is None else iter(self.reconnect_delays)
        for attempt, delay in enumerate(delays, start=1):
            readable, _, _ = select.select([stop_fd], [], [], delay)
            if readable:
                return None
            try:
                connection = self._connect()
            except Exception as exc:
                last_error = exc
                logger.warning("notification listener: reconnect attempt %d failed: %s", attempt, exc)
                continue
            logger.info("notification listener reconnected after %d attempt(s)", attempt)
            self.reconnects += 1
            return connection
        raise _ReconnectFailed(
            f"lost the connection ({cause}) and could not reconnect after "
            f"{len(self.reconnect_delays or ())} attempt(s): {last_error}"
        ) from last_error

    def _connect(self) -> Any:
        # Disposing the engine must end our session too; a listener cannot
        # quietly open a new one then, so it stops (consumers see the end).
        connection = open_dbapi_connection(self._engine, on_dispose=self.stop)
        try:
            statements = [f"SET application_name TO {quote_ident(APPLICATION_NAME)}"]
            statements += [f"LISTEN {quote_ident(channel)}" for channel in self.channels]
            with connection.cursor() as cursor:
                cursor.execute("; ".join(statements))
        except BaseException:
            _close_quietly(connection)
            raise
        self._backend_pid = backend_pid(connection)
        return connection


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        logger.debug("closing the listener connection failed", exc_info=True)


__all__ = ["PgNotification", "PgNotificationListener", "checked_channels", "validate_channel"]

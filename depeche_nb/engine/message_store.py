"""The message store: typed messages in, `StoredMessage`s out, with optimistic concurrency.

Notifications. PostgreSQL serialises every commit that carries a NOTIFY,
cluster-wide, on one lock held through that commit's WAL flush, so a NOTIFY
inside each writing transaction turns concurrent writers into a queue and
defeats group commit. When the store owns the transaction (no `conn`
given), one round trip sends: the data transaction (no NOTIFY), its COMMIT,
then a tiny second transaction with `synchronous_commit = off` holding only
the NOTIFY, which takes the notify lock for microseconds since it waits for
no flush. A listener is woken only after the data committed, so it always
finds it; if the connection dies between the two commits, the wake-up (never
the data) is lost and consumers' safety-net timer covers it. When the caller
passes `conn`, the NOTIFY is part of their transaction (PostgreSQL folds
identical ones, so it is sent once per transaction) and fires only if they
commit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import sqlalchemy as sa

from depeche_nb.core.display import DEFAULT_LIMIT, STREAMS_LIMIT, RichRepr, run_view
from depeche_nb.core.errors import (
    DepecheError,
    MessageIdMismatchError,
    MessageSerializationError,
)
from depeche_nb.core.identifiers import validate_stream, validate_wildcard
from depeche_nb.core.messages import MessagePosition, MessageSerializer, StoredMessage
from depeche_nb.postgres.driver import is_driver_error, script_value
from depeche_nb.postgres.rawconn import autocommit_cursor, callers_or_own, execute_prepared, prepared_sql
from depeche_nb.store.storage import (
    Storage,
    check_expected_version,
    translate_write_error,
)

if TYPE_CHECKING:
    import pandas as pd

from depeche_nb.engine.aggregated_stream import AggregatedStreamFactory
from depeche_nb.engine.trace import MessageTrace, trace_message
from depeche_nb.store.reading import MessageStoreReader, stored_message_decoder

E = TypeVar("E")
# Rows per round trip when a read streams from a server-side cursor.
_STREAM_CHUNK_ROWS = 5000


@functools.lru_cache(maxsize=256)
def _is_message_type(cls: type) -> bool:
    # isinstance() against a runtime Protocol costs ~20 us; this is per class.
    return callable(getattr(cls, "get_message_id", None)) and callable(getattr(cls, "get_message_time", None))


class MessageStore(RichRepr, Generic[E]):
    """A named message store on an engine: typed messages in, `StoredMessage`s out, with
    optimistic concurrency; `aggregated_stream(...)` defines aggregated streams over it."""

    def __init__(self, name: str, engine: sa.Engine, serializer: MessageSerializer[E]) -> None:
        if not isinstance(engine, sa.Engine):
            raise TypeError(f"engine must be a SQLAlchemy Engine, got {type(engine).__name__}")
        self._storage = Storage(name=name, engine=engine)
        self._serializer = serializer
        self.name = name
        self.engine = engine
        self.aggregated_stream: AggregatedStreamFactory[E] = AggregatedStreamFactory(self)

    @property
    def notification_channel(self) -> str:
        return self._storage.notification_channel

    @property
    def serializer(self) -> MessageSerializer[E]:
        return self._serializer

    # -- writing ------------------------------------------------------------------------------

    def write(
        self,
        stream: str,
        message: E,
        expected_version: int | None = None,
        conn: sa.Connection | None = None,
    ) -> MessagePosition:
        """Append one message. `expected_version`: None = no check, 0 = stream must be empty,
        N = the stream must be at version N; otherwise `OptimisticConcurrencyError`."""
        return self.write_all(stream, [message], expected_version, conn)

    def write_all(
        self,
        stream: str,
        messages: Sequence[E],
        expected_version: int | None = None,
        conn: sa.Connection | None = None,
    ) -> MessagePosition:
        """Append several messages atomically, in one round trip; returns the last position."""
        serialized = [self._serialize(message) for message in messages]
        return self._append(stream, expected_version, serialized, conn)

    def synchronize(
        self,
        stream: str,
        expected_version: int | None,
        messages: Sequence[E],
        conn: sa.Connection | None = None,
    ) -> MessagePosition:
        """Make the stream hold `messages` (its whole history from version 1).

        Messages already stored (same ids, same order) are skipped; the rest are
        appended, checked against `expected_version`. A stored id that differs
        from the given one raises `MessageIdMismatchError`. When nothing is new
        the call returns the head and checks nothing, so re-synchronising is
        idempotent.
        """
        expected = check_expected_version(expected_version)
        serialized = [self._serialize(message) for message in messages]
        with self._connection(conn) as c:
            stored_ids = list(self._storage.get_message_ids(c, stream))
        for index, (stored_id, (given_id, _)) in enumerate(zip(stored_ids, serialized, strict=False)):
            if stored_id != given_id:
                raise MessageIdMismatchError(
                    f"message id mismatch at version {index + 1} of stream {stream!r}: stored "
                    f"{stored_id}, given {given_id}; has the stream been modified in the meantime?"
                )
        remaining = serialized[len(stored_ids) :]
        if not remaining:
            with self._connection(conn) as c:
                return self._storage.get_max_version(c, stream)
        # Without an explicit expectation, still pin the head we compared
        # against, so a concurrent append cannot slip between check and write.
        return self._append(stream, len(stored_ids) if expected is None else expected, remaining, conn)

    def truncate(self) -> None:
        """Delete every message of this store (aggregated streams are not touched)."""
        with self.engine.begin() as conn:
            self._storage.truncate(conn)

    def _serialize(self, message: E) -> tuple[uuid.UUID, dict[str, Any]]:
        if not _is_message_type(type(message)):  # type: ignore[arg-type]
            raise MessageSerializationError(
                f"{type(message).__name__} is not a message: it needs get_message_id() and get_message_time()"
            )
        message_id = message.get_message_id()  # type: ignore[attr-defined]
        if not isinstance(message_id, uuid.UUID):
            raise MessageSerializationError(
                f"{type(message).__name__}.get_message_id() returned {type(message_id).__name__}, not a UUID"
            )
        try:
            payload = self._serializer.serialize(message)
        except DepecheError:
            raise
        except Exception as exc:
            raise MessageSerializationError(f"cannot serialise {type(message).__name__}: {exc}") from exc
        if not isinstance(payload, dict):
            raise MessageSerializationError(
                f"the serializer returned {type(payload).__name__} for "
                f"{type(message).__name__}; it must return a dict"
            )
        return message_id, payload

    def _append(
        self,
        stream: str,
        expected_version: int | None,
        serialized: Sequence[tuple[uuid.UUID, dict[str, Any]]],
        conn: sa.Connection | None,
    ) -> MessagePosition:
        if conn is not None:
            return self._storage.add_all(conn, stream, expected_version, serialized, notify=True)
        params = self._storage.write_params(stream, expected_version, serialized, notify=False)
        with autocommit_cursor(self.engine) as cursor:
            try:
                statements = self._storage.statements
                execute_write = prepared_sql(cursor, statements.write_recording)
                last = script_value(cursor.connection, statements.write_and_notify_sql(execute_write), params)
            except Exception as exc:
                if not is_driver_error(exc):
                    raise
                # The string stops at the failing statement, inside our BEGIN.
                if not cursor.connection.closed:
                    cursor.execute("ROLLBACK")
                translated = translate_write_error(exc, stream)
                if translated is not None:
                    raise translated from exc
                raise
        assert last is not None  # the script ends by reading the setting it wrote
        version, global_position = (int(part) for part in last.split(","))
        return MessagePosition(stream, version, global_position)

    # -- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reader(self, conn: sa.Connection | None = None) -> Iterator[MessageStoreReader[E]]:
        with self._connection(conn) as c:
            yield MessageStoreReader(c, self._storage, self._serializer, owned=conn is None)

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        """The stream's messages in version order (from `min_version` on, if given)."""
        validate_stream(stream)
        with autocommit_cursor(self.engine) as cursor:
            execute_prepared(cursor, self._storage.statements.text_read, (stream, min_version or 0))
            rows = cursor.fetchall()
        decode = stored_message_decoder(self._serializer)
        for row in rows:
            yield decode(row)

    def read_wildcard(self, stream_wildcard: str) -> Iterator[StoredMessage[E]]:
        """Messages of every stream matching the SQL LIKE pattern, in global order.

        Rows arrive in chunks from a server-side cursor, so a large store does
        not have to fit in memory at once.
        """
        yield from self._stream_rows(
            self._storage.statements.text_wildcard_sql, (validate_wildcard(stream_wildcard),)
        )

    def _stream_rows(self, sql: str, params: tuple[Any, ...]) -> Iterator[StoredMessage[E]]:
        raw = self.engine.raw_connection()
        try:
            dbapi = raw.driver_connection
            assert dbapi is not None
            with dbapi.cursor(name=f"depeche_nb_{uuid.uuid4().hex}") as cursor:
                cursor.itersize = _STREAM_CHUNK_ROWS
                cursor.execute(sql, params)
                decode = stored_message_decoder(self._serializer)
                # fetchmany: iterating a named cursor row by row costs a Python call per row.
                while rows := cursor.fetchmany(_STREAM_CHUNK_ROWS):
                    for row in rows:
                        yield decode(row)
            dbapi.commit()
        finally:
            raw.close()

    def _connection(self, conn: sa.Connection | None) -> contextlib.AbstractContextManager[sa.Connection]:
        return callers_or_own(self.engine, conn)

    # -- DataFrame views (built by `notebook.views`; pandas loads on first use) ----------------

    def to_dataframe(
        self,
        stream: str | None = None,
        wildcard: str | None = None,
        limit: int | None = DEFAULT_LIMIT,
        since: int | _dt.datetime | None = None,
    ) -> pd.DataFrame:
        """Messages as a DataFrame: one `stream`, a `wildcard` or the whole store; at most
        `limit` rows (default 10,000; None = all), from global position / time `since`.
        Payload keys become columns; see `notebook.views.store.messages_dataframe`."""
        return run_view("messages", self, stream=stream, wildcard=wildcard, limit=limit, since=since)  # type: ignore[no-any-return]

    def streams_dataframe(self, limit: int | None = STREAMS_LIMIT) -> pd.DataFrame:
        """One row per stream, by name: message count, first/last global position, last write;
        at most `limit` streams (default 1,000; None = all), see `notebook.views.store`."""
        return run_view("streams", self, limit=limit)  # type: ignore[no-any-return]

    def trace(self, message: uuid.UUID | str | StoredMessage[E]) -> MessageTrace:
        """Where a stored message went (by id, or a `StoredMessage` read from this store): its
        stream, version and global position; its partition and position in every aggregated
        stream whose wildcards match it (or "not projected yet"); and whether each of their
        subscriptions handled it, still has it pending (and how far behind it is), or parked
        it (with the error). `MessageNotFound` for an unknown id. See `engine.trace`."""
        return trace_message(self, message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


__all__ = ["MessageStore"]

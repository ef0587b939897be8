"""Stored messages as they are read: rows to `StoredMessage`s (or `UnreadableMessage`
placeholders) and `MessageStoreReader`, reads on one connection."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from depeche_nb.core.errors import (
    MessageNotFound,
    UnreadableMessageError,
)
from depeche_nb.core.identifiers import validate_stream, validate_wildcard
from depeche_nb.core.messages import MessageSerializer, StoredMessage, UnreadableMessage
from depeche_nb.postgres.driver import PSYCOPG2
from depeche_nb.postgres.rawconn import execute_in, execute_prepared_in
from depeche_nb.store.storage import (
    Storage,
)

E = TypeVar("E")


def stored_message_decoder(serializer: MessageSerializer[E]) -> Callable[[Sequence[Any]], StoredMessage[E]]:
    """Rows in `messages_table.ROW_COLUMNS` order (payload as JSON text or a dict) to
    `StoredMessage`s: build it once per read, call it per row (the serializer's methods are
    looked up once; JSON text goes to its own parser where it has one)."""
    from_text = getattr(serializer, "deserialize_text", None)
    from_dict = serializer.deserialize

    def decode(row: Sequence[Any]) -> StoredMessage[E]:
        message_id, stream, version, payload, global_position, added_at = row
        if isinstance(payload, str):
            if from_text is not None:
                message = from_text(payload)
            else:
                message = from_dict(json.loads(payload))
        else:
            message = from_dict(payload)
        # The message carries its own id (the store wrote exactly that one), which
        # spares parsing the column's text for every row.
        if not isinstance(message_id, uuid.UUID):
            own_id = getattr(message, "get_message_id", None)
            parsed_id = own_id() if own_id is not None else None
            if isinstance(parsed_id, uuid.UUID) and str(parsed_id) == message_id:
                message_id = parsed_id
            else:
                message_id = uuid.UUID(message_id)
        return StoredMessage(message_id, stream, version, message, global_position, added_at)

    return decode


def stored_or_unreadable_decoder(
    serializer: MessageSerializer[E],
) -> Callable[[Sequence[Any]], StoredMessage[Any]]:
    """`stored_message_decoder`, except that a payload that cannot be deserialised gives a
    `StoredMessage` holding an `UnreadableMessage` (for subscriptions, see there)."""
    decode = stored_message_decoder(serializer)

    def decode_or_placeholder(row: Sequence[Any]) -> StoredMessage[Any]:
        try:
            return decode(row)
        except Exception as exc:
            return _unreadable(row, exc)

    return decode_or_placeholder


def _unreadable(row: Sequence[Any], exc: Exception) -> StoredMessage[Any]:
    message_id, stream, version, _, global_position, added_at = row
    error = UnreadableMessageError(
        f"message {message_id} (stream {stream!r}, version {version}, global position "
        f"{global_position}) cannot be deserialised: {type(exc).__name__}: {exc}"
    )
    error.__cause__ = exc
    message_uuid = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
    return StoredMessage(message_uuid, stream, version, UnreadableMessage(error), global_position, added_at)


class MessageStoreReader(Generic[E]):
    """Reads on one connection (the caller's or one the store opened for a `with` block)."""

    def __init__(
        self, conn: sa.Connection, storage: Storage, serializer: MessageSerializer[E], *, owned: bool = False
    ):
        self._conn = conn
        self._storage = storage
        self._serializer = serializer
        self._decode = stored_message_decoder(serializer)
        # On a connection the store opened for the reader, psycopg2 reads with a statement
        # prepared in its session (see `rawconn.execute_prepared_in`): planning each read
        # costs 25-30 us, as much as a short stream's rows. psycopg 3 prepares by itself.
        self._prepared = owned and conn.dialect.driver == PSYCOPG2

    def get_message_by_id(self, message_id: uuid.UUID) -> StoredMessage[E]:
        row = self._storage.get_message_by_id(self._conn, message_id)
        if row is None:
            raise MessageNotFound(f"no message with id {message_id} in store {self._storage.name!r}")
        return self._decode(row)

    def get_messages_by_ids(self, message_ids: Sequence[uuid.UUID]) -> Iterator[StoredMessage[E]]:
        """The stored messages among `message_ids`, in global order; unknown ids are skipped."""
        for row in self._storage.get_messages_by_ids(self._conn, message_ids):
            yield self._decode(row)

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        validate_stream(stream)
        # On the connection's DBAPI side: SQLAlchemy's result layer would cost as much as a
        # small stream's read (see `rawconn.execute_in`).
        statements = self._storage.statements
        params = (stream, min_version or 0)
        if self._prepared:
            rows = execute_prepared_in(self._conn, statements.text_read, params)
        else:
            rows = execute_in(self._conn, statements.text_read_sql, params)
        for row in rows:
            yield self._decode(row)

    def read_wildcard(self, stream_wildcard: str) -> Iterator[StoredMessage[E]]:
        pattern = validate_wildcard(stream_wildcard)
        for row in self._conn.exec_driver_sql(self._storage.statements.text_wildcard_sql, (pattern,)):
            yield self._decode(row)


__all__ = [
    "MessageStoreReader",
    "stored_message_decoder",
    "stored_or_unreadable_decoder",
]

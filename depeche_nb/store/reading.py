"""Stored messages as they are read: rows to `StoredMessage`s (or `UnreadableMessage`
placeholders) and `MessageStoreReader`, reads on one connection."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import sqlalchemy as sa

from depeche_nb.core.errors import (
    MessageNotFound,
    UnreadableMessageError,
)
from depeche_nb.core.identifiers import validate_stream, validate_wildcard
from depeche_nb.core.messages import MessageSerializer, StoredMessage, UnreadableMessage
from depeche_nb.postgres.rawconn import execute_in
from depeche_nb.store.storage import (
    Storage,
)

if TYPE_CHECKING:
    pass

E = TypeVar("E")


def deserialize_payload(payload: Any, serializer: MessageSerializer[E]) -> E:
    """A payload as JSON text (fast path where the serializer parses JSON itself) or a dict."""
    if isinstance(payload, str):
        from_text = getattr(serializer, "deserialize_text", None)
        if from_text is not None:
            return from_text(payload)  # type: ignore[no-any-return]
        payload = json.loads(payload)
    return serializer.deserialize(payload)


def to_stored_message(row: Sequence[Any], serializer: MessageSerializer[E]) -> StoredMessage[E]:
    """Build a `StoredMessage` from a row in `messages_table.ROW_COLUMNS` order (payload as
    a dict or JSON text)."""
    message_id, stream, version, payload, global_position, added_at = row
    message = deserialize_payload(payload, serializer)
    # The message carries its own id (the store wrote exactly that one), which
    # spares parsing the column's text for every row.
    own_id = getattr(message, "get_message_id", None)
    parsed_id = own_id() if own_id is not None else None
    if isinstance(message_id, uuid.UUID):
        parsed_id = message_id
    elif not (isinstance(parsed_id, uuid.UUID) and str(parsed_id) == message_id):
        parsed_id = uuid.UUID(message_id)
    return StoredMessage(
        message_id=parsed_id,
        stream=stream,
        version=version,
        message=message,
        global_position=global_position,
        added_at=added_at,
    )


def to_stored_or_unreadable(row: Sequence[Any], serializer: MessageSerializer[E]) -> StoredMessage[Any]:
    """`to_stored_message`, except that a payload that cannot be deserialised gives a
    `StoredMessage` holding an `UnreadableMessage` (for subscriptions, see there)."""
    try:
        return to_stored_message(row, serializer)
    except Exception as exc:
        message_id, stream, version, _, global_position, added_at = row
        error = UnreadableMessageError(
            f"message {message_id} (stream {stream!r}, version {version}, global position "
            f"{global_position}) cannot be deserialised: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        message_uuid = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
        return StoredMessage(
            message_uuid, stream, version, UnreadableMessage(error), global_position, added_at
        )


class MessageStoreReader(Generic[E]):
    """Reads on one connection (the caller's or one the store opened for a `with` block)."""

    def __init__(self, conn: sa.Connection, storage: Storage, serializer: MessageSerializer[E]):
        self._conn = conn
        self._storage = storage
        self._serializer = serializer

    def get_message_by_id(self, message_id: uuid.UUID) -> StoredMessage[E]:
        row = self._storage.get_message_by_id(self._conn, message_id)
        if row is None:
            raise MessageNotFound(f"no message with id {message_id} in store {self._storage.name!r}")
        return to_stored_message(row, self._serializer)

    def get_messages_by_ids(self, message_ids: Sequence[uuid.UUID]) -> Iterator[StoredMessage[E]]:
        """The stored messages among `message_ids`, in global order; unknown ids are skipped."""
        for row in self._storage.get_messages_by_ids(self._conn, message_ids):
            yield to_stored_message(row, self._serializer)

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]:
        validate_stream(stream)
        # On the connection's DBAPI side: SQLAlchemy's result layer would cost as much as a
        # small stream's read (see `rawconn.execute_in`).
        rows = execute_in(self._conn, self._storage.statements.text_read_sql, (stream, min_version or 0))
        for row in rows:
            yield to_stored_message(row, self._serializer)

    def read_wildcard(self, stream_wildcard: str) -> Iterator[StoredMessage[E]]:
        pattern = validate_wildcard(stream_wildcard)
        for row in self._conn.exec_driver_sql(self._storage.statements.text_wildcard_sql, (pattern,)):
            yield to_stored_message(row, self._serializer)


__all__ = ["MessageStoreReader", "to_stored_message", "to_stored_or_unreadable"]

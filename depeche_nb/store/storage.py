"""`Storage`: the low-level table API of one message store (payloads as dicts, caller's transaction).

Every statement about the messages table lives here; `MessageStore` adds
serialisation, connection handling and notifications on top.

The reading methods return what Depeche DB's `Storage` returns, on either
driver: SQLAlchemy results whose rows hold the message id as `uuid.UUID`, the
payload as a dict and `added_at` as a naive UTC datetime (Depeche DB's column
is a `timestamp without time zone`), in Depeche DB's column order. The table
itself is `timestamptz`; the notebook views show it timezone-aware.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.errors import (
    DuplicateMessageIdError,
    MessageSerializationError,
    OptimisticConcurrencyError,
    UnstorablePayloadError,
)
from depeche_nb.core.identifiers import unstorable_text_problem, validate_stream, validate_wildcard
from depeche_nb.core.messages import MessagePosition
from depeche_nb.postgres.driver import UNIQUE_VIOLATION, diagnostic, driver_error, sqlstate
from depeche_nb.postgres.messages_table import (
    VERSION_CONFLICT_SQLSTATE,
    MessagesStatements,
    MessagesViews,
    ensure_store_schema,
    message_table,
)
from depeche_nb.postgres.names import StoreNames, quote_ident
from depeche_nb.postgres.rawconn import execute_in
from depeche_nb.store.serializers import TYPE_KEY


def check_expected_version(expected_version: object) -> int | None:
    if expected_version is None:
        return None
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise TypeError(f"expected_version must be an int or None, got {type(expected_version).__name__}")
    if expected_version > 2**63 - 1:
        raise ValueError(f"expected_version {expected_version} is out of range")
    if expected_version < 0:
        raise ValueError(
            f"expected_version must be >= 0 (0 means: the stream must be empty), got {expected_version}"
        )
    return expected_version


def payload_json(payload: dict[str, Any], message_type: str) -> str:
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise UnstorablePayloadError(f"the serialised {message_type} is not storable: {exc}") from exc
    except TypeError as exc:
        raise MessageSerializationError(
            f"the serialised {message_type} is not JSON-compatible: {exc}"
        ) from exc
    # jsonb refuses \u0000 and lone surrogates; the ASCII-escaped text shows either only as
    # an escape, so the exact (slower) search runs only when one appears.
    if "\\u0000" in text or "\\ud" in text:
        problem = _unstorable_text_in(payload, "payload")
        if problem is not None:
            raise UnstorablePayloadError(f"the serialised {message_type} is not storable: {problem}")
    return text


def _unstorable_text_in(value: object, path: str) -> str | None:
    """The first string or key under `value` PostgreSQL cannot store, described, or None."""
    if isinstance(value, str):
        problem = unstorable_text_problem(value)
        return None if problem is None else f"{path} {problem}"
    if isinstance(value, dict):
        for key, item in value.items():
            key_problem = unstorable_text_problem(key) if isinstance(key, str) else None
            if key_problem is not None:
                return f"key {key!r} of {path} {key_problem}"
            found = _unstorable_text_in(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _unstorable_text_in(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def translate_write_error(error: BaseException, stream: str) -> Exception | None:
    """Map a database error from the write function to the library's error, or None."""
    orig = driver_error(error)
    if orig is None:
        return None
    state = sqlstate(orig)
    if state == VERSION_CONFLICT_SQLSTATE:
        message = diagnostic(orig, "message_primary") or str(orig)
        return OptimisticConcurrencyError(f"optimistic concurrency failure: {message}")
    if state == UNIQUE_VIOLATION:
        constraint = diagnostic(orig, "constraint_name") or ""
        if constraint.endswith("_msg_id_uq"):
            detail = diagnostic(orig, "message_detail") or ""
            return DuplicateMessageIdError(
                f"a message with this id is already stored (stream {stream!r}): {detail}".strip()
            )
        if constraint.endswith("_msg_sv_uq"):
            return OptimisticConcurrencyError(
                f"optimistic concurrency failure: stream {stream!r} changed concurrently "
                "(the transaction's snapshot is older than the stream head)"
            )
    return None


class Storage:
    """Statements on one store's messages table. Nothing here commits."""

    def __init__(self, name: str, engine: sa.Engine) -> None:
        self.names = StoreNames(name)
        self.name = name
        self.engine = engine
        self.table = quote_ident(self.names.messages_table)
        self.notification_channel = self.names.channel
        ensure_store_schema(engine, self.names)
        self.views = MessagesViews(self.names, TYPE_KEY)
        self.metadata = sa.MetaData()
        self.message_table = message_table(self.names, self.metadata)
        t = self.message_table.c
        # Depeche DB's row shapes: `read` leaves out the stream (the caller named it).
        self._select: sa.Select[Any] = sa.select(
            t.message_id, t.stream, t.version, t.message, t.global_position, t.added_at
        )
        self._select_without_stream: sa.Select[Any] = sa.select(
            t.message_id, t.version, t.message, t.global_position, t.added_at
        )
        self.statements = MessagesStatements(self.names)

    @staticmethod
    def message_table_name(name: str) -> str:
        return StoreNames(name).messages_table

    @staticmethod
    def notification_channel_name(name: str) -> str:
        return StoreNames(name).channel

    # -- writing ------------------------------------------------------------------------------

    def add(
        self,
        conn: sa.Connection,
        stream: str,
        expected_version: int | None,
        message_id: uuid.UUID,
        message: dict[str, Any],
    ) -> MessagePosition:
        return self.add_all(conn, stream, expected_version, [(message_id, message)])

    def add_all(
        self,
        conn: sa.Connection,
        stream: str,
        expected_version: int | None,
        messages: Sequence[tuple[uuid.UUID, dict[str, Any]]],
        *,
        notify: bool = True,
    ) -> MessagePosition:
        """Append `messages` atomically in one round trip; notify at the caller's commit."""
        params = self.write_params(stream, expected_version, messages, notify=notify)
        try:
            rows = execute_in(conn, self.statements.write_sql, params)
        except sa.exc.DBAPIError as exc:
            translated = translate_write_error(exc, stream)
            if translated is not None:
                raise translated from exc
            raise
        version, global_position = rows[-1]
        return MessagePosition(stream, version, global_position)

    def write_params(
        self,
        stream: str,
        expected_version: int | None,
        messages: Sequence[tuple[uuid.UUID, dict[str, Any]]],
        *,
        notify: bool,
    ) -> tuple[Any, ...]:
        validate_stream(stream)
        expected = check_expected_version(expected_version)
        if not messages:
            raise ValueError("nothing to write: the message list is empty")
        ids = ",".join([str(message_id) for message_id, _ in messages])
        payloads = "[" + ",".join([payload_json(payload, "message") for _, payload in messages]) + "]"
        return (stream, expected, ids, payloads, notify)

    def truncate(self, conn: sa.Connection) -> None:
        conn.execute(self.message_table.delete())

    # -- reading ------------------------------------------------------------------------------

    def read(self, conn: sa.Connection, stream: str, min_version: int | None = None) -> sa.CursorResult[Any]:
        """Rows `(message_id, version, message, global_position, added_at)` of one stream,
        by version (from `min_version` on)."""
        validate_stream(stream)
        t = self.message_table.c
        query = self._select_without_stream.where(t.stream == stream)
        if min_version is not None:
            query = query.where(t.version >= min_version)
        return conn.execute(query.order_by(t.version))

    def read_multiple(self, conn: sa.Connection, streams: Sequence[str]) -> sa.CursorResult[Any]:
        """Rows `(message_id, stream, version, message, global_position, added_at)` of several
        streams, in global order."""
        for stream in streams:
            validate_stream(stream)
        t = self.message_table.c
        return conn.execute(self._select.where(t.stream.in_(list(streams))).order_by(t.global_position))

    def read_wildcard(self, conn: sa.Connection, stream_wildcard: str) -> sa.CursorResult[Any]:
        """Full rows of every stream matching the SQL LIKE pattern, in global order."""
        t = self.message_table.c
        pattern = validate_wildcard(stream_wildcard)
        return conn.execute(self._select.where(t.stream.like(pattern)).order_by(t.global_position))

    def get_message_by_id(self, conn: sa.Connection, message_id: uuid.UUID) -> sa.Row[Any] | None:
        """The full row of one message, or None."""
        t = self.message_table.c
        return conn.execute(self._select.where(t.message_id == message_id)).first()

    def get_messages_by_ids(
        self, conn: sa.Connection, message_ids: Sequence[uuid.UUID]
    ) -> sa.CursorResult[Any]:
        """Full rows of the stored messages among `message_ids`, in global order."""
        t = self.message_table.c
        return conn.execute(
            self._select.where(t.message_id.in_(list(message_ids))).order_by(t.global_position)
        )

    def get_message_ids(self, conn: sa.Connection, stream: str) -> Iterator[uuid.UUID]:
        validate_stream(stream)
        t = self.message_table.c
        query = sa.select(t.message_id).where(t.stream == stream).order_by(t.version)
        yield from conn.execute(query).scalars()

    def get_global_position(self, conn: sa.Connection) -> int:
        value = conn.exec_driver_sql(self.statements.global_position_sql).scalar()
        return int(value or 0)

    def get_max_version(self, conn: sa.Connection, stream: str) -> MessagePosition:
        validate_stream(stream)
        row = conn.exec_driver_sql(self.statements.max_version_sql, (stream,)).first()
        if row is None:
            return MessagePosition(stream, 0, None)
        return MessagePosition(stream, row[0], row[1])


__all__ = ["Storage", "check_expected_version", "translate_write_error"]

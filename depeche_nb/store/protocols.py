"""Structural types for code that only needs a store's reading/writing surface."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

from depeche_nb.core.messages import MessagePosition, StoredMessage

E = TypeVar("E")


class MessageStoreReaderProtocol(Protocol[E]):
    def get_message_by_id(self, message_id: uuid.UUID) -> StoredMessage[E]: ...

    def get_messages_by_ids(self, message_ids: Sequence[uuid.UUID]) -> Iterator[StoredMessage[E]]: ...

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]: ...

    def read_wildcard(self, stream_wildcard: str) -> Iterator[StoredMessage[E]]: ...


class MessageStoreProtocol(Protocol[E]):
    def truncate(self) -> None: ...

    def write(
        self, stream: str, message: E, expected_version: int | None = None, conn: Any = None
    ) -> MessagePosition: ...

    def synchronize(
        self, stream: str, expected_version: int | None, messages: Sequence[E], conn: Any = None
    ) -> MessagePosition: ...

    def reader(
        self, conn: Any = None
    ) -> contextlib.AbstractContextManager[MessageStoreReaderProtocol[E]]: ...

    def read(self, stream: str, min_version: int | None = None) -> Iterator[StoredMessage[E]]: ...

"""The public `MessageStore`: the store layer's store plus aggregated streams."""

from __future__ import annotations

import uuid
from typing import TypeVar

import sqlalchemy as sa

from depeche_nb.core.messages import MessageSerializer, StoredMessage
from depeche_nb.engine.aggregated_stream import AggregatedStreamFactory
from depeche_nb.engine.trace import MessageTrace, trace_message
from depeche_nb.store.message_store import MessageStoreBase

E = TypeVar("E")


class MessageStore(MessageStoreBase[E]):
    """A named message store (see `MessageStoreBase`) that can define aggregated streams."""

    def __init__(self, name: str, engine: sa.Engine, serializer: MessageSerializer[E]) -> None:
        super().__init__(name, engine, serializer)
        self.aggregated_stream: AggregatedStreamFactory[E] = AggregatedStreamFactory(self)

    def trace(self, message: uuid.UUID | str | StoredMessage[E]) -> MessageTrace:
        """Where a stored message went (by id, or a `StoredMessage` read from this store): its
        stream, version and global position; its partition and position in every aggregated
        stream whose wildcards match it (or "not projected yet"); and whether each of their
        subscriptions handled it, still has it pending (and how far behind it is), or parked
        it (with the error). `MessageNotFound` for an unknown id. See `engine.trace`."""
        return trace_message(self, message)

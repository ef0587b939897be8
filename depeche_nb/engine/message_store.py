"""The public `MessageStore`: the store layer's store plus aggregated streams."""

from __future__ import annotations

from typing import TypeVar

import sqlalchemy as sa

from depeche_nb.core.messages import MessageSerializer
from depeche_nb.engine.aggregated_stream import AggregatedStreamFactory
from depeche_nb.store.message_store import MessageStoreBase

E = TypeVar("E")


class MessageStore(MessageStoreBase[E]):
    """A named message store (see `MessageStoreBase`) that can define aggregated streams."""

    def __init__(self, name: str, engine: sa.Engine, serializer: MessageSerializer[E]) -> None:
        super().__init__(name, engine, serializer)
        self.aggregated_stream: AggregatedStreamFactory[E] = AggregatedStreamFactory(self)

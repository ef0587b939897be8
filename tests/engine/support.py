"""What the subscription and handler tests share: an environment of one store and one
aggregated stream (streams `s-<n>` in three partitions) and small helpers around it.

The `env` fixture that builds it is in `tests/engine/conftest.py`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

import depeche_nb
from depeche_nb import MessageHandlerRegister, StoredMessage
from tests.support import Numbered


class ModuloPartitioner:
    """`s-<n>` goes to partition n % partitions."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def get_partition(self, message: StoredMessage[Any]) -> int:
        return int(message.stream.rsplit("-", 1)[1]) % self.partitions


@dataclasses.dataclass
class Env:
    engine: sa.Engine
    name: str
    store: depeche_nb.MessageStore[Any]
    stream: depeche_nb.AggregatedStream[Any]

    def write(self, stream_no: int, *messages: Any) -> list[uuid.UUID]:
        self.store.write_all(f"s-{stream_no}", list(messages))
        return [m.message_id for m in messages]

    def numbers(self, stream_no: int, numbers: range | list[int]) -> list[uuid.UUID]:
        return self.write(stream_no, *[Numbered(number=n) for n in numbers])

    def project(self) -> None:
        self.stream.projector.run()

    def subscription(self, handlers: Any = None, suffix: str = "sub", **kwargs: Any) -> Any:
        return self.stream.subscription(name=f"{self.name}_{suffix}", handlers=handlers, **kwargs)


def register(*handlers: Callable[..., Any]) -> MessageHandlerRegister[Any]:
    handler_register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    for handler in handlers:
        handler_register.register(handler)
    return handler_register


def positions(subscription: Any) -> dict[int, int]:
    return {p.partition: p.position for p in subscription.progress()}

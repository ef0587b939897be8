"""What the engine tests share.

* The subscription and handler tests: an environment of one store and one aggregated stream
  (streams `s-<n>` in three partitions) and small helpers around it; the `env` fixture that
  builds it is in `tests/engine/conftest.py`.
* The projector tests: invariant 3 checked on an aggregated stream's table
  (`assert_exact_projection`) and a partitioner spreading streams over five partitions.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict
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


class ModuloStreamPartitioner:
    """Partition by the number after the last dash, so streams spread over 5 partitions."""

    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        return int(message.stream.rsplit("-", 1)[1]) % 5


def assignments(engine: sa.Engine, stream_name: str) -> list[tuple[str, str, int, int, int, int]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT message_id::text, origin_stream, origin_stream_version, global_position, "
            f'partition, position FROM "{stream_name}_stream" ORDER BY partition, position'
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def assert_exact_projection(
    engine: sa.Engine, stream_name: str, committed: dict[str, tuple[str, int]]
) -> None:
    """committed: message_id -> (stream, version) of every committed matching message."""
    rows = assignments(engine, stream_name)
    projected_ids = [r[0] for r in rows]
    assert len(projected_ids) == len(set(projected_ids)), "a message was projected twice"
    missing = set(committed) - set(projected_ids)
    extra = set(projected_ids) - set(committed)
    assert not missing, f"{len(missing)} committed message(s) never projected"
    assert not extra, f"{len(extra)} projected message(s) were never committed (rolled back?)"
    by_partition: dict[int, list[int]] = defaultdict(list)
    versions_seen: dict[str, list[int]] = defaultdict(list)
    for message_id, stream, version, _gp, partition, position in rows:
        by_partition[partition].append(position)
        versions_seen[stream].append(version)
        assert committed[message_id] == (stream, version)
    for partition, positions in by_partition.items():
        assert positions == list(range(len(positions))), f"partition {partition} has gaps"
    for stream, versions in versions_seen.items():
        assert versions == sorted(versions), f"stream {stream} out of version order"
        assert versions == list(range(1, len(versions) + 1)), f"stream {stream} incomplete"

"""Messages a projector just decoded, kept briefly for the runners it hands them to.

When an Executor links a projector to runners of its aggregated stream in the same
process (see `engine.executor`), each message is decoded twice within milliseconds:
by the projector, for its partitioner, and by the runner that delivers it. The
projector leaves what it committed here; the runner's read takes a message from here
instead of decoding the row again. A stored message never changes, so the message the
runner gets is the one it would have decoded. Only the decoding is skipped: the runner
still claims the partition and reads its rows under the claim, so what it delivers is
still what the database says, in its order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from depeche_nb.core.messages import StoredMessage

E = TypeVar("E")

# A runner far behind its projector would never take the oldest entries: beyond this many,
# the oldest are dropped (and decoded again by the runner, as without this cache).
DEFAULT_CAPACITY = 5_000


class RecentlyDecoded(Generic[E]):
    """Stored messages by global position, each taken at most once (a message object is
    never handed to two subscriptions' handlers)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._messages: dict[int, StoredMessage[E]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, messages: Iterable[StoredMessage[E]]) -> None:
        with self._lock:
            kept = self._messages
            for stored in messages:
                kept[stored.global_position] = stored
            excess = len(kept) - self.capacity
            if excess > 0:
                # dicts keep insertion order, and a projector commits in global order.
                for position in list(kept)[:excess]:
                    del kept[position]

    def take(self, row: Sequence[Any]) -> StoredMessage[E] | None:
        """The message of a row in `messages_table.ROW_COLUMNS` order, if it is here and is
        that row's message (same stream and version at that global position); else None."""
        if not self._messages:
            return None
        with self._lock:
            stored = self._messages.pop(row[4], None)
        if stored is None or stored.stream != row[1] or stored.version != row[2]:
            return None
        return stored

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()


__all__ = ["DEFAULT_CAPACITY", "RecentlyDecoded"]

"""Ready-made partitioners."""

from __future__ import annotations

import hashlib
from typing import Any

from depeche_nb.core.messages import StoredMessage


class StreamNamePartitioner:
    """All messages of one origin stream in one partition, spread by a hash of the stream name.

    `partitions` bounds the number of partitions (Depeche DB's default spreads
    over 65,536; a notebook is easier to read with a handful).
    """

    def __init__(self, partitions: int = 65536) -> None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or not 1 <= partitions <= 65536:
            raise ValueError(f"partitions must be an int from 1 to 65536, got {partitions!r}")
        self.partitions = partitions

    def get_partition(self, message: StoredMessage[Any]) -> int:
        digest = hashlib.sha256(message.stream.encode()).digest()
        return int.from_bytes(digest[:2], "little") % self.partitions

    def __repr__(self) -> str:
        return f"StreamNamePartitioner(partitions={self.partitions})"

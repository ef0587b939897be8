"""Every database object name, derived from validated names in one place.

Names passed in here have gone through `core.identifiers.validate_name`, so
they are lowercase identifiers of at most 40 characters; quoting is still
applied everywhere so a future relaxation of the rule cannot open injection.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from depeche_nb.core.identifiers import validate_name


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def text_array_literal(values: list[str]) -> str:
    """A `text[]` literal of `values` (every element quoted), to pass as one str parameter."""
    quoted = ('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return "{" + ",".join(quoted) + "}"


def lock_namespace(kind: str, name: str) -> int:
    """A stable signed 32-bit key for the first half of two-key advisory locks."""
    value = zlib.crc32(f"depeche_nb:{kind}:{name}".encode())
    return value - (1 << 32) if value >= (1 << 31) else value


@dataclass(frozen=True)
class StoreNames:
    store: str

    def __post_init__(self) -> None:
        validate_name(self.store, "store name")
        assert len(self.messages_table) <= 63 and len(self.write_function) <= 63

    @property
    def messages_table(self) -> str:
        return f"{self.store}_messages"

    # Short suffixes: PostgreSQL silently truncates identifiers beyond 63 bytes,
    # and error translation recognises constraints by these names.
    @property
    def message_id_constraint(self) -> str:
        return f"{self.store}_msg_id_uq"

    @property
    def stream_version_constraint(self) -> str:
        return f"{self.store}_msg_sv_uq"

    @property
    def txid_index(self) -> str:
        return f"{self.store}_msg_txid"

    @property
    def write_function(self) -> str:
        return f"{self.store}_write"

    @property
    def channel(self) -> str:
        return f"{self.store}_messages"

    @property
    def stream_lock_namespace(self) -> int:
        return lock_namespace("stream", self.store)

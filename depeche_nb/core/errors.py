"""Every exception the library raises on purpose lives here.

Each class is also an instance of the builtin exception Depeche DB raises in
the same situation (`ValueError`, `TypeError`, `KeyError`, `AssertionError`),
so code written against Depeche DB that catches those keeps working, while
`except DepecheError` (or the specific class) catches ours precisely.
"""

from __future__ import annotations

import datetime as _dt


class DepecheError(Exception):
    """Base class of the library's own errors."""


class OptimisticConcurrencyError(DepecheError):
    """The stream's version was not the one the writer expected; nothing was written."""


class MessageIdMismatchError(DepecheError, ValueError):
    """`synchronize` found stored messages whose ids differ from the given ones."""


class _KeyErrorText(KeyError):
    # KeyError's str() is the repr of its argument; ours carry readable text.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class MessageNotFound(DepecheError, _KeyErrorText):
    """No stored message has the requested id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "message not found"


class InvalidIdentifierError(DepecheError, ValueError, AssertionError):
    """A store, stream or subscription name that is not a safe SQL identifier.

    Depeche DB checks names with `assert name.isidentifier()`, hence also an
    `AssertionError`.
    """


class MessageSerializationError(DepecheError, TypeError):
    """A message could not be serialised; nothing was written."""


class UnstorablePayloadError(MessageSerializationError, ValueError):
    """A payload value PostgreSQL's jsonb cannot hold faithfully: a NUL character or a lone
    surrogate in a string or key, or a NaN/Infinity (which JSON has no words for)."""


class InvalidStreamNameError(DepecheError, ValueError):
    """A stream name (free text, passed as a parameter) that PostgreSQL cannot store."""


class InvalidWildcardError(DepecheError, ValueError):
    """A stream wildcard that is not a valid SQL LIKE pattern, or that holds text PostgreSQL
    cannot store."""


class UnknownMessageTypeError(DepecheError, TypeError, LookupError):
    """A stored payload names a message type the serializer does not know.

    A `TypeError` like Depeche DB's `PydanticMessageSerializer.deserialize`
    raises; also a `LookupError` (the type name was looked up and not found).
    """


class MissingMessageTypeError(UnknownMessageTypeError, _KeyErrorText):
    """A stored payload has no type name at all (Depeche DB: a `KeyError` on `__typename__`)."""


class EmbeddedServerError(DepecheError, RuntimeError):
    """The embedded PostgreSQL server could not be initialised or started."""


class DuplicateMessageIdError(DepecheError, ValueError):
    """A message with the same id is already stored; nothing was written."""


class HandlerRegistrationError(DepecheError):
    """A handler that cannot be registered; see the subclasses for the builtin type."""


class HandlerSignatureError(HandlerRegistrationError, ValueError):
    """The handler takes no parameter for the message (Depeche DB: `ValueError`)."""


class HandlerTypeError(HandlerRegistrationError, TypeError):
    """The handler's first parameter is not annotated with message type(s) (Depeche DB: `TypeError`)."""


class HandlerOverlapError(HandlerRegistrationError, ValueError):
    """A handler for a type that another registered handler already covers (Depeche DB: `ValueError`)."""


class AckRolledback(DepecheError, RuntimeError):
    """The handler acknowledged in its own transaction, which did not commit: a failed
    attempt (the retry policy and the error handler apply)."""


class PartitionLostError(DepecheError, RuntimeError):
    """A runner's claim on a partition ended (its lock session died and another runner may
    have taken over): the acknowledgement was refused, so a handler's transaction that
    made it rolls back, and the runner abandons the batch. The message is delivered again
    to whoever holds the partition now."""


class ReplayInProgressError(DepecheError, RuntimeError):
    """Another session is replaying this parked message right now."""


class BatchAckError(DepecheError, ValueError, AssertionError):
    """A message acknowledged on a batch it is not part of, or out of order.

    Depeche DB raises `ValueError` for a foreign message and asserts the order.
    """


class CheckpointClusterError(DepecheError, RuntimeError):
    """An aggregated stream's checkpoint holds transaction ids of another PostgreSQL cluster
    (the database was restored from a dump or moved by logical replication); nothing was
    projected. `aggregated_stream.projector.reanchor()` rebuilds the checkpoint."""


class DefinitionError(DepecheError, ValueError):
    """A name already stands for something else in this database; nothing was changed."""


class NameInUseError(DefinitionError):
    """An aggregated-stream name used over another store, or a subscription name on another
    aggregated stream."""


class DefinitionChangedError(DefinitionError):
    """An aggregated stream defined again with other wildcards or another partitioner; pass
    `rebuild=True` to record the new definition and re-project."""


class RebuildInProgressError(DepecheError, RuntimeError):
    """Another session is rebuilding the aggregated stream; nothing was changed."""


class UnreadableMessageError(DepecheError, ValueError):
    """A stored message that cannot be deserialised any more (e.g. after a model change);
    the message names its stream, version, global position and id."""


class UnsupportedServerError(DepecheError, RuntimeError):
    """The database cannot give what the engine needs: a transaction-mode pooler
    (PgBouncer) in the way, or a PostgreSQL-compatible engine without xid8 snapshots,
    session advisory locks or LISTEN/NOTIFY (CockroachDB, YugabyteDB). Raised before
    anything is written; the message says what is missing and how to fix it."""


class PartitionerError(DepecheError, ValueError):
    """The partitioner raised or returned something that is not an int >= 0."""


class AdoptionError(DepecheError):
    """The database cannot be adopted as it is; nothing was changed. The message says why."""


# -- event sourcing -------------------------------------------------------------------------


class NotFound(DepecheError):
    """No aggregate with this id: its stream holds no events.

    `args[0]` is the id, as in Depeche DB, so code reading it keeps working.
    """

    def __init__(self, id: object, stream: str | None = None) -> None:
        super().__init__(id)
        self.id = id
        self.stream = stream

    def __str__(self) -> str:
        where = f" (stream {self.stream!r} is empty)" if self.stream is not None else ""
        return f"no aggregate with id {self.id!r}{where}"


class VersionNotFound(NotFound):
    """The aggregate exists, but not in the past state asked for: `version` is beyond its
    current version, or it had no event yet at `at`.

    A subclass of `NotFound`, so `except NotFound` reads "there was no such aggregate then".
    `current_version` is the stream's version when it was read (for `version`);
    `first_added_at` the time its first event was stored (for `at`).
    """

    def __init__(
        self,
        id: object,
        stream: str,
        *,
        current_version: int | None = None,
        version: int | None = None,
        at: _dt.datetime | None = None,
        first_added_at: _dt.datetime | None = None,
    ) -> None:
        super().__init__(id, stream)
        self.current_version = current_version
        self.version = version
        self.at = at
        self.first_added_at = first_added_at

    def __str__(self) -> str:
        if self.version is not None:
            return (
                f"aggregate {self.id!r} (stream {self.stream!r}) is at version {self.current_version}; "
                f"version {self.version} does not exist (yet)"
            )
        return (
            f"aggregate {self.id!r} (stream {self.stream!r}) did not exist yet at {self.at}: its first "
            f"event was stored at {self.first_added_at}"
        )


class ConcurrentModificationError(OptimisticConcurrencyError, MessageIdMismatchError):
    """The stream holds other events than the aggregate being saved was built from.

    The store reports this as an id mismatch; for a repository it is the same
    conflict as a wrong expected version (someone saved first, or another
    aggregate already uses the id), so it is both: `except
    OptimisticConcurrencyError` catches every save conflict, and code written
    for Depeche DB that catches `MessageIdMismatchError` still works.
    """

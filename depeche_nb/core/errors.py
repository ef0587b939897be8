"""Every exception the library raises on purpose lives here."""

from __future__ import annotations


class DepecheError(Exception):
    """Base class of the library's own errors."""


class OptimisticConcurrencyError(DepecheError):
    """The stream's version was not the one the writer expected; nothing was written."""


class MessageIdMismatchError(DepecheError, ValueError):
    """`synchronize` found stored messages whose ids differ from the given ones."""


class MessageNotFound(DepecheError, KeyError):
    """No stored message has the requested id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "message not found"


class InvalidIdentifierError(DepecheError, ValueError):
    """A store, stream or subscription name that is not a safe SQL identifier."""


class MessageSerializationError(DepecheError, TypeError):
    """A message could not be serialised; nothing was written."""


class UnknownMessageTypeError(DepecheError, LookupError):
    """A stored payload names a message type the serializer does not know."""


class EmbeddedServerError(DepecheError, RuntimeError):
    """The embedded PostgreSQL server could not be initialised or started."""


class DuplicateMessageIdError(DepecheError, ValueError):
    """A message with the same id is already stored; nothing was written."""

"""depeche-nb: build and explore event-sourced systems on PostgreSQL, cell by cell.

The public names follow Depeche DB's API, so `import depeche_nb as depeche_db`
style code keeps working; `connect()` adds the zero-setup embedded database.
"""

from depeche_nb.core.errors import (
    DuplicateMessageIdError,
    EmbeddedServerError,
    InvalidIdentifierError,
    MessageIdMismatchError,
    MessageNotFound,
    MessageSerializationError,
    OptimisticConcurrencyError,
    UnknownMessageTypeError,
)
from depeche_nb.core.messages import (
    MessagePosition,
    MessageProtocol,
    MessageSerializer,
    StoredMessage,
)
from depeche_nb.engine.message_store import MessageStore
from depeche_nb.postgres.connection import connect
from depeche_nb.store.message_store import MessageStoreReader
from depeche_nb.store.protocols import MessageStoreProtocol, MessageStoreReaderProtocol
from depeche_nb.store.storage import Storage

__version__ = "0.1.0"

__all__ = [
    "DuplicateMessageIdError",
    "EmbeddedServerError",
    "InvalidIdentifierError",
    "MessageIdMismatchError",
    "MessageNotFound",
    "MessagePosition",
    "MessageProtocol",
    "MessageSerializationError",
    "MessageSerializer",
    "MessageStore",
    "MessageStoreProtocol",
    "MessageStoreReader",
    "MessageStoreReaderProtocol",
    "OptimisticConcurrencyError",
    "Storage",
    "StoredMessage",
    "UnknownMessageTypeError",
    "connect",
]

"""Ready-made implementations of the library's protocols (Depeche DB's `tools` module)."""

from depeche_nb.engine.partitioners import StreamNamePartitioner
from depeche_nb.engine.reader import InMemorySubscriptionState, NullLockProvider
from depeche_nb.engine.state import DbSubscriptionStateProvider
from depeche_nb.postgres.async_listener import AsyncPgNotificationListener
from depeche_nb.postgres.listener import PgNotification, PgNotificationListener
from depeche_nb.postgres.locks import DbLockProvider
from depeche_nb.store.serializers import PydanticMessageSerializer

__all__ = [
    "AsyncPgNotificationListener",
    "DbLockProvider",
    "DbSubscriptionStateProvider",
    "InMemorySubscriptionState",
    "NullLockProvider",
    "PgNotification",
    "PgNotificationListener",
    "PydanticMessageSerializer",
    "StreamNamePartitioner",
]

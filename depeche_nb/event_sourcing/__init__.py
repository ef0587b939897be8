"""Event sourcing on top of the message store: aggregates, repositories and their caches."""

from depeche_nb.event_sourcing.aggregate import EventSourcedAggregateRoot
from depeche_nb.event_sourcing.cache import BaseCache, InMemoryCache, NoOpCache, RepoCache
from depeche_nb.event_sourcing.repository import (
    ConcurrentModificationError,
    EventStoreRepo,
    NotFound,
    ReadRepository,
    Repo,
)

__all__ = [
    "BaseCache",
    "ConcurrentModificationError",
    "EventSourcedAggregateRoot",
    "EventStoreRepo",
    "InMemoryCache",
    "NoOpCache",
    "NotFound",
    "ReadRepository",
    "Repo",
    "RepoCache",
]

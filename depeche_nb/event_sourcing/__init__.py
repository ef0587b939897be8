"""Event sourcing on top of the message store: aggregates, repositories and their caches."""

from depeche_nb.core.errors import ConcurrentModificationError, NotFound, VersionNotFound
from depeche_nb.event_sourcing.aggregate import EventSourcedAggregateRoot
from depeche_nb.event_sourcing.cache import BaseCache, InMemoryCache, NoOpCache, RepoCache
from depeche_nb.event_sourcing.history import AggregateHistory, HistoryStep
from depeche_nb.event_sourcing.repository import EventStoreRepo, ReadRepository, Repo

__all__ = [
    "AggregateHistory",
    "BaseCache",
    "ConcurrentModificationError",
    "EventSourcedAggregateRoot",
    "EventStoreRepo",
    "HistoryStep",
    "InMemoryCache",
    "NoOpCache",
    "NotFound",
    "ReadRepository",
    "Repo",
    "RepoCache",
    "VersionNotFound",
]

"""Event sourcing on top of the message store: aggregates, repositories and their caches."""

from depeche_nb.event_sourcing.aggregate import EventSourcedAggregateRoot
from depeche_nb.event_sourcing.cache import BaseCache, InMemoryCache, NoOpCache, RepoCache
from depeche_nb.event_sourcing.history import AggregateHistory, HistoryStep
from depeche_nb.event_sourcing.repository import (
    ConcurrentModificationError,
    EventStoreRepo,
    NotFound,
    ReadRepository,
    Repo,
    VersionNotFound,
)

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

"""Caches of loaded aggregates, so a repository replays only the events it has not seen."""

from __future__ import annotations

import abc
import pickle
import threading
from typing import Any, Generic, Protocol, TypeVar

from depeche_nb.event_sourcing.aggregate import EventSourcedAggregateRoot

OBJ = TypeVar("OBJ")
ID = TypeVar("ID")
ID_contra = TypeVar("ID_contra", contravariant=True)
AGG = TypeVar("AGG", bound=EventSourcedAggregateRoot[Any, Any])


class RepoCache(Protocol[OBJ, ID_contra]):
    """What a repository needs from a cache.

    A repository catches up whatever `get` returns by applying newer events
    to it, so `get` should hand out an object the cache itself will not see
    change (a copy), or the cache ends up holding a state it never stored.

    A cache may also have `discard(id)`; repositories call it, when present,
    after finding an entry that no longer matches its stream.
    """

    def get(self, id: ID_contra) -> OBJ | None: ...

    def set(self, id: ID_contra, obj: OBJ) -> None: ...


class NoOpCache(Generic[OBJ, ID]):
    """The default: nothing is cached, every load replays the whole stream."""

    def get(self, id: ID) -> OBJ | None:
        return None

    def set(self, id: ID, obj: OBJ) -> None:
        return None

    def discard(self, id: ID) -> None:
        return None


class BaseCache(abc.ABC, Generic[AGG, ID]):
    """Writes an aggregate only every `cache_every_x_version` versions.

    Storing costs a serialisation (or a network round trip) on every load,
    while catching up a few events is cheap; so an entry is replaced only
    once it lags `cache_every_x_version` versions behind what was loaded.
    The version of each entry is remembered in this process, under a lock,
    so one cache can serve repositories in several threads. Subclasses
    implement `_get` / `_set` (and `_discard` if they can delete).
    """

    def __init__(self, cache_every_x_version: int = 20) -> None:
        if isinstance(cache_every_x_version, bool) or not isinstance(cache_every_x_version, int):
            raise TypeError(
                f"cache_every_x_version must be an int, got {type(cache_every_x_version).__name__}"
            )
        if cache_every_x_version < 1:
            raise ValueError(f"cache_every_x_version must be >= 1, got {cache_every_x_version}")
        self.cache_every_x_version = cache_every_x_version
        self._lock = threading.Lock()
        self._cached_versions: dict[ID, int] = {}

    def get(self, id: ID) -> AGG | None:
        with self._lock:
            obj = self._get(id)
            if obj is None:
                # The entry may have been evicted behind our back: store the next one.
                self._cached_versions.pop(id, None)
            else:
                self._cached_versions[id] = obj.version
            return obj

    def set(self, id: ID, obj: AGG) -> None:
        with self._lock:
            cached = self._cached_versions.get(id)
            if cached is not None and obj.version - cached < self.cache_every_x_version:
                return
            self._set(id, obj)
            self._cached_versions[id] = obj.version

    def discard(self, id: ID) -> None:
        """Drop the entry; forgetting its version also makes the next `set` overwrite it."""
        with self._lock:
            self._cached_versions.pop(id, None)
            self._discard(id)

    @abc.abstractmethod
    def _get(self, id: ID) -> AGG | None: ...

    @abc.abstractmethod
    def _set(self, id: ID, obj: AGG) -> None: ...

    def _discard(self, id: ID) -> None:
        """Delete the entry if the backend can; without it, the next `set` overwrites it."""


class InMemoryCache(BaseCache[AGG, ID]):
    """Keeps pickled aggregates in a dict.

    Pickling makes every `get` a fresh, private object: the repository can
    catch it up and the caller can run commands on it without changing what
    the cache holds. Aggregate classes must therefore be picklable (defined
    at module level, state without locks or connections).
    """

    def __init__(self, cache_every_x_version: int = 20) -> None:
        super().__init__(cache_every_x_version)
        self._data: dict[ID, bytes] = {}

    def _get(self, id: ID) -> AGG | None:
        data = self._data.get(id)
        if data is None:
            return None
        obj: AGG = pickle.loads(data)
        return obj

    def _set(self, id: ID, obj: AGG) -> None:
        try:
            self._data[id] = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(
                f"InMemoryCache cannot pickle {type(obj).__name__} ({exc}); define the aggregate "
                "class at module level and keep its state picklable"
            ) from exc

    def _discard(self, id: ID) -> None:
        self._data.pop(id, None)

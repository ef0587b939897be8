"""Repositories: load aggregates by replaying their stream, save them by appending new events."""

from __future__ import annotations

import abc
import datetime as _dt
import logging
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from depeche_nb.core.errors import (
    ConcurrentModificationError,
    MessageIdMismatchError,
    NotFound,
    VersionNotFound,
)
from depeche_nb.core.messages import MessagePosition, StoredMessage, stored_at
from depeche_nb.event_sourcing.aggregate import EventSourcedAggregateRoot
from depeche_nb.event_sourcing.cache import NoOpCache, RepoCache
from depeche_nb.store.protocols import MessageStoreProtocol, MessageStoreReaderProtocol

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

E = TypeVar("E")
OBJ = TypeVar("OBJ")
ID = TypeVar("ID")
AGG = TypeVar("AGG", bound=EventSourcedAggregateRoot[Any, Any])

# What a broken or outdated cache entry typically raises while being caught
# up; the repository then rebuilds from the stream instead of failing.
_CACHE_ERRORS = (KeyError, ValueError, TypeError, AttributeError, pickle.UnpicklingError)


def _stream_name(stream_prefix: str, id: object) -> str:
    return f"{stream_prefix}-{id}"


def check_past(version: object, at: object) -> tuple[int | None, _dt.datetime | None]:
    """The `version` / `at` of a time-travelling `get`, checked (`at` as UTC) before anything is read."""
    if version is not None and at is not None:
        raise ValueError("pass either version or at, not both")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        if version < 1:
            raise ValueError(
                f"version must be >= 1 (version N is the state after the N-th event), got {version}"
            )
        return version, None
    if at is not None:
        if not isinstance(at, _dt.datetime):
            raise TypeError(f"at must be a datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(
                "at must be timezone-aware (e.g. datetime.now(timezone.utc)): stored times are UTC, "
                "and a naive datetime could mean any time zone"
            )
        return None, at.astimezone(_dt.timezone.utc)
    return None, None


def _check_prefix(stream_prefix: object) -> str:
    if not isinstance(stream_prefix, str):
        raise TypeError(f"stream_prefix must be a str, got {type(stream_prefix).__name__}")
    if not stream_prefix:
        raise ValueError("stream_prefix must not be empty")
    return stream_prefix


class Repo(abc.ABC, Generic[OBJ, ID]):
    """Where aggregates are kept; application code depends on this, not on the store."""

    @abc.abstractmethod
    def add(self, entity: OBJ) -> MessagePosition:
        """Save a new aggregate; fails if one with its id already exists."""

    @abc.abstractmethod
    def save(self, entity: OBJ, expected_version: int) -> MessagePosition:
        """Save new events of an aggregate that was at `expected_version` when loaded."""

    @abc.abstractmethod
    def get(self, id: ID) -> OBJ:
        """Load the aggregate; raise `NotFound` if it does not exist."""


class ReadRepository(Generic[E, AGG, ID]):
    """Loads aggregates through one reader, i.e. within one connection.

    `EventStoreRepo.get` opens a reader per call; use this class directly to
    load several aggregates on one connection, or inside your own transaction
    (`store.reader(conn=...)`).

    With a cache, a hit is caught up with the events after its version. The
    first event read is the one the cached state ends with, and its id is
    compared with the cached one: if they differ, or the stream is shorter,
    the stream was rewritten under the cache (`store.truncate()` in a
    notebook, then the same ids used again), and the entry is discarded and
    the aggregate rebuilt from scratch rather than returned wrong.
    """

    def __init__(
        self,
        event_store_reader: MessageStoreReaderProtocol[E],
        constructor: Callable[[], AGG],
        stream_prefix: str,
        cache: RepoCache[AGG, ID] | None = None,
    ) -> None:
        self._reader = event_store_reader
        self._constructor = constructor
        self._stream_prefix = _check_prefix(stream_prefix)
        self._cache: RepoCache[AGG, ID] = cache if cache is not None else NoOpCache()

    def get(self, id: ID, *, version: int | None = None, at: _dt.datetime | None = None) -> AGG:
        """The aggregate now, or as it was after its `version`-th event, or at time `at`
        (see `EventStoreRepo.get`)."""
        past_version, past_at = check_past(version, at)
        stream = _stream_name(self._stream_prefix, id)
        if past_version is not None or past_at is not None:
            return self._past(id, stream, past_version, past_at)
        obj = self._from_cache(id, stream)
        if obj is None:
            obj = self._rebuild(id, stream)
        self._cache.set(id, obj)
        return obj

    def _past(self, id: ID, stream: str, version: int | None, at: _dt.datetime | None) -> AGG:
        """Replay the stream's first events only, bypassing the cache both ways: it keeps one
        state per id, which the next `get` takes for the newest one it knows, so a past state
        must never be stored there; and an entry could serve only if it were older than the
        state asked for."""
        obj = self._constructor()
        first_later: StoredMessage[Any] | None = None  # the first event stored after `at`
        with obj._replaying():
            for stored in self._reader.read(stream):
                if version is not None and stored.version > version:
                    break
                # Stop at the first event stored after `at`, even if a later one carries an
                # earlier time: a stream's writers take turns, so that later event committed
                # after this one, i.e. after `at` too.
                if at is not None and stored_at(stored) > at:
                    first_later = stored
                    break
                obj.apply(stored.message)
        if obj.version == 0:
            if first_later is None:
                raise NotFound(id, stream)
            raise VersionNotFound(id, stream, at=at, first_added_at=stored_at(first_later))
        if version is not None and obj.version < version:
            raise VersionNotFound(id, stream, current_version=obj.version, version=version)
        if obj.get_id() is None:
            raise NotFound(id, stream)
        return obj

    def _from_cache(self, id: ID, stream: str) -> AGG | None:
        """The cached aggregate caught up with the stream, or None if there is no usable entry."""
        try:
            cached = self._cache.get(id)
            if cached is None:
                return None
            if self._catch_up(cached, stream):
                return cached
            logger.warning(
                "cached %s for stream %r does not match the stream any more; rebuilding it",
                type(cached).__name__,
                stream,
            )
        except _CACHE_ERRORS as exc:
            logger.warning("cannot use the cached aggregate for stream %r (%r); rebuilding it", stream, exc)
        self._discard(id)
        return None

    def _catch_up(self, obj: AGG, stream: str) -> bool:
        """Apply the events after `obj.version`; False if `obj` is not a prefix of the stream."""
        version = obj.version
        rows = self._reader.read(stream, min_version=version if version > 0 else None)
        if version > 0:
            head = next(rows, None)
            if head is None or head.version != version or not obj._events:
                return False
            get_message_id = getattr(obj._events[-1], "get_message_id", None)
            if not callable(get_message_id) or get_message_id() != head.message_id:
                return False
        with obj._replaying():
            for stored in rows:
                obj.apply(stored.message)
        return True

    def _rebuild(self, id: ID, stream: str) -> AGG:
        obj = self._constructor()
        with obj._replaying():
            for stored in self._reader.read(stream):
                obj.apply(stored.message)
        if obj.get_id() is None:
            raise NotFound(id, stream)
        return obj

    def _discard(self, id: ID) -> None:
        discard = getattr(self._cache, "discard", None)
        if callable(discard):
            discard(id)


class EventStoreRepo(Repo[AGG, ID], Generic[E, AGG, ID]):
    """A `Repo` keeping each aggregate in the stream `"{stream_prefix}-{id}"` of a message store.

    Saving synchronises the aggregate's whole history with the stream, so
    only events the stream does not have yet are written, and saving an
    unchanged aggregate again writes nothing. `expected_version` is the
    version the aggregate had when it was loaded (0 for a new one); a save
    that conflicts with a concurrent one raises `OptimisticConcurrencyError`
    (or its subclass `ConcurrentModificationError`) and writes nothing.
    """

    def __init__(
        self,
        event_store: MessageStoreProtocol[E],
        constructor: Callable[[], AGG],
        stream_prefix: str,
        cache: RepoCache[AGG, ID] | None = None,
    ) -> None:
        self._event_store = event_store
        self._constructor = constructor
        self._stream_prefix = _check_prefix(stream_prefix)
        self._cache: RepoCache[AGG, ID] = cache if cache is not None else NoOpCache()

    @property
    def event_store(self) -> MessageStoreProtocol[E]:
        return self._event_store

    @property
    def constructor(self) -> Callable[[], AGG]:
        return self._constructor

    def stream_name(self, id: ID) -> str:
        """The stream holding the aggregate `id`: `"{stream_prefix}-{id}"`."""
        return _stream_name(self._stream_prefix, id)

    def add(self, entity: AGG) -> MessagePosition:
        return self.save(entity, expected_version=0)

    def save(self, entity: AGG, expected_version: int) -> MessagePosition:
        id = entity.get_id()
        if id is None:
            raise ValueError(
                f"cannot save {type(entity).__name__}: get_id() is None, i.e. no event has been "
                "applied yet, so there is nothing to save and no stream name"
            )
        stream = _stream_name(self._stream_prefix, id)
        try:
            return self._event_store.synchronize(
                stream=stream, expected_version=expected_version, messages=entity.events
            )
        except ConcurrentModificationError:
            raise
        except MessageIdMismatchError as exc:
            raise ConcurrentModificationError(
                f"stream {stream!r} holds other events than this {type(entity).__name__} was built "
                "from: it was saved by someone else since it was loaded (or another aggregate "
                "uses the same id); load it again and retry"
            ) from exc

    def get(self, id: ID, *, version: int | None = None, at: _dt.datetime | None = None) -> AGG:
        """The aggregate as it is now; or, time travelling, as it was after its `version`-th
        event, or at the moment `at` (a timezone-aware datetime).

        `at` means what the store held at that moment: the events whose stored `added_at`
        is at or before `at` (not their own `get_message_time()`, which the writer chose and
        may lie in the past or the future). `added_at` is the start of the writing
        transaction (PostgreSQL's `now()`): within milliseconds of the commit for the
        store's own writes, earlier for a write inside a long transaction of the caller's.

        Past states are replayed from the stream, bypassing the cache (never stored there).
        A past aggregate can run commands, but saving it raises `OptimisticConcurrencyError`
        once the stream has moved on. Raises `NotFound` for an empty stream and
        `VersionNotFound` (a `NotFound`) for a `version` beyond the current one or an `at`
        before the first event; bad arguments (`version` < 1 or not an int, a naive or
        non-datetime `at`, both given) raise `ValueError` / `TypeError` before anything is
        read.
        """
        past_version, past_at = check_past(version, at)
        with self._event_store.reader() as reader:
            repository = ReadRepository(reader, self._constructor, self._stream_prefix, self._cache)
            return repository.get(id, version=past_version, at=past_at)

    def history(self, id: ID) -> pd.DataFrame:
        """One row per event of the aggregate, oldest first: `version`, `event_type`,
        `added_at`, `global_position`, `message_id`, the event's fields, and the aggregate's
        state after the event, its public attributes flattened into `state.<name>` columns
        (`state.<name>.<field>` for a dataclass or pydantic model in one), and
        `changed`: the list of state columns the event changed. `NotFound` for an empty
        stream. See `AggregateHistory`."""
        from depeche_nb.event_sourcing.history import AggregateHistory

        return AggregateHistory(self, id).to_dataframe()

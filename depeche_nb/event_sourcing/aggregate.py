"""The aggregate root: state rebuilt from events, changed only by applying new ones."""

from __future__ import annotations

import abc
import contextlib
import copy
from collections.abc import Iterator
from typing import Any, ClassVar, Generic, TypeVar

ID = TypeVar("ID")
E = TypeVar("E")


class EventSourcedAggregateRoot(abc.ABC, Generic[ID, E]):
    """Base class of event-sourced aggregates.

    A subclass keeps its state in plain attributes, changes it only in
    `_apply(event)` and exposes command methods that build events and pass
    them to `apply()`. The recorded events (loaded and new ones) are the
    aggregate's whole history; a repository writes that history to the
    stream `"{prefix}-{get_id()}"`.

    **A failed `apply()` changes nothing.** Depeche DB runs `_apply` and then
    `_check_invariants`, so an invariant violation leaves the object in the
    rejected state and it has to be thrown away. Here `apply()` first takes a
    deep copy of the instance state (not of the event log, which is only
    touched on success) and puts it back if `_apply` or `_check_invariants`
    raises, so a caller can catch the error and keep using the aggregate.
    Restored attributes are equal copies of the old values, not the same
    objects; attributes in `__slots__` are not covered.

    The copy costs time proportional to the state's size, once per command
    event. Events replayed by a repository skip it: a failure there discards
    the half-built object anyway, and copying on every replayed event would
    make loading quadratic for aggregates whose state grows with history.
    An aggregate with very large or uncopyable state (locks, connections)
    can set the class attribute `_rollback_on_error = False` to get Depeche
    DB's behaviour back.
    """

    _rollback_on_error: ClassVar[bool] = True
    # Set on the instance only while a repository replays stored events.
    _in_replay: bool = False

    # Equality is by identity and version, which change as events are
    # applied, so instances must not be dict keys or set members.
    __hash__ = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self._events: list[E] = []
        self._version = 0

    @property
    def events(self) -> list[E]:
        """A copy, so callers cannot rewrite the history a repository will save."""
        return list(self._events)

    @property
    def version(self) -> int:
        """The number of events applied so far: the stream version this state corresponds to."""
        return self._version

    @abc.abstractmethod
    def get_id(self) -> ID | None:
        """The aggregate's id; must be None until an event has set it.

        Repositories rely on None to tell "no such aggregate" from an existing one.
        """

    @abc.abstractmethod
    def _apply(self, event: E) -> None:
        """Change the state according to `event`; the only place where state changes."""

    def _check_invariants(self) -> None:
        """Raise if the state after `_apply` is not allowed; `apply()` then undoes the change."""

    def apply(self, event: E) -> None:
        """Apply `event`, check the invariants, and record the event in the history."""
        if self._rollback_on_error and not self._in_replay:
            saved = self._snapshot()
            try:
                self._apply(event)
                self._check_invariants()
            except BaseException:
                self.__dict__.clear()
                self.__dict__.update(saved)
                raise
        else:
            self._apply(event)
            self._check_invariants()
        self._version += 1
        self._events.append(event)

    def _snapshot(self) -> dict[str, Any]:
        # The memo makes deepcopy reuse the event log (never mutated before
        # success) and keep back-references to this object pointing at it.
        memo: dict[int, Any] = {id(self._events): self._events, id(self): self}
        try:
            return copy.deepcopy(self.__dict__, memo)
        except Exception as exc:
            raise TypeError(
                f"cannot snapshot {type(self).__name__} to make apply() atomic ({exc}); keep only "
                "copyable data in aggregates, or set `_rollback_on_error = False` on the class"
            ) from exc

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[None]:
        """Used by repositories while they feed stored events through `apply()`."""
        if self._in_replay:  # nested: the outer block ends the replay
            yield
            return
        self._in_replay = True
        try:
            yield
        finally:
            del self._in_replay  # back to the class default, so nothing extra is pickled

    def __eq__(self, other: object) -> bool:
        # Depeche DB raises NotImplementedError here, which breaks `x in list`
        # and comparisons with None; returning NotImplemented lets Python
        # fall back to identity, so such comparisons are simply False.
        if not isinstance(other, EventSourcedAggregateRoot):
            return NotImplemented
        if type(self) is not type(other):
            return False
        return bool(self.get_id() == other.get_id() and self._version == other._version)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.get_id()!r} version={self._version}>"

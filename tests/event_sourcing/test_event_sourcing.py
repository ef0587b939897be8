"""Event sourcing: a bank account aggregate saved to and loaded from a real store."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import pickle
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Union

import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
import depeche_nb.tools
from depeche_nb.event_sourcing import (
    AggregateHistory,
    BaseCache,
    ConcurrentModificationError,
    EventSourcedAggregateRoot,
    EventStoreRepo,
    InMemoryCache,
    NoOpCache,
    NotFound,
    ReadRepository,
    Repo,
    VersionNotFound,
)

pytestmark = pytest.mark.both_drivers

# -- the example domain -----------------------------------------------------------------------


class _AccountEventBase(pydantic.BaseModel):
    account_id: uuid.UUID
    event_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.event_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


class AccountOpened(_AccountEventBase):
    owner: str


class MoneyDeposited(_AccountEventBase):
    amount: int


class MoneyWithdrawn(_AccountEventBase):
    amount: int


AccountEvent = Union[AccountOpened, MoneyDeposited, MoneyWithdrawn]  # noqa: UP007 - the serializer wants a Union


class InsufficientFunds(ValueError):
    pass


class Account(EventSourcedAggregateRoot[uuid.UUID, AccountEvent]):
    def __init__(self) -> None:
        super().__init__()
        self.id: uuid.UUID | None = None
        self.owner = ""
        self.balance = 0
        self.transactions: list[int] = []

    def get_id(self) -> uuid.UUID | None:
        return self.id

    @classmethod
    def open(cls, owner: str, account_id: uuid.UUID | None = None) -> Account:
        account = cls()
        account.apply(AccountOpened(account_id=account_id or uuid.uuid4(), owner=owner))
        return account

    def deposit(self, amount: int) -> None:
        assert self.id is not None
        self.apply(MoneyDeposited(account_id=self.id, amount=amount))

    def withdraw(self, amount: int) -> None:
        # No pre-check on purpose: the invariant is what rejects an overdraft.
        assert self.id is not None
        self.apply(MoneyWithdrawn(account_id=self.id, amount=amount))

    def _apply(self, event: AccountEvent) -> None:
        if isinstance(event, AccountOpened):
            self.id = event.account_id
            self.owner = event.owner
        elif isinstance(event, MoneyDeposited):
            self.transactions.append(event.amount)
            self.balance += event.amount
        elif isinstance(event, MoneyWithdrawn):
            # Mutates a nested list before the invariant fails, so a rollback must be deep.
            self.transactions.append(-event.amount)
            self.balance -= event.amount
        else:
            raise TypeError(f"unknown event {event!r}")

    def _check_invariants(self) -> None:
        if self.balance < 0:
            raise InsufficientFunds(f"balance would be {self.balance}")


class LegacyAccount(Account):
    """Depeche DB's behaviour: a rejected event leaves its changes behind."""

    _rollback_on_error = False


class CopyProbe:
    """Counts how often the aggregate state around it is deep-copied."""

    copies = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> CopyProbe:
        CopyProbe.copies += 1
        return CopyProbe()


class ProbedAccount(Account):
    def __init__(self) -> None:
        super().__init__()
        self.probe = CopyProbe()


class Customer(EventSourcedAggregateRoot[uuid.UUID, AccountEvent]):
    """A second aggregate type, to compare with `Account`."""

    def __init__(self) -> None:
        super().__init__()
        self.id: uuid.UUID | None = None

    def get_id(self) -> uuid.UUID | None:
        return self.id

    def _apply(self, event: AccountEvent) -> None:
        self.id = event.account_id


# -- helpers ------------------------------------------------------------------------------------


class CountingReader:
    """A reader that counts the rows `read` yields and records its arguments."""

    def __init__(self, inner: depeche_nb.MessageStoreReaderProtocol[AccountEvent], owner: CountingStore):
        self._inner = inner
        self._owner = owner

    def read(
        self, stream: str, min_version: int | None = None
    ) -> Iterator[depeche_nb.StoredMessage[AccountEvent]]:
        self._owner.read_calls.append((stream, min_version))
        for message in self._inner.read(stream, min_version):
            self._owner.rows_read += 1
            yield message

    def get_message_by_id(self, message_id: uuid.UUID) -> depeche_nb.StoredMessage[AccountEvent]:
        return self._inner.get_message_by_id(message_id)

    def get_messages_by_ids(
        self, message_ids: Sequence[uuid.UUID]
    ) -> Iterator[depeche_nb.StoredMessage[AccountEvent]]:
        return self._inner.get_messages_by_ids(message_ids)

    def read_wildcard(self, stream_wildcard: str) -> Iterator[depeche_nb.StoredMessage[AccountEvent]]:
        return self._inner.read_wildcard(stream_wildcard)


class CountingStore:
    """Delegates to a real store; its readers count what they read."""

    def __init__(self, store: depeche_nb.MessageStore[AccountEvent]) -> None:
        self._store = store
        self.rows_read = 0
        self.read_calls: list[tuple[str, int | None]] = []

    def truncate(self) -> None:
        self._store.truncate()

    def write(
        self, stream: str, message: AccountEvent, expected_version: int | None = None, conn: Any = None
    ) -> depeche_nb.MessagePosition:
        return self._store.write(stream, message, expected_version, conn)

    def synchronize(
        self,
        stream: str,
        expected_version: int | None,
        messages: Sequence[AccountEvent],
        conn: Any = None,
    ) -> depeche_nb.MessagePosition:
        return self._store.synchronize(stream, expected_version, messages, conn)

    @contextlib.contextmanager
    def reader(self, conn: Any = None) -> Iterator[CountingReader]:
        with self._store.reader(conn) as inner:
            yield CountingReader(inner, self)

    def read(
        self, stream: str, min_version: int | None = None
    ) -> Iterator[depeche_nb.StoredMessage[AccountEvent]]:
        return self._store.read(stream, min_version)

    def reset(self) -> None:
        self.rows_read = 0
        self.read_calls.clear()


@pytest.fixture
def account_store(engine: sa.Engine, unique_name: str) -> depeche_nb.MessageStore[AccountEvent]:
    return depeche_nb.MessageStore(
        name=unique_name,
        engine=engine,
        serializer=depeche_nb.tools.PydanticMessageSerializer(AccountEvent),
    )


@pytest.fixture
def repo(
    account_store: depeche_nb.MessageStore[AccountEvent],
) -> EventStoreRepo[AccountEvent, Account, uuid.UUID]:
    return EventStoreRepo(account_store, Account, "account")


def stream_of(store: depeche_nb.MessageStore[AccountEvent], account_id: uuid.UUID | None) -> list[Any]:
    return [m.message for m in store.read(f"account-{account_id}")]


def saved_account(
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID], deposits: int = 0, owner: str = "ada"
) -> Account:
    account = Account.open(owner)
    for amount in range(1, deposits + 1):
        account.deposit(amount)
    repo.add(account)
    return account


# -- the aggregate on its own -------------------------------------------------------------------


def test_fresh_aggregate_has_no_id_and_version_zero() -> None:
    account = Account()
    assert account.get_id() is None
    assert account.version == 0
    assert account.events == []


def test_apply_records_events_and_counts_versions() -> None:
    account = Account.open("ada")
    account.deposit(30)
    account.withdraw(10)
    assert account.version == 3
    assert [type(e) for e in account.events] == [AccountOpened, MoneyDeposited, MoneyWithdrawn]
    assert (account.balance, account.transactions) == (20, [30, -10])


def test_events_returns_a_copy_so_the_history_cannot_be_rewritten() -> None:
    account = Account.open("ada")
    account.events.clear()
    account.events.append(MoneyDeposited(account_id=uuid.uuid4(), amount=1))
    assert len(account.events) == 1
    assert isinstance(account.events[0], AccountOpened)


def test_version_is_read_only() -> None:
    account = Account.open("ada")
    with pytest.raises(AttributeError):
        account.version = 5  # type: ignore[misc]
    assert account.version == 1


def test_invariant_violation_raises_and_leaves_the_aggregate_unchanged() -> None:
    account = Account.open("ada")
    account.deposit(10)
    events_before = account.events

    with pytest.raises(InsufficientFunds):
        account.withdraw(50)

    assert account.balance == 10
    assert account.transactions == [10]  # the nested list was rolled back too
    assert account.version == 2
    assert account.events == events_before
    account.withdraw(10)  # still usable afterwards
    assert (account.balance, account.version) == (0, 3)


def test_error_inside_apply_is_rolled_back_too() -> None:
    account = Account.open("ada")
    account.deposit(5)
    with pytest.raises(TypeError, match="unknown event"):
        account.apply("not an event")  # type: ignore[arg-type]
    assert (account.balance, account.transactions, account.version) == (5, [5], 2)


def test_rollback_can_be_switched_off_for_depeche_db_behaviour() -> None:
    account = LegacyAccount.open("ada")
    with pytest.raises(InsufficientFunds):
        account.withdraw(50)
    assert account.balance == -50  # the rejected change stays, as in Depeche DB
    assert account.version == 1  # but the event is not recorded
    assert len(account.events) == 1


def test_uncopyable_state_gives_a_clear_error() -> None:
    account = Account.open("ada")
    account.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="_rollback_on_error"):
        account.deposit(1)
    assert account.balance == 0


def test_equality_by_type_id_and_version() -> None:
    account = Account.open("ada")
    twin = copy.deepcopy(account)
    assert account == twin
    twin.deposit(1)
    assert account != twin

    customer = Customer()
    customer.apply(account.events[0])
    assert customer.get_id() == account.get_id() and customer.version == account.version
    assert account != customer


def test_comparing_with_other_objects_is_false_not_an_error() -> None:
    account = Account.open("ada")
    assert (account == "ada") is False
    assert account != None  # noqa: E711 - the comparison itself is what is tested
    assert account not in [1, "x", None]


def test_aggregates_are_unhashable() -> None:
    assert Account.__hash__ is None
    with pytest.raises(TypeError):
        hash(Account.open("ada"))


# -- repositories -------------------------------------------------------------------------------


def test_round_trip_open_deposit_withdraw(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    assert isinstance(repo, Repo)
    account = Account.open("ada")
    position = repo.add(account)
    assert (position.stream, position.version) == (f"account-{account.get_id()}", 1)

    loaded = repo.get(account.id)  # type: ignore[arg-type]
    loaded.deposit(100)
    loaded.withdraw(30)
    position = repo.save(loaded, expected_version=1)
    assert position.version == 3

    again = repo.get(account.id)  # type: ignore[arg-type]
    assert (again.owner, again.balance, again.transactions) == ("ada", 70, [100, -30])
    assert again.version == 3
    assert again == loaded
    assert again.events == loaded.events
    assert stream_of(account_store, account.id) == loaded.events


def test_get_of_unknown_id_raises_not_found(
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFound) as info:
        repo.get(missing)
    assert info.value.args[0] == missing
    assert str(missing) in str(info.value)


def test_saving_an_aggregate_without_id_is_rejected_and_writes_nothing(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    with pytest.raises(ValueError, match="get_id"):
        repo.add(Account())
    assert list(account_store.read_wildcard("%")) == []


def test_invariant_violation_saves_nothing(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = Account.open("ada")
    with pytest.raises(InsufficientFunds):
        account.withdraw(5)
    repo.add(account)
    assert [type(e) for e in stream_of(account_store, account.id)] == [AccountOpened]

    account.deposit(10)
    repo.save(account, expected_version=1)
    with pytest.raises(InsufficientFunds):
        account.withdraw(11)
    position = repo.save(account, expected_version=2)
    assert position.version == 2
    assert len(stream_of(account_store, account.id)) == 2
    assert repo.get(account.id).balance == 10  # type: ignore[arg-type]


def test_first_save_wins_and_the_second_raises_optimistic_concurrency_error(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account_id = saved_account(repo).id
    assert account_id is not None
    first, second = repo.get(account_id), repo.get(account_id)
    first.deposit(10)
    second.deposit(20)

    repo.save(first, expected_version=1)
    with pytest.raises(depeche_nb.OptimisticConcurrencyError) as info:
        repo.save(second, expected_version=1)

    # Code written for Depeche DB catches the id mismatch instead; both work.
    assert isinstance(info.value, depeche_nb.MessageIdMismatchError)
    assert stream_of(account_store, account_id) == first.events
    assert repo.get(account_id).balance == 10


def test_stale_expected_version_raises_and_writes_nothing(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = saved_account(repo)
    account.deposit(10)
    with pytest.raises(depeche_nb.OptimisticConcurrencyError):
        repo.save(account, expected_version=0)
    assert len(stream_of(account_store, account.id)) == 1


def test_adding_a_second_aggregate_with_a_taken_id_is_a_conflict(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    original = saved_account(repo, owner="ada")
    impostor = Account.open("eve", account_id=original.id)
    with pytest.raises(ConcurrentModificationError):
        repo.add(impostor)
    assert repo.get(original.id).owner == "ada"  # type: ignore[arg-type]
    assert stream_of(account_store, original.id) == original.events


def _race_saves(
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID], accounts: list[Account], expected_version: int
) -> list[object]:
    """Save all `accounts` at the same moment from one thread each; each outcome is a position or an error."""
    barrier = threading.Barrier(len(accounts))
    outcomes: list[object] = [None] * len(accounts)

    def save(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = repo.save(accounts[index], expected_version=expected_version)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(accounts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_concurrent_saves_from_threads_let_exactly_one_win(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    for _ in range(5):
        account_id = saved_account(repo).id
        assert account_id is not None
        copies = [repo.get(account_id) for _ in range(2)]
        for amount, copy_ in enumerate(copies, start=1):
            copy_.deposit(amount)

        outcomes = _race_saves(repo, copies, expected_version=1)

        winners = [i for i, o in enumerate(outcomes) if isinstance(o, depeche_nb.MessagePosition)]
        losers = [o for o in outcomes if isinstance(o, depeche_nb.OptimisticConcurrencyError)]
        assert len(winners) == 1 and len(losers) == 1, outcomes
        assert stream_of(account_store, account_id) == copies[winners[0]].events


def test_resaving_an_unchanged_aggregate_is_idempotent(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = saved_account(repo, deposits=2)
    first = repo.save(account, expected_version=3)
    second = repo.save(account, expected_version=3)
    stale = repo.add(account)  # nothing new, so even a stale expectation is fine
    assert first == second == stale
    assert first.version == 3
    assert len(list(account_store.read_wildcard("%"))) == 3


def test_stream_name_is_prefix_dash_id(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = saved_account(repo, deposits=1)
    [stored_stream] = {m.stream for m in account_store.read_wildcard("%")}
    assert stored_stream == f"account-{account.id}"


def test_read_repository_loads_several_aggregates_on_one_reader(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    a, b = saved_account(repo, deposits=1), saved_account(repo, deposits=3)
    with account_store.reader() as reader:
        read_repo: ReadRepository[AccountEvent, Account, uuid.UUID | None] = ReadRepository(
            reader, Account, "account"
        )
        assert read_repo.get(a.id).balance == 1
        assert read_repo.get(b.id).balance == 6
        with pytest.raises(NotFound):
            read_repo.get(uuid.uuid4())


def test_replaying_stored_events_does_not_snapshot_but_commands_do(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account_id = saved_account(repo, deposits=20).id
    probed_repo: EventStoreRepo[AccountEvent, ProbedAccount, uuid.UUID] = EventStoreRepo(
        account_store, ProbedAccount, "account"
    )
    CopyProbe.copies = 0
    loaded = probed_repo.get(account_id)  # type: ignore[arg-type]
    assert loaded.version == 21
    assert CopyProbe.copies == 0
    loaded.deposit(1)
    assert CopyProbe.copies == 1


# -- caches -------------------------------------------------------------------------------------


def test_cached_get_reads_only_the_new_events(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = saved_account(repo, deposits=9)  # versions 1..10
    counting = CountingStore(account_store)
    cache: InMemoryCache[Account, uuid.UUID] = InMemoryCache(cache_every_x_version=1)
    cached_repo = EventStoreRepo(counting, Account, "account", cache=cache)
    assert account.id is not None

    assert cached_repo.get(account.id).version == 10
    assert counting.rows_read == 10

    account.deposit(100)
    account.deposit(200)
    repo.save(account, expected_version=10)

    counting.reset()
    loaded = cached_repo.get(account.id)
    # The cached state ends at version 10; that row is re-read only to verify it.
    assert counting.read_calls == [(f"account-{account.id}", 10)]
    assert counting.rows_read == 3
    assert (loaded.version, loaded.balance) == (12, 45 + 300)
    assert loaded == account

    counting.reset()
    assert cached_repo.get(account.id).version == 12
    assert counting.rows_read == 1  # nothing new


def test_cache_stores_only_every_x_versions(
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
    account_store: depeche_nb.MessageStore[AccountEvent],
) -> None:
    cache: InMemoryCache[Account, uuid.UUID] = InMemoryCache(cache_every_x_version=3)
    cached_repo = EventStoreRepo(account_store, Account, "account", cache=cache)
    account = saved_account(repo)
    account_id = account.id
    assert account_id is not None

    def cached_version() -> int | None:
        entry = cache.get(account_id)
        return None if entry is None else entry.version

    assert cached_version() is None
    cached_repo.get(account_id)
    assert cached_version() == 1  # nothing cached yet: stored at once

    for expected_cached, deposits in [(1, 1), (1, 1), (4, 1), (4, 2), (7, 1)]:
        version = account.version
        for _ in range(deposits):
            account.deposit(1)
        repo.save(account, expected_version=version)
        assert cached_repo.get(account_id).version == account.version
        assert cached_version() == expected_cached, account.version


def test_mutating_a_returned_object_does_not_change_the_cache(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    cache: InMemoryCache[Account, uuid.UUID] = InMemoryCache(cache_every_x_version=1)
    cached_repo = EventStoreRepo(account_store, Account, "account", cache=cache)
    account_id = saved_account(repo, deposits=2).id
    assert account_id is not None

    loaded = cached_repo.get(account_id)
    loaded.deposit(1000)  # not saved
    loaded.transactions.append(99)

    from_cache = cache.get(account_id)
    assert from_cache is not None
    assert (from_cache.balance, from_cache.transactions, from_cache.version) == (3, [1, 2], 3)
    fresh = cached_repo.get(account_id)
    assert (fresh.balance, fresh.transactions, fresh.version) == (3, [1, 2], 3)
    assert fresh is not loaded


def test_stale_cache_after_truncate_is_detected_and_replaced(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache: InMemoryCache[Account, uuid.UUID] = InMemoryCache()
    cached_repo = EventStoreRepo(account_store, Account, "account", cache=cache)
    old = saved_account(repo, deposits=3, owner="ada")
    assert old.id is not None
    assert cached_repo.get(old.id).owner == "ada"

    account_store.truncate()
    with pytest.raises(NotFound):
        cached_repo.get(old.id)

    # Same id, other history, and a longer stream than the cached one.
    new = Account.open("bob", account_id=old.id)
    for _ in range(5):
        new.deposit(7)
    repo.add(new)
    with caplog.at_level(logging.WARNING, logger="depeche_nb.event_sourcing.repository"):
        loaded = cached_repo.get(old.id)
    assert (loaded.owner, loaded.balance, loaded.version) == ("bob", 35, 6)
    assert "does not match the stream" in caplog.text
    from_cache = cache.get(old.id)
    assert from_cache is not None and from_cache.owner == "bob"


class _BrokenCache(BaseCache[Account, uuid.UUID]):
    """A backend whose entries cannot be read back."""

    def __init__(self) -> None:
        super().__init__(cache_every_x_version=1)
        self.stored: list[int] = []

    def _get(self, id: uuid.UUID) -> Account | None:
        raise pickle.UnpicklingError("corrupt entry")

    def _set(self, id: uuid.UUID, obj: Account) -> None:
        self.stored.append(obj.version)


def test_unreadable_cache_entry_falls_back_to_a_full_rebuild(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = _BrokenCache()
    cached_repo = EventStoreRepo(account_store, Account, "account", cache=cache)
    account_id = saved_account(repo, deposits=2).id
    assert account_id is not None
    with caplog.at_level(logging.WARNING, logger="depeche_nb.event_sourcing.repository"):
        assert cached_repo.get(account_id).balance == 3
    assert "corrupt entry" in caplog.text
    assert cache.stored == [3]


def test_in_memory_cache_explains_unpicklable_aggregates(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    class LocalAccount(Account):
        pass

    account_id = saved_account(repo).id
    local_repo: EventStoreRepo[AccountEvent, LocalAccount, uuid.UUID] = EventStoreRepo(
        account_store, LocalAccount, "account", cache=InMemoryCache()
    )
    with pytest.raises(TypeError, match="module level"):
        local_repo.get(account_id)  # type: ignore[arg-type]


def test_cache_construction_and_no_op_cache() -> None:
    with pytest.raises(TypeError):
        BaseCache()  # type: ignore[abstract]
    with pytest.raises(ValueError, match=">= 1"):
        InMemoryCache(cache_every_x_version=0)
    with pytest.raises(TypeError):
        InMemoryCache(cache_every_x_version="5")  # type: ignore[arg-type]
    no_op: NoOpCache[Account, uuid.UUID] = NoOpCache()
    account = Account.open("ada")
    no_op.set(account.id, account)  # type: ignore[arg-type]
    assert no_op.get(account.id) is None  # type: ignore[arg-type]


def test_in_memory_cache_set_copies_the_object() -> None:
    cache: InMemoryCache[Account, uuid.UUID] = InMemoryCache(cache_every_x_version=1)
    account = Account.open("ada")
    assert account.id is not None
    cache.set(account.id, account)
    account.deposit(5)
    entry = cache.get(account.id)
    assert entry is not None and (entry.balance, entry.version) == (0, 1)


# -- time travel and history --------------------------------------------------------------------


class Untouchable:
    """A store that fails the test if anything reads or writes it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was used ({name}) before the arguments were checked")


def replayed(events: Sequence[AccountEvent]) -> Account:
    """The aggregate built in memory from `events`: what a past state must equal."""
    account = Account()
    for event in events:
        account.apply(event)
    return account


def state_of(account: Account) -> tuple[Any, ...]:
    return (account.id, account.owner, account.balance, list(account.transactions), account.version)


def random_account(rng: random.Random, repo: EventStoreRepo[AccountEvent, Account, uuid.UUID]) -> Account:
    """An account with a random history, saved in random batches (so events of one save share
    a transaction and a stored time)."""
    account = Account.open(rng.choice(["ada", "bob", "cy"]))
    saved = 0
    for _ in range(rng.randint(0, 14)):
        if rng.random() < 0.55 or account.balance == 0:
            account.deposit(rng.randint(1, 50))
        else:
            account.withdraw(rng.randint(1, account.balance))
        if rng.random() < 0.4:
            repo.save(account, expected_version=saved)
            saved = account.version
    repo.save(account, expected_version=saved)
    return account


def test_state_at_each_version_equals_replaying_that_prefix(
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    rng = random.Random(1207)
    for _ in range(12):
        account = random_account(rng, repo)
        assert account.id is not None
        events = account.events
        history = repo.history(account.id)
        assert history["version"].tolist() == list(range(1, len(events) + 1))
        for version in range(1, len(events) + 1):
            expected = replayed(events[:version])
            past = repo.get(account.id, version=version)
            assert state_of(past) == state_of(expected)
            assert past.events == events[:version]
            row = history.iloc[version - 1]
            assert (row["state.owner"], row["state.balance"], row["state.transactions"]) == (
                expected.owner,
                expected.balance,
                expected.transactions,
            )
            before = replayed(events[: version - 1])
            changed = {
                name
                for name in ("id", "owner", "balance", "transactions")
                if getattr(before, name) != getattr(expected, name)
            }
            assert set(row["changed"]) == {f"state.{name}" for name in changed}
        with pytest.raises(VersionNotFound) as info:
            repo.get(account.id, version=len(events) + 1)
        assert info.value.current_version == len(events)


def stored_times(store: depeche_nb.MessageStore[AccountEvent], account: Account) -> list[dt.datetime]:
    return [m.added_at.replace(tzinfo=dt.timezone.utc) for m in store.read(f"account-{account.id}")]


def test_time_travel_by_at_uses_the_stored_time_not_the_message_time(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    future = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)  # every event claims to happen then
    account = Account()
    account.apply(AccountOpened(account_id=uuid.uuid4(), owner="ada", occurred_at=future))
    repo.add(account)
    for amount, version in [(10, 1), (20, 2)]:
        time.sleep(0.002)  # distinct stored times
        account.apply(MoneyDeposited(account_id=account.id, amount=amount, occurred_at=future))
        repo.save(account, expected_version=version)
    assert account.id is not None
    first, second, third = stored_times(account_store, account)
    assert first < second < third

    assert repo.get(account.id, at=first).version == 1
    assert repo.get(account.id, at=second).balance == 10  # inclusive
    assert repo.get(account.id, at=third - dt.timedelta(microseconds=1)).version == 2
    assert repo.get(account.id, at=future).version == 3
    # Any time zone names the same moment.
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    assert repo.get(account.id, at=second.astimezone(tz)).version == 2

    with pytest.raises(VersionNotFound) as info:
        repo.get(account.id, at=first - dt.timedelta(microseconds=1))
    assert isinstance(info.value, NotFound)
    assert info.value.first_added_at == first
    assert "did not exist yet" in str(info.value)
    with pytest.raises(NotFound) as missing:
        repo.get(uuid.uuid4(), at=future)
    assert not isinstance(missing.value, VersionNotFound)


def test_time_travel_neither_reads_nor_fills_the_cache(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = saved_account(repo, deposits=4)  # versions 1..5, balance 10
    assert account.id is not None
    counting = CountingStore(account_store)
    cache: InMemoryCache[Account, uuid.UUID] = InMemoryCache(cache_every_x_version=1)
    cached_repo = EventStoreRepo(counting, Account, "account", cache=cache)

    assert cached_repo.get(account.id, version=2).balance == 1
    assert cache.get(account.id) is None  # a past state is never stored
    assert cached_repo.get(account.id).version == 5
    counting.reset()
    past = cached_repo.get(account.id, version=3)
    assert (past.version, past.balance) == (3, 3)
    assert counting.read_calls == [(f"account-{account.id}", None)]  # from the start, not the cache
    entry = cache.get(account.id)
    assert entry is not None and entry.version == 5
    assert cached_repo.get(account.id).balance == 10

    past.deposit(100)  # a past state cannot overwrite what came after it
    with pytest.raises(depeche_nb.OptimisticConcurrencyError):
        repo.save(past, expected_version=3)
    assert len(stream_of(account_store, account.id)) == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"version": 0}, ValueError, "version must be >= 1"),
        ({"version": -3}, ValueError, "version must be >= 1"),
        ({"version": True}, TypeError, "version must be an int"),
        ({"version": 2.0}, TypeError, "version must be an int"),
        ({"version": "2"}, TypeError, "version must be an int"),
        ({"at": dt.datetime(2024, 5, 6, 9, 0)}, ValueError, "timezone-aware"),
        ({"at": dt.date(2024, 5, 6)}, TypeError, "at must be a datetime"),
        ({"at": "2024-05-06T09:00:00+00:00"}, TypeError, "at must be a datetime"),
        (
            {"version": 1, "at": dt.datetime(2024, 5, 6, tzinfo=dt.timezone.utc)},
            ValueError,
            "either version or at",
        ),
    ],
)
def test_bad_time_travel_arguments_fail_before_the_store_is_used(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID] = EventStoreRepo(
        Untouchable(),  # type: ignore[arg-type]
        Account,
        "account",
    )
    with pytest.raises(error, match=match):
        repo.get(uuid.uuid4(), **kwargs)


def test_history_is_a_typed_dataframe_pandas_can_query(
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = Account.open("ada")
    for amount in (50, -30, -15, 40, -42):
        account.deposit(amount) if amount > 0 else account.withdraw(-amount)
    repo.add(account)
    assert account.id is not None

    history = repo.history(account.id)
    assert list(history.columns[:5]) == ["version", "event_type", "added_at", "global_position", "message_id"]
    assert str(history["version"].dtype) == "int64"
    assert str(history["added_at"].dtype) == "datetime64[us, UTC]"
    assert str(history["occurred_at"].dtype) == "datetime64[us, UTC]"  # an event field
    assert str(history["state.balance"].dtype) == "int64"
    assert str(history["amount"].dtype) == "Int64"  # AccountOpened has none
    assert history["event_type"].tolist() == [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
        "MoneyWithdrawn",
        "MoneyDeposited",
        "MoneyWithdrawn",
    ]
    assert history["state.balance"].tolist() == [0, 50, 20, 5, 45, 3]
    # Snapshots, not the list the aggregate kept appending to.
    assert history["state.transactions"].tolist()[:3] == [[], [50], [50, -30]]
    assert history["changed"].tolist()[:2] == [
        ["state.id", "state.owner"],
        ["state.balance", "state.transactions"],
    ]
    # "Which withdrawal first took the balance below 10?"
    low = history[(history["state.balance"] < 10) & (history["event_type"] == "MoneyWithdrawn")].iloc[0]
    assert (low["version"], low["event_type"], low["amount"]) == (4, "MoneyWithdrawn", 15)

    with pytest.raises(NotFound):
        repo.history(uuid.uuid4())


def test_aggregate_history_follows_new_events_and_a_rewritten_stream(
    account_store: depeche_nb.MessageStore[AccountEvent],
    repo: EventStoreRepo[AccountEvent, Account, uuid.UUID],
) -> None:
    account = saved_account(repo, deposits=2)
    assert account.id is not None
    history = AggregateHistory(repo, account.id)
    assert (history.version, history.update()) == (3, 0)

    account.deposit(7)
    account.withdraw(2)
    repo.save(account, expected_version=3)
    assert history.update() == 2
    assert [s.state["balance"] for s in history.steps] == [0, 1, 3, 10, 8]
    assert history.steps[-1].changed == ("balance", "transactions")

    account_store.truncate()  # the same id with another, shorter history
    repo.add(Account.open("bob", account_id=account.id))
    assert history.update() == 1
    assert [(s.version, s.state["owner"]) for s in history.steps] == [(1, "bob")]

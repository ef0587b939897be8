"""Fenced partitions: a runner whose lock vanished cannot acknowledge, so its handler's
transaction rolls back and positions never go back (DESIGN invariant 4, "Fenced").

Two runners of one subscription live in this process, each with its own lock session.
The faults are real: the first runner's lock session is ended with
`pg_terminate_backend` while it works, and the second one takes the partition over.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import (
    AckStrategy,
    MessageHandlerRegister,
    ParkSubscriptionErrorHandler,
    PartitionLostError,
    ReplayInProgressError,
    SubscriptionMessage,
)
from depeche_nb.postgres.driver import driver_of
from depeche_nb.postgres.locks import advisory_key
from depeche_nb.tools import DbLockProvider, PydanticMessageSerializer
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers

MESSAGES = 8
WAIT_S = 20


class OnePartition:
    def get_partition(self, message: Any) -> int:
        return 0


def _effects_table(engine: sa.Engine, name: str) -> str:
    table = f"{name}_effects"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{table}" (number int NOT NULL, runner text NOT NULL)')
    return table


def _effects(engine: sa.Engine, table: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT number, runner FROM "{table}" ORDER BY number').all()
    return [(int(r[0]), str(r[1])) for r in rows]


def _terminate(engine: sa.Engine, pid: int | None) -> None:
    assert pid is not None
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_terminate_backend(%s)", (pid,)).scalar() is True
        conn.commit()
    # The backend exits asynchronously; its locks go with it.
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if not conn.exec_driver_sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).first():
                return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} did not exit")


def _ending_the_lock_session_at(
    number: int, engine: sa.Engine, delivered: list[int], holder: dict[str, Any]
) -> Any:
    """A handler that records each number it gets and, at `number`, ends the lock session of
    the subscription in `holder["sub"]`."""

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        got = message.stored_message.message.number
        delivered.append(got)
        if got == number:
            _terminate(engine, holder["sub"].lock_provider.session_pid)

    return handle


class Setup:
    def __init__(self, engine: sa.Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.store = depeche_nb.MessageStore(
            name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered)
        )
        self.stream = self.store.aggregated_stream(
            name=f"{name}_agg", partitioner=OnePartition(), stream_wildcards=["f-%"]
        )
        self.effects = _effects_table(engine, name)
        for number in range(MESSAGES):
            self.store.write("f-1", Numbered(number=number))
        self.stream.projector.run()

    def subscription(self, handler: Any, **kwargs: Any) -> Any:
        register: MessageHandlerRegister[Numbered] = MessageHandlerRegister()
        register.register(handler)
        locks = DbLockProvider(f"{self.name}_locks", self.engine)
        return self.stream.subscription(
            name=f"{self.name}_sub", handlers=register, lock_provider=locks, **kwargs
        )

    def position(self, subscription: Any) -> int:
        return int(subscription.progress()[0].position)


@pytest.fixture
def setup(engine: sa.Engine, unique_name: str) -> Setup:
    return Setup(engine, unique_name)


def test_a_runner_whose_lock_session_died_cannot_ack_in_its_handlers_transaction(setup: Setup) -> None:
    """Runner A loses its lock session while handling message 3; runner B takes the partition
    and is handling message 3 too when A's handler commits its side effect and its ack in one
    transaction. The fenced ack refuses (B's claim bumped the token), A's transaction rolls
    back, and every effect exists exactly once; B goes on to the end."""
    engine = setup.engine
    a_at_three, a_resume = threading.Event(), threading.Event()
    b_at_three, b_resume = threading.Event(), threading.Event()
    gates = {"a": (a_at_three, a_resume), "b": (b_at_three, b_resume)}

    def handler_for(runner: str) -> Any:
        def handle(message: SubscriptionMessage[Numbered]) -> None:
            number = message.stored_message.message.number
            if number == 3:
                arrived, resume = gates[runner]
                arrived.set()
                assert resume.wait(WAIT_S)
            with engine.begin() as conn:
                conn.exec_driver_sql(f'INSERT INTO "{setup.effects}" VALUES (%s, %s)', (number, runner))
                message.ack.execute(conn=conn)

        return handle

    a = setup.subscription(handler_for("a"))
    b = setup.subscription(handler_for("b"))
    outcome: dict[str, Any] = {}

    def step(name: str, sub: Any) -> threading.Thread:
        def target() -> None:
            try:
                outcome[name] = sub.runner.step()
            except BaseException as exc:  # the test thread asserts on it
                outcome[name] = exc

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    thread_a = step("a", a)
    assert a_at_three.wait(WAIT_S)
    assert setup.position(a) == 2
    _terminate(engine, a.lock_provider.session_pid)
    thread_b = step("b", b)  # the lock is free now: B takes over at position 3
    assert b_at_three.wait(WAIT_S)
    a_resume.set()
    thread_a.join(WAIT_S)
    assert outcome["a"].lost_partitions == [0], outcome["a"]
    assert setup.position(a) == 2  # A's ack was refused
    b_resume.set()
    thread_b.join(WAIT_S)
    assert not isinstance(outcome["b"], BaseException), outcome["b"]
    effects = _effects(engine, setup.effects)
    assert Counter(n for n, _ in effects) == Counter(range(MESSAGES)), effects
    assert [n for n, r in effects if r == "a"] == [0, 1, 2]
    assert setup.position(b) == MESSAGES - 1


def test_a_runner_notices_its_lost_lock_before_the_next_delivery(setup: Setup) -> None:
    """The lock session ends between two messages: the runner delivers nothing more."""
    delivered: list[int] = []
    holder: dict[str, Any] = {}
    a = setup.subscription(_ending_the_lock_session_at(2, setup.engine, delivered, holder))
    holder["sub"] = a
    report = a.runner.step()
    assert delivered == [0, 1, 2]
    assert report.lost_partitions == [0]
    assert setup.position(a) == 2  # 2 was handled before the loss was noticed, and acked
    # A new claim opens a new session and goes on from there.
    delivered.clear()
    a.runner.run()
    assert delivered == list(range(3, MESSAGES))


def test_a_batched_ack_after_a_takeover_is_refused_and_the_position_does_not_go_back(setup: Setup) -> None:
    engine = setup.engine
    at_three, resume = threading.Event(), threading.Event()
    handled: list[tuple[str, int]] = []

    def handler_for(runner: str) -> Any:
        def handle(message: SubscriptionMessage[Numbered]) -> None:
            number = message.stored_message.message.number
            handled.append((runner, number))
            if runner == "a" and number == 3:
                at_three.set()
                assert resume.wait(WAIT_S)

        return handle

    a = setup.subscription(handler_for("a"), ack_strategy=AckStrategy.BATCHED)
    b = setup.subscription(handler_for("b"), ack_strategy=AckStrategy.BATCHED)
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("report", a.runner.step()))
    thread.start()
    assert at_three.wait(WAIT_S)
    _terminate(engine, a.lock_provider.session_pid)
    b.runner.step()  # nothing was acknowledged yet: B starts at 0 (at-least-once)
    assert setup.position(b) == MESSAGES - 1
    resume.set()
    thread.join(WAIT_S)
    assert outcome["report"].lost_partitions == [0]
    assert setup.position(a) == MESSAGES - 1  # A's batch ack (position <= 3) was refused
    assert [n for r, n in handled if r == "b"] == list(range(MESSAGES))


def test_an_ack_with_a_stale_token_raises_partition_lost(setup: Setup) -> None:
    def ignore(message: SubscriptionMessage[Numbered]) -> None:
        return None

    sub = setup.subscription(ignore)
    sub.ensure_initialized()
    first = sub.claim(0)
    assert first is not None
    sub.release(first)
    second = sub.claim(0)
    assert second is not None and second.token == first.token + 1
    with pytest.raises(PartitionLostError, match="lost partition 0"):
        sub.ack_op(first, 0).execute()
    sub.ack_op(second, 1).execute()
    with pytest.raises(PartitionLostError, match="would go back"):
        sub.ack_op(second, 0).execute()
    sub.release(second)
    assert setup.position(sub) == 1


def test_reset_of_one_partition_does_not_touch_another_one_being_worked_on(
    engine: sa.Engine, unique_name: str
) -> None:
    """Finding 3: reset({1: 0}) used to read every position before locking and write them all
    back, rewinding partition 0 under a runner."""
    store = depeche_nb.MessageStore(
        name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered)
    )

    class ByStream:
        def get_partition(self, message: Any) -> int:
            return int(message.stream.rsplit("-", 1)[1])

    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByStream(), stream_wildcards=["p-%"]
    )
    for number in range(3):
        store.write("p-0", Numbered(number=number))
    store.write("p-1", Numbered(number=100))
    stream.projector.run()
    calls: Counter[int] = Counter()
    in_four, resume = threading.Event(), threading.Event()

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        number = message.stored_message.message.number
        calls[number] += 1
        if number == 4:
            in_four.set()
            assert resume.wait(WAIT_S)

    register: MessageHandlerRegister[Numbered] = MessageHandlerRegister()
    register.register(handle)
    sub = stream.subscription(name=f"{unique_name}_sub", handlers=register)
    sub.runner.run()  # 0, 1, 2 and 100 handled
    for number in range(3, 6):
        store.write("p-0", Numbered(number=number))
    stream.projector.run()
    thread = threading.Thread(target=sub.runner.step)
    thread.start()
    assert in_four.wait(WAIT_S)  # the runner holds partition 0, at position 3
    result = sub.reset({1: 0}, timeout=5)  # must not wait for partition 0's lock
    assert result == {0: 3, 1: -1}
    resume.set()
    thread.join(WAIT_S)
    sub.runner.run()
    assert {n: c for n, c in calls.items() if n < 100} == {n: 1 for n in range(6)}
    assert calls[100] == 2  # partition 1 was rewound and handled again
    assert {p.partition: p.position for p in sub.progress()} == {0: 5, 1: 0}


class Partitions:
    """Stream p-<n> in partition n; partition 0 (eight messages) is handled first, then the
    others (three each, numbered 100 * n + i)."""

    def __init__(self, engine: sa.Engine, name: str, partitions: int = 2) -> None:
        self.engine = engine
        self.store = depeche_nb.MessageStore(
            name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered)
        )
        self.stream = self.store.aggregated_stream(
            name=f"{name}_agg", partitioner=ByStreamNumber(), stream_wildcards=["p-%"]
        )
        self.store.write_all("p-0", [Numbered(number=n) for n in range(MESSAGES)])
        for partition in range(1, partitions):
            self.store.write_all(f"p-{partition}", [Numbered(number=100 * partition + n) for n in range(3)])
        self.stream.projector.run()
        self.name = name

    def subscription(self, handle: Any, **kwargs: Any) -> Any:
        register: MessageHandlerRegister[Numbered] = MessageHandlerRegister()
        register.register(handle)
        return self.stream.subscription(name=f"{self.name}_sub", handlers=register, **kwargs)

    def positions(self, subscription: Any) -> dict[int, int]:
        return {p.partition: p.position for p in subscription.progress()}


class ByStreamNumber:
    def get_partition(self, message: Any) -> int:
        return int(message.stream.rsplit("-", 1)[1])


@pytest.mark.parametrize("ack_strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
def test_an_ack_refused_on_the_way_to_the_next_partition_loses_only_its_own(
    engine: sa.Engine, unique_name: str, ack_strategy: AckStrategy
) -> None:
    """A runner hands partition 0 back (its batch's ack, its unlock) in the round trip that
    claims partition 1. Partition 0 was taken over meanwhile, as another runner's claim
    does it (the fencing token bumped): its ack is refused and reported, nothing of it is
    stored, and partition 1 is handled as usual."""
    two = Partitions(engine, unique_name)
    delivered: list[int] = []
    holder: dict[str, Any] = {}

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        number = message.stored_message.message.number
        delivered.append(number)
        if number == MESSAGES - 1:
            state_table = holder["sub"].state_provider.sql.table
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    f"UPDATE {state_table} SET token = token + 1 "
                    "WHERE subscription_name = %s AND partition = 0",
                    (holder["sub"].name,),
                )

    sub = two.subscription(handle, ack_strategy=ack_strategy)
    holder["sub"] = sub
    report = sub.runner.step()
    assert delivered == [*range(MESSAGES), 100, 101, 102]
    assert report.lost_partitions == [0], report
    # One ack per message: only the last one, made after the takeover, is refused. The
    # batch's one ack is refused as a whole.
    single = ack_strategy is AckStrategy.SINGLE
    assert two.positions(sub) == {0: MESSAGES - 2 if single else -1, 1: 2}
    assert not sub.lock_provider.held()


def test_a_hand_over_to_a_partition_another_runner_holds_acks_and_leaves_it(
    engine: sa.Engine, unique_name: str
) -> None:
    two = Partitions(engine, unique_name)
    delivered: list[int] = []

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        delivered.append(message.stored_message.message.number)

    sub = two.subscription(handle, ack_strategy=AckStrategy.BATCHED)
    # Another runner of the subscription, with a lock session of its own.
    other = two.subscription(
        handle, ack_strategy=AckStrategy.BATCHED, lock_provider=DbLockProvider(f"{unique_name}_sub", engine)
    )
    sub.ensure_initialized()
    held = other.claim(1)
    assert held is not None
    try:
        report = sub.runner.step()
    finally:
        other.release(held)
    assert delivered == list(range(MESSAGES))
    assert report.contended_partitions == [1] and report.lost_partitions == []
    assert two.positions(sub) == {0: MESSAGES - 1, 1: -1}
    assert not sub.lock_provider.held()
    sub.runner.run()
    assert delivered == [*range(MESSAGES), 100, 101, 102]


def _holds(engine: sa.Engine, provider: DbLockProvider, lock_name: str) -> bool:
    """Whether the provider's lock session holds `lock_name`, as pg_locks shows it."""
    key = advisory_key(provider.name, lock_name)
    with engine.connect() as conn:
        return bool(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s "
                "AND classid = ((%s::bigint >> 32) & 4294967295)::oid "
                "AND objid = (%s::bigint & 4294967295)::oid",
                (provider.session_pid, key, key),
            ).scalar()
        )


def test_a_runner_on_psycopg_3_claims_the_next_partition_while_it_handles_one(
    engine: sa.Engine, unique_name: str
) -> None:
    """The server claims partition 1 while partition 0's batch is being handled (psycopg 3
    sends the claim ahead; psycopg2 cannot, and claims it afterwards)."""
    parts = Partitions(engine, unique_name)
    seen: dict[int, bool] = {}
    holder: dict[str, Any] = {}

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        number = message.stored_message.message.number
        if number == MESSAGES - 1:  # the last of partition 0's batch
            sub = holder["sub"]
            deadline = time.monotonic() + 2
            while not (held := _holds(engine, sub.lock_provider, sub.partition_lock_name(1))):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            seen[number] = held

    sub = parts.subscription(handle, ack_strategy=AckStrategy.BATCHED)
    holder["sub"] = sub
    report = sub.runner.step()
    assert len(report) == MESSAGES + 3
    sends_ahead = driver_of(engine) == "psycopg"
    assert seen == {MESSAGES - 1: sends_ahead}
    assert parts.positions(sub) == {0: MESSAGES - 1, 1: 2}
    assert not sub.lock_provider.held()


@pytest.mark.parametrize("ack_strategy", [AckStrategy.SINGLE, AckStrategy.BATCHED])
def test_a_lock_session_killed_while_the_next_claim_is_in_flight_loses_one_batch(
    engine: sa.Engine, unique_name: str, ack_strategy: AckStrategy
) -> None:
    """Partition 1's handler ends the lock session while the script sent ahead (partition
    0's ack and unlock, partition 2's claim) may still be on its way. Partition 1's batch is
    abandoned; partition 0's ack stands (made again if it was lost), partition 2 is claimed
    on a new session and handled; the next step delivers the rest of partition 1."""
    parts = Partitions(engine, unique_name, partitions=3)
    delivered: list[int] = []
    holder: dict[str, Any] = {}
    sub = parts.subscription(
        _ending_the_lock_session_at(101, engine, delivered, holder), ack_strategy=ack_strategy
    )
    holder["sub"] = sub
    report = sub.runner.step()
    assert delivered == [*range(MESSAGES), 100, 101, 200, 201, 202]
    assert report.lost_partitions == [1], report
    single = ack_strategy is AckStrategy.SINGLE
    assert parts.positions(sub) == {0: MESSAGES - 1, 1: 101 - 100 if single else 1, 2: 2}
    assert not sub.lock_provider.held()
    delivered.clear()
    sub.runner.run()
    assert delivered == [102]
    assert parts.positions(sub) == {0: MESSAGES - 1, 1: 2, 2: 2}


def test_concurrent_replays_of_one_parked_message_run_the_handler_once(setup: Setup) -> None:
    engine = setup.engine
    failing = {"on": True}

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        number = message.stored_message.message.number
        if failing["on"] and number == 2:
            raise RuntimeError("poison")
        time.sleep(0.2 if not failing["on"] else 0)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'INSERT INTO "{setup.effects}" VALUES (%s, %s)', (number, "replay"))
            message.ack.execute(conn=conn)

    sub = setup.subscription(handle, error_handler=ParkSubscriptionErrorHandler())
    sub.runner.run()
    [parked] = sub.parked()
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DELETE FROM "{setup.effects}"')
    failing["on"] = False
    errors: list[BaseException] = []

    def replay() -> None:
        try:
            sub.replay_parked(parked.id)
        except (ReplayInProgressError, KeyError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert len(errors) == 1, errors
    assert _effects(engine, setup.effects) == [(2, "replay")]
    assert sub.parked() == [] and sub.parked(include_resolved=True)[0].status == "replayed"


def test_a_replay_whose_transaction_rolls_back_stays_parked(setup: Setup) -> None:
    engine = setup.engine
    mode = {"fail": True}

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        if message.stored_message.message.number != 1:
            return
        if mode["fail"]:
            raise RuntimeError("poison")
        with engine.connect() as conn:
            conn.exec_driver_sql(f'INSERT INTO "{setup.effects}" VALUES (1, %s)', ("replay",))
            message.ack.execute(conn=conn)
            conn.rollback()
            raise RuntimeError("the effect failed after the ack")

    sub = setup.subscription(handle, error_handler=ParkSubscriptionErrorHandler())
    sub.runner.run()
    [parked] = sub.parked()
    mode["fail"] = False
    with pytest.raises(RuntimeError, match="after the ack"):
        sub.replay_parked(parked.id)
    assert [p.id for p in sub.parked()] == [parked.id]
    assert _effects(engine, setup.effects) == []


@pytest.fixture(scope="module")
def faulty() -> Any:
    from tests.faults import FaultyServer

    server = FaultyServer()
    yield server
    server.close()


def test_a_lock_session_survives_an_idle_session_timeout_shorter_than_a_batch(faulty: Any) -> None:
    """With `idle_session_timeout` shorter than a batch, the server used to end the idle lock
    session mid-batch and a second runner took the partition. The lock session opts out."""
    engine = faulty.engine()
    try:
        setup = Setup(engine, "idle_fence")
        handled: list[int] = []

        def handle(message: SubscriptionMessage[Numbered]) -> None:
            handled.append(message.stored_message.message.number)
            time.sleep(0.12)

        sub = setup.subscription(handle)
        rival = setup.subscription(handle)
        with faulty.setting("idle_session_timeout", "250ms"):
            thread = threading.Thread(target=sub.runner.step)
            thread.start()
            time.sleep(0.05)
            pid = sub.lock_provider.session_pid
            contended = 0
            while thread.is_alive():
                report = rival.runner.step()  # must never get the partition while A works
                contended += report.contended_partitions == [0]
                time.sleep(0.05)
            thread.join()
        assert handled == list(range(MESSAGES))
        assert contended > 5
        assert sub.lock_provider.session_pid == pid  # the same session throughout
        assert sub.runner.last_report.lost_partitions == []
    finally:
        engine.dispose()

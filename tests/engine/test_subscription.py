"""Subscriptions (invariant 4 in-process): at-least-once delivery, acks inside the handler's
transaction, start points, batched acks, retries and parking, resets, stepping and name
validation. Handler registration and dispatch: `tests/engine/test_handlers.py`.

No `from __future__ import annotations` here on purpose: handler annotations in this
module are real objects, except where a test spells out a string annotation.
"""

import datetime as dt
import json
import logging
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import (
    AckRolledback,
    AckStrategy,
    InvalidIdentifierError,
    LogAndIgnoreSubscriptionErrorHandler,
    MessageHandler,
    ParkSubscriptionErrorHandler,
    RetryPolicy,
    RunOnNotificationResult,
    StartAtNextMessage,
    StartAtPointInTime,
    SubscriptionMessage,
)
from depeche_nb.postgres.locks import LOCK_SESSION_SETTINGS
from depeche_nb.postgres.rawconn import Prepared
from depeche_nb.tools import DbLockProvider
from tests.engine.support import Env, ModuloPartitioner, positions, register
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers

UTC = dt.timezone.utc


def heads(env: Env) -> dict[int, int]:
    return env.stream.get_max_aggregated_stream_positions()


class FlakyNumbers:
    """A plain-message handler that records each call and raises for chosen numbers."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.fail: dict[int, int] = {}  # number -> how many more calls fail (-1: always)

    def handle(self, message: Numbered) -> None:
        self.calls.append(message.number)
        left = self.fail.get(message.number, 0)
        if left != 0:
            self.fail[message.number] = left - 1 if left > 0 else -1
            raise RuntimeError(f"boom {message.number}")


# -- the README flow ------------------------------------------------------------------------------


class RecordingHandlers(MessageHandler[Numbered]):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[SubscriptionMessage[Numbered]] = []

    @MessageHandler.register
    def handle_message(self, message: SubscriptionMessage[Numbered]) -> None:
        self.seen.append(message)


def test_readme_flow_handles_every_message_once_in_partition_order(env: Env) -> None:
    written: list[uuid.UUID] = []
    for round_ in range(3):  # interleave streams so partitions mix several origin streams
        for stream_no in range(6):
            written += env.numbers(stream_no, range(round_ * 10 + stream_no, round_ * 10 + stream_no + 1))
    handlers = RecordingHandlers()
    subscription = env.subscription(handlers)
    env.stream.projector.run()
    assert subscription.runner.run() is RunOnNotificationResult.DONE_FOR_NOW

    assert sorted(m.stored_message.message_id for m in handlers.seen) == sorted(written)
    for partition in range(3):
        expected = [(p.position, p.message_id) for p in env.stream.read(partition)]
        got = [(m.position, m.stored_message.message_id) for m in handlers.seen if m.partition == partition]
        assert got == expected, f"partition {partition} handled out of order"
        assert [p for p, _ in got] == list(range(6))
    assert positions(subscription) == {0: 5, 1: 5, 2: 5}

    # A second run has nothing new to do.
    assert subscription.runner.run() is RunOnNotificationResult.DONE_FOR_NOW
    assert len(subscription.runner.step()) == 0
    assert len(handlers.seen) == 18


# -- at-least-once -------------------------------------------------------------------------------


def test_get_next_messages_acks_each_message_when_the_next_is_requested(env: Env) -> None:
    env.numbers(0, range(5))
    env.project()
    subscription = env.subscription(register(FlakyNumbers().handle))
    messages = subscription.get_next_messages(count=3)
    first = next(messages)
    assert (first.partition, first.position) == (0, 0)
    assert positions(subscription)[0] == -1, "not acked before the consumer comes back"
    second = next(messages)
    assert second.position == 1
    assert positions(subscription)[0] == 0
    assert subscription.lock_provider.held() == frozenset({subscription.partition_lock_name(0)})
    messages.close()  # the consumer gives up while handling the second message
    assert positions(subscription)[0] == 0, "an abandoned message must not be acked"
    assert subscription.lock_provider.held() == frozenset(), "the partition must be unlocked"
    assert [m.position for m in subscription.get_next_messages(count=10)] == [1, 2, 3, 4]
    assert positions(subscription)[0] == 4


def test_failing_handler_leaves_its_message_unacked_and_it_is_redelivered(env: Env) -> None:
    handler = FlakyNumbers()
    handler.fail[3] = 2  # fails twice, then works
    env.numbers(0, range(6))  # partition 0, positions 0..5 carry numbers 0..5
    env.project()
    subscription = env.subscription(register(handler.handle))

    with pytest.raises(RuntimeError, match="boom 3"):
        subscription.runner.step()
    assert positions(subscription)[0] == 2, "the failed message (position 3) must not be acked"
    report = subscription.runner.last_report
    assert [(h.position, h.outcome) for h in report.handled] == [
        (0, "handled"),
        (1, "handled"),
        (2, "handled"),
        (3, "failed"),
    ]

    with pytest.raises(RuntimeError, match="boom 3"):
        subscription.runner.run()
    assert positions(subscription)[0] == 2
    assert handler.calls == [0, 1, 2, 3, 3], "the next step starts again at the failed message only"

    subscription.runner.run()
    assert positions(subscription)[0] == 5
    assert Counter(handler.calls) == {0: 1, 1: 1, 2: 1, 3: 3, 4: 1, 5: 1}


# -- acks inside the handler's transaction -------------------------------------------------------


def _side_table(engine: sa.Engine, name: str) -> str:
    table = f"{name}_side"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{table}" (number integer PRIMARY KEY)')
    return table


def _side_numbers(engine: sa.Engine, table: str) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(f'SELECT number FROM "{table}" ORDER BY number')]


def test_ack_inside_the_handlers_transaction_commits_with_the_side_effect(env: Env) -> None:
    table = _side_table(env.engine, env.name)
    seen_during: list[tuple[int, int, int]] = []  # (position, state before commit, state after)
    subscription: Any = None

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        with env.engine.begin() as conn:
            conn.exec_driver_sql(
                f'INSERT INTO "{table}" VALUES (%s)', (message.stored_message.message.number,)
            )
            message.ack.execute(conn=conn)
            before = subscription.state_provider.read(subscription.name).positions.get(0, -1)
        after = subscription.state_provider.read(subscription.name).positions.get(0, -1)
        seen_during.append((message.position, before, after))

    env.numbers(0, range(4))
    env.project()
    subscription = env.subscription(register(handle))
    subscription.runner.run()
    assert _side_numbers(env.engine, table) == [0, 1, 2, 3]
    assert positions(subscription)[0] == 3
    # The ack became visible exactly when the handler's own transaction committed.
    assert seen_during == [(0, -1, 0), (1, 0, 1), (2, 1, 2), (3, 2, 3)]


def test_handler_transaction_rolled_back_after_ack_persists_nothing_and_redelivers(env: Env) -> None:
    table = _side_table(env.engine, env.name)
    calls: Counter[int] = Counter()

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        number = message.stored_message.message.number
        calls[number] += 1
        with env.engine.begin() as conn:
            conn.exec_driver_sql(f'INSERT INTO "{table}" VALUES (%s)', (number,))
            message.ack.execute(conn=conn)
            if number == 2 and calls[number] == 1:
                raise RuntimeError("fails after acking in its transaction")

    env.numbers(0, range(5))
    env.project()
    subscription = env.subscription(register(handle))
    with pytest.raises(RuntimeError, match="after acking"):
        subscription.runner.run()
    assert _side_numbers(env.engine, table) == [0, 1]
    assert positions(subscription)[0] == 1, "the ack of the rolled-back transaction must not persist"

    subscription.runner.run()
    assert _side_numbers(env.engine, table) == [0, 1, 2, 3, 4]
    assert positions(subscription)[0] == 4
    assert calls == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}


def _acking_handler(env: Env, table: str, calls: Counter[int], roll_back: Callable[[int, int], bool]) -> Any:
    def handle(message: SubscriptionMessage[Numbered]) -> None:
        number = message.stored_message.message.number
        calls[number] += 1
        with env.engine.connect() as conn:
            conn.exec_driver_sql(f'INSERT INTO "{table}" VALUES (%s)', (number,))
            message.ack.execute(conn=conn)
            if roll_back(number, calls[number]):
                conn.rollback()  # no exception: the runner must notice the ack did not commit
            else:
                conn.commit()

    return register(handle)


def test_an_ack_transaction_that_did_not_commit_is_a_failed_attempt_and_retried(env: Env) -> None:
    table = _side_table(env.engine, env.name)
    calls: Counter[int] = Counter()
    handlers = _acking_handler(env, table, calls, lambda number, call: number == 1 and call == 1)
    env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(handlers, retry_policy=RetryPolicy(attempts=2, backoff_seconds=0.01))
    report = subscription.runner.step()
    assert positions(subscription)[0] == 2
    assert _side_numbers(env.engine, table) == [0, 1, 2]
    assert calls == {0: 1, 1: 2, 2: 1}
    assert [h.attempts for h in report.handled] == [1, 2, 1]


def test_an_ack_transaction_that_never_commits_is_not_redelivered_in_a_tight_loop(env: Env) -> None:
    """Finding 7 of the fencing issue: it was re-delivered ~600 times a second, ignoring the
    retry policy. Now the policy's attempts run (with their back-off), then the error
    handler decides: here it parks the message and the partition moves on."""
    table = _side_table(env.engine, env.name)
    calls: Counter[int] = Counter()
    handlers = _acking_handler(env, table, calls, lambda number, call: number == 1)
    env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(
        handlers,
        retry_policy=RetryPolicy(attempts=3, backoff_seconds=0.01),
        error_handler=ParkSubscriptionErrorHandler(),
    )
    subscription.runner.run()
    assert calls == {0: 1, 1: 3, 2: 1}
    assert _side_numbers(env.engine, table) == [0, 2]
    [parked] = subscription.parked()
    assert parked.position == 1 and parked.error.startswith("AckRolledback")
    assert positions(subscription)[0] == 2


def test_without_a_retry_policy_an_uncommitted_ack_stops_the_runner_like_a_handler_error(env: Env) -> None:
    table = _side_table(env.engine, env.name)
    calls: Counter[int] = Counter()
    handlers = _acking_handler(env, table, calls, lambda number, call: number == 1)
    env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(handlers)
    with pytest.raises(AckRolledback, match="position 1 did not commit"):
        subscription.runner.step()
    assert calls == {0: 1, 1: 1}
    assert positions(subscription)[0] == 0


# -- start points --------------------------------------------------------------------------------


def test_start_at_next_message_handles_only_later_messages(env: Env) -> None:
    handler = FlakyNumbers()
    env.numbers(0, range(3))
    env.numbers(1, range(10, 12))
    env.project()
    subscription = env.subscription(register(handler.handle), start_point=StartAtNextMessage())
    assert len(subscription.runner.step()) == 0  # initialises the state at the current heads
    assert positions(subscription) == {0: 2, 1: 1}

    env.numbers(0, [3, 4])
    env.numbers(2, [20])  # partition 2 did not exist at initialisation: read from its start
    env.project()
    subscription.runner.run()
    assert sorted(handler.calls) == [3, 4, 20]


def test_start_at_point_in_time(env: Env) -> None:
    old = dt.datetime(2020, 1, 1, tzinfo=UTC)
    new = dt.datetime(2030, 1, 1, tzinfo=UTC)
    env.write(0, *[Numbered(number=n, occurred_at=old) for n in (1, 2, 3)])
    env.write(0, *[Numbered(number=n, occurred_at=new) for n in (4, 5)])
    env.write(1, *[Numbered(number=n, occurred_at=old) for n in (11, 12)])  # only old
    env.write(2, *[Numbered(number=n, occurred_at=new) for n in (21, 22)])  # only new
    env.project()
    handler = FlakyNumbers()
    start = StartAtPointInTime(dt.datetime(2025, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    subscription = env.subscription(register(handler.handle), start_point=start)
    subscription.runner.run()
    assert sorted(handler.calls) == [4, 5, 21, 22]
    assert positions(subscription) == {0: 4, 1: 1, 2: 1}


def test_start_point_validation(env: Env) -> None:
    with pytest.raises(ValueError, match="timezone"):
        StartAtPointInTime(dt.datetime(2025, 1, 1))
    with pytest.raises(TypeError):
        StartAtPointInTime("2025-01-01")  # type: ignore[arg-type]
    for wrong in (dt.datetime.now(UTC), "next", StartAtNextMessage):
        with pytest.raises(TypeError, match="start_point"):
            env.subscription(register(FlakyNumbers().handle), start_point=wrong)


# -- batched acks --------------------------------------------------------------------------------


def test_batched_ack_stores_positions_per_batch_and_never_rewinds(env: Env) -> None:
    seen: list[tuple[int, int]] = []  # (position handled, acked position while handling)
    fail_at: set[int] = {4}
    subscription: Any = None

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        state = subscription.state_provider.read(subscription.name).positions.get(0, -1)
        seen.append((message.position, state))
        if message.position in fail_at:
            fail_at.discard(message.position)
            raise RuntimeError(f"boom at {message.position}")

    env.numbers(0, range(10))
    env.project()
    subscription = env.subscription(register(handle), batch_size=4, ack_strategy=AckStrategy.BATCHED)
    assert isinstance(subscription.runner, depeche_nb.BatchedAckSubscriptionRunner)

    subscription.runner.step()
    assert positions(subscription)[0] == 3
    assert seen == [(0, -1), (1, -1), (2, -1), (3, -1)], "positions are stored once per batch"

    # The first message of the next batch fails: nothing of that batch is acked, and the
    # partition is not rewound (Depeche DB 0.13 stored -1 here).
    with pytest.raises(RuntimeError, match="boom at 4"):
        subscription.runner.step()
    assert positions(subscription)[0] == 3

    fail_at.add(6)  # a failure in the middle keeps what was handled before it
    with pytest.raises(RuntimeError, match="boom at 6"):
        subscription.runner.step()
    assert positions(subscription)[0] == 5
    assert seen[4:] == [(4, 3), (4, 3), (5, 3), (6, 3)]

    subscription.runner.run()
    assert positions(subscription)[0] == 9
    assert seen[8:] == [(6, 5), (7, 5), (8, 5), (9, 5)]
    assert Counter(p for p, _ in seen) == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 1, 6: 2, 7: 1, 8: 1, 9: 1}


def test_batched_ack_refuses_acks_from_the_handler(env: Env) -> None:
    errors: list[BaseException] = []

    def handle(message: SubscriptionMessage[Numbered]) -> None:
        try:
            message.ack.execute()
        except RuntimeError as exc:
            errors.append(exc)
            if message.stored_message.message.number == 1:
                raise

    env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(register(handle), ack_strategy=AckStrategy.BATCHED)
    with pytest.raises(RuntimeError, match="BATCHED"):
        subscription.runner.step()
    assert len(errors) == 2
    assert positions(subscription)[0] == 0


# -- retries, parking, ignoring ------------------------------------------------------------------


def test_retry_then_park_replay_and_discard(env: Env) -> None:
    handler = FlakyNumbers()
    handler.fail[1] = 2  # fails twice, then succeeds on the third attempt
    handler.fail[2] = -1  # always fails
    handler.fail[4] = -1
    ids = env.numbers(0, range(6))
    env.project()
    subscription = env.subscription(
        register(handler.handle),
        error_handler=ParkSubscriptionErrorHandler(),
        retry_policy=RetryPolicy(attempts=3, backoff_seconds=0.01),
    )
    report = subscription.runner.step()
    assert [(h.position, h.outcome, h.attempts) for h in report.handled] == [
        (0, "handled", 1),
        (1, "handled", 3),
        (2, "parked", 3),
        (3, "handled", 1),
        (4, "parked", 3),
        (5, "handled", 1),
    ]
    assert Counter(handler.calls) == {0: 1, 1: 3, 2: 3, 3: 1, 4: 3, 5: 1}
    assert positions(subscription)[0] == 5, "the partition continues after a parked message"

    parked = subscription.parked()
    assert [(p.position, p.message_id, p.status, p.attempts) for p in parked] == [
        (2, ids[2], "parked", 3),
        (4, ids[4], "parked", 3),
    ]
    assert "boom 2" in parked[0].error and "RuntimeError" in parked[0].error
    assert "boom 2" in parked[0].traceback
    frame = subscription.parked_dataframe()
    assert len(frame) == 2
    assert list(frame["message_id"]) == [str(ids[2]), str(ids[4])]
    assert str(frame["recorded_at"].dt.tz) == "UTC"

    handler.fail.clear()  # "fix" the handler
    assert subscription.replay_parked(parked[0].id) == "handled"
    assert handler.calls[-1] == 2
    subscription.discard_parked(parked[1].id)
    assert subscription.parked() == []
    resolved = {p.id: p for p in subscription.parked(include_resolved=True)}
    assert resolved[parked[0].id].status == "replayed"
    assert resolved[parked[1].id].status == "discarded"
    assert all(p.resolved_at is not None for p in resolved.values())
    assert len(subscription.parked_dataframe(include_resolved=True)) == 2

    for resolve_again in (subscription.discard_parked, subscription.replay_parked):
        for parked_id in (parked[0].id, parked[1].id, 999_999):
            with pytest.raises(KeyError):
                resolve_again(parked_id)
    assert len(subscription.runner.step()) == 0


def test_replaying_a_resolved_parked_message_does_not_run_the_handler_again(env: Env) -> None:
    handler = FlakyNumbers()
    handler.fail[0] = 1
    env.numbers(0, range(1))
    env.project()
    subscription = env.subscription(register(handler.handle), error_handler=ParkSubscriptionErrorHandler())
    subscription.runner.step()
    [parked] = subscription.parked()
    subscription.replay_parked(parked.id)
    assert handler.calls == [0, 0]
    with pytest.raises(KeyError):
        subscription.replay_parked(parked.id)
    assert handler.calls == [0, 0], "an already replayed message was handled again before KeyError"


def test_failing_replay_leaves_the_message_parked(env: Env) -> None:
    handler = FlakyNumbers()
    handler.fail[0] = -1
    env.numbers(0, range(1))
    env.project()
    subscription = env.subscription(register(handler.handle), error_handler=ParkSubscriptionErrorHandler())
    subscription.runner.step()
    [parked] = subscription.parked()
    with pytest.raises(RuntimeError, match="boom 0"):
        subscription.replay_parked(parked.id)
    assert [p.status for p in subscription.parked()] == ["parked"]


def test_log_and_ignore_records_the_skip(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    handler = FlakyNumbers()
    handler.fail[1] = -1
    ids = env.numbers(0, range(3))
    env.project()
    name = f"{env.name}_sub"
    subscription = env.subscription(
        register(handler.handle), error_handler=LogAndIgnoreSubscriptionErrorHandler(name)
    )
    with caplog.at_level(logging.ERROR):
        report = subscription.runner.step()
    assert [h.outcome for h in report.handled] == ["handled", "ignored after error", "handled"]
    assert "boom 1" in (report.handled[1].error or "")
    assert positions(subscription)[0] == 2
    [skipped] = subscription.parked()
    assert (skipped.status, skipped.position, skipped.message_id) == ("ignored", 1, ids[1])
    assert "boom 1" in skipped.error
    logged = [r for r in caplog.records if r.name.endswith(f"subscription.{name}")]
    assert len(logged) == 1 and str(ids[1]) in logged[0].getMessage()
    assert logged[0].exc_info is not None


# -- resets --------------------------------------------------------------------------------------


def test_reset_to_beginning_partition_positions_and_next_message(env: Env) -> None:
    handler = FlakyNumbers()
    env.numbers(0, range(4))
    env.numbers(1, range(10, 13))
    env.project()
    subscription = env.subscription(register(handler.handle))
    subscription.runner.run()
    assert Counter(handler.calls) == Counter([0, 1, 2, 3, 10, 11, 12])

    assert subscription.reset() == {0: -1, 1: -1}
    assert positions(subscription) == {0: -1, 1: -1}
    subscription.runner.run()
    assert Counter(handler.calls) == Counter([0, 1, 2, 3, 10, 11, 12] * 2)

    handler.calls.clear()
    result = subscription.reset({0: 2})  # next message of partition 0 is position 2
    assert result == {0: 1, 1: 2}
    subscription.runner.run()
    assert handler.calls == [2, 3]

    subscription.reset()
    assert subscription.reset(StartAtNextMessage()) == heads(env)
    assert len(subscription.runner.step()) == 0


def test_reset_to_a_point_in_time_matches_the_start_point(env: Env) -> None:
    old = dt.datetime(2020, 1, 1, tzinfo=UTC)
    new = dt.datetime(2030, 1, 1, tzinfo=UTC)
    env.write(0, *[Numbered(number=n, occurred_at=old) for n in (1, 2)])
    env.write(0, *[Numbered(number=n, occurred_at=new) for n in (3, 4)])
    env.write(1, *[Numbered(number=n, occurred_at=new) for n in (11,)])
    env.write(2, *[Numbered(number=n, occurred_at=old) for n in (21,)])
    env.project()
    handler = FlakyNumbers()
    subscription = env.subscription(register(handler.handle))
    subscription.runner.run()
    handler.calls.clear()
    cut = dt.datetime(2025, 1, 1, tzinfo=UTC)
    assert subscription.reset(StartAtPointInTime(cut)) == {0: 1, 1: -1, 2: 0}
    subscription.runner.run()
    assert sorted(handler.calls) == [3, 4, 11]
    handler.calls.clear()
    assert subscription.reset(cut) == {0: 1, 1: -1, 2: 0}  # a datetime works too
    with pytest.raises(ValueError):
        subscription.reset(dt.datetime(2025, 1, 1))
    subscription.runner.run()
    assert sorted(handler.calls) == [3, 4, 11]


def test_reset_before_first_run_is_not_overridden_by_the_start_point(env: Env) -> None:
    handler = FlakyNumbers()
    env.numbers(0, range(4))
    env.project()
    subscription = env.subscription(register(handler.handle), start_point=StartAtNextMessage())
    subscription.reset({0: 1})
    subscription.runner.run()
    assert handler.calls == [1, 2, 3]


def test_reset_waits_for_partition_locks_and_times_out_without_changes(env: Env) -> None:
    handler = FlakyNumbers()
    env.numbers(0, range(3))
    env.numbers(1, range(10, 13))
    env.numbers(2, range(20, 23))
    env.project()
    subscription = env.subscription(register(handler.handle))
    subscription.runner.run()
    before = positions(subscription)
    assert before == {0: 2, 1: 2, 2: 2}

    other_runner = DbLockProvider(subscription.name, env.engine)  # another process's lock session
    try:
        assert other_runner.lock(subscription.partition_lock_name(1))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            subscription.reset(timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert positions(subscription) == before, "a reset that timed out must change nothing"
        assert subscription.lock_provider.held() == frozenset(), "locks taken so far must be released"

        result: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: result.setdefault("reset", subscription.reset(timeout=10)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive(), "reset must wait while another runner holds a partition"
        assert positions(subscription) == before
        other_runner.unlock(subscription.partition_lock_name(1))
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        assert result["reset"] == {0: -1, 1: -1, 2: -1}
        assert positions(subscription) == {0: -1, 1: -1, 2: -1}
    finally:
        other_runner.finalize()


def test_bad_reset_arguments_are_refused_and_change_nothing(env: Env) -> None:
    env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(register(FlakyNumbers().handle))
    subscription.runner.run()
    for bad in ("beginning", 5, [0, 1], 1.5):
        with pytest.raises(TypeError):
            subscription.reset(bad)
    for bad_mapping in ({0: -1}, {0: "1"}, {-1: 0}, {"0": 1}, {0: True}):
        with pytest.raises(ValueError):
            subscription.reset(bad_mapping)
    assert positions(subscription) == {0: 2}
    assert subscription.lock_provider.held() == frozenset()


def test_reset_of_an_unknown_partition_is_refused_or_stored(env: Env) -> None:
    env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(register(FlakyNumbers().handle))
    subscription.runner.run()
    try:
        result = subscription.reset({7: 2})
    except ValueError:
        assert positions(subscription) == {0: 2}
        return
    stored = subscription.state_provider.read(subscription.name).positions
    assert stored.get(7) == result[7], "reset() reported a position it never stored"


# -- stepping ------------------------------------------------------------------------------------


def test_step_handles_at_most_max_messages_and_reports_a_typed_dataframe(env: Env) -> None:
    handler = FlakyNumbers()
    for stream_no in range(3):
        env.numbers(stream_no, range(stream_no * 10, stream_no * 10 + 2))
    env.project()
    subscription = env.subscription(register(handler.handle))

    report = subscription.runner.step(max_messages=3)
    assert len(report) == 3
    assert len(handler.calls) == 3
    assert sum(p.position + 1 for p in subscription.progress()) == 3
    frame = report.to_dataframe()
    assert list(frame.columns) == [
        "partition",
        "position",
        "message_id",
        "message_type",
        "outcome",
        "attempts",
        "error",
    ]
    for column in ("partition", "position", "attempts"):
        assert str(frame[column].dtype) == "int64"
    assert all(isinstance(v, str) and uuid.UUID(v) for v in frame["message_id"])
    assert set(frame["outcome"]) == {"handled"}
    assert "handled" in report.summary()

    rest = subscription.runner.step(max_messages=100)
    assert len(rest) == 3
    assert sorted(handler.calls) == [0, 1, 10, 11, 20, 21]
    empty = subscription.runner.step().to_dataframe()
    assert len(empty) == 0 and list(empty.columns) == list(frame.columns)

    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            subscription.runner.step(max_messages=bad)


def _rows_read_from(plan: dict[str, Any], table: str) -> int:
    """Rows the scans of `table` returned in an EXPLAIN ANALYZE JSON plan, over all loops."""
    own = 0
    if plan.get("Relation Name") == table:
        own = int(plan["Actual Rows"] * plan.get("Actual Loops", 1))
    return own + sum(_rows_read_from(child, table) for child in plan.get("Plans", []))


def test_a_claim_reads_its_batch_not_the_rest_of_an_unanalysed_partition(env: Env) -> None:
    # A fresh stream has no statistics: the planner expects a handful of rows per partition
    # and, unless the lock session rules it out, scans every row after the position with a
    # bitmap and sorts them, for every batch: quadratic in the partition's size.
    env.numbers(0, range(2000))
    env.project()
    stream_table = env.stream.names.table
    with env.engine.begin() as conn:
        conn.exec_driver_sql(f'ALTER TABLE "{stream_table}" SET (autovacuum_enabled = false)')
        analysed = conn.exec_driver_sql(
            "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables WHERE relname = %s",
            (stream_table,),
        ).one()
    assert analysed == (None, None)
    subscription = env.subscription(register(FlakyNumbers().handle), batch_size=100)
    subscription.ensure_initialized()
    provider = subscription.lock_provider
    assert isinstance(provider, DbLockProvider)
    # The lock session runs with LOCK_SESSION_SETTINGS...
    setting = Prepared("SELECT pg_try_advisory_lock(%(lock_key)s), current_setting('enable_bitmapscan')")
    assert provider.lock_with("look", setting, {}) == [(True, "off")]
    provider.unlock("look")
    # ...under which the claim's plan reads one batch (and the row that ends it).
    claim_sql = env.stream.statements.claim_slice_sql(subscription.state_provider.sql)
    with env.engine.connect() as conn:
        conn.exec_driver_sql(LOCK_SESSION_SETTINGS)
        plan = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + claim_sql,
            {"lock_key": 1, "subscription": subscription.name, "partition": 0, "count": 100},
        ).scalar_one()
        conn.rollback()
    plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
    assert _rows_read_from(plan, stream_table) <= 101, "the claim read past its batch"


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["Bad", "with-dash", "x; DROP TABLE y", "", "1abc", "a" * 41, 'q"uote'])
def test_subscription_and_stream_names_must_be_identifiers(env: Env, bad: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        env.stream.subscription(name=bad, handlers=register(FlakyNumbers().handle))
    with pytest.raises(InvalidIdentifierError):
        env.store.aggregated_stream(name=bad, partitioner=ModuloPartitioner(3), stream_wildcards=["s-%"])
    with pytest.raises(InvalidIdentifierError):
        DbLockProvider(bad, env.engine)


# -- errors that point at the cause -----------------------------------------------------------


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes exist from Python 3.11")
def test_a_failing_handlers_traceback_names_the_message(env: Env) -> None:
    handler = FlakyNumbers()
    handler.fail[1] = -1
    ids = env.numbers(0, range(3))
    env.project()
    subscription = env.subscription(register(handler.handle))
    with pytest.raises(RuntimeError, match="boom 1") as caught:
        subscription.runner.step()
    [note] = caught.value.__notes__
    assert f"handled message {ids[1]} (Numbered, stream 's-0' version 2, partition 0 position 1" in note
    assert subscription.name in note


def test_passing_the_handler_class_instead_of_an_instance_says_so(env: Env) -> None:
    with pytest.raises(
        TypeError, match=r"you passed the class RecordingHandlers; write handlers=RecordingHandlers\(\)"
    ):
        env.subscription(RecordingHandlers)

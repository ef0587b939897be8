"""Concurrent writers on one stream: threads, processes, caller transactions with slow commits."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import MessageStore, OptimisticConcurrencyError, StoredMessage
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers

JOIN_TIMEOUT_S = 60


def run_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run `target(i)` in `count` threads; re-raise the first error; return the results."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def wrapper(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "writer threads did not finish in time"
    if errors:
        raise errors[0]
    return results


def assert_gapless_stream(stored: list[StoredMessage[Numbered]], expected_count: int) -> None:
    assert [m.version for m in stored] == list(range(1, expected_count + 1))
    positions = [m.global_position for m in stored]
    assert all(a < b for a, b in itertools.pairwise(positions)), "global_position not increasing"
    assert len({m.message_id for m in stored}) == expected_count


def assert_each_writer_kept_its_order(stored: list[StoredMessage[Numbered]]) -> None:
    """A writer's messages (tagged by `text`, numbered in order) appear in its own write order."""
    by_writer: dict[str, list[int]] = {}
    for m in stored:
        by_writer.setdefault(m.message.text, []).append(m.message.number)
    for numbers in by_writer.values():
        assert numbers == sorted(numbers)


# -- (a) threads, no expected version -------------------------------------------------------------


def test_threads_appending_to_one_stream_get_gapless_versions(store: MessageStore) -> None:
    threads, per_thread = 8, 50
    barrier = threading.Barrier(threads, timeout=JOIN_TIMEOUT_S)

    def writer(i: int) -> list[tuple[uuid.UUID, int, int]]:
        barrier.wait()
        got = []
        for n in range(per_thread):
            message = Numbered(number=n, text=f"w{i}")
            pos = store.write("s", message)
            got.append((message.message_id, pos.version, pos.global_position))
        return got

    results = run_threads(threads, writer)

    stored = list(store.read("s"))
    assert_gapless_stream(stored, threads * per_thread)
    assert_each_writer_kept_its_order(stored)
    # the positions each writer was told match what is stored
    by_id = {m.message_id: (m.version, m.global_position) for m in stored}
    for got in results:
        assert len(got) == per_thread
        for message_id, version, global_position in got:
            assert by_id[message_id] == (version, global_position)
        assert [v for _, v, _ in got] == sorted(v for _, v, _ in got)


def test_threads_appending_batches_keep_each_batch_contiguous(store: MessageStore) -> None:
    threads, batches, batch_size = 4, 15, 4

    def writer(i: int) -> None:
        for b in range(batches):
            batch = [Numbered(number=b * batch_size + k, text=f"w{i}") for k in range(batch_size)]
            pos = store.write_all("s", batch)
            assert pos.version % batch_size == 0

    run_threads(threads, writer)

    stored = list(store.read("s"))
    assert_gapless_stream(stored, threads * batches * batch_size)
    for start in range(0, len(stored), batch_size):
        chunk = stored[start : start + batch_size]
        assert len({m.message.text for m in chunk}) == 1  # one writer's batch, not interleaved
        assert [m.message.number % batch_size for m in chunk] == list(range(batch_size))


def test_threads_on_many_streams_do_not_interfere(store: MessageStore) -> None:
    threads, per_thread, streams = 6, 30, 3

    def writer(i: int) -> None:
        rng = random.Random(i)
        for n in range(per_thread):
            store.write(f"s-{rng.randrange(streams)}", Numbered(number=n, text=f"w{i}"))

    run_threads(threads, writer)

    total = 0
    for k in range(streams):
        stored = list(store.read(f"s-{k}"))
        assert_gapless_stream(stored, len(stored))
        assert_each_writer_kept_its_order(stored)
        total += len(stored)
    assert total == threads * per_thread
    everything = list(store.read_wildcard("s-%"))
    assert len({m.global_position for m in everything}) == total


# -- (b) threads racing with the same expected version --------------------------------------------


@pytest.mark.parametrize("with_conn", [False, True], ids=["own-conn", "caller-conn"])
def test_same_expected_version_exactly_one_writer_wins(
    engine: sa.Engine, store: MessageStore, with_conn: bool
) -> None:
    threads, rounds = 8, 8
    for round_ in range(rounds):
        barrier = threading.Barrier(threads, timeout=JOIN_TIMEOUT_S)

        def writer(i: int, expected: int = round_, barrier: threading.Barrier = barrier) -> str:
            message = Numbered(number=expected, text=f"w{i}")
            barrier.wait()
            try:
                if with_conn:
                    with engine.connect() as conn:
                        store.write("s", message, expected_version=expected, conn=conn)
                        conn.commit()
                else:
                    store.write("s", message, expected_version=expected)
            except OptimisticConcurrencyError:
                return "lost"
            return "won"

        outcomes = run_threads(threads, writer)
        assert sorted(outcomes) == ["lost"] * (threads - 1) + ["won"], f"round {round_}"
        stored = list(store.read("s"))
        assert_gapless_stream(stored, round_ + 1)
        winner = outcomes.index("won")
        assert stored[-1].message.text == f"w{winner}"


def test_same_expected_version_zero_on_new_stream(store: MessageStore) -> None:
    threads = 8
    barrier = threading.Barrier(threads, timeout=JOIN_TIMEOUT_S)

    def writer(i: int) -> bool:
        barrier.wait()
        try:
            store.write_all("s", [Numbered(number=0, text=f"w{i}"), Numbered(number=1, text=f"w{i}")], 0)
        except OptimisticConcurrencyError:
            return False
        return True

    outcomes = run_threads(threads, writer)
    assert outcomes.count(True) == 1
    stored = list(store.read("s"))
    assert_gapless_stream(stored, 2)
    assert {m.message.text for m in stored} == {f"w{outcomes.index(True)}"}


# -- (c) processes --------------------------------------------------------------------------------


def _process_writer(
    store_name: str, stream: str, worker: int, count: int, barrier: Any, results: Any
) -> None:
    """Runs in a spawned child: its own engine from DEPECHE_NB_DSN, its own store object."""
    try:
        engine = depeche_nb.connect()
        store = MessageStore(name=store_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
        rng = random.Random(worker)
        barrier.wait()
        written = []
        for n in range(count):
            time.sleep(rng.uniform(0, 0.002))
            message = Numbered(number=n, text=f"p{worker}")
            pos = store.write(stream, message)
            written.append((str(message.message_id), pos.version))
        results.put((worker, written, None))
    except BaseException as exc:
        results.put((worker, [], repr(exc)))


def test_processes_appending_to_one_stream_get_gapless_versions(store: MessageStore) -> None:
    processes, per_process = 4, 50
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes, timeout=JOIN_TIMEOUT_S)
    results = ctx.Queue()
    children = [
        ctx.Process(
            target=_process_writer, args=(store.name, "s", w, per_process, barrier, results), daemon=True
        )
        for w in range(processes)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=JOIN_TIMEOUT_S) for _ in children]
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
    assert [error for _, _, error in reports] == [None] * processes
    assert all(child.exitcode == 0 for child in children)

    stored = list(store.read("s"))
    assert_gapless_stream(stored, processes * per_process)
    assert_each_writer_kept_its_order(stored)
    assert {m.message.text for m in stored} == {f"p{w}" for w in range(processes)}
    by_id = {str(m.message_id): m.version for m in stored}
    for _, written, _ in reports:
        assert len(written) == per_process
        for message_id, version in written:
            assert by_id[message_id] == version


# -- (d) caller transactions with slow commits and rollbacks --------------------------------------


def test_caller_transactions_with_delays_and_rollbacks(engine: sa.Engine, store: MessageStore) -> None:
    threads, per_thread = 6, 12

    def writer(i: int) -> list[uuid.UUID]:
        rng = random.Random(100 + i)
        committed = []
        for n in range(per_thread):
            with engine.connect() as conn:
                batch = [Numbered(number=n, text=f"w{i}") for _ in range(rng.choice([1, 1, 2]))]
                store.write_all("s", batch, conn=conn)
                time.sleep(rng.uniform(0, 0.01))  # commit delay inside the open transaction
                if rng.random() < 0.3:
                    conn.rollback()
                else:
                    conn.commit()
                    committed.extend(m.message_id for m in batch)
        return committed

    results = run_threads(threads, writer)
    committed = [message_id for ids in results for message_id in ids]
    assert len(committed) < threads * per_thread * 2  # some were rolled back
    assert len(committed) > 0

    stored = list(store.read("s"))
    assert {m.message_id for m in stored} == set(committed)
    assert_gapless_stream(stored, len(committed))
    assert_each_writer_kept_its_order(stored)


def test_own_conn_writers_interleave_with_slow_caller_transactions(
    engine: sa.Engine, store: MessageStore
) -> None:
    """A writer without conn waits for a slow caller transaction on the same stream, then appends."""
    opened = threading.Event()
    release = threading.Event()

    def slow_caller() -> None:
        with engine.connect() as conn:
            store.write("s", Numbered(number=1, text="slow"), conn=conn)
            opened.set()
            release.wait(JOIN_TIMEOUT_S)
            conn.commit()

    slow = threading.Thread(target=slow_caller, daemon=True)
    slow.start()
    assert opened.wait(JOIN_TIMEOUT_S)
    fast_result: list[int] = []
    fast = threading.Thread(
        target=lambda: fast_result.append(store.write("s", Numbered(number=2, text="fast")).version),
        daemon=True,
    )
    fast.start()
    fast.join(0.3)
    assert fast.is_alive(), "the second writer must wait for the open transaction on the stream"
    assert list(store.read("s")) == []
    release.set()
    slow.join(JOIN_TIMEOUT_S)
    fast.join(JOIN_TIMEOUT_S)
    assert fast_result == [2]
    assert [(m.version, m.message.text) for m in store.read("s")] == [(1, "slow"), (2, "fast")]

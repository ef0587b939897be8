"""Invariant 4 across real processes: several runners share one subscription, each partition
is handled by one runner at a time, and a runner killed with SIGKILL loses nothing.

Children are started with the "spawn" method and build everything themselves from the
names passed in (see tests/workers.py); each handler call appends a row to a shared log
table on its own autocommit connection, and the assertions read that log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import multiprocessing
import queue
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from depeche_nb.tools import DbLockProvider
from tests import workers
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers

SPAWN = multiprocessing.get_context("spawn")
BATCH_SIZE = 20


@dataclasses.dataclass(frozen=True)
class LogRow:
    pid: int
    partition: int
    position: int
    message_id: uuid.UUID
    started_at: dt.datetime
    finished_at: dt.datetime


@dataclasses.dataclass
class Setup:
    store_name: str
    stream_name: str
    subscription_name: str
    log_table: str
    written: dict[uuid.UUID, int]  # message id -> partition


def _prepare(engine: sa.Engine, name: str, streams: int, per_stream: int) -> Setup:
    store, stream = workers.build_stream(engine, name, f"{name}_agg")
    written: dict[uuid.UUID, int] = {}
    for i in range(streams):
        messages = [Numbered(number=i * per_stream + k) for k in range(per_stream)]
        store.write_all(f"par-{i}", messages)
        written.update({m.message_id: i % workers.PARTITIONS for m in messages})
    stream.projector.run()
    heads = stream.get_max_aggregated_stream_positions()
    assert sum(h + 1 for h in heads.values()) == len(written), "setup: projection incomplete"
    log_table = f"{name}_log"
    workers.create_log_table(engine, log_table)
    return Setup(name, f"{name}_agg", f"{name}_sub", log_table, written)


def _read_log(engine: sa.Engine, log_table: str) -> list[LogRow]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT pid, partition, position, message_id, started_at, finished_at "
            f'FROM "{log_table}" ORDER BY started_at, id'
        ).all()
    return [
        LogRow(r[0], r[1], r[2], r[3] if isinstance(r[3], uuid.UUID) else uuid.UUID(r[3]), r[4], r[5])
        for r in rows
    ]


def _start(
    setup: Setup, batch_size: int = BATCH_SIZE, crash_at: tuple[int, int] | None = None
) -> tuple[Any, Any, Any]:
    ready, start = SPAWN.Queue(), SPAWN.Event()
    process = SPAWN.Process(
        target=workers.run_consumer,
        args=(
            setup.store_name,
            setup.stream_name,
            setup.subscription_name,
            setup.log_table,
            batch_size,
            ready,
            start,
            crash_at,
        ),
        daemon=True,
    )
    process.start()
    return process, ready, start


def _wait_ready(processes: list[Any], ready_queues: list[Any], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    for process, ready in zip(processes, ready_queues, strict=True):
        while True:
            try:
                ready.get(timeout=0.2)
                break
            except queue.Empty:
                assert process.exitcode is None, f"child exited with {process.exitcode} before it was ready"
                assert time.monotonic() < deadline, "child did not get ready in time"


@contextlib.contextmanager
def _reaped(processes: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


def _assert_partitions_never_shared(log: list[LogRow]) -> None:
    by_partition: dict[int, list[LogRow]] = defaultdict(list)
    for row in log:
        by_partition[row.partition].append(row)
    for partition, rows in by_partition.items():
        rows.sort(key=lambda r: (r.started_at, r.finished_at))
        for earlier, later in itertools.pairwise(rows):
            assert earlier.started_at <= earlier.finished_at
            # Sorted by start, intervals never intersect iff each ends before the next starts;
            # consecutive calls of different runners would overlap if the lock failed.
            assert earlier.finished_at <= later.started_at, (
                f"partition {partition}: pid {earlier.pid} handled position {earlier.position} until "
                f"{earlier.finished_at}, but pid {later.pid} started position {later.position} at "
                f"{later.started_at}"
            )


def test_three_runner_processes_share_one_subscription(engine: sa.Engine, unique_name: str) -> None:
    setup = _prepare(engine, unique_name, streams=50, per_stream=100)  # 5,000 messages, 500 per partition
    started = [_start(setup) for _ in range(3)]
    processes = [p for p, _, _ in started]
    with _reaped(processes):
        _wait_ready(processes, [r for _, r, _ in started])
        for _, _, start in started:
            start.set()
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0, f"runner exited with {process.exitcode}"

    log = _read_log(engine, setup.log_table)
    handled = Counter(row.message_id for row in log)
    assert set(handled) == set(setup.written), "a message was never handled"
    duplicates = {m: n for m, n in handled.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} message(s) handled more than once without any crash"
    assert len(log) == 5000
    for row in log:
        assert setup.written[row.message_id] == row.partition

    by_partition: dict[int, list[int]] = defaultdict(list)
    for row in log:  # ordered by started_at
        by_partition[row.partition].append(row.position)
    assert sorted(by_partition) == list(range(workers.PARTITIONS))
    for partition, positions in by_partition.items():
        assert positions == list(range(500)), f"partition {partition} handled out of order"
    _assert_partitions_never_shared(log)

    pids = Counter(row.pid for row in log)
    assert len(pids) > 1, f"only one runner did any work: {pids}"
    assert set(pids) <= {p.pid for p in processes}


def test_killed_runner_loses_nothing_and_releases_its_locks(engine: sa.Engine, unique_name: str) -> None:
    setup = _prepare(engine, unique_name, streams=30, per_stream=10)  # 30 messages per partition
    crash_at = (3, 12)  # batch size 10: the 3rd message of partition 3's 2nd batch
    crasher, ready, start = _start(setup, batch_size=10, crash_at=crash_at)
    processes = [crasher]
    with _reaped(processes):
        _wait_ready([crasher], [ready])
        start.set()
        crasher.join(timeout=60)
        assert crasher.exitcode == -signal.SIGKILL, (
            f"the runner was meant to die by SIGKILL: {crasher.exitcode}"
        )

        log = _read_log(engine, setup.log_table)
        killed_at = [r for r in log if (r.partition, r.position) == crash_at]
        assert [r.pid for r in killed_at] == [crasher.pid], "the killed handler's side effect is logged"
        with engine.connect() as conn:
            state = dict(
                conn.exec_driver_sql(
                    f'SELECT partition, position FROM "{setup.subscription_name}_subscription_state" '
                    "WHERE subscription_name = %s AND partition >= 0",
                    (setup.subscription_name,),
                ).all()
            )
        assert state[crash_at[0]] == crash_at[1] - 1, "acked up to the message before the kill, not beyond"

        # The dead runner's session is gone, so its advisory locks are free again.
        probe = DbLockProvider(setup.subscription_name, engine)
        lock_name = f"subscription-{setup.subscription_name}-{crash_at[0]}"
        try:
            deadline = time.monotonic() + 10
            while not probe.lock(lock_name):
                assert time.monotonic() < deadline, "the killed runner's partition lock was never released"
                time.sleep(0.05)
            probe.unlock(lock_name)
        finally:
            probe.finalize()

        survivor, ready, start = _start(setup)
        processes.append(survivor)
        _wait_ready([survivor], [ready])
        start.set()
        survivor.join(timeout=60)
        assert survivor.exitcode == 0, f"the surviving runner exited with {survivor.exitcode}"

    log = _read_log(engine, setup.log_table)
    handled = Counter(row.message_id for row in log)
    assert set(handled) == set(setup.written), "a message was lost by the crash"
    duplicates = {m for m, n in handled.items() if n > 1}
    [killed_row] = killed_at
    assert duplicates == {killed_row.message_id}, "only the message being handled at the kill comes twice"
    redelivered = [r for r in log if r.message_id == killed_row.message_id]
    assert [r.pid for r in redelivered] == [crasher.pid, survivor.pid]
    assert {r.pid for r in log} == {crasher.pid, survivor.pid}
    partition_positions = [r.position for r in log if r.partition == crash_at[0]]
    assert partition_positions == [*range(crash_at[1] + 1), *range(crash_at[1], 30)]
    for partition in set(range(workers.PARTITIONS)) - {crash_at[0]}:
        assert [r.position for r in log if r.partition == partition] == list(range(30))
    _assert_partitions_never_shared(log)

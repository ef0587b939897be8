"""Work moves to the survivors when an executor process dies (kill -9), without waiting
for the safety-net timer: partitions held by a dead process are retried once its locks go."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import sqlalchemy as sa

from tests.support import Numbered
from tests.system.executor_workers import run_executor
from tests.workers import build_stream, create_log_table

pytestmark = pytest.mark.both_drivers

MESSAGES = 300


def _logged_by(engine: sa.Engine, log_table: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{log_table}"').scalar_one())


def test_survivor_takes_over_the_partitions_of_a_killed_executor(engine: sa.Engine, unique_name: str) -> None:
    store, stream = build_stream(engine, unique_name, f"{unique_name}_agg")
    log_table = f"{unique_name}_log"
    create_log_table(engine, log_table)
    for i in range(MESSAGES):
        store.write(f"par-{i % 10}", Numbered(number=i))
    stream.projector.run()
    ctx = multiprocessing.get_context("spawn")
    args = (unique_name, f"{unique_name}_agg", f"{unique_name}_sub", log_table)
    # The doomed executor is slow and dies late, holding a partition with work left, after
    # the survivor has finished everything else and gone idle: only a retry of the
    # contended partition (not a notification, not the timer) can hand the work over.
    doomed = ctx.Process(target=run_executor, args=(*args, 25, 0.1))
    survivor = ctx.Process(target=run_executor, args=(*args, None))
    doomed.start()
    # The survivor starts once the doomed one is into its third batch of 10 (it dies at the
    # 25th message): a fixed head start is too short on a loaded machine, and a shorter one
    # lets the survivor take the doomed one's partition between its batches.
    started = time.monotonic() + 60
    while _logged_by(engine, log_table) < 20 and time.monotonic() < started:
        time.sleep(0.05)
    survivor.start()
    try:
        doomed.join(timeout=60)
        assert doomed.exitcode == -9, "the doomed executor should have been killed mid-run"
        deadline = time.monotonic() + 40  # far below the 600 s safety net
        handled = 0
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                handled = conn.exec_driver_sql(
                    f'SELECT count(DISTINCT message_id) FROM "{log_table}"'
                ).scalar_one()
            if handled == MESSAGES:
                break
            time.sleep(0.2)
        assert handled == MESSAGES, f"only {handled} of {MESSAGES} handled after the crash"
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                f'SELECT message_id, array_agg(pid) FROM "{log_table}" GROUP BY message_id '
                "HAVING count(*) > 1"
            ).all()
            pids = conn.exec_driver_sql(f'SELECT DISTINCT pid FROM "{log_table}"').scalars().all()
        # At-least-once: only the message the killed process was handling may come twice.
        assert len(rows) <= 1, rows
        assert doomed.pid in pids and survivor.pid in pids
    finally:
        for process in (doomed, survivor):
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)

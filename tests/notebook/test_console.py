"""The operations console (`OperationsConsole`, `engine.operations`) on the real database:
what it shows equals what the tables, `pg_locks` and `pg_stat_activity` hold, in several
states; Replay and Discard act only after confirmation; looking takes no lock.

No `from __future__ import annotations`: handler annotations must be real objects.
"""

import contextlib
import datetime as dt
import html
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import MessageHandlerRegister, StoredMessage
from depeche_nb.engine.operations import diagnose_partition, read_operations
from depeche_nb.engine.parking import DISCARDED, PARKED, REPLAYED
from depeche_nb.engine.projector import unprojected_count
from depeche_nb.notebook.views.subscriptions import partition_states
from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.server_check import ensure_supported
from depeche_nb.tools import PydanticMessageSerializer
from depeche_nb.widgets import OperationsConsole
from tests.support import AnyMessage, Numbered

pytestmark = pytest.mark.both_drivers

WAIT_S = 10.0
ROOT = Path(__file__).resolve().parents[2]


class ByNumber:
    """`n-<k>` goes to partition k % 3; number 99 cannot be partitioned."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        if message.message.number == 99:
            raise ValueError("99 has no partition")
        return int(message.stream.rsplit("-", 1)[-1]) % 3


class Handlers:
    """Handlers recording what they handled; numbers in `fail_on` raise; `gate`, when set,
    makes the handler of `gate_number` wait for it (a runner holding its partition)."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.fail_on = set(fail_on or ())
        self.seen: list[int] = []
        self.gate: threading.Event | None = None
        self.gate_number: int | None = None
        self.waiting = threading.Event()

    def register(self) -> MessageHandlerRegister[Any]:
        register: MessageHandlerRegister[Any] = MessageHandlerRegister()

        def handle(message: Numbered) -> None:
            if self.gate is not None and message.number == self.gate_number:
                self.waiting.set()
                assert self.gate.wait(WAIT_S * 3), "the test never opened the gate"
            if message.number in self.fail_on:
                raise RuntimeError(f"cannot take {message.number} <b>now</b>")
            self.seen.append(message.number)

        register.register(handle)
        return register


class Ops:
    """One store, one aggregated stream `n-%` in three partitions, four subscriptions:

    partition 1: n-1 v1..v3 (numbers 10, 11, 12); partition 2: n-2 v1..v2 (20, 21);
    partition 0: n-3 v1 (30). `done` handles everything, `slow` one message, `never` nothing,
    `fussy` parks 11 and 20.
    """

    WRITES = (("n-1", (10, 11, 12)), ("n-2", (20, 21)), ("n-3", (30,)))

    def __init__(self, engine: sa.Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(AnyMessage))
        self.stream = self.store.aggregated_stream(f"{name}_n", ByNumber(), ["n-%"])
        self.handlers = {kind: Handlers() for kind in ("done", "slow", "never")}
        self.handlers["fussy"] = Handlers({11, 20})
        park = depeche_nb.ParkSubscriptionErrorHandler()
        self.subs = {
            kind: self.stream.subscription(
                f"{name}_{kind}",
                handlers=h.register(),
                error_handler=park if kind == "fussy" else None,
            )
            for kind, h in self.handlers.items()
        }
        self.ids: dict[int, uuid.UUID] = {}

    def write(self, stream: str, *numbers: int) -> None:
        for number in numbers:
            message = Numbered(number=number, text="<b>hi</b>")
            self.store.write(stream, message)
            self.ids[number] = message.message_id

    def write_all(self) -> None:
        for stream, numbers in self.WRITES:
            self.write(stream, *numbers)

    def handle(self) -> None:
        self.subs["done"].runner.run()
        self.subs["fussy"].runner.run()
        self.subs["slow"].runner.step(max_messages=1)  # partition 1 is the furthest behind

    def sub(self, kind: str) -> Any:
        return self.subs[kind]

    def name_of(self, kind: str) -> str:
        return f"{self.name}_{kind}"


@pytest.fixture
def ops(engine: sa.Engine, unique_name: str) -> Ops:
    return Ops(engine, unique_name)


def text(page: str) -> str:
    """The visible text of a page: style and tags dropped, entities decoded, spaces collapsed."""
    without_style = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", without_style)).split())


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def truth(subscription: Any) -> dict[int, tuple[int, int]]:
    """{partition: (position, head)} as the subscription's own read-only view has them."""
    return {s.partition: (s.position, s.head) for s in partition_states(subscription)}


def shown(snapshot: Any, subscription: Any) -> dict[int, tuple[int, int]]:
    return {p.partition: (p.position, p.head) for p in snapshot.subscription(subscription.name).partitions}


def activity(engine: sa.Engine, pid: int) -> tuple[Any, ...]:
    with engine.connect() as conn:
        return tuple(
            conn.exec_driver_sql(
                "SELECT application_name, host(client_addr), client_port, backend_start, usename "
                "FROM pg_stat_activity WHERE pid = %s",
                (pid,),
            ).one()
        )


def with_application_name(engine: sa.Engine, application_name: str) -> sa.Engine:
    url = engine.url.update_query_dict({"application_name": application_name})
    return connect(url.render_as_string(hide_password=False))


# -- what it shows equals the truth ---------------------------------------------------------------


def test_streams_and_subscriptions_equal_the_truth_in_every_state(ops: Ops, engine: sa.Engine) -> None:
    stream_name = ops.stream.name
    names = {ops.name_of(kind) for kind in ops.subs}

    # Defined, nothing written: every stream and subscription is listed, empty.
    snapshot = read_operations(engine, ops.store.name)
    assert [s.name for s in snapshot.streams] == [stream_name]
    assert {s.name for s in snapshot.subscriptions} == names
    status = snapshot.stream(stream_name)
    assert (status.store, status.wildcards, status.partitions, status.projected) == (
        ops.store.name,
        ["n-%"],
        0,
        0,
    )
    assert all(s.partitions == [] and s.parked_count is None for s in snapshot.subscriptions)
    assert snapshot.most_behind() is None

    # Written, not projected: the projection lag is the store's backlog.
    ops.write_all()
    snapshot = read_operations(engine, ops.store.name)
    status = snapshot.stream(stream_name)
    assert (status.partitions, status.projected, status.unprojected.value) == (0, 0, 6)
    assert status.unprojected.value == unprojected_count(ops.stream)

    # Projected: heads per partition, every position -1.
    ops.stream.projector.run()
    snapshot = read_operations(engine, ops.store.name)
    status = snapshot.stream(stream_name)
    assert (status.partitions, status.projected, status.unprojected.value) == (3, 6, 0)
    with engine.connect() as conn:
        checkpoint = conn.exec_driver_sql(
            f"SELECT updated_at FROM {quote_ident(stream_name + '_checkpoint')}"
        ).scalar_one()
    assert status.checkpoint_updated_at == checkpoint
    assert status.checkpoint_age == snapshot.read_at - checkpoint
    for kind, sub in ops.subs.items():
        assert shown(snapshot, sub) == truth(sub) == {0: (-1, 0), 1: (-1, 2), 2: (-1, 1)}, kind

    # Handled: positions as the state table has them, parked messages as the subscription lists them.
    ops.handle()
    snapshot = read_operations(engine, ops.store.name)
    for kind, sub in ops.subs.items():
        assert shown(snapshot, sub) == truth(sub), kind
    assert shown(snapshot, ops.sub("slow")) == {0: (-1, 0), 1: (0, 2), 2: (-1, 1)}
    fussy = snapshot.subscription(ops.name_of("fussy"))
    assert fussy.lag == 0 and fussy.parked_count == 2
    assert [(p.id, p.position, p.error) for p in fussy.parked] == [
        (p.id, p.position, p.error) for p in ops.sub("fussy").parked()
    ]
    assert [p.error for p in fussy.parked] == [
        "RuntimeError: cannot take 11 <b>now</b>",
        "RuntimeError: cannot take 20 <b>now</b>",
    ]
    assert snapshot.subscription(ops.name_of("slow")).lag == 5
    assert (
        snapshot.subscription(ops.name_of("done")).state_table == f"{ops.name_of('done')}_subscription_state"
    )
    never = snapshot.subscription(ops.name_of("never"))
    assert (never.state_table, never.initialized, never.lag) == (None, False, 6)
    assert "no stored state" in never.note
    # The largest lag of one partition: `never` in partition 1 (3 messages, `slow` has 2 left there).
    assert snapshot.most_behind() == (ops.name_of("never"), 1)
    last_acks = {p.partition: p.last_acked_at for p in snapshot.subscription(ops.name_of("slow")).partitions}
    assert last_acks[1] == next(
        s.last_acked_at for s in partition_states(ops.sub("slow")) if s.partition == 1
    )
    assert last_acks[0] is None

    # More writes, one the projector cannot place: the lag and the dead letters follow.
    ops.write("n-4", 40)
    ops.stream.projector.run()
    ops.write("n-5", 99, 50)
    ops.stream.projector.run()
    ops.write("n-6", 60, 61)
    status = read_operations(engine, ops.store.name).stream(stream_name)
    assert status.dead_letters == len(ops.stream.projector.dead_letters_dataframe()) == 2  # 99 and 50 held
    assert status.unprojected.value == unprojected_count(ops.stream) == 2  # 60, 61
    assert status.projected == 7


def test_a_database_console_lists_every_store_a_store_console_only_its_own(
    engine: sa.Engine, unique_name: str
) -> None:
    first, second = Ops(engine, unique_name + "a"), Ops(engine, unique_name + "b")
    first.write_all()
    second.write("n-1", 1)
    everything = read_operations(engine)
    listed = {s.name for s in everything.streams}
    assert {first.stream.name, second.stream.name} <= listed
    assert {first.name_of("done"), second.name_of("done")} <= {s.name for s in everything.subscriptions}
    only = read_operations(engine, first.store.name)
    assert [s.name for s in only.streams] == [first.stream.name]
    assert {s.name for s in only.subscriptions} == {first.name_of(kind) for kind in first.subs}
    assert only.store == first.store.name and everything.store is None
    assert everything.schema == only.schema


# -- who holds a partition --------------------------------------------------------------------


@contextlib.contextmanager
def runner_blocked_in(ops: Ops, app_engine: sa.Engine, number: int) -> Iterator[Any]:
    """`slow`'s runner, on `app_engine`, handling message `number` and waiting there (holding
    its partition) until the block ends. Yields the runner's Subscription."""
    handlers = Handlers()
    handlers.gate, handlers.gate_number = threading.Event(), number
    store = depeche_nb.MessageStore(ops.store.name, app_engine, PydanticMessageSerializer(AnyMessage))
    stream = store.aggregated_stream(ops.stream.name, ByNumber(), ["n-%"])
    subscription = stream.subscription(ops.name_of("slow"), handlers=handlers.register())
    thread = threading.Thread(target=subscription.runner.run, daemon=True)
    thread.start()
    try:
        assert handlers.waiting.wait(WAIT_S), "the runner never reached the message"
        yield subscription
    finally:
        handlers.gate.set()
        thread.join(WAIT_S)
        subscription.lock_provider.finalize()


HOLD_SCRIPT = """
import sys
import depeche_nb
from depeche_nb.postgres.locks import DbLockProvider
provider = DbLockProvider(sys.argv[2], depeche_nb.connect(sys.argv[1]))
assert provider.lock(sys.argv[3])
print(provider.session_pid, flush=True)
sys.stdin.readline()
"""


def test_lock_holders_are_the_sessions_that_hold_the_partitions(ops: Ops, engine: sa.Engine) -> None:
    ops.write_all()
    ops.stream.projector.run()
    ops.handle()
    name = ops.name_of("slow")
    app = f"dnb_runner_{ops.name[-6:]}"
    app_engine = with_application_name(engine, app)
    other_app = f"dnb_other_{ops.name[-6:]}"
    dsn = engine.url.update_query_dict({"application_name": other_app}).render_as_string(hide_password=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Another process holds partition 2, as a runner of another machine would.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, dsn, name, f"subscription-{name}-2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        other_pid = int(holder.stdout.readline())
        # This process's runner (another thread) is inside the handler of 11: partition 1.
        with runner_blocked_in(ops, app_engine, 11) as runner:
            pid = runner.lock_provider.session_pid
            assert pid is not None
            snapshot = read_operations(engine, ops.store.name)
            slow = snapshot.subscription(name)
            holders = {p.partition: p.holder for p in slow.partitions}
            assert holders[0] is None
            assert holders[1] is not None and holders[1].pid == pid
            assert holders[2] is not None and holders[2].pid == other_pid
            for partition, expected_pid in ((1, pid), (2, other_pid)):
                h = holders[partition]
                assert h is not None
                assert (
                    h.application_name,
                    h.client_addr,
                    h.client_port,
                    h.backend_start,
                    h.user,
                ) == activity(engine, expected_pid)
            assert holders[1].application_name == app and holders[2].application_name == other_app
            assert holders[1].state_change is not None and holders[1].backend_start <= holders[1].state_change
            assert slow.held == [1, 2]
            # Nobody holds another subscription's partitions.
            assert snapshot.subscription(ops.name_of("done")).held == []

            diagnosis = diagnose_partition(engine, name, 1)
            assert diagnosis.holder == holders[1]
            assert any(f"a runner holds the partition: pid {pid} ({app})" in r for r in diagnosis.reasons())

            console = OperationsConsole(ops.store, live=False)
            try:
                page = text(console.snapshot_html())
                assert f"pid {pid} {app}" in page and f"pid {other_pid} {other_app}" in page
                assert "session started" in page and "last statement" in page
                assert "pg_stat_activity.backend_start" in page  # which time is which, said in the UI
            finally:
                console.close()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(WAIT_S) == 0
        # Both let go: nobody holds anything.
        assert wait_for(lambda: read_operations(engine, ops.store.name).subscription(name).held == [])
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT_S)
        app_engine.dispose()


# -- looking takes no lock --------------------------------------------------------------------

LOCK_FUNCTIONS = [
    (function, arguments, "void" if not function.startswith("pg_try") else "boolean")
    for function in (
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
    )
    for arguments in ("bigint", "integer, integer")
]


@contextlib.contextmanager
def lock_spy(engine: sa.Engine, name: str) -> Iterator[sa.Engine]:
    """An engine whose sessions fail on any advisory-lock function: a schema of look-alikes
    that raise, searched before pg_catalog (named in the search path, pg_catalog comes where
    it is named). Other sessions keep the default path and never see them."""
    spy = f"{name}_spy"
    with engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    url = engine.url.update_query_dict(
        {"options": f"-csearch_path={quote_ident(schema)},{quote_ident(spy)},pg_catalog"}
    )
    spy_engine = connect(url.render_as_string(hide_password=False))
    # The library's once-per-URL server check takes a probe lock of its own on a throwaway
    # connection: done now, before the look-alikes exist (a notebook's engine has done it
    # when it first connected).
    ensure_supported(spy_engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {quote_ident(spy)}")
        for function, arguments, returns in LOCK_FUNCTIONS:
            conn.exec_driver_sql(
                f"CREATE FUNCTION {quote_ident(spy)}.{function}({arguments}) RETURNS {returns} "
                f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'a lock was taken: {function}'; END $$"
            )
    try:
        yield spy_engine
    finally:
        spy_engine.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {quote_ident(spy)} CASCADE")


def advisory_locks_of(engine: sa.Engine, application_name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND a.application_name = %s",
                (application_name,),
            ).scalar_one()
        )


def test_looking_takes_no_lock_while_a_runner_holds_partitions(ops: Ops, engine: sa.Engine) -> None:
    ops.write_all()
    ops.stream.projector.run()
    ops.handle()
    name = ops.name_of("slow")
    app = f"dnb_console_{ops.name[-6:]}"
    app_engine = with_application_name(engine, app)
    with lock_spy(app_engine, ops.name) as spy_engine:
        # The spy works: a lock function on its sessions fails.
        with pytest.raises(sa.exc.DBAPIError, match="a lock was taken: pg_try_advisory_lock"):
            with spy_engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_try_advisory_lock(1)")
        runner_engine = with_application_name(engine, f"dnb_runner_{ops.name[-6:]}")
        try:
            with runner_blocked_in(ops, runner_engine, 11) as runner:
                before = runner.lock_provider.held()
                assert before == {f"subscription-{name}-1"}
                console = OperationsConsole(spy_engine, live=False)
                try:
                    for _ in range(3):
                        console.refresh()
                    console.why_behind(name, 1)
                    fussy = console.snapshot.subscription(ops.name_of("fussy"))  # type: ignore[union-attr]
                    console.request_discard(fussy.name, fussy.parked[0].id)  # asked, not confirmed
                    assert console.last_error is None, console.last_error
                    assert console.diagnosis is not None and console.diagnosis.holder is not None
                    assert console.diagnosis.holder.pid == runner.lock_provider.session_pid
                    # The same reads called directly raise on any lock.
                    read_operations(spy_engine)
                    diagnose_partition(spy_engine, name, 1)
                    assert advisory_locks_of(engine, app) == 0
                finally:
                    console.close()
                # The runner kept its partition all along, and still works.
                assert runner.lock_provider.still_holds(f"subscription-{name}-1")
            assert ops.sub("fussy").parked()[0].status == PARKED
        finally:
            runner_engine.dispose()
    app_engine.dispose()


# -- why is partition N behind? -----------------------------------------------------------------


def test_why_behind_names_the_next_message_its_age_the_holder_and_the_errors(
    ops: Ops, engine: sa.Engine
) -> None:
    ops.write_all()
    ops.stream.projector.run()
    ops.handle()
    name = ops.name_of("slow")
    diagnosis = diagnose_partition(engine, name, 1)
    eleven = next(m for m in ops.store.read("n-1") if m.version == 2)
    assert (diagnosis.position, diagnosis.head, diagnosis.lag) == (0, 2, 2)
    m = diagnosis.next_message
    assert m is not None
    assert (m.stream, m.version, m.global_position, m.message_id, m.message_type, m.position) == (
        "n-1",
        2,
        eleven.global_position,
        str(ops.ids[11]),
        "Numbered",
        1,
    )
    written = eleven.added_at.replace(tzinfo=dt.timezone.utc)  # stored messages carry naive UTC
    assert m.added_at == written
    assert m.age == diagnosis.read_at - written and m.age.total_seconds() >= 0
    assert diagnosis.holder is None and diagnosis.locks_known
    reasons = diagnosis.reasons()
    assert reasons[0] == "2 messages to handle in partition 1"
    assert any(r.startswith("no runner holds the partition") for r in reasons)
    assert any(f"the next message (n-1 v2, global position {eleven.global_position})" in r for r in reasons)

    # Not behind, and the parked messages of a partition with their errors.
    fussy = diagnose_partition(engine, ops.name_of("fussy"), 1)
    assert fussy.lag == 0 and fussy.next_message is None
    assert fussy.reasons()[0] == "not behind: every projected message of partition 1 is acknowledged"
    assert [(p.position, p.error) for p in fussy.parked] == [(1, "RuntimeError: cannot take 11 <b>now</b>")]
    assert any("parked in this partition: 1" in r for r in fussy.reasons())

    # No stored state; a stream with work to project.
    ops.write("n-1", 13)
    never = diagnose_partition(engine, ops.name_of("never"), 1)
    assert (never.position, never.lag, never.has_state, str(never.unprojected)) == (-1, 3, False, "1")
    assert any("no stored state" in r for r in never.reasons())
    assert any("has 1 messages to project" in r for r in never.reasons())

    with pytest.raises(KeyError, match="no subscription named 'nope'"):
        diagnose_partition(engine, "nope", 0)
    # A partition without messages.
    empty = diagnose_partition(engine, name, 7)
    assert (empty.position, empty.head) == (-1, -1)
    assert empty.reasons()[0] == "partition 7 has no projected messages"


def test_why_behind_reports_what_this_process_executors_know(ops: Ops, engine: sa.Engine) -> None:
    ops.write_all()
    ops.stream.projector.run()
    failing = Handlers({12})
    sub = ops.stream.subscription(ops.name + "_exits", handlers=failing.register())
    executor = depeche_nb.Executor(engine=engine, disable_signals=True)
    executor.register(sub.runner)
    console = None
    try:
        executor.start()
        assert wait_for(lambda: not executor.is_running), "the failing handler should stop the executor"
        diagnosis = diagnose_partition(engine, sub.name, 1, executors=[executor])
        assert (diagnosis.position, diagnosis.lag) == (1, 1)  # 10 and 11 handled, 12 failed
        assert diagnosis.executor_errors == [
            "its runner stopped an Executor of this process: RuntimeError: cannot take 12 <b>now</b>"
        ]
        assert diagnosis.reasons()[1] == diagnosis.executor_errors[0]
        assert [w.state for w in diagnosis.workers] == ["failed"]
        # A stopped executor is not found by itself; one given is shown.
        console = OperationsConsole(ops.store, executors=[executor], live=False)
        console.why_behind(sub.name, 1)
        assert console.executors == [executor]
        assert (
            console.diagnosis is not None and console.diagnosis.executor_errors == diagnosis.executor_errors
        )
        assert "cannot take 12" in text(console.diagnosis_view.value)
        assert "ExecutorHealth" in text(console.executors_view.value)
    finally:
        executor.stop()
        if console is not None:
            console.close()


def test_running_executors_of_this_process_show_up_by_themselves(ops: Ops, engine: sa.Engine) -> None:
    console = OperationsConsole(ops.store, live=False)
    executor = depeche_nb.Executor(engine=engine, disable_signals=True)
    executor.register(ops.stream.projector)
    executor.register(ops.sub("fussy").runner)
    try:
        assert console.executors == []
        assert "none on this database" in text(console.executors_view.value)
        executor.start()
        assert wait_for(lambda: executor.is_running)
        assert console.executors == [executor]
        # Its runner's subscription can be replayed from the console.
        assert console.known_subscriptions() == {ops.name_of("fussy"): ops.sub("fussy")}
        console.refresh()
        assert "ExecutorHealth" in text(console.executors_view.value)
    finally:
        executor.stop()
        console.close()
    assert console.executors == []


# -- Replay and Discard, confirmed ------------------------------------------------------------------


def parked_status(subscription: Any) -> dict[int, str]:
    return {p.id: p.status for p in subscription.parked(include_resolved=True)}


def test_replay_and_discard_act_only_after_confirmation(ops: Ops, engine: sa.Engine) -> None:
    ops.write_all()
    ops.stream.projector.run()
    ops.handle()
    fussy, handlers = ops.sub("fussy"), ops.handlers["fussy"]
    eleven, twenty = (p.id for p in fussy.parked())
    console = OperationsConsole(ops.store, subscriptions=[fussy], live=False)
    try:
        assert set(console.parked_rows) == {(fussy.name, eleven), (fussy.name, twenty)}
        assert console.confirm_row.layout.display == "none"
        handled_before = list(handlers.seen)

        # Replay, first click: the confirm row, nothing else.
        row = console.parked_rows[(fussy.name, eleven)]
        assert not row.replay.disabled
        row.replay.click()
        assert console.pending is not None and (console.pending.kind, console.pending.parked_id) == (
            "replay",
            eleven,
        )
        assert console.confirm_row.layout.display == "flex"
        assert f"Replay parked message #{eleven} of {fussy.name}" in text(console.confirm_text.value)
        assert console.confirm_button.description == "Confirm replay"
        assert parked_status(fussy) == {eleven: PARKED, twenty: PARKED} and handlers.seen == handled_before

        # Cancel: still nothing.
        console.cancel_button.click()
        assert console.pending is None and console.confirm_row.layout.display == "none"
        assert parked_status(fussy) == {eleven: PARKED, twenty: PARKED} and handlers.seen == handled_before

        # The handler still fails: a confirmed replay leaves the message parked, with the error shown.
        row.replay.click()
        console.confirm_button.click()
        assert parked_status(fussy)[eleven] == PARKED
        assert console.last_error is not None and "cannot take 11" in str(console.last_error)
        assert "it stays as it was" in text(console.error.value)

        # Fixed: replayed once, after Confirm, and gone from the list.
        handlers.fail_on.clear()
        row.replay.click()
        assert handlers.seen == handled_before
        console.confirm_button.click()
        assert console.last_error is None
        assert handlers.seen == [*handled_before, 11]
        assert parked_status(fussy) == {eleven: REPLAYED, twenty: PARKED}
        assert set(console.parked_rows) == {(fussy.name, twenty)}
        assert f"Replayed parked message #{eleven}" in text(console.outcome.value)

        # Discard: confirmed, without calling the handler.
        console.parked_rows[(fussy.name, twenty)].discard.click()
        assert parked_status(fussy)[twenty] == PARKED
        assert console.pending is not None and console.pending.kind == "discard"
        console.confirm_button.click()
        assert parked_status(fussy) == {eleven: REPLAYED, twenty: DISCARDED}
        assert handlers.seen == [*handled_before, 11]
        assert console.parked_rows == {}
        assert "none: no subscription has an unresolved parked message" in text(console.parked_title.value)

        # Confirm with nothing asked does nothing.
        console.confirm()
        assert "nothing to confirm" in text(console.outcome.value)
    finally:
        console.close()


def test_replay_needs_the_subscription_and_a_new_request_replaces_the_old(ops: Ops) -> None:
    ops.write_all()
    ops.stream.projector.run()
    ops.handle()
    fussy = ops.sub("fussy")
    eleven, twenty = (p.id for p in fussy.parked())
    console = OperationsConsole(ops.store, live=False)
    try:
        row = console.parked_rows[(fussy.name, eleven)]
        assert row.replay.disabled and "give the console the Subscription" in row.replay.tooltip
        assert not console.request_replay(fussy.name, eleven) or console.pending is None
        assert console.last_error is not None and "add_subscription" in str(console.last_error)
        console.request_discard(fussy.name, eleven)
        console.request_discard(fussy.name, twenty)
        assert console.pending is not None and console.pending.parked_id == twenty
        console.confirm()
        assert parked_status(fussy) == {eleven: PARKED, twenty: DISCARDED}
        with pytest.raises(KeyError, match="not among the unresolved ones shown"):
            console._parked_message(fussy.name, twenty)
        console.add_subscription(fussy)
        assert not console.parked_rows[(fussy.name, eleven)].replay.disabled
    finally:
        console.close()


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_is_refused_before_any_sql(ops: Ops) -> None:
    # Nothing listens on port 1: any attempt to connect would fail with another error.
    nowhere = sa.create_engine("postgresql+psycopg://nobody:secret@127.0.0.1:1/nothing")
    for target in ("postgresql://localhost/db", ops.stream, ops.sub("done"), None, 42):
        with pytest.raises(TypeError, match=r"takes a SQLAlchemy Engine .* or a MessageStore"):
            OperationsConsole(target)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subscriptions must be Subscription objects"):
        OperationsConsole(nowhere, subscriptions=["x"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterables"):
        OperationsConsole(nowhere, subscriptions=ops.sub("done"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="executors must be Executor objects"):
        OperationsConsole(nowhere, executors=[object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="another database"):
        OperationsConsole(nowhere, subscriptions=[ops.sub("done")])
    for option in ({"max_partitions": 0}, {"max_parked": "3"}, {"refresh_every": 0}, {"refresh_every": True}):
        with pytest.raises(ValueError):
            OperationsConsole(nowhere, **option)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parked_limit"):
        read_operations(nowhere, parked_limit=0)
    with pytest.raises(ValueError, match="partition must be >= 0"):
        diagnose_partition(nowhere, "x", -1)
    with pytest.raises(TypeError, match="partition must be an int"):
        diagnose_partition(nowhere, "x", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subscription's name"):
        diagnose_partition(nowhere, ops.sub("done"), 1)  # type: ignore[arg-type]


# -- static fallback and live refresh ----------------------------------------------------------------


def test_the_static_fallback_reads_as_text_and_escapes_user_data(ops: Ops) -> None:
    ops.write_all()
    ops.stream.projector.run()
    ops.handle()
    console = OperationsConsole(ops.store, live=False)
    try:
        bundle = console._repr_mimebundle_()
        page = bundle["text/html"]
        assert "<b>now</b>" not in page and "&lt;b&gt;now&lt;/b&gt;" in page
        lines = text(page)
        assert f"Aggregated streams of store {ops.store.name}" in lines
        assert f"Subscription {ops.name_of('slow')} on {ops.stream.name}" in lines
        assert "partition position head lag held by application client" in lines
        assert "Parked messages (2)" in lines and "cannot take 20 <b>now</b>" in lines
        # The drill-down shows the partition furthest behind by itself.
        assert f"Why is partition 1 of {ops.name_of('never')} behind?" in lines
        assert "no runner holds the partition" in lines
        assert "not live: press Refresh" in lines
        assert bundle["text/plain"] == repr(console)
        assert "lag 11" in repr(console)  # slow 5 + never 6
    finally:
        console.close()


def test_live_follows_notifications_and_the_idle_timer_catches_acks(ops: Ops) -> None:
    ops.write_all()
    ops.stream.projector.run()
    console = OperationsConsole(ops.store, live=True, refresh_every=0.5)
    try:
        assert console.live
        assert "live: on notifications and every 0.5 s" in text(console.header.value)
        stream_name = ops.stream.name
        # A write notifies the store's channel, a projection the stream's.
        ops.write("n-1", 13)
        assert wait_for(lambda: console.snapshot.stream(stream_name).unprojected.value == 1)  # type: ignore[union-attr]
        ops.stream.projector.run()
        assert wait_for(lambda: console.snapshot.stream(stream_name).projected == 7)  # type: ignore[union-attr]
        # An acknowledgement sends no notification: the idle timer shows it.
        ops.sub("done").runner.run()
        name = ops.name_of("done")
        assert wait_for(lambda: console.snapshot.subscription(name).lag == 0)  # type: ignore[union-attr]
        thread = console.live_thread
    finally:
        console.close()
    assert thread is not None and not thread.is_alive() and not console.live


def _scans_of(engine: sa.Engine, tables: list[str]) -> int:
    """Scans of `tables` so far, this thread's pooled session (the one read_operations uses)
    flushing its statistics first."""
    from depeche_nb.postgres.rawconn import autocommit_cursor

    with autocommit_cursor(engine) as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")  # flushed once this statement ends
        cursor.execute(
            "SELECT coalesce(sum(seq_scan + coalesce(idx_scan, 0)), 0) FROM pg_stat_user_tables "
            "WHERE relid = ANY(%s::regclass[])",
            ([quote_ident(t) for t in tables],),
        )
        return int(cursor.fetchone()[0])


def test_reading_the_operations_looks_in_each_state_table_a_bounded_number_of_times(
    engine: sa.Engine, unique_name: str
) -> None:
    """Subscriptions whose state is not in their default table (a named state provider) were
    looked for table after table: subscriptions x tables statements, seconds in a database of
    a few hundred. Now each state table is asked once for all of them, then once for the
    positions of each subscription it holds."""
    from depeche_nb.tools import DbSubscriptionStateProvider, StreamNamePartitioner

    count = 8
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    store.write_all("o-1", [Numbered(number=n) for n in range(3)])
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=StreamNamePartitioner(2), stream_wildcards=["o-%"]
    )
    stream.projector.run()
    tables = []
    for i in range(count):
        provider = DbSubscriptionStateProvider(f"{unique_name}_p{i}", engine)
        subscription = stream.subscription(
            name=f"{unique_name}_s{i}", handlers=MessageHandlerRegister(), state_provider=provider
        )
        subscription.runner.step(max_messages=i % 3 + 1)
        tables.append(f"{unique_name}_p{i}_subscription_state")
    before = _scans_of(engine, tables)
    operations = read_operations(engine)
    scans = _scans_of(engine, tables) - before
    mine = {s.name: s for s in operations.subscriptions if s.name.startswith(f"{unique_name}_s")}
    assert len(mine) == count
    for i in range(count):  # and the positions are those of each one's own table
        handled = i % 3 + 1
        assert sum(p.position + 1 for p in mine[f"{unique_name}_s{i}"].partitions) == handled
    # Here about 2 x count (other sessions' late statistics may add a few); table after
    # table, about count x count / 2 + count (44 and more).
    assert scans <= 4 * count, scans

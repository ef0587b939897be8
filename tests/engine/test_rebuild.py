"""Rebuilding an aggregated stream under a changed definition (issue 10): the new projection is
built beside the old one, subscriptions move along without skipping a message, workers of
the old definition are refused after the switch."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.core.errors import DefinitionChangedError, RebuildInProgressError
from depeche_nb.postgres.names import lock_namespace
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
from tests.engine.support import assert_exact_projection
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Numbered]:
    return depeche_nb.MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered))


def _recorder() -> tuple[
    depeche_nb.MessageHandlerRegister[depeche_nb.StoredMessage[Numbered]], list[tuple[str, int]]
]:
    handled: list[tuple[str, int]] = []
    handlers = depeche_nb.MessageHandlerRegister[depeche_nb.StoredMessage[Numbered]]()

    def handle(message: depeche_nb.StoredMessage[Numbered]) -> None:
        handled.append((message.stream, message.version))

    handlers.register(handle)
    return handlers, handled


def _partitions_of_streams(engine: sa.Engine, name: str) -> dict[str, set[int]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT origin_stream, partition FROM "{name}_stream"').all()
    found: dict[str, set[int]] = defaultdict(set)
    for stream, partition in rows:
        found[stream].add(partition)
    return found


def _committed(store: depeche_nb.MessageStore[Numbered], pattern: str) -> dict[str, tuple[str, int]]:
    return {str(m.message_id): (m.stream, m.version) for m in store.read_wildcard(pattern)}


def test_a_changed_partitioner_and_wider_wildcards_rebuild_and_move_the_subscription(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    for stream_name, count in (("cart-1", 3), ("cart-2", 2), ("cart-3", 4), ("invoice-1", 2)):
        store.write_all(stream_name, [Numbered(number=n) for n in range(count)])
    name = f"{unique_name}_agg"
    old = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(2), stream_wildcards=["cart-%"]
    )
    old.projector.update_full()
    handlers, handled = _recorder()
    subscription = old.subscription(name=f"{unique_name}_sub", handlers=handlers)
    subscription.runner.step(max_messages=4)
    before = list(handled)
    assert 0 < len(before) < 9

    new = store.aggregated_stream(
        name=name,
        partitioner=StreamNamePartitioner(5),
        stream_wildcards=["cart-%", "invoice-%"],
        rebuild=True,
    )

    report = new.last_rebuild
    assert report is not None
    # Widened wildcards: the older invoice messages are projected too, each stream whole
    # in one partition, gapless and in version order.
    assert report.projected == 11
    assert_exact_projection(engine, name, {**_committed(store, "cart-%"), **_committed(store, "invoice-%")})
    assert all(len(partitions) == 1 for partitions in _partitions_of_streams(engine, name).values())
    sub = f"{unique_name}_sub"
    assert report.kept[sub] + report.delivered_again[sub] == len(before)
    assert f"{sub!r} keeps {report.kept[sub]} acknowledged" in report.summary()

    # The old definition's projector (a cell run before, or a worker on old code) is refused.
    store.write("cart-1", Numbered(number=99))
    with pytest.raises(DefinitionChangedError, match="rebuilt under another definition"):
        old.projector.step()
    new.projector.update_full()

    moved = new.subscription(name=sub, handlers=handlers)
    moved.runner.run()
    after = handled[len(before) :]
    everything = set(_committed(store, "cart-%").values()) | set(_committed(store, "invoice-%").values())
    # Nothing skipped; what is handled again was handled before and no more than reported.
    assert set(before) | set(after) == everything
    again = [m for m in after if m in set(before)]
    assert len(again) == report.delivered_again[sub]
    assert Counter(after) == Counter(set(after))
    # Same definition again (the cell re-run once more): no rebuild.
    again_stream = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(5), stream_wildcards=["invoice-%", "cart-%"]
    )
    assert again_stream.last_rebuild is None


def test_rebuild_while_writers_projectors_and_runners_of_the_old_definition_run(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    name, sub = f"{unique_name}_agg", f"{unique_name}_sub"
    old = store.aggregated_stream(name=name, partitioner=StreamNamePartitioner(3), stream_wildcards=["w-%"])
    for n in range(60):
        store.write(f"w-{n % 7}", Numbered(number=n))
    handlers, handled = _recorder()
    lock = threading.Lock()

    def handle(message: depeche_nb.StoredMessage[Numbered]) -> None:
        with lock:
            handled.append((message.stream, message.version))
        time.sleep(0.002)  # batches in flight while the switch waits for the partition locks

    handlers = depeche_nb.MessageHandlerRegister[depeche_nb.StoredMessage[Numbered]]()
    handlers.register(handle)
    old_subscription = old.subscription(name=sub, handlers=handlers)
    stop = threading.Event()
    refused: list[BaseException] = []
    errors: list[BaseException] = []

    def write() -> None:
        n = 1000
        while not stop.is_set():
            store.write(f"w-{n % 7}", Numbered(number=n))
            n += 1
            time.sleep(0.003)

    def old_projector() -> None:
        while not stop.is_set():
            try:
                old.projector.step()
            except DefinitionChangedError as exc:
                refused.append(exc)
                return
            except BaseException as exc:
                errors.append(exc)
                return
            time.sleep(0.005)

    def old_runner() -> None:
        while not stop.is_set():
            try:
                old_subscription.runner.step(max_messages=5)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=f) for f in (write, old_projector, old_runner)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    new = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(4), stream_wildcards=["w-%"], rebuild=True
    )
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(refused) == 1, "the old projector went on after the switch"
    new.projector.update_full()
    new.subscription(name=sub, handlers=handlers).runner.run()
    committed = _committed(store, "w-%")
    assert_exact_projection(engine, name, committed)
    assert all(len(partitions) == 1 for partitions in _partitions_of_streams(engine, name).values())
    assert set(handled) == set(committed.values()), "a message was never handled"
    assert new.last_rebuild is not None and new.last_rebuild.partitions == 4


class Interrupting:
    """Partitions like `StreamNamePartitioner(4)` until told to interrupt (a ^C in a cell)."""

    def __init__(self) -> None:
        self.partitions = 4
        self.interrupt = False

    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        if self.interrupt:
            raise KeyboardInterrupt
        return StreamNamePartitioner(4).get_partition(message)


def test_an_interrupted_rebuild_leaves_the_projection_and_a_later_one_succeeds(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    for n in range(12):
        store.write(f"i-{n % 3}", Numbered(number=n))
    name = f"{unique_name}_agg"
    old = store.aggregated_stream(name=name, partitioner=StreamNamePartitioner(2), stream_wildcards=["i-%"])
    old.projector.update_full()
    before = _partitions_of_streams(engine, name)
    interrupting = Interrupting()
    interrupting.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        store.aggregated_stream(name=name, partitioner=interrupting, stream_wildcards=["i-%"], rebuild=True)
    assert _partitions_of_streams(engine, name) == before
    store.write("i-0", Numbered(number=100))
    assert len(old.projector.step()) == 1, "the old projection should go on after a failed rebuild"
    with pytest.raises(DefinitionChangedError):
        store.aggregated_stream(name=name, partitioner=Interrupting(), stream_wildcards=["i-%"])

    rebuilt = store.aggregated_stream(
        name=name, partitioner=Interrupting(), stream_wildcards=["i-%"], rebuild=True
    )
    assert rebuilt.last_rebuild is not None and rebuilt.last_rebuild.projected == 13
    assert_exact_projection(engine, name, _committed(store, "i-%"))


def test_one_rebuild_at_a_time_and_rebuild_of_the_same_definition(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    for n in range(5):
        store.write(f"r-{n}", Numbered(number=n))
    name = f"{unique_name}_agg"
    stream = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(2), stream_wildcards=["r-%"]
    )
    stream.projector.update_full()
    with engine.connect() as other:
        other.exec_driver_sql("SELECT pg_advisory_lock(%s, 0)", (lock_namespace("rebuild", name),))
        with pytest.raises(RebuildInProgressError, match="being rebuilt by another session"):
            stream.rebuild()
        other.exec_driver_sql("SELECT pg_advisory_unlock(%s, 0)", (lock_namespace("rebuild", name),))
    # An explicit rebuild under the same definition (e.g. the partitioner's code changed).
    report = stream.rebuild(progress=False)
    assert report.projected == 5 and report.partitions <= 2
    assert_exact_projection(engine, name, _committed(store, "r-%"))
    stream.projector.update_full()
    with engine.connect() as conn:
        leftovers = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_class WHERE relname LIKE %s", (f"{name}__next%",)
        ).scalar()
    assert leftovers == 0


def test_a_stream_moved_to_another_store_starts_its_subscriptions_over(
    engine: sa.Engine, unique_name: str
) -> None:
    first, second = _store(engine, f"{unique_name}_a"), _store(engine, f"{unique_name}_b")
    for store, count in ((first, 4), (second, 6)):
        for n in range(count):
            store.write(f"m-{n % 2}", Numbered(number=n))
    name, sub = f"{unique_name}_agg", f"{unique_name}_sub"
    on_first = first.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(2), stream_wildcards=["m-%"]
    )
    on_first.projector.update_full()
    handlers, handled = _recorder()
    on_first.subscription(name=sub, handlers=handlers).runner.run()
    assert len(handled) == 4
    # Global positions of the first store say nothing about the second's messages.
    on_second = second.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(2), stream_wildcards=["m-%"], rebuild=True
    )
    assert on_second.last_rebuild is not None and on_second.last_rebuild.started_over == [sub]
    on_second.subscription(name=sub, handlers=handlers).runner.run()
    assert sorted(handled[4:]) == sorted((m.stream, m.version) for m in second.read_wildcard("m-%"))


def _sessions_waiting_on_advisory_locks(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).scalar_one()
        )


def test_the_switch_waits_for_a_batch_in_flight_and_keeps_its_ack(
    engine: sa.Engine, unique_name: str
) -> None:
    """A runner mid-batch holds its partition: the switch waits for it (instead of moving the
    positions under it), and the batch's acknowledgement, made while the switch waits,
    counts in the new projection: those messages are not delivered again, none is skipped."""
    store = _store(engine, unique_name)
    store.write_all("cart-1", [Numbered(number=n) for n in range(4)])
    name = f"{unique_name}_agg"
    old = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(2), stream_wildcards=["cart-%"]
    )
    old.projector.update_full()
    handlers, handled = _recorder()
    subscription = old.subscription(name=f"{unique_name}_sub", handlers=handlers)
    subscription.ensure_initialized()
    (partition,) = _partitions_of_streams(engine, name)["cart-1"]
    claimed = subscription.claim_batch(partition, 2)
    assert claimed is not None
    claim, batch = claimed
    assert [stored.version for _, _, stored in batch] == [1, 2]

    outcome: dict[str, object] = {}

    def rebuild() -> None:
        try:
            outcome["stream"] = store.aggregated_stream(
                name=name, partitioner=StreamNamePartitioner(3), stream_wildcards=["cart-%"], rebuild=True
            )
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=rebuild, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while _sessions_waiting_on_advisory_locks(engine) == 0:
        assert thread.is_alive(), f"the rebuild switched while a batch was in flight: {outcome}"
        assert time.monotonic() < deadline, "the rebuild never waited for the partition in flight"
        time.sleep(0.02)
    assert thread.is_alive()

    # The batch in flight ends: acknowledged up to its last message, then released.
    subscription.ack_and_release(claim, batch[-1][1])
    thread.join(30)
    assert not thread.is_alive() and "error" not in outcome, outcome
    new = outcome["stream"]
    assert isinstance(new, depeche_nb.AggregatedStream)
    assert new.last_rebuild is not None

    again_handlers, again = _recorder()
    new.subscription(name=f"{unique_name}_sub", handlers=again_handlers).runner.run()
    assert again == [("cart-1", 3), ("cart-1", 4)]
    assert handled == []  # the batch was claimed by hand: nothing went through a handler

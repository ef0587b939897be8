"""The write-to-handler fast paths of the engine: an Executor's projector hands its runners
the partitions it just advanced (after its commit, as a hint that never bypasses a
claim); a runner claims and reads a batch in one statement on its lock session and ends
a batch with its ack and release in one; the projector's step is two plpgsql functions."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.engine import health
from depeche_nb.engine.decoded import RecentlyDecoded
from depeche_nb.postgres.locks import DbLockProvider
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers

WAIT_S = 20.0


def _stream(engine: sa.Engine, name: str, partitions: int = 4, serializer: Any = None) -> Any:
    store = depeche_nb.MessageStore(name, engine, serializer or PydanticMessageSerializer(Numbered))
    return store, store.aggregated_stream(
        name=f"{name}_agg", partitioner=StreamNamePartitioner(partitions), stream_wildcards=["h-%"]
    )


class _Recorder(depeche_nb.MessageHandler[Numbered]):
    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[int] = []
        self.changed = threading.Condition()

    @depeche_nb.MessageHandler.register
    def on_numbered(self, message: Numbered) -> None:
        with self.changed:
            self.numbers.append(message.number)
            self.changed.notify_all()

    def wait_for(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.numbers) >= count, timeout=WAIT_S)


def test_executor_hands_projected_partitions_to_its_runners(engine: sa.Engine, unique_name: str) -> None:
    """With the runner deaf to notifications and the safety-net timer an hour away, only the
    projector's handoff in this process can explain that the messages arrive."""
    store, stream = _stream(engine, unique_name)
    handler = _Recorder()
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=handler)
    runner = subscription.runner
    runner.interested_in_notification = lambda notification: False  # type: ignore[method-assign]
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=3600)
    executor.register(stream.projector)
    executor.register(runner)
    with executor:
        _wait_until_idle(executor)
        for number in range(5):
            store.write(f"h-{number}", Numbered(number=number))
        assert handler.wait_for(5), f"handled only {handler.numbers}"
    assert sorted(handler.numbers) == [0, 1, 2, 3, 4]
    assert not executor.errors
    assert all(p.lag == 0 for p in subscription.progress())
    # The projector keeps no listener of a stopped executor.
    assert stream.projector._step_listeners == []


def _wait_until_idle(executor: depeche_nb.Executor) -> None:
    """Until every worker has made its start-up run: later work needs a wake-up."""
    deadline = time.monotonic() + WAIT_S
    while not all(w.runs >= 1 and w.state == health.IDLE for w in executor.health().workers):
        assert time.monotonic() < deadline, executor.health()
        time.sleep(0.01)


def test_runner_of_another_executor_still_wakes_on_the_notification(
    engine: sa.Engine, unique_name: str
) -> None:
    """The handoff links a projector only to runners of its own executor; a runner elsewhere
    (here: another executor, as in another process) keeps the notification path."""
    store, stream = _stream(engine, unique_name)
    handler = _Recorder()
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=handler)
    projecting = depeche_nb.Executor(engine=engine, stimulation_interval=3600)
    projecting.register(stream.projector)
    handling = depeche_nb.Executor(engine=engine, stimulation_interval=3600)
    handling.register(subscription.runner)
    with projecting, handling:
        _wait_until_idle(projecting)
        _wait_until_idle(handling)
        assert stream.projector._step_listeners == []
        store.write("h-1", Numbered(number=1))
        assert handler.wait_for(1)
    assert handler.numbers == [1]


def test_step_listeners_run_after_the_commit(engine: sa.Engine, unique_name: str) -> None:
    store, stream = _stream(engine, unique_name)
    store.write_all("h-1", [Numbered(number=n) for n in range(3)])
    seen_by_others: list[dict[int, int]] = []

    def listener(heads: dict[int, int]) -> None:
        # Another session (the test engine's pool) sees the heads handed over: committed.
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f'SELECT partition, max_position FROM "{unique_name}_agg_heads"')
            seen_by_others.append({row[0]: row[1] for row in rows})
        assert seen_by_others[-1] == heads

    stream.projector.add_step_listener(listener)
    report = stream.projector.step()
    assert len(report) == 3 and report.heads == seen_by_others[0]
    assert [m.position for m in report.projected] == [0, 1, 2]
    assert stream.projector.step().heads == {}  # nothing projected: no call
    assert len(seen_by_others) == 1
    stream.projector.remove_step_listener(listener)


def test_a_handed_over_partition_is_still_claimed(engine: sa.Engine, unique_name: str) -> None:
    """A handoff is only a hint: while another session holds the partition's lock nothing is
    delivered, and the message comes once it is released."""
    store, stream = _stream(engine, unique_name, partitions=1)
    handler = _Recorder()
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=handler)
    store.write("h-1", Numbered(number=1))
    heads = stream.projector.step().heads
    other = DbLockProvider(subscription.name, engine)
    assert other.lock(subscription.partition_lock_name(0))
    runner = subscription.runner
    runner.take_handoff(heads)
    report = runner._step(None, runner._take_hints())
    assert report.handled == [] and report.contended_partitions == [0]
    other.unlock(subscription.partition_lock_name(0))
    runner.take_handoff(heads)
    assert runner.run() is depeche_nb.RunOnNotificationResult.DONE_FOR_NOW
    assert handler.numbers == [1]
    other.finalize()


def test_a_stale_handoff_delivers_nothing_twice(engine: sa.Engine, unique_name: str) -> None:
    store, stream = _stream(engine, unique_name, partitions=1)
    handler = _Recorder()
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=handler)
    store.write("h-1", Numbered(number=1))
    heads = stream.projector.step().heads
    subscription.runner.run()
    subscription.runner.take_handoff(heads)  # arrives after the work was done
    subscription.runner.run()
    assert handler.numbers == [1]


def test_claim_batch_is_one_statement_with_the_lock_token_and_messages(
    engine: sa.Engine, unique_name: str
) -> None:
    store, stream = _stream(engine, unique_name, partitions=1)
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=_Recorder())
    store.write_all("h-1", [Numbered(number=n) for n in range(3)])
    stream.projector.step()
    subscription.ensure_initialized()
    claimed = subscription.claim_batch(0, 2)
    assert claimed is not None
    claim, batch = claimed
    assert [position for _, position, _ in batch] == [0, 1]
    assert [stored.message.number for _, _, stored in batch] == [0, 1]
    # The claim holds the lock: a second claim (any provider object) is refused.
    assert subscription.claim_batch(0, 2) is None
    assert DbLockProvider(subscription.name, engine).lock(claim.lock_name) is False
    subscription.ack_op(claim, 1).execute()
    subscription.release(claim)
    again = subscription.claim_batch(0, 5)
    assert again is not None
    claim2, batch2 = again
    assert claim2.token is not None and claim.token is not None and claim2.token > claim.token
    assert [position for _, position, _ in batch2] == [2]
    # The old claim's token is stale now: its ack is refused.
    with pytest.raises(depeche_nb.PartitionLostError):
        subscription.ack_op(claim, 2).execute()
    subscription.release(claim2)
    empty = subscription.claim_batch(0, 5)
    assert empty is not None and [p for _, p, _ in empty[1]] == [2]
    subscription.release(empty[0])


def _functions(engine: sa.Engine, prefix: str) -> set[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT proname FROM pg_proc WHERE proname LIKE %s", (prefix.replace("_", r"\_") + "%",)
        )
        return set(rows.scalars())


def test_projector_functions_belong_to_the_stream_and_its_store(engine: sa.Engine, unique_name: str) -> None:
    store, stream = _stream(engine, unique_name)
    names = stream.names
    assert _functions(engine, f"{unique_name}_agg_") == {
        names.project_begin_function,
        names.project_commit_function,
    }
    store.write("h-1", Numbered(number=1))
    stream.projector.run()
    # A rebuild (here: a changed partitioner) leaves no function of its new projection behind.
    rebuilt = store.aggregated_stream(
        name=f"{unique_name}_agg",
        partitioner=StreamNamePartitioner(2),
        stream_wildcards=["h-%"],
        rebuild=True,
    )
    assert rebuilt.last_rebuild is not None and rebuilt.last_rebuild.projected == 1
    assert _functions(engine, f"{unique_name}_agg") == {
        names.project_begin_function,
        names.project_commit_function,
    }
    # The stream moved to another store: functions of its own read that store.
    other = depeche_nb.MessageStore(f"{unique_name}_b", engine, PydanticMessageSerializer(Numbered))
    other.write("h-2", Numbered(number=2))
    moved = other.aggregated_stream(
        name=f"{unique_name}_agg",
        partitioner=StreamNamePartitioner(2),
        stream_wildcards=["h-%"],
        rebuild=True,
    )
    assert moved.names.project_begin_function != names.project_begin_function
    assert [m.message.number for m in _all_messages(moved)] == [2]


def _all_messages(stream: Any) -> list[Any]:
    return [
        stored
        for partition in stream.get_max_aggregated_stream_positions()
        for _, _, stored in stream.read_slice_messages(partition, 0, 100)
    ]


def test_ack_and_release_is_fenced_and_always_releases(engine: sa.Engine, unique_name: str) -> None:
    store, stream = _stream(engine, unique_name, partitions=1)
    subscription = stream.subscription(
        name=f"{unique_name}_sub", handlers=_Recorder(), ack_strategy=depeche_nb.AckStrategy.BATCHED
    )
    store.write_all("h-1", [Numbered(number=n) for n in range(3)])
    stream.projector.step()
    subscription.ensure_initialized()
    claimed = subscription.claim_batch(0, 2)
    assert claimed is not None
    claim, _ = claimed
    subscription.ack_and_release(claim, 1)
    assert subscription.lock_provider.held() == frozenset()  # type: ignore[attr-defined]
    assert [p.position for p in subscription.progress()] == [1]
    # A takeover bumped the token meanwhile: the ack is refused, the partition released anyway.
    claimed = subscription.claim_batch(0, 2)
    assert claimed is not None
    stale, _ = claimed
    subscription.state_provider.take(subscription.name, 0)  # type: ignore[attr-defined]
    with pytest.raises(depeche_nb.PartitionLostError):
        subscription.ack_and_release(stale, 2)
    assert subscription.lock_provider.held() == frozenset()  # type: ignore[attr-defined]
    other = DbLockProvider(subscription.name, engine)
    assert other.lock(stale.lock_name)
    other.unlock(stale.lock_name)  # at once (closing the session releases it a moment later)
    other.finalize()
    assert [p.position for p in subscription.progress()] == [1]
    # The batched runner ends each batch that way: everything handled, nothing held.
    subscription.runner.run()
    assert [p.position for p in subscription.progress()] == [2]
    assert subscription.lock_provider.held() == frozenset()  # type: ignore[attr-defined]


class _CountingSerializer(PydanticMessageSerializer[Numbered]):
    """Counts the payloads it decodes (rows read by the projector and by runners)."""

    def __init__(self) -> None:
        super().__init__(Numbered)
        self.decoded = 0

    def deserialize_text(self, text: str) -> Numbered:
        self.decoded += 1
        return super().deserialize_text(text)


def test_executor_decodes_each_message_once_for_projector_and_runner(
    engine: sa.Engine, unique_name: str
) -> None:
    """The runner takes the messages its projector just decoded instead of decoding them
    again; what it delivers is still what its claim read, in partition order."""
    serializer = _CountingSerializer()
    store, stream = _stream(engine, unique_name, serializer=serializer)
    handler = _Recorder()
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=handler)
    runner = subscription.runner
    # Woken only by the hand-over, which comes after the projector kept what it decoded.
    runner.interested_in_notification = lambda notification: False  # type: ignore[method-assign]
    executor = depeche_nb.Executor(engine=engine, stimulation_interval=3600)
    executor.register(stream.projector)
    executor.register(runner)
    count = 30
    with executor:
        _wait_until_idle(executor)
        for number in range(count):
            store.write(f"h-{number % 3}", Numbered(number=number))
        assert handler.wait_for(count), handler.numbers
    assert sorted(handler.numbers) == list(range(count))
    for origin in range(3):  # each origin stream in its version order
        mine = [n for n in handler.numbers if n % 3 == origin]
        assert mine == sorted(mine)
    assert serializer.decoded == count  # without the hand-over of decoded messages: 2 x count
    # Stopped: nobody in this process takes them any more, nothing is kept.
    assert len(stream.recently_decoded) == 0


def test_without_an_executor_the_projector_keeps_nothing_decoded(engine: sa.Engine, unique_name: str) -> None:
    serializer = _CountingSerializer()
    store, stream = _stream(engine, unique_name, partitions=2, serializer=serializer)
    store.write_all("h-1", [Numbered(number=n) for n in range(5)])
    stream.projector.run()
    assert len(stream.recently_decoded) == 0
    handler = _Recorder()
    stream.subscription(name=f"{unique_name}_sub", handlers=handler).runner.run()
    assert handler.numbers == list(range(5))
    assert serializer.decoded == 10  # projector and runner each decoded every row


def test_recently_decoded_gives_a_message_once_and_only_for_its_row(
    engine: sa.Engine, unique_name: str
) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    store.write_all("h-1", [Numbered(number=n) for n in range(3)])
    stored = list(store.read("h-1"))
    cache: RecentlyDecoded[Numbered] = RecentlyDecoded(capacity=2)
    cache.add(stored)
    assert len(cache) == 2  # over capacity: the oldest went
    first, second, third = (
        (s.message_id, s.stream, s.version, "{}", s.global_position, s.added_at) for s in stored
    )
    assert cache.take(first) is None
    assert cache.take(third) is stored[2]
    assert cache.take(third) is None  # taken once
    # Same global position, another message (a store emptied and refilled): decoded anew.
    assert cache.take(("x", "h-2", second[2], "{}", second[4], second[5])) is None
    assert len(cache) == 0

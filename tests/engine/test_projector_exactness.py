"""Invariant 3: every committed matching message is projected exactly once, in stream order,
into gapless partitions, whatever the commit order and however long transactions run."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pandas as pd
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer
from tests.engine.support import ModuloStreamPartitioner, assert_exact_projection, assignments
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Numbered]:
    return depeche_nb.MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered))


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_torture_concurrent_writers_with_delays_and_rollbacks(
    engine: sa.Engine, unique_name: str, seed: int
) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["tort-%"]
    )
    committed: dict[str, tuple[str, int]] = {}
    committed_lock = threading.Lock()
    writers_done = threading.Event()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        try:
            for _ in range(25):
                written: list[tuple[str, str, int]] = []
                with engine.connect() as conn:
                    # Streams in a fixed order per transaction: per-stream locks are
                    # held to commit, so any other order could deadlock (by design).
                    streams = sorted({f"tort-{rng.randint(0, 11):02d}" for _ in range(rng.randint(1, 3))})
                    for s in streams:
                        message = Numbered(number=k)
                        position = store.write(s, message, conn=conn)
                        written.append((str(message.message_id), s, position.version))
                    time.sleep(rng.random() * 0.03)  # commit late, out of global order
                    if rng.random() < 0.15:
                        conn.rollback()
                        continue
                    conn.commit()
                with committed_lock:
                    for message_id, s, version in written:
                        committed[message_id] = (s, version)
                # Noise outside the wildcard must never be projected.
                store.write(f"other-{k}", Numbered(number=-1))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def projector(k: int) -> None:
        rng = random.Random(seed + 1000 + k)
        try:
            while not writers_done.is_set():
                stream.projector.step(max_messages=rng.randint(1, 40))
                time.sleep(rng.random() * 0.01)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    projectors = [threading.Thread(target=projector, args=(k,)) for k in range(2)]
    for t in writers + projectors:
        t.start()
    for t in writers:
        t.join(timeout=120)
    writers_done.set()
    for t in projectors:
        t.join(timeout=60)
    assert not errors, errors
    stream.projector.run()
    assert committed, "the test wrote nothing"
    assert_exact_projection(engine, f"{unique_name}_agg", committed)


def test_long_transaction_is_projected_after_it_commits(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["long-%"]
    )
    committed: dict[str, tuple[str, int]] = {}
    long_conn = engine.connect()
    early = Numbered(number=0)
    store.write("long-1", early, conn=long_conn)  # holds global position 1, commits last
    for i in range(20):
        message = Numbered(number=i)
        position = store.write(f"long-{2 + i % 3}", message)
        committed[str(message.message_id)] = (position.stream, position.version)
    report = stream.projector.step(max_messages=1000)
    assert {str(p.message_id) for p in report.projected} == set(committed)
    assert str(early.message_id) not in {str(p.message_id) for p in report.projected}
    # Later rounds must not stall behind the open transaction either.
    late = Numbered(number=99)
    position = store.write("long-3", late)
    committed[str(late.message_id)] = (position.stream, position.version)
    assert [str(p.message_id) for p in stream.projector.step().projected] == [str(late.message_id)]
    long_conn.commit()
    long_conn.close()
    committed[str(early.message_id)] = ("long-1", 1)
    report = stream.projector.step()
    assert [str(p.message_id) for p in report.projected] == [str(early.message_id)]
    assert report.projected[0].global_position < min(
        p[3] for p in assignments(engine, f"{unique_name}_agg") if p[0] != str(early.message_id)
    )
    assert_exact_projection(engine, f"{unique_name}_agg", committed)


def test_rolled_back_long_transaction_is_never_projected(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["rb-%"]
    )
    conn = engine.connect()
    ghost = Numbered(number=1)
    store.write("rb-1", ghost, conn=conn)
    kept = Numbered(number=2)
    store.write("rb-2", kept)
    stream.projector.run()
    conn.rollback()
    conn.close()
    stream.projector.run()
    assert [r[0] for r in assignments(engine, f"{unique_name}_agg")] == [str(kept.message_id)]


def test_second_projector_returns_at_once_while_one_runs(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["lk-%"]
    )
    store.write("lk-1", Numbered(number=1))
    lock_a, lock_b = stream.names.projector_lock
    with engine.connect() as holder:
        holder.exec_driver_sql(f"SELECT pg_advisory_xact_lock({lock_a}, {lock_b})")
        started = time.monotonic()
        report = stream.projector.step()
        assert time.monotonic() - started < 2.0
        assert report.locked and len(report) == 0
        holder.rollback()
    report = stream.projector.step()
    assert not report.locked and len(report) == 1


def test_step_reports_exactly_what_moved(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["st-%"]
    )
    positions = [store.write(f"st-{i % 2}", Numbered(number=i)) for i in range(5)]
    first = stream.projector.step(max_messages=3)
    assert [(p.origin_stream, p.version) for p in first.projected] == [
        (positions[i].stream, positions[i].version) for i in range(3)
    ]
    assert first.more_available
    assert [(p.partition, p.position) for p in first.projected] == [(0, 0), (1, 0), (0, 1)]
    second = stream.projector.step(max_messages=3)
    assert [(p.partition, p.position) for p in second.projected] == [(1, 1), (0, 2)]
    assert not second.more_available
    frame = second.to_dataframe()
    assert list(frame.columns) == [
        "message_id",
        "origin_stream",
        "version",
        "global_position",
        "partition",
        "position",
    ]
    assert frame["position"].tolist() == [1, 2]
    assert "caught up" in second._repr_html_()
    assert len(stream.projector.step()) == 0


class BadPartitioner:
    def __init__(self, result: object) -> None:
        self.result = result

    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        if message.message.number == 3:
            if isinstance(self.result, Exception):
                raise self.result
            return self.result  # type: ignore[return-value]
        return 0


@pytest.mark.parametrize("bad", [-1, "2", 1.5, None, True, RuntimeError("boom")])
def test_bad_partition_parks_the_message_and_holds_its_stream(
    engine: sa.Engine, unique_name: str, bad: object
) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=BadPartitioner(bad), stream_wildcards=["bad-%"]
    )
    committed: dict[str, tuple[str, int]] = {}
    for i in range(5):
        message = Numbered(number=i)
        committed[str(message.message_id)] = ("bad-1", store.write("bad-1", message).version)
        if i == 3:
            bad_message = message
    other = Numbered(number=10)
    committed[str(other.message_id)] = ("bad-2", store.write("bad-2", other).version)
    report = stream.projector.step(max_messages=10)
    # Versions 1-3 and the other stream are projected; version 4 is parked, 5 held behind it.
    assert [(p.origin_stream, p.version) for p in report.projected] == [
        ("bad-1", 1),
        ("bad-1", 2),
        ("bad-1", 3),
        ("bad-2", 1),
    ]
    assert report.dead_lettered == 2
    letters = stream.projector.dead_letters_dataframe()
    assert letters["status"].tolist() == ["parked", "held"]
    assert letters["version"].tolist() == [4, 5]
    assert letters["message_id"][0] == str(bad_message.message_id)
    assert letters["error"][0].startswith("PartitionerError") and pd.isna(letters["error"][1])
    assert len(stream.projector.step()) == 0
    # Replaying with the partitioner still broken changes nothing; fixed, it projects both.
    assert len(stream.projector.replay_dead_letters()) == 0
    stream.projector.partitioner = BadPartitioner(0)
    replayed = stream.projector.replay_dead_letters()
    assert [(p.origin_stream, p.version) for p in replayed.projected] == [("bad-1", 4), ("bad-1", 5)]
    assert stream.projector.dead_letters_dataframe().empty
    assert stream.projector.dead_letters_dataframe(include_resolved=True)["status"].tolist() == [
        "replayed",
        "replayed",
    ]
    assert_exact_projection(engine, f"{unique_name}_agg", committed)
    # Truncating starts over: the dead letters go with the assignments.
    stream.truncate()
    assert stream.projector.dead_letters_dataframe(include_resolved=True).empty


@pytest.mark.parametrize(
    ("wildcards", "error"),
    [("order-%", TypeError), ([], ValueError), ([3], TypeError), (None, TypeError), ([""], TypeError)],
)
def test_wrong_wildcards_are_rejected(
    engine: sa.Engine, unique_name: str, wildcards: object, error: type[Exception]
) -> None:
    store = _store(engine, unique_name)
    with pytest.raises(error):
        store.aggregated_stream(
            name=f"{unique_name}_agg",
            partitioner=ModuloStreamPartitioner(),
            stream_wildcards=wildcards,  # type: ignore[arg-type]
        )
    with engine.connect() as conn:
        exists = conn.exec_driver_sql("SELECT to_regclass(%s)", (f"{unique_name}_agg_stream",)).scalar()
    assert exists is None


def test_like_wildcards_follow_sql_semantics(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg",
        partitioner=ModuloStreamPartitioner(),
        stream_wildcards=["a_-%", "exact-1"],
    )
    for s in ["ab-1", "a-1", "abc-1", "exact-1", "exact-10", "ax-2"]:
        store.write(s, Numbered(number=1))
    stream.projector.run()
    assert sorted(r[1] for r in assignments(engine, f"{unique_name}_agg")) == ["ab-1", "ax-2", "exact-1"]


def test_reading_positions_and_statistics(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["rd-%"]
    )
    written = [store.write(f"rd-{i % 2}", Numbered(number=i)) for i in range(6)]
    stream.projector.run()
    assert [m.position for m in stream.read(0)] == [0, 1, 2]
    assert [m.position for m in stream.read_slice(1, 1, 5)] == [1, 2]
    assert stream.get_max_aggregated_stream_positions() == {0: 2, 1: 2}
    stats = {s.partition_number: s for s in stream.get_partition_statistics()}
    assert stats[0].max_position == 2 and stats[0].next_message_position == 0
    assert stream.global_position_to_positions(written[2].global_position) == {0: 1, 1: 0}
    assert stream.global_position_to_positions(0) == {0: -1, 1: -1}
    future = stream.time_to_positions(depeche_nb_now() + __import__("datetime").timedelta(days=1))
    assert future == {0: 3, 1: 3}
    with pytest.raises(ValueError):
        stream.time_to_positions(__import__("datetime").datetime(2020, 1, 1))
    assert isinstance(next(stream.read(0)).message_id, uuid.UUID)


def depeche_nb_now():  # type: ignore[no-untyped-def]
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)

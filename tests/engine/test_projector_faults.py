"""The projector under faults of its surroundings: a truncate racing a step, a restore into
another cluster, messages it cannot read, names reused for something else (issue 9)."""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.core.errors import CheckpointClusterError, DefinitionChangedError, NameInUseError
from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.embedded import EmbeddedServer
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
from tests.engine.support import ModuloStreamPartitioner, assert_exact_projection
from tests.support import Loose, Numbered, _Message

pytestmark = pytest.mark.both_drivers


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Numbered]:
    return depeche_nb.MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered))


def _projected(engine: sa.Engine, stream_name: str) -> list[int]:
    """The global positions in the aggregated stream's table, one per projected message."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT global_position FROM "{stream_name}_stream"').all()
    return sorted(row[0] for row in rows)


class GatedPartitioner:
    """Partition 0; while `gate` is set, the first call blocks until released, holding the
    projector's step open between reading its checkpoint and writing the next one."""

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.entered.set()
            gate.wait(10)
        return 0


def test_truncate_waits_for_a_step_in_flight(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    partitioner = GatedPartitioner()
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=partitioner, stream_wildcards=["trunc-%"]
    )
    store.write_all("trunc-1", [Numbered(number=i) for i in range(5)])
    stream.projector.update_full()
    store.write_all("trunc-1", [Numbered(number=i) for i in range(5, 8)])
    expected = sorted(m.global_position for m in store.read("trunc-1"))

    release = threading.Event()
    partitioner.gate = release
    step = threading.Thread(target=stream.projector.step)
    step.start()
    assert partitioner.entered.wait(10), "the step never reached the partitioner"
    truncate = threading.Thread(target=stream.truncate)
    truncate.start()
    # The truncate now either waits for the step (correct) or has already reset the
    # checkpoint that the step is about to overwrite (the race of issue 9, finding 5).
    truncate.join(0.5)
    release.set()
    step.join(10)
    truncate.join(10)
    assert not step.is_alive() and not truncate.is_alive()

    stream.projector.update_full()
    assert _projected(engine, stream.name) == expected


def test_checkpoint_without_a_cluster_records_this_one(engine: sa.Engine, unique_name: str) -> None:
    """Checkpoints written before clusters were recorded are taken as this cluster's."""
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=StreamNamePartitioner(), stream_wildcards=["old-%"]
    )
    store.write("old-1", Numbered(number=1))
    stream.projector.step()
    checkpoint = f'"{unique_name}_agg_checkpoint"'
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {checkpoint} SET cluster = NULL")
    store.write("old-1", Numbered(number=2))
    assert len(stream.projector.step()) == 1
    with engine.connect() as conn:
        recorded, current = conn.exec_driver_sql(
            f"SELECT cluster, (SELECT system_identifier::text FROM pg_control_system()) FROM {checkpoint}"
        ).one()
    assert recorded == current


@pytest.fixture
def source_database(engine: sa.Engine) -> Iterator[sa.Engine]:
    """A new database on the session's server, so a dump of it holds only this test's tables."""
    name = f"move_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    source = connect(engine.url.set(database=name).render_as_string(hide_password=False))
    yield source
    source.dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def fresh_cluster() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(ephemeral=True)
    server.start()
    yield server
    server.destroy()


def _libpq(url: sa.URL) -> str:
    parts = {"host": url.query.get("host", url.host), "port": url.port or url.query.get("port")}
    parts.update(user=url.username, password=url.password, dbname=url.database)
    return " ".join(f"{key}={value}" for key, value in parts.items() if value)


def _next_txid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_current_xact_id()::text::bigint").scalar_one())


def test_restore_into_another_cluster_is_detected_and_reanchored(
    source_database: sa.Engine, fresh_cluster: EmbeddedServer, unique_name: str, tmp_path: Path
) -> None:
    # The failure needs the new cluster to hand out smaller transaction ids than the old one
    # did: a fresh cluster is below a few thousand, so the old one is taken past that.
    with source_database.connect() as conn:
        for _ in range(max(0, 5000 - _next_txid(source_database))):
            conn.exec_driver_sql("SELECT pg_current_xact_id()")
            conn.commit()

    def define(
        engine: sa.Engine,
    ) -> tuple[depeche_nb.MessageStore[Numbered], depeche_nb.AggregatedStream[Numbered]]:
        store = _store(engine, unique_name)
        stream = store.aggregated_stream(
            name=f"{unique_name}_agg", partitioner=ModuloStreamPartitioner(), stream_wildcards=["mv-%"]
        )
        return store, stream

    committed: dict[str, tuple[str, int]] = {}

    def write(store: depeche_nb.MessageStore[Numbered], stream: str, count: int) -> None:
        for _ in range(count):
            message = Numbered(number=len(committed))
            position = store.write(stream, message)
            committed[str(message.message_id)] = (stream, position.version)

    old_store, old_stream = define(source_database)
    for k in range(4):
        write(old_store, f"mv-{k}", 3)
    old_stream.projector.update_full()
    write(old_store, "mv-1", 2)  # written on the old cluster, not yet projected at the move

    dump = tmp_path / "dump.sql"
    subprocess.run(
        [fresh_cluster.tool("pg_dump"), "--no-owner", "-f", str(dump), _libpq(source_database.url)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [
            fresh_cluster.tool("psql"),
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(dump),
            fresh_cluster.libpq_dsn,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    target = connect(fresh_cluster.dsn)
    try:
        store, stream = define(target)
        with target.connect() as conn:
            oldest_foreign = conn.exec_driver_sql(
                f'SELECT min(txid::text::bigint) FROM "{unique_name}_messages"'
            ).scalar_one()
        assert _next_txid(target) < oldest_foreign, "the scenario needs smaller ids on the new cluster"
        write(store, "mv-2", 2)
        write(store, "mv-9", 1)
        projected_before = _projected(target, stream.name)

        with pytest.raises(CheckpointClusterError, match="reanchor"):
            stream.projector.step()
        assert _projected(target, stream.name) == projected_before

        stream.projector.reanchor()
        stream.projector.update_full()
        assert_exact_projection(target, stream.name, committed)
        # Afterwards the checkpoint is of this cluster: new messages flow as usual.
        write(store, "mv-3", 2)
        stream.projector.update_full()
        assert_exact_projection(target, stream.name, committed)
        assert len(committed) == 19
    finally:
        target.dispose()


def _tables_named(engine: sa.Engine, prefix: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE starts_with(tablename, %s) ORDER BY 1", (prefix,)
        ).all()
    return [row[0] for row in rows]


def test_aggregated_stream_name_over_another_store_is_refused(engine: sa.Engine, unique_name: str) -> None:
    first, second = _store(engine, f"{unique_name}_a"), _store(engine, f"{unique_name}_b")
    first.write("same-1", Numbered(number=1))
    second.write_all("same-1", [Numbered(number=n) for n in range(5)])
    stream = first.aggregated_stream(
        name=f"{unique_name}_s", partitioner=StreamNamePartitioner(), stream_wildcards=["same-%"]
    )
    stream.projector.update_full()
    with pytest.raises(NameInUseError, match=f"store is '{unique_name}_a', not '{unique_name}_b'"):
        second.aggregated_stream(
            name=f"{unique_name}_s", partitioner=StreamNamePartitioner(), stream_wildcards=["same-%"]
        )
    assert _projected(engine, stream.name) == [m.global_position for m in first.read("same-1")]


def test_subscription_name_on_another_stream_is_refused_until_rebuilt(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    one, two = (
        store.aggregated_stream(
            name=f"{unique_name}_{k}", partitioner=StreamNamePartitioner(1), stream_wildcards=[f"{k}-%"]
        )
        for k in ("one", "two")
    )
    for k, stream in (("one", one), ("two", two)):
        store.write_all(f"{k}-1", [Numbered(number=n) for n in range(3)])
        stream.projector.update_full()
    handled: list[str] = []
    handlers = depeche_nb.MessageHandlerRegister[depeche_nb.StoredMessage[Numbered]]()

    def handle(message: depeche_nb.StoredMessage[Numbered]) -> None:
        handled.append(message.stream)

    handlers.register(handle)
    one.subscription(name=f"{unique_name}_sub", handlers=handlers).runner.step()
    assert handled == ["one-1"] * 3
    before = _tables_named(engine, unique_name)
    # Both streams put their messages at positions 0-2 of partition 0: sharing the stored
    # positions would deliver none of the second stream's.
    with pytest.raises(NameInUseError, match=f"reads aggregated stream '{unique_name}_one'"):
        two.subscription(name=f"{unique_name}_sub", handlers=handlers)
    assert _tables_named(engine, unique_name) == before
    # Defining it again on its own stream (a notebook re-running a cell) is fine.
    one.subscription(name=f"{unique_name}_sub", handlers=handlers)

    moved = two.subscription(name=f"{unique_name}_sub", handlers=handlers, rebuild=True)
    moved.runner.step()
    assert handled == ["one-1"] * 3 + ["two-1"] * 3
    with pytest.raises(NameInUseError, match=f"reads aggregated stream '{unique_name}_two'"):
        one.subscription(name=f"{unique_name}_sub", handlers=handlers)


def test_concurrent_first_definitions_agree(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def define() -> None:
        try:
            start.wait(10)
            store.aggregated_stream(
                name=f"{unique_name}_agg", partitioner=StreamNamePartitioner(), stream_wildcards=["c-%"]
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=define) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with engine.connect() as conn:
        owners = conn.exec_driver_sql(
            "SELECT owner FROM depeche_nb_definitions WHERE name = %s", (f"{unique_name}_agg",)
        ).all()
    assert [row[0] for row in owners] == [unique_name]


def test_changed_definition_is_an_error_until_rebuilt(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    for stream_name in ("a-1", "b-1"):
        store.write(stream_name, Numbered(number=1))
    name = f"{unique_name}_agg"
    stream = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(4), stream_wildcards=["a-%"]
    )
    stream.projector.update_full()
    a_only = _projected(engine, name)
    # The same definition again (a notebook re-running a cell): nothing to say.
    store.aggregated_stream(name=name, partitioner=StreamNamePartitioner(4), stream_wildcards=["a-%"])
    with pytest.raises(DefinitionChangedError, match=r"wildcards are \['a-%'\], not \['a-%', 'b-%'\]"):
        store.aggregated_stream(
            name=name, partitioner=StreamNamePartitioner(4), stream_wildcards=["a-%", "b-%"]
        )
    with pytest.raises(DefinitionChangedError, match=r"partitions=4\), not .*partitions=8\)"):
        store.aggregated_stream(name=name, partitioner=StreamNamePartitioner(8), stream_wildcards=["a-%"])
    assert _projected(engine, name) == a_only

    rebuilt = store.aggregated_stream(
        name=name, partitioner=StreamNamePartitioner(8), stream_wildcards=["b-%", "a-%"], rebuild=True
    )
    rebuilt.projector.update_full()
    assert _projected(engine, name) == sorted(m.global_position for m in store.read_wildcard("%"))
    # Wildcards are a set: another order is the same definition.
    store.aggregated_stream(name=name, partitioner=StreamNamePartitioner(8), stream_wildcards=["a-%", "b-%"])


def _reading_v1() -> type[_Message]:
    class Reading(_Message):
        value: int

    return Reading


def _reading_v2() -> type[_Message]:
    # The model after a change: stored values of 100 or more no longer validate.
    class Reading(_Message):
        value: int = pydantic.Field(lt=100)

    return Reading


class ByStream:
    def get_partition(self, message: depeche_nb.StoredMessage[object]) -> int:
        return int(message.stream.rsplit("-", 1)[1])


def test_unreadable_message_is_parked_with_its_stream_held_and_can_be_skipped(
    engine: sa.Engine, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = _reading_v1(), _reading_v2()
    old = depeche_nb.MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(v1))
    written = {}
    for stream, value in [("r-1", 1), ("r-1", 500), ("r-1", 2), ("r-2", 3)]:
        message = v1(value=value)
        written[value] = old.write(stream, message)
    store = depeche_nb.MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(v2))
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByStream(), stream_wildcards=["r-%"]
    )
    report = stream.projector.step()
    assert [(p.origin_stream, p.version) for p in report.projected] == [("r-1", 1), ("r-2", 1)]
    letters = stream.projector.dead_letters_dataframe()
    assert letters[["origin_stream", "version", "status"]].values.tolist() == [
        ["r-1", 2, "parked"],
        ["r-1", 3, "held"],
    ]
    poison = written[500].global_position
    # A headless worker says so in its log, naming the message.
    assert [r.levelname for r in caplog.records if "dead letter" in r.getMessage()] == ["WARNING"]
    assert f"global position {poison}" in caplog.text
    assert letters["global_position"].tolist() == [poison, written[2].global_position]
    assert "ValidationError" in letters["error"][0] and "less than 100" in letters["error"][0]
    assert "2 messages the projector could not read" in stream._repr_html_()
    # Later messages of other streams keep flowing; the held stream stays held.
    store.write("r-2", v2(value=4))
    store.write("r-1", v2(value=5))
    flowing = stream.projector.step()
    assert [(p.origin_stream, p.version) for p in flowing.projected] == [("r-2", 2)]
    assert flowing.dead_lettered == 1

    skipped = stream.projector.skip_dead_letter(poison)
    assert [(p.origin_stream, p.version) for p in skipped.projected] == [("r-1", 3), ("r-1", 4)]
    with pytest.raises(KeyError):
        stream.projector.skip_dead_letter(poison)
    assert stream.projector.dead_letters_dataframe().empty
    assert "could not read" not in stream._repr_html_()
    projected = _projected(engine, stream.name)
    everything = [m.global_position for m in old.read_wildcard("r-%")]
    assert projected == sorted(set(everything) - {poison})
    with engine.connect() as conn:
        positions = conn.exec_driver_sql(
            f"SELECT partition, array_agg(origin_stream_version ORDER BY position), "
            f'array_agg(position ORDER BY position) FROM "{stream.name}_stream" GROUP BY partition ORDER BY 1'
        ).all()
    assert [tuple(row) for row in positions] == [(1, [1, 3, 4], [0, 1, 2]), (2, [1, 2], [0, 1])]


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_payload_is_projected_and_delivered(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(
        name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Loose)
    )
    # pydantic writes up to 255 levels but its JSON parser stops at 200.
    store.write("deep-1", Loose(data=_nested(230)))
    store.write("deep-1", Loose(text="after"))
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=StreamNamePartitioner(1), stream_wildcards=["deep-%"]
    )
    assert len(stream.projector.step()) == 2
    seen: list[object] = []
    handlers = depeche_nb.MessageHandlerRegister[Loose]()

    def handle(message: Loose) -> None:
        seen.append(message.data)

    handlers.register(handle)
    stream.subscription(name=f"{unique_name}_sub", handlers=handlers).runner.step()
    assert seen == [_nested(230), None]


def test_unreadable_message_goes_through_the_subscriptions_retry_and_parking(
    engine: sa.Engine, unique_name: str
) -> None:
    v1, v2 = _reading_v1(), _reading_v2()
    old = depeche_nb.MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(v1))
    stream_v1 = old.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByStream(), stream_wildcards=["s-%"]
    )
    for value in (1, 500, 2):
        old.write("s-1", v1(value=value))
    stream_v1.projector.update_full()  # projected while the old model still read them

    store = depeche_nb.MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(v2))
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByStream(), stream_wildcards=["s-%"]
    )
    handled: list[int] = []
    handlers = depeche_nb.MessageHandlerRegister[object]()

    def handle(message: object) -> None:
        handled.append(message.value)  # type: ignore[attr-defined]

    handlers.register_manual(handle, v2)
    subscription = stream.subscription(
        name=f"{unique_name}_sub",
        handlers=handlers,
        error_handler=depeche_nb.ParkSubscriptionErrorHandler(),
        retry_policy=depeche_nb.RetryPolicy(attempts=2, backoff_seconds=0.0),
    )
    report = subscription.runner.step()
    assert handled == [1, 2]
    parked = subscription.parked()
    assert len(parked) == 1 and parked[0].position == 1 and parked[0].attempts == 2
    assert "UnreadableMessageError" in parked[0].error and "version 2" in parked[0].error
    assert [h.outcome for h in report.handled] == ["handled", "parked", "handled"]

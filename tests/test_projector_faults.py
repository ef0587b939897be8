"""The projector under faults of its surroundings: a truncate racing a step, a restore into
another cluster, messages it cannot read, names reused for something else (issue 9)."""

from __future__ import annotations

import threading

import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered


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

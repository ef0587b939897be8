"""Displays cost the same in a small and in a big store (issue 10): the rows each repr and
overview DataFrame makes PostgreSQL read from the messages and stream tables, taken from
its statistics, do not grow with the store. No timing: rows are counted, not seconds.

Both sizes are past every cap of the displays (exact message count, stream count, view
limit), and big enough that the planner scans a table sequentially when a statement asks
for all of its rows, so a display that does reads three times as many rows at the big size.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.core.display import STREAMS_LIMIT
from depeche_nb.notebook.views.store import EXACT_MESSAGES
from depeche_nb.postgres.names import quote_ident
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

PER_STREAM = 10
SMALL_STREAMS = 2_000  # 20,000 messages
BIG_STREAMS = 3 * SMALL_STREAMS
PARTITIONS = 8
ACKED = 100
TAIL = 5  # written after each projection, so the backlog is never empty

pytestmark = pytest.mark.slow


class ByNumber:
    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        return int(message.stream.rsplit("-", 1)[1]) % PARTITIONS


def handle(message: Numbered) -> None:
    return None


@dataclasses.dataclass
class World:
    engine: sa.Engine
    store: depeche_nb.MessageStore[Numbered]
    stream: depeche_nb.AggregatedStream[Numbered]
    subscription: depeche_nb.Subscription[Numbered]

    @property
    def tables(self) -> list[str]:
        return [self.store._storage.names.messages_table, self.stream.names.table]


VIEWS: dict[str, Callable[[World], Any]] = {
    "store repr": lambda w: w.store._repr_html_(),
    "streams_dataframe": lambda w: w.store.streams_dataframe(),
    "aggregated stream repr": lambda w: w.stream._repr_html_(),
    "partitions_dataframe": lambda w: w.stream.partitions_dataframe(),
    "subscription repr": lambda w: w.subscription._repr_html_(),
    "state_dataframe": lambda w: w.subscription.state_dataframe(),
}


def rows_read(world: World) -> int:
    """Rows read so far from the world's tables, sequentially or through an index, on this
    thread's connection (the one the displays use), its statistics flushed first."""
    with autocommit_cursor(world.engine) as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")  # flushed once this statement ends
        tables = [quote_ident(t) for t in world.tables]
        cursor.execute(
            "SELECT (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables "
            "WHERE relid = ANY(%s::regclass[])) + (SELECT coalesce(sum(idx_tup_read), 0) "
            "FROM pg_stat_user_indexes WHERE relid = ANY(%s::regclass[]))",
            (tables, tables),
        )
        return int(cursor.fetchone()[0])


def grow(world: World, first: int, last: int) -> None:
    """Streams `n-first`..`n-(last-1)`, all projected, then a few unprojected messages."""
    with world.engine.begin() as conn:
        for n in range(first, last):
            world.store.write_all(f"n-{n}", [Numbered(number=i) for i in range(PER_STREAM)], conn=conn)
    world.stream.projector.run(progress=False)
    world.store.write_all("n-0", [Numbered(number=-1) for _ in range(TAIL)])
    with autocommit_cursor(world.engine) as cursor:
        for table in world.tables:
            cursor.execute(f"ANALYZE {quote_ident(table)}")


def measure(world: World) -> dict[str, int]:
    counts = {}
    for name, view in VIEWS.items():
        view(world)  # first use: imports, plans, DDL
        before = rows_read(world)
        view(world)
        counts[name] = rows_read(world) - before
    return counts


@pytest.fixture(scope="module")
def rows_at_two_sizes(engine: sa.Engine) -> Iterator[tuple[dict[str, int], dict[str, int]]]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(Numbered))
    stream = store.aggregated_stream(name=f"{name}_agg", partitioner=ByNumber(), stream_wildcards=["n-%"])
    register: depeche_nb.MessageHandlerRegister[Numbered] = depeche_nb.MessageHandlerRegister()
    register.register(handle)
    world = World(engine, store, stream, stream.subscription(name=f"{name}_sub", handlers=register))
    with autocommit_cursor(engine) as cursor:
        for table in world.tables:
            # Only the displays read these tables while they are measured.
            cursor.execute(f"ALTER TABLE {quote_ident(table)} SET (autovacuum_enabled = false)")
        # A parallel worker reports its reads when it exits, maybe after they are read here.
        cursor.execute("SET max_parallel_workers_per_gather = 0")
    try:
        grow(world, 0, SMALL_STREAMS)
        world.subscription.runner.step(ACKED)
        small = measure(world)
        grow(world, SMALL_STREAMS, BIG_STREAMS)
        big = measure(world)
        yield small, big
    finally:
        with autocommit_cursor(engine) as cursor:
            cursor.execute("RESET max_parallel_workers_per_gather")


def test_the_sizes_are_past_every_cap() -> None:
    assert SMALL_STREAMS * PER_STREAM > EXACT_MESSAGES and SMALL_STREAMS > STREAMS_LIMIT


@pytest.mark.parametrize("view", list(VIEWS))
def test_a_display_reads_as_many_rows_in_a_store_three_times_bigger(
    rows_at_two_sizes: tuple[dict[str, int], dict[str, int]], view: str
) -> None:
    small, big = rows_at_two_sizes
    # Bounded by the caps, not by the 20,000 (then 60,000) messages.
    assert small[view] < SMALL_STREAMS * PER_STREAM, (view, small[view])
    assert big[view] <= small[view] * 1.05 + 20, (view, small[view], big[view])

"""What the bounded displays show is true (issue 10): counts, heads and the projection
backlog equal what the tables hold, through writes, rolled back writes, projection steps,
late commits, dead letters, truncation, concurrent writers and a schema of the previous
release; past their caps they say "about" or "more than", never a wrong exact number.

The truth is computed with plain aggregates over the whole tables (`tests/notebook/support.py`).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
import depeche_nb.notebook.views.store as store_frames
import depeche_nb.notebook.views.streams as engine_frames
from depeche_nb.core.display import ABOUT, MORE_THAN, Count
from depeche_nb.notebook import html as h
from depeche_nb.notebook.views.store import store_overview
from depeche_nb.postgres.ddl import forget_ddl_for
from depeche_nb.postgres.names import quote_ident
from depeche_nb.tools import PydanticMessageSerializer
from tests.notebook.support import (
    check_markup,
    rows,
    shown_partitions,
    true_backlog,
    true_partitions,
    true_streams,
)
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


class ByNumber:
    """`n-<k>` goes to partition k % 2; any other name fails (a dead letter)."""

    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        return int(message.stream.rsplit("-", 1)[1]) % 2


class One:
    def get_partition(self, message: depeche_nb.StoredMessage[Numbered]) -> int:
        return 0


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Numbered]:
    return depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(Numbered))


def rolled_back_write(store: depeche_nb.MessageStore[Numbered], stream: str) -> None:
    """A write whose transaction rolls back: it used up a global position."""
    with store.engine.connect() as conn:
        store.write(stream, Numbered(number=0), conn=conn)
        conn.rollback()


# -- the store ------------------------------------------------------------------------------------


def test_store_overview_shows_the_true_streams_and_counts(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    for round_ in range(3):
        for n in range(4):
            store.write_all(f"n-{n}", [Numbered(number=round_) for _ in range(n + 1)])
    rolled_back_write(store, "n-9")
    store.write("late-1", Numbered(number=1))

    ov = store_overview(store, max_streams=3)
    truth = true_streams(store)
    assert ov.messages == Count(sum(t[1] for t in truth)) and ov.streams == Count(len(truth))
    assert ov.last_global_position == max(t[3] for t in truth)
    # The three most recently written streams, newest first, each exactly as stored.
    recent = sorted(truth, key=lambda t: -t[3])[:3]
    assert [
        (s.stream, s.messages, s.first_global_position, s.last_global_position, s.last_added_at)
        for s in ov.recent_streams
    ] == recent
    text = check_markup(store._repr_html_())
    assert f"{ov.messages.value} messages · 5 streams" in text


def test_past_the_caps_a_store_says_about_and_more_than(
    engine: sa.Engine, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_frames, "EXACT_MESSAGES", 5)
    monkeypatch.setattr(store_frames, "STREAMS_LIMIT", 3)
    monkeypatch.setattr(h, "MAX_ROWS", 2)  # streams a repr lists, below the stream cap
    store = _store(engine, unique_name)
    for n in range(4):
        store.write_all(f"n-{n}", [Numbered(number=n) for _ in range(2)])
        rolled_back_write(store, f"n-{n}")
    truth = sum(t[1] for t in true_streams(store))
    ov = store_overview(store)
    # The span of global positions: never below the truth, above it by the rolled back writes.
    assert ov.messages.qualifier == ABOUT and ov.messages.value >= truth == 8
    assert ov.streams == Count(3, MORE_THAN)
    text = check_markup(store._repr_html_())
    assert f"about {ov.messages.value} messages · more than 3 streams" in text
    assert "… more than 1 more streams not shown; store.streams_dataframe(limit=None) lists them all" in text
    assert f"{truth} messages" not in text and "4 streams" not in text


def test_streams_dataframe_is_the_true_streams_by_name_up_to_its_limit(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    with engine.begin() as conn:
        for v in range(3):
            for n in (3, 1, 4, 5, 9, 2):
                store.write(f"s-{n}", Numbered(number=v), conn=conn)
    rolled_back_write(store, "s-0")
    store.write_all("s-1", [Numbered(number=7) for _ in range(3)])
    truth = true_streams(store)

    def rows(frame: Any) -> list[tuple[Any, ...]]:
        return [
            (r.stream, r.messages, r.first_global_position, r.last_global_position, r.last_added_at)
            for r in frame.itertuples()
        ]

    every = store.streams_dataframe(limit=None)
    assert rows(every) == truth and every.attrs["more_available"] is False
    assert rows(store.streams_dataframe()) == truth  # fewer than the default limit
    first = store.streams_dataframe(limit=4)
    assert rows(first) == truth[:4] and first.attrs["more_available"] is True
    assert store.streams_dataframe(limit=len(truth)).attrs["more_available"] is False
    assert depeche_nb.streams_dataframe(store, limit=0).empty
    with pytest.raises(ValueError, match="limit"):
        store.streams_dataframe(limit=-1)


# -- aggregated streams ---------------------------------------------------------------------------


def test_partitions_show_their_true_size_first_and_head_after_a_late_commit(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(name=f"{unique_name}_agg", partitioner=One(), stream_wildcards=["n-%"])
    with engine.connect() as late:
        # Takes a global position now, commits after later ones are projected.
        store.write("n-1", Numbered(number=1), conn=late)
        store.write_all("n-2", [Numbered(number=2) for _ in range(3)])
        stream.projector.run()
        late.commit()
    stream.projector.run()
    truth = true_partitions(stream)
    gps = rows(engine, f"SELECT max(global_position) FROM {quote_ident(stream.names.table)}")[0][0]
    assert truth[0][4] < gps  # the head is the late message, not the highest global position
    assert shown_partitions(stream) == truth
    page = check_markup(stream._repr_html_())
    assert "1 partition · projected 4 · unprojected 0" in page


def test_the_backlog_is_exact_through_steps_late_commits_dead_letters_and_truncation(
    engine: sa.Engine, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByNumber(), stream_wildcards=["n-%"]
    )

    def backlog() -> int:
        shown = stream.partitions_dataframe().attrs["unprojected_messages"]
        assert shown == true_backlog(stream)
        return int(shown)

    for n in range(6):
        store.write(f"n-{n}", Numbered(number=n))
    store.write_all("other-1", [Numbered(number=0) for _ in range(2)])
    assert backlog() == 6  # nothing projected yet: no snapshot to start from
    stream.projector.step(2)
    assert backlog() == 4  # inside a round
    with engine.connect() as late:
        store.write("n-7", Numbered(number=7), conn=late)
        stream.projector.run()
        assert backlog() == 0  # not committed: not visible to anyone yet
        late.commit()
    assert backlog() == 1  # in progress when the projector's snapshot was taken
    stream.projector.run()
    assert backlog() == 0
    store.write_all("n-8", [Numbered(number=8) for _ in range(3)])
    stream.projector.step(1)
    assert backlog() == 2  # inside a later round
    stream.projector.run()
    assert backlog() == 0

    # A message the partitioner fails on, and one held behind it, wait as dead letters.
    store.write_all("n-bad", [Numbered(number=0) for _ in range(2)])
    assert backlog() == 2
    stream.projector.run()
    assert backlog() == 0
    page = check_markup(stream._repr_html_())
    assert "unprojected 0" in page and "2 messages the projector could not read" in page

    monkeypatch.setattr(engine_frames, "UNPROJECTED_CAP", 3)
    stream.truncate()
    assert backlog() == 12
    page = check_markup(stream._repr_html_())
    assert "unprojected more than 3" in page
    assert "more than 3 stored messages matching the wildcards not projected yet" in page
    stream.projector.run()
    assert backlog() == 0


def test_heads_of_the_previous_release_get_their_gaps_counted_once(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    name = f"{unique_name}_agg"
    stream = store.aggregated_stream(name=name, partitioner=ByNumber(), stream_wildcards=["n-%"])
    for n in range(12):
        store.write(f"n-{n}", Numbered(number=n))
    stream.projector.run()
    heads, table = quote_ident(stream.names.heads_table), quote_ident(stream.names.table)
    with engine.begin() as conn:
        # The previous release's heads, over positions with gaps as Depeche DB may leave them:
        # partition 0 starts at 2, partition 1 skips 10 positions after its third.
        conn.exec_driver_sql(f"ALTER TABLE {heads} DROP COLUMN gaps")
        conn.exec_driver_sql(
            f"UPDATE {table} SET position = position + 1000 WHERE partition = 0 OR position >= 3"
        )
        conn.exec_driver_sql(
            f"UPDATE {table} SET position = position - 1000 + CASE partition WHEN 0 THEN 2 ELSE 10 END "
            "WHERE position >= 1000"
        )
        conn.exec_driver_sql(
            f"UPDATE {heads} h SET max_position = (SELECT max(position) FROM {table} s "
            "WHERE s.partition = h.partition)"
        )

    def reopen() -> depeche_nb.AggregatedStream[Numbered]:
        forget_ddl_for(engine.url)
        return store.aggregated_stream(name=name, partitioner=ByNumber(), stream_wildcards=["n-%"])

    stream = reopen()
    assert [(r[1], r[2]) for r in true_partitions(stream)] == [(6, 7), (6, 15)]
    assert shown_partitions(stream) == true_partitions(stream)
    for n in range(12, 16):
        store.write(f"n-{n}", Numbered(number=n))
    stream.projector.run()
    stream = reopen()  # counted once: the projector's later positions are gapless
    assert [(r[1], r[2]) for r in true_partitions(stream)] == [(8, 9), (8, 17)]
    assert shown_partitions(stream) == true_partitions(stream)
    assert stream.partitions_dataframe().attrs["unprojected_messages"] == true_backlog(stream) == 0
    assert "projected 16" in check_markup(stream._repr_html_())


def test_displays_are_true_after_concurrent_writers_and_a_projector(
    engine: sa.Engine, unique_name: str
) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByNumber(), stream_wildcards=["n-%"]
    )
    writers, per_writer = 4, 40
    errors: list[BaseException] = []
    done = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(per_writer):
                store.write(f"n-{w * 1000 + i % 5}", Numbered(number=i))
                if i % 7 == 0:
                    rolled_back_write(store, f"n-{w}")
        except BaseException as exc:
            errors.append(exc)

    def project() -> None:
        try:
            while not done.wait(0.005):
                stream.projector.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    projector = threading.Thread(target=project)
    for thread in [*threads, projector]:
        thread.start()
    seen = []
    while any(t.is_alive() for t in threads):
        # Displays while everything moves: exact counts never go back, none exceeds the total.
        ov = store_overview(store)
        assert ov.messages.exact and ov.messages.value <= writers * per_writer
        seen.append(ov.messages.value)
        assert engine_frames.aggregated_stream_overview(stream).unprojected.exact
    for thread in threads:
        thread.join()
    done.set()
    projector.join()
    assert not errors, errors
    assert seen == sorted(seen)
    stream.projector.run()

    truth = true_streams(store)
    ov = store_overview(store)
    assert ov.messages == Count(writers * per_writer) == Count(sum(t[1] for t in truth))
    assert ov.streams == Count(len(truth)) == Count(writers * 5)
    frame = store.streams_dataframe()
    assert list(zip(frame["stream"], frame["messages"], frame["last_global_position"], strict=True)) == [
        (t[0], t[1], t[3]) for t in truth
    ]
    assert shown_partitions(stream) == true_partitions(stream)
    assert sum(p[1] for p in true_partitions(stream)) == writers * per_writer
    assert stream.partitions_dataframe().attrs["unprojected_messages"] == true_backlog(stream) == 0


def test_count_text() -> None:
    assert str(Count(1234)) == "1,234" and Count(5).exact
    assert str(Count(1_000_000, ABOUT)) == "about 1,000,000"
    assert Count.capped(11, 10) == Count(10, MORE_THAN) and Count.capped(10, 10) == Count(10)
    assert not Count(10, MORE_THAN).exact

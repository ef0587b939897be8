"""Writing to a message store: versions, optimistic concurrency, atomicity, synchronize, stream names."""

from __future__ import annotations

import random
import uuid

import pydantic
import pytest
import sqlalchemy as sa

from depeche_nb import (
    DuplicateMessageIdError,
    MessageIdMismatchError,
    MessagePosition,
    MessageSerializationError,
    MessageStore,
    OptimisticConcurrencyError,
    Storage,
)
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered, Renamed

pytestmark = pytest.mark.both_drivers


class Holder(Numbered):
    """A message whose `extra` may hold something JSON cannot express."""

    extra: object = None


def row_count(store: MessageStore, stream: str | None = None) -> int:
    """Rows in the store's table (of one stream, if given), read with plain SQL."""
    table = Storage.message_table_name(store.name)
    sql = f'SELECT count(*) FROM "{table}"'
    params: tuple[str, ...] = ()
    if stream is not None:
        sql += " WHERE stream = %s"
        params = (stream,)
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql(sql, params).scalar_one())


def versions(store: MessageStore, stream: str) -> list[int]:
    return [m.version for m in store.read(stream)]


# -- versions and global positions -----------------------------------------------------------------


def test_first_write_on_fresh_store_is_version_1_global_position_1(store: MessageStore) -> None:
    assert store.write("s", Numbered(number=0)) == MessagePosition("s", 1, 1)


def test_versions_are_gapless_from_1_and_global_positions_increase(store: MessageStore) -> None:
    positions = [store.write("s", Numbered(number=i)) for i in range(6)]

    assert [p.version for p in positions] == [1, 2, 3, 4, 5, 6]
    assert all(p.stream == "s" for p in positions)
    global_positions = [p.global_position for p in positions]
    assert all(isinstance(g, int) for g in global_positions)
    assert global_positions == sorted(set(global_positions))  # unique and strictly increasing

    stored = list(store.read("s"))
    assert [m.version for m in stored] == [1, 2, 3, 4, 5, 6]
    assert [m.message.number for m in stored] == [0, 1, 2, 3, 4, 5]
    assert [m.global_position for m in stored] == global_positions


def test_versions_are_per_stream(store: MessageStore) -> None:
    got = []
    for i in range(4):
        got.append(store.write("a", Numbered(number=i)).version)
        got.append(store.write("b", Numbered(number=i)).version)
    assert got == [1, 1, 2, 2, 3, 3, 4, 4]
    assert versions(store, "a") == [1, 2, 3, 4]
    assert versions(store, "b") == [1, 2, 3, 4]
    all_positions = [m.global_position for s in ("a", "b") for m in store.read(s)]
    assert len(set(all_positions)) == 8  # global positions are unique across streams


def test_write_all_assigns_consecutive_versions_and_returns_last(store: MessageStore) -> None:
    store.write("s", Numbered(number=0))
    batch = [Numbered(number=i) for i in range(1, 5)]
    pos = store.write_all("s", batch)

    assert pos.version == 5
    stored = list(store.read("s"))
    assert [m.version for m in stored] == [1, 2, 3, 4, 5]
    assert [m.message for m in stored[1:]] == batch
    assert pos.global_position == stored[-1].global_position
    assert [m.global_position for m in stored] == sorted(m.global_position for m in stored)


def test_write_all_of_nothing_is_a_value_error(store: MessageStore) -> None:
    with pytest.raises(ValueError):
        store.write_all("s", [])
    assert row_count(store) == 0


# -- expected_version -----------------------------------------------------------------------------


def test_expected_version_none_writes_unconditionally(store: MessageStore) -> None:
    store.write("s", Numbered(number=1))
    store.write("s", Numbered(number=2))
    assert store.write("s", Numbered(number=3), expected_version=None).version == 3


def test_expected_version_0_means_stream_must_be_empty(store: MessageStore) -> None:
    assert store.write("s", Numbered(number=1), expected_version=0).version == 1

    with pytest.raises(OptimisticConcurrencyError) as info:
        store.write("s", Numbered(number=2), expected_version=0)
    assert "s" in str(info.value)
    assert versions(store, "s") == [1]


def test_expected_version_n_must_match_head(store: MessageStore) -> None:
    for i in range(3):
        store.write("s", Numbered(number=i))

    assert store.write("s", Numbered(number=3), expected_version=3).version == 4
    for wrong in (0, 1, 3, 5, 100):
        with pytest.raises(OptimisticConcurrencyError):
            store.write("s", Numbered(number=99), expected_version=wrong)
    assert versions(store, "s") == [1, 2, 3, 4]
    assert all(m.message.number != 99 for m in store.read("s"))


def test_write_all_expected_version_mismatch_writes_nothing(store: MessageStore) -> None:
    store.write("s", Numbered(number=0))
    batch = [Numbered(number=i) for i in range(5)]
    with pytest.raises(OptimisticConcurrencyError):
        store.write_all("s", batch, expected_version=0)
    assert row_count(store) == 1

    assert store.write_all("s", batch, expected_version=1).version == 6
    assert versions(store, "s") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("expected_version", [2**31, 2**40, 2**63 - 1, 2**70])
def test_out_of_range_expected_version_is_a_clear_error(store: MessageStore, expected_version: int) -> None:
    """No stream can be at such a version, so this is a concurrency mismatch (or a ValueError),
    never a raw driver error."""
    store.write("s", Numbered(number=0))
    with pytest.raises((OptimisticConcurrencyError, ValueError)):
        store.write("s", Numbered(number=1), expected_version=expected_version)
    assert row_count(store) == 1


@pytest.mark.parametrize("expected_version", [-1, -100])
def test_negative_expected_version_is_value_error(store: MessageStore, expected_version: int) -> None:
    with pytest.raises(ValueError):
        store.write("s", Numbered(number=1), expected_version=expected_version)
    with pytest.raises(ValueError):
        store.write_all("s", [Numbered(number=1)], expected_version=expected_version)
    assert row_count(store) == 0


@pytest.mark.parametrize("expected_version", [True, False, "1", "0", 1.0, 0.0])
def test_non_int_expected_version_is_type_error(store: MessageStore, expected_version: object) -> None:
    store.write("s", Numbered(number=0))  # head is 1: True would equal it if treated as int
    with pytest.raises(TypeError):
        store.write("s", Numbered(number=1), expected_version=expected_version)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.synchronize("s", expected_version, [Numbered(number=1)])  # type: ignore[arg-type]
    assert row_count(store) == 1


def test_concurrency_error_on_caller_conn_writes_nothing(engine: sa.Engine, store: MessageStore) -> None:
    store.write("s", Numbered(number=0))
    with engine.connect() as conn:
        store.write("other", Numbered(number=1), conn=conn)
        with pytest.raises(OptimisticConcurrencyError):
            store.write("s", Numbered(number=2), expected_version=5, conn=conn)
        conn.rollback()
    assert row_count(store) == 1
    assert versions(store, "s") == [1]


# -- atomicity and duplicate ids ------------------------------------------------------------------


def test_batch_with_duplicate_id_inside_leaves_no_row(store: MessageStore) -> None:
    first = Numbered(number=1)
    with pytest.raises(DuplicateMessageIdError):
        store.write_all("s", [first, Numbered(number=2), first])
    assert row_count(store) == 0
    # the stream is still empty: a later write starts at version 1
    assert store.write("s", Numbered(number=3)).version == 1


def test_batch_with_id_already_stored_leaves_no_row(store: MessageStore) -> None:
    existing = Numbered(number=0)
    store.write("other", existing)
    with pytest.raises(DuplicateMessageIdError):
        store.write_all("s", [Numbered(number=1), Numbered(number=2), existing])
    assert row_count(store, "s") == 0
    assert row_count(store) == 1


def test_duplicate_message_id_is_rejected_and_versions_stay_gapless(store: MessageStore) -> None:
    message = Numbered(number=1)
    store.write("s", message)
    with pytest.raises(DuplicateMessageIdError) as info:
        store.write("s", message)
    assert isinstance(info.value, ValueError)
    with pytest.raises(DuplicateMessageIdError):
        store.write("elsewhere", message)
    assert row_count(store) == 1
    assert store.write("s", Numbered(number=2)).version == 2


def test_duplicate_message_id_on_caller_conn(engine: sa.Engine, store: MessageStore) -> None:
    message = Numbered(number=1)
    store.write("s", message)
    with engine.connect() as conn:
        with pytest.raises(DuplicateMessageIdError):
            store.write("s", message, conn=conn)
        conn.rollback()
    assert row_count(store) == 1


def test_batch_with_non_serialisable_message_leaves_no_row(engine: sa.Engine, unique_name: str) -> None:
    store = MessageStore(
        name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered | Holder)
    )
    batch = [Numbered(number=1), Holder(number=2, extra=object()), Numbered(number=3)]
    with pytest.raises(MessageSerializationError):
        store.write_all("s", batch)
    assert row_count(store) == 0


def test_batch_with_message_of_unknown_type_leaves_no_row(store: MessageStore) -> None:
    with pytest.raises(MessageSerializationError):
        store.write_all("s", [Numbered(number=1), Renamed(name="x")])  # type: ignore[list-item]
    assert row_count(store) == 0


def test_batch_with_non_message_leaves_no_row(store: MessageStore) -> None:
    with pytest.raises(MessageSerializationError):
        store.write_all("s", [Numbered(number=1), {"number": 2}])  # type: ignore[list-item]
    assert row_count(store) == 0


# -- synchronize ----------------------------------------------------------------------------------


def test_synchronize_sequence_from_depeche_docs(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(4)]

    assert store.synchronize("s", 0, events[0:3]).version == 3
    again = store.synchronize("s", 0, events[0:3])  # stale expected_version, nothing new: idempotent
    assert again.version == 3
    assert row_count(store) == 3
    assert store.synchronize("s", 3, events[0:4]).version == 4
    assert [m.message for m in store.read("s")] == events


def test_synchronize_returns_head_position_when_nothing_is_new(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(3)]
    written = store.synchronize("s", 0, events)
    assert store.synchronize("s", 0, events) == written
    assert store.synchronize("s", None, events) == written


def test_synchronize_prefix_is_skipped(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(5)]
    head = store.synchronize("s", 0, events)
    assert head.version == 5

    # a strict prefix of the stored history: no error, no write, the head is returned
    assert store.synchronize("s", 2, events[:2]) == head
    assert store.synchronize("s", 0, []) == head
    assert row_count(store) == 5


def test_synchronize_empty_stream_with_nothing(store: MessageStore) -> None:
    assert store.synchronize("s", 0, []) == MessagePosition("s", 0, None)
    assert row_count(store) == 0


def test_synchronize_appends_only_the_new_tail(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(6)]
    store.synchronize("s", 0, events[:2])
    pos = store.synchronize("s", 2, events)
    assert pos.version == 6
    stored = list(store.read("s"))
    assert [m.message_id for m in stored] == [e.message_id for e in events]
    assert [m.version for m in stored] == [1, 2, 3, 4, 5, 6]


def test_synchronize_id_mismatch(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(3)]
    store.synchronize("s", 0, events)
    changed = [events[0], Numbered(number=99), events[2], Numbered(number=3)]

    with pytest.raises(MessageIdMismatchError):
        store.synchronize("s", 3, changed)
    assert row_count(store) == 3
    assert [m.message for m in store.read("s")] == events


def test_synchronize_id_mismatch_is_a_value_error(store: MessageStore) -> None:
    """Depeche DB: `MessageIdMismatchError(ValueError)`, so callers catch it as ValueError."""
    store.synchronize("s", 0, [Numbered(number=1)])
    with pytest.raises(ValueError):
        store.synchronize("s", 1, [Numbered(number=2), Numbered(number=3)])
    assert issubclass(MessageIdMismatchError, ValueError)
    assert row_count(store) == 1


def test_synchronize_expected_version_mismatch(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(5)]
    store.synchronize("s", 0, events[:3])

    for wrong in (0, 2, 4):
        with pytest.raises(OptimisticConcurrencyError):
            store.synchronize("s", wrong, events)
    assert row_count(store) == 3
    assert store.synchronize("s", 3, events).version == 5


def test_synchronize_without_expected_version_appends_tail(store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(4)]
    store.synchronize("s", None, events[:1])
    assert store.synchronize("s", None, events).version == 4
    assert [m.message for m in store.read("s")] == events


def test_synchronize_on_caller_conn_is_invisible_until_commit(engine: sa.Engine, store: MessageStore) -> None:
    events = [Numbered(number=i) for i in range(3)]
    with engine.connect() as conn:
        assert store.synchronize("s", 0, events, conn=conn).version == 3
        assert row_count(store) == 0
        # the caller's own transaction sees its writes, so a re-sync there is a no-op
        assert store.synchronize("s", 0, events, conn=conn).version == 3
        conn.commit()
    assert [m.message for m in store.read("s")] == events


# -- caller-owned transactions --------------------------------------------------------------------


def test_caller_conn_write_is_invisible_until_commit(engine: sa.Engine, store: MessageStore) -> None:
    with engine.connect() as conn:
        first = store.write("s", Numbered(number=1), conn=conn)
        second = store.write("s", Numbered(number=2), conn=conn)
        assert (first.version, second.version) == (1, 2)
        assert list(store.read("s")) == []
        assert row_count(store) == 0
        with store.reader(conn=conn) as reader:
            assert [m.version for m in reader.read("s")] == [1, 2]
        conn.commit()
    assert versions(store, "s") == [1, 2]
    assert [m.global_position for m in store.read("s")] == [first.global_position, second.global_position]


def test_caller_conn_rollback_discards_writes(engine: sa.Engine, store: MessageStore) -> None:
    with engine.connect() as conn:
        store.write("s", Numbered(number=1), conn=conn)
        store.write_all("s", [Numbered(number=2), Numbered(number=3)], conn=conn)
        conn.rollback()
    assert row_count(store) == 0
    assert store.write("s", Numbered(number=4)).version == 1


def test_caller_conn_closed_without_commit_discards_writes(engine: sa.Engine, store: MessageStore) -> None:
    with engine.connect() as conn:
        store.write("s", Numbered(number=1), conn=conn)
    assert row_count(store) == 0


def test_caller_conn_commits_together_with_callers_own_statements(
    engine: sa.Engine, store: MessageStore, unique_name: str
) -> None:
    side = f"{unique_name}_side"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{side}" (n int)')
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'INSERT INTO "{side}" VALUES (1)')
            store.write("s", Numbered(number=1), conn=conn)
            conn.rollback()
            conn.exec_driver_sql(f'INSERT INTO "{side}" VALUES (2)')
            store.write("s", Numbered(number=2), conn=conn)
            conn.commit()
        with engine.connect() as conn:
            assert conn.exec_driver_sql(f'SELECT n FROM "{side}"').scalars().all() == [2]
        assert [m.message.number for m in store.read("s")] == [2]
        assert versions(store, "s") == [1]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP TABLE "{side}"')


@pytest.mark.parametrize("long_name", [False, True], ids=["short-name", "40-char-name"])
@pytest.mark.parametrize("isolation_level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_stale_snapshot_write_is_a_concurrency_error(
    engine: sa.Engine, unique_name: str, long_name: bool, isolation_level: str
) -> None:
    """A caller transaction whose snapshot predates the stream head cannot append after it.

    The write function computes the head from the caller's snapshot; the unique
    (stream, version) constraint rejects the clash, and that must be reported as
    `OptimisticConcurrencyError` for every valid store name, including names of
    the maximum length (40 characters).
    """
    name = unique_name.ljust(40, "x") if long_name else unique_name
    store = MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
    with engine.connect().execution_options(isolation_level=isolation_level) as conn:
        conn.exec_driver_sql("SELECT 1")  # takes the transaction snapshot
        store.write("s", Numbered(number=1))  # committed by someone else afterwards
        with pytest.raises(OptimisticConcurrencyError):
            store.write("s", Numbered(number=2), conn=conn)
        conn.rollback()
    assert [m.message.number for m in store.read("s")] == [1]


# -- stream names ---------------------------------------------------------------------------------


def _mixed_unicode_255() -> str:
    rng = random.Random(1234)
    pools = [
        "abcXYZ019",
        "'\"`%_\\;-- /*",
        "äöüßéñçøå",
        "日本語中文한국어",
        "🎉🚀💥🧪🐍",
        "\t \u00a0\u2028",
        "ЖжЩщΩπ",
    ]
    chars = "".join(pools)
    return "".join(rng.choice(chars) for _ in range(255))


STREAM_NAMES = [
    "'; DROP TABLE x; --",
    'quote"double',
    "it's",
    "back\\slash",
    "%",
    "_",
    "100%_sure",
    "a%b_c",
    "emoji-🎉🚀🐍",
    "日本語のストリーム",
    "  spaces around  ",
    "line\nbreak\ttab",
    "$1 $$body$$ %s %(x)s {0}",
    "x" * 255,
    "🐍" * 255,
    _mixed_unicode_255(),
]


@pytest.mark.parametrize("stream", STREAM_NAMES, ids=range(len(STREAM_NAMES)))
def test_stream_names_are_stored_and_read_back_exactly(store: MessageStore, stream: str) -> None:
    message = Numbered(number=7)
    pos = store.write(stream, message)
    assert pos.stream == stream
    assert pos.version == 1
    assert store.write(stream, Numbered(number=8), expected_version=1).version == 2

    stored = list(store.read(stream))
    assert [m.stream for m in stored] == [stream, stream]
    assert stored[0].message == message

    table = Storage.message_table_name(store.name)
    with store.engine.connect() as conn:
        raw = conn.exec_driver_sql(f'SELECT DISTINCT stream FROM "{table}"').scalars().all()
        assert raw == [stream]
        assert store._storage.get_max_version(conn, stream).version == 2
    with store.reader() as reader:
        assert reader.get_message_by_id(message.message_id).stream == stream
    # no other stream name is treated as equal to it (same length, last character changed; prefix)
    other = stream[:-1] + ("y" if stream[-1] != "y" else "z")
    assert list(store.read(other)) == []
    if len(stream) > 1:
        assert list(store.read(stream[:-1])) == []


@pytest.mark.parametrize(
    "stream", ["x" * 256, "🐍" * 256, "é" * 300, "a\x00b"], ids=["256-ascii", "256-emoji", "300", "nul"]
)
def test_invalid_stream_names_are_value_errors_and_write_nothing(store: MessageStore, stream: str) -> None:
    with pytest.raises(ValueError):
        store.write(stream, Numbered(number=1))
    with pytest.raises(ValueError):
        store.write_all(stream, [Numbered(number=1), Numbered(number=2)])
    with pytest.raises(ValueError):
        store.synchronize(stream, 0, [Numbered(number=1)])
    assert row_count(store) == 0


def test_empty_stream_name_is_a_value_error(store: MessageStore) -> None:
    with pytest.raises(ValueError):
        store.write("", Numbered(number=1))
    with pytest.raises(ValueError):
        store.synchronize("", 0, [Numbered(number=1)])
    assert row_count(store) == 0


@pytest.mark.parametrize("stream", [None, 42, b"bytes", ["s"], uuid.UUID(int=1)])
def test_non_str_stream_name_is_a_type_error(store: MessageStore, stream: object) -> None:
    with pytest.raises(TypeError):
        store.write(stream, Numbered(number=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.write_all(stream, [Numbered(number=1)])  # type: ignore[arg-type]
    assert row_count(store) == 0


def test_message_that_is_not_a_message_writes_nothing(store: MessageStore) -> None:
    class NoId(pydantic.BaseModel):
        number: int

    with pytest.raises(MessageSerializationError):
        store.write("s", NoId(number=1))  # type: ignore[arg-type]
    assert row_count(store) == 0

"""Reading a message store: streams, wildcards, lookups by id, truncate, the low-level `Storage`."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from depeche_nb import (
    MessageNotFound,
    MessagePosition,
    MessageStore,
    MessageStoreReader,
    Storage,
    StoredMessage,
)
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


def fill(store: MessageStore, streams: list[str]) -> list[tuple[str, Numbered, MessagePosition]]:
    """Write one message per entry of `streams` (in that order); return what went where."""
    written = []
    for i, stream in enumerate(streams):
        message = Numbered(number=i, text=stream)
        written.append((stream, message, store.write(stream, message)))
    return written


# -- read -----------------------------------------------------------------------------------------


def test_read_yields_stream_in_version_order(store: MessageStore) -> None:
    written = fill(store, ["a", "b", "a", "c", "a", "b"])
    stored = list(store.read("a"))
    assert [m.version for m in stored] == [1, 2, 3]
    assert [m.message for m in stored] == [w[1] for w in written if w[0] == "a"]
    assert all(m.stream == "a" for m in stored)


def test_read_min_version(store: MessageStore) -> None:
    for i in range(5):
        store.write("s", Numbered(number=i))
    assert [m.version for m in store.read("s", min_version=3)] == [3, 4, 5]
    assert [m.version for m in store.read("s", min_version=5)] == [5]
    assert [m.version for m in store.read("s", min_version=6)] == []
    assert [m.version for m in store.read("s", min_version=1)] == [1, 2, 3, 4, 5]
    assert [m.version for m in store.read("s", min_version=0)] == [1, 2, 3, 4, 5]
    assert [m.version for m in store.read("s", min_version=None)] == [1, 2, 3, 4, 5]
    with store.reader() as reader:
        assert [m.message.number for m in reader.read("s", min_version=4)] == [3, 4]


def test_read_unknown_stream_yields_nothing(store: MessageStore) -> None:
    store.write("s", Numbered(number=1))
    assert list(store.read("nope")) == []
    assert list(store.read("S")) == []  # names are case sensitive
    with store.reader() as reader:
        assert list(reader.read("nope")) == []


def test_read_is_lazy_and_sees_data_committed_before_iteration(store: MessageStore) -> None:
    it = store.read("s")  # a generator: no query yet
    store.write("s", Numbered(number=1))
    assert [m.message.number for m in it] == [1]


# -- stored message fields ------------------------------------------------------------------------


def test_stored_message_fields(engine: sa.Engine, store: MessageStore) -> None:
    with engine.connect() as conn:
        before = conn.exec_driver_sql("SELECT now()").scalar_one()
    message = Numbered(number=42, text="hello")
    pos = store.write("s", message)
    with engine.connect() as conn:
        after = conn.exec_driver_sql("SELECT now()").scalar_one()

    (stored,) = store.read("s")
    assert isinstance(stored, StoredMessage)
    assert isinstance(stored.message_id, uuid.UUID)
    assert stored.message_id == message.message_id
    assert stored.stream == "s"
    assert stored.version == 1
    assert stored.message == message
    assert type(stored.message) is Numbered
    assert stored.global_position == pos.global_position
    # Depeche DB's shape: a naive datetime in UTC.
    assert isinstance(stored.added_at, dt.datetime)
    assert stored.added_at.tzinfo is None
    added_utc = stored.added_at.replace(tzinfo=dt.timezone.utc)
    assert before <= added_utc <= after


def test_stored_message_is_frozen(store: MessageStore) -> None:
    store.write("s", Numbered(number=1))
    (stored,) = store.read("s")
    with pytest.raises(AttributeError):
        stored.version = 5  # type: ignore[misc]


# -- wildcards ------------------------------------------------------------------------------------


WILDCARD_STREAMS = ["order-1", "order-2", "order-10", "order_1", "orderX1", "invoice-1", "Order-3"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("order-%", {"order-1", "order-2", "order-10"}),
        ("order-_", {"order-1", "order-2"}),
        ("order__", {"order-1", "order-2", "order_1", "orderX1"}),
        ("order%", {"order-1", "order-2", "order-10", "order_1", "orderX1"}),
        ("%-1", {"order-1", "invoice-1"}),
        ("%1%", {"order-1", "order-10", "order_1", "orderX1", "invoice-1"}),
        ("order-1", {"order-1"}),
        ("order\\_1", {"order_1"}),  # LIKE's default escape character
        ("%", set(WILDCARD_STREAMS)),
        ("nothing%", set()),
        ("Order%", {"Order-3"}),  # LIKE is case sensitive
    ],
)
def test_read_wildcard_like_semantics(store: MessageStore, pattern: str, expected: set[str]) -> None:
    fill(store, WILDCARD_STREAMS)
    assert {m.stream for m in store.read_wildcard(pattern)} == expected
    with store.reader() as reader:
        assert {m.stream for m in reader.read_wildcard(pattern)} == expected


def test_read_wildcard_orders_by_global_position(store: MessageStore) -> None:
    order = ["a-1", "a-2", "a-1", "b-1", "a-2", "a-3", "a-1"]
    written = fill(store, order)
    expected = [(s, m.message_id) for s, m, _ in written if s.startswith("a-")]

    got = list(store.read_wildcard("a-%"))
    assert [(m.stream, m.message_id) for m in got] == expected
    assert [m.global_position for m in got] == sorted(m.global_position for m in got)
    # within each stream, version order is kept
    for stream in ("a-1", "a-2", "a-3"):
        assert [m.version for m in got if m.stream == stream] == list(
            range(1, 1 + sum(1 for s in order if s == stream))
        )
    with store.reader() as reader:
        assert [(m.stream, m.message_id) for m in reader.read_wildcard("a-%")] == expected


def test_read_wildcard_rejects_non_str(store: MessageStore) -> None:
    with pytest.raises(TypeError):
        list(store.read_wildcard(None))  # type: ignore[arg-type]
    with store.reader() as reader, pytest.raises(TypeError):
        list(reader.read_wildcard(["a-%"]))  # type: ignore[arg-type]


def test_reader_on_caller_conn_sees_uncommitted_data(engine: sa.Engine, store: MessageStore) -> None:
    with engine.connect() as conn:
        message = Numbered(number=1)
        store.write("s-1", message, conn=conn)
        with store.reader(conn=conn) as reader:
            assert isinstance(reader, MessageStoreReader)
            assert [m.message for m in reader.read("s-1")] == [message]
            assert [m.message for m in reader.read_wildcard("s-%")] == [message]
            assert reader.get_message_by_id(message.message_id).message == message
        assert list(store.read_wildcard("s-%")) == []
        conn.rollback()


def _prepared_reads(conn: sa.Connection, store: MessageStore) -> int:
    """How many statements named like ours this session holds that read the store's table."""
    return int(
        conn.exec_driver_sql(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'depeche\\_nb\\_%%' "
            "AND statement LIKE %s",
            (f"%{store._storage.names.messages_table}%",),
        ).scalar_one()
    )


def test_a_store_opened_reader_reads_with_a_prepared_statement_and_survives_its_loss(
    store: MessageStore,
) -> None:
    """psycopg2 has no prepared statements of its own: on the connection the store opened for
    the reader, the read is prepared once, so the server does not plan it again per stream
    (psycopg 3 prepares by itself). If the session loses it in between (DEALLOCATE ALL, as a
    pooler's DISCARD does), the next read prepares it again instead of failing."""
    fill(store, ["a", "b", "a"])
    psycopg2 = store.engine.dialect.driver == "psycopg2"
    with store.reader() as reader:
        assert [m.version for m in reader.read("a")] == [1, 2]
        assert _prepared_reads(reader._conn, store) == (1 if psycopg2 else 0)
        reader._conn.exec_driver_sql("DEALLOCATE ALL")
        assert [m.version for m in reader.read("a")] == [1, 2]
        assert [m.version for m in reader.read("b")] == [1]
        assert _prepared_reads(reader._conn, store) == (1 if psycopg2 else 0)


def test_a_reader_on_a_callers_connection_prepares_nothing_there(
    engine: sa.Engine, store: MessageStore
) -> None:
    """A lost prepared statement would abort the caller's transaction, so none is made there."""
    fill(store, ["a"])
    with engine.connect() as conn:
        with store.reader(conn=conn) as reader:
            assert [m.version for m in reader.read("a")] == [1]
        assert _prepared_reads(conn, store) == 0
        conn.rollback()


# -- lookups by id --------------------------------------------------------------------------------


def test_get_message_by_id(store: MessageStore) -> None:
    written = fill(store, ["a", "b", "a"])
    with store.reader() as reader:
        for stream, message, pos in written:
            stored = reader.get_message_by_id(message.message_id)
            assert stored.message == message
            assert stored.stream == stream
            assert stored.version == pos.version
            assert stored.global_position == pos.global_position


def test_get_message_by_id_unknown_raises_message_not_found(store: MessageStore) -> None:
    store.write("s", Numbered(number=1))
    missing = uuid.uuid4()
    with store.reader() as reader, pytest.raises(MessageNotFound) as info:
        reader.get_message_by_id(missing)
    assert str(missing) in str(info.value)


def test_get_messages_by_ids_skips_unknown_ids(store: MessageStore) -> None:
    written = fill(store, ["a", "b", "c", "a"])
    wanted = [written[3][1].message_id, uuid.uuid4(), written[0][1].message_id, written[2][1].message_id]
    with store.reader() as reader:
        got = list(reader.get_messages_by_ids(wanted))
        assert {m.message_id for m in got} == {wanted[0], wanted[2], wanted[3]}
        assert len(got) == 3
        assert [m.global_position for m in got] == sorted(m.global_position for m in got)
        assert list(reader.get_messages_by_ids([uuid.uuid4(), uuid.uuid4()])) == []
        assert list(reader.get_messages_by_ids([])) == []


# -- truncate -------------------------------------------------------------------------------------


def test_truncate_deletes_everything_and_streams_restart_at_version_1(store: MessageStore) -> None:
    written = fill(store, ["a", "b", "a"])
    last_global = max(pos.global_position for _, _, pos in written)

    store.truncate()

    assert list(store.read("a")) == []
    assert list(store.read_wildcard("%")) == []
    with store.reader() as reader, pytest.raises(MessageNotFound):
        reader.get_message_by_id(written[0][1].message_id)
    pos = store.write("a", Numbered(number=9))
    assert pos.version == 1
    assert pos.global_position > last_global  # global positions are never reused


def test_truncate_only_touches_its_own_store(
    engine: sa.Engine, store: MessageStore, unique_name: str
) -> None:
    other = MessageStore(
        name=f"{unique_name}_o", engine=engine, serializer=PydanticMessageSerializer(Numbered)
    )
    store.write("s", Numbered(number=1))
    other.write("s", Numbered(number=2))
    store.truncate()
    assert list(store.read("s")) == []
    assert [m.message.number for m in other.read("s")] == [2]


# -- Storage (low level) --------------------------------------------------------------------------


def test_storage_names(store: MessageStore, unique_name: str) -> None:
    storage = store._storage
    assert isinstance(storage, Storage)
    assert storage.name == unique_name
    assert Storage.message_table_name(unique_name) != Storage.message_table_name(unique_name + "x")
    assert Storage.notification_channel_name(unique_name) == store.notification_channel
    assert storage.notification_channel == store.notification_channel


def test_storage_positions(engine: sa.Engine, store: MessageStore) -> None:
    storage = store._storage
    with engine.connect() as conn:
        assert storage.get_global_position(conn) == 0
        assert storage.get_max_version(conn, "s") == MessagePosition("s", 0, None)

    written = fill(store, ["s", "t", "s", "s", "t"])

    with engine.connect() as conn:
        last = written[-1][2]
        assert storage.get_global_position(conn) == last.global_position
        s_head = [pos for stream, _, pos in written if stream == "s"][-1]
        assert storage.get_max_version(conn, "s") == MessagePosition("s", 3, s_head.global_position)
        assert storage.get_max_version(conn, "t") == last
        assert storage.get_max_version(conn, "empty") == MessagePosition("empty", 0, None)
        assert list(storage.get_message_ids(conn, "s")) == [m.message_id for st, m, _ in written if st == "s"]


def test_storage_reads_return_rows(engine: sa.Engine, store: MessageStore) -> None:
    storage = store._storage
    written = fill(store, ["s", "t", "s", "u"])
    with engine.connect() as conn:
        rows = list(storage.read(conn, "s"))
        assert [row.version for row in rows] == [1, 2]
        assert [row.message["number"] for row in rows] == [0, 2]
        assert [row.message["__typename__"] for row in rows] == ["Numbered", "Numbered"]
        assert [row.version for row in storage.read(conn, "s", min_version=2)] == [2]

        multiple = list(storage.read_multiple(conn, ["s", "u"]))
        assert [(row.stream, row.version) for row in multiple] == [("s", 1), ("s", 2), ("u", 1)]
        positions = [row.global_position for row in multiple]
        assert positions == sorted(positions)

        wildcard = list(storage.read_wildcard(conn, "%"))
        assert [row.message_id for row in wildcard] == [m.message_id for _, m, _ in written]

        row = storage.get_message_by_id(conn, written[1][1].message_id)
        assert row is not None
        assert (row.stream, row.version) == ("t", 1)
        assert storage.get_message_by_id(conn, uuid.uuid4()) is None

        ids = [written[0][1].message_id, uuid.uuid4(), written[3][1].message_id]
        assert {r.message_id for r in storage.get_messages_by_ids(conn, ids)} == {ids[0], ids[2]}


def test_storage_add_and_add_all_in_caller_transaction(engine: sa.Engine, store: MessageStore) -> None:
    storage = store._storage
    first = Numbered(number=1)
    batch = [Numbered(number=2), Numbered(number=3)]
    serializer = store.serializer
    with engine.connect() as conn:
        pos = storage.add(conn, "s", 0, first.message_id, serializer.serialize(first))
        assert pos.version == 1
        last = storage.add_all(conn, "s", 1, [(m.message_id, serializer.serialize(m)) for m in batch])
        assert last.version == 3
        assert list(store.read("s")) == []  # Storage never commits
        conn.commit()
    assert [m.message for m in store.read("s")] == [first, *batch]


def test_storage_truncate_in_caller_transaction(engine: sa.Engine, store: MessageStore) -> None:
    fill(store, ["s", "s"])
    with engine.connect() as conn:
        store._storage.truncate(conn)
        conn.rollback()
    assert len(list(store.read("s"))) == 2
    with engine.begin() as conn:
        store._storage.truncate(conn)
    assert list(store.read("s")) == []


def test_two_store_objects_share_one_table(engine: sa.Engine, store: MessageStore, unique_name: str) -> None:
    again = MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
    message = Numbered(number=5)
    store.write("s", message)
    assert [m.message for m in again.read("s")] == [message]
    assert again.write("s", Numbered(number=6), expected_version=1).version == 2

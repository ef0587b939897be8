"""DataFrame views: exact columns, dtypes and contents on known data, against the real database.

No `from __future__ import annotations`: handler annotations must be real objects.
"""

import dataclasses
import datetime as dt
import uuid
from typing import Any

import pandas as pd
import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import MessageHandlerRegister, StoredMessage
from depeche_nb.core.display import DEFAULT_LIMIT
from depeche_nb.notebook.views.kit import MESSAGE_COLUMNS
from depeche_nb.tools import DbLockProvider, PydanticMessageSerializer
from tests.support import _Message

pytestmark = pytest.mark.both_drivers

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
STR = pd.Series(["x"]).dtype  # pandas' default string dtype, whatever the version
TS = "datetime64[us, UTC]"


class Opened(_Message):
    account: str
    owner: dict[str, Any]
    tags: list[str]


class Deposited(_Message):
    account: str
    amount: int
    note: str | None = None


class AccountPartitioner:
    """`account-<n>` goes to partition n % 2."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        return int(message.stream.rsplit("-", 1)[1]) % 2


@dataclasses.dataclass
class Bank:
    store: depeche_nb.MessageStore[Any]
    ids: list[uuid.UUID]  # in write (= global) order
    gps: list[int]


def _msg(cls: type, n: int, **fields: Any) -> Any:
    return cls(message_id=uuid.UUID(int=n), occurred_at=T0 + dt.timedelta(minutes=n), **fields)


@pytest.fixture
def bank(engine: sa.Engine, unique_name: str) -> Bank:
    store: depeche_nb.MessageStore[Any] = depeche_nb.MessageStore(
        unique_name, engine, PydanticMessageSerializer(Opened | Deposited)
    )
    writes = [
        (
            "account-1",
            _msg(Opened, 1, account="1", owner={"name": "Ann", "address": {"city": "Oslo"}}, tags=["a"]),
        ),
        ("account-2", _msg(Opened, 2, account="2", owner={"name": "Bo"}, tags=[])),
        ("account-1", _msg(Deposited, 3, account="1", amount=10)),
        ("account-2", _msg(Deposited, 4, account="2", amount=5, note="hi")),
        ("audit-1", _msg(Deposited, 5, account="1", amount=7)),
    ]
    gps = []
    for stream, message in writes:
        position = store.write(stream, message)
        assert position.global_position is not None
        gps.append(position.global_position)
    return Bank(store, [m.message_id for _, m in writes], gps)


# -- store: messages ------------------------------------------------------------------------------


def test_whole_store_columns_dtypes_and_flattened_payload(bank: Bank) -> None:
    frame = bank.store.to_dataframe()
    assert tuple(frame.columns[:6]) == MESSAGE_COLUMNS
    assert set(frame.columns[6:]) == {
        "account",
        "amount",
        "note",
        "owner",
        "tags",
        "occurred_at",
        "message.message_id",  # the payload's own key, renamed: it equals a fixed column
    }
    assert frame.dtypes["global_position"] == "int64"
    assert frame.dtypes["version"] == "int64"
    assert frame.dtypes["stream"] == STR
    assert frame.dtypes["message_id"] == STR
    assert frame.dtypes["message_type"] == STR
    assert str(frame.dtypes["added_at"]) == TS
    assert frame.dtypes["account"] == STR
    # The payload's own id holds the id column's very strings, not copies.
    assert frame["message.message_id"].tolist() == frame["message_id"].tolist()
    assert frame.dtypes["amount"] == "Int64"  # integers, missing in the Opened rows
    assert frame.dtypes["owner"] == "object"  # nested objects stay dicts
    assert frame.dtypes["tags"] == "object"

    assert frame["global_position"].tolist() == bank.gps
    assert frame["stream"].tolist() == ["account-1", "account-2", "account-1", "account-2", "audit-1"]
    assert frame["version"].tolist() == [1, 1, 2, 2, 1]
    assert frame["message_id"].tolist() == [str(i) for i in bank.ids]
    assert frame["message.message_id"].tolist() == [str(i) for i in bank.ids]
    assert frame["message_type"].tolist() == ["Opened", "Opened", "Deposited", "Deposited", "Deposited"]
    assert frame.loc[0, "owner"] == {"name": "Ann", "address": {"city": "Oslo"}}
    assert frame.loc[1, "tags"] == []
    assert frame["amount"].tolist() == [pd.NA, pd.NA, 10, 5, 7]
    assert frame.loc[3, "note"] == "hi"
    assert frame["note"].isna().tolist() == [True, True, True, False, True]
    assert frame["account"].tolist() == ["1", "2", "1", "2", "1"]
    # Both models type it as a datetime: a timestamp column, not ISO strings.
    assert str(frame.dtypes["occurred_at"]) == TS
    assert frame["occurred_at"].iloc[0] == pd.Timestamp(T0 + dt.timedelta(minutes=1))
    assert frame["added_at"].is_monotonic_increasing
    assert frame.attrs["more_available"] is False


def test_one_stream_by_version(bank: Bank) -> None:
    frame = bank.store.to_dataframe(stream="account-1")
    assert frame["version"].tolist() == [1, 2]
    assert frame["global_position"].tolist() == [bank.gps[0], bank.gps[2]]
    assert set(frame["stream"]) == {"account-1"}
    assert bank.store.to_dataframe(stream="nope").empty


def test_wildcard_and_all_present_integers_are_int64(bank: Bank) -> None:
    accounts = bank.store.to_dataframe(wildcard="account-%")
    assert accounts["global_position"].tolist() == bank.gps[:4]
    audit = bank.store.to_dataframe(wildcard="audit-%")
    assert audit["amount"].tolist() == [7]
    assert audit.dtypes["amount"] == "int64"
    assert "owner" not in audit.columns  # only keys that occur become columns


def test_limit_and_since(bank: Bank) -> None:
    first_two = bank.store.to_dataframe(limit=2)
    assert first_two["global_position"].tolist() == bank.gps[:2]
    assert first_two.attrs["more_available"] is True
    assert bank.store.to_dataframe(limit=5).attrs["more_available"] is False
    assert len(bank.store.to_dataframe(limit=None)) == 5
    assert bank.store.to_dataframe(limit=0).empty

    since_position = bank.store.to_dataframe(since=bank.gps[2])
    assert since_position["global_position"].tolist() == bank.gps[2:]
    paged = bank.store.to_dataframe(since=bank.gps[1], limit=2)
    assert paged["global_position"].tolist() == bank.gps[1:3]

    everything = bank.store.to_dataframe()
    cut = everything["added_at"].iloc[3]
    since_time = bank.store.to_dataframe(since=cut)
    assert (
        since_time["global_position"].tolist()
        == everything[everything["added_at"] >= cut]["global_position"].tolist()
    )
    assert bank.gps[3] in since_time["global_position"].tolist()
    # A plain datetime works too, not only a pandas Timestamp.
    assert len(bank.store.to_dataframe(since=cut.to_pydatetime())) == len(since_time)
    assert DEFAULT_LIMIT == 10_000


def test_bad_arguments(bank: Bank) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        bank.store.to_dataframe(since=dt.datetime(2024, 1, 1))
    with pytest.raises(TypeError):
        bank.store.to_dataframe(since="yesterday")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either stream or wildcard"):
        bank.store.to_dataframe(stream="a", wildcard="a%")
    with pytest.raises(ValueError, match="limit"):
        bank.store.to_dataframe(limit=-1)
    with pytest.raises(TypeError):
        bank.store.to_dataframe(wildcard=["a%"])  # type: ignore[arg-type]


def test_unflattened_payload_column(bank: Bank) -> None:
    frame = depeche_nb.messages_dataframe(bank.store, stream="account-2", flatten=False)
    assert list(frame.columns) == [*MESSAGE_COLUMNS, "message"]
    payload = frame["message"].iloc[1]
    assert isinstance(payload, dict)
    assert payload["note"] == "hi" and payload["amount"] == 5
    assert "__typename__" not in payload
    assert frame["message_type"].tolist() == ["Opened", "Deposited"]


def test_empty_store_has_typed_columns(engine: sa.Engine, unique_name: str) -> None:
    store: depeche_nb.MessageStore[Any] = depeche_nb.MessageStore(
        unique_name, engine, PydanticMessageSerializer(Deposited)
    )
    frame = store.to_dataframe()
    assert list(frame.columns) == list(MESSAGE_COLUMNS)
    assert frame.dtypes["global_position"] == "int64"
    assert str(frame.dtypes["added_at"]) == TS
    assert frame.dtypes["stream"] == STR
    streams = store.streams_dataframe()
    assert list(streams.columns) == [
        "stream",
        "messages",
        "first_global_position",
        "last_global_position",
        "last_added_at",
    ]
    assert streams.empty and streams.dtypes["messages"] == "int64"


class Scheduled(_Message):
    due: dt.datetime | None = None
    confirmed: pydantic.AwareDatetime
    label: str  # holds ISO text, but the model says str
    when: str = ""


class Rescheduled(_Message):
    due: dt.datetime
    when: dt.datetime  # a datetime here, a str in Scheduled: the column stays as it is


def test_payload_datetimes_the_model_types_become_utc_timestamps(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Scheduled | Rescheduled))
    berlin = dt.timezone(dt.timedelta(hours=2))
    store.write_all(
        "plan-1",
        [
            Scheduled(
                due=dt.datetime(2024, 6, 1, 9, 30, tzinfo=berlin),
                confirmed=T0,
                label="2024-01-01T00:00:00Z",
                when="soon",
                occurred_at=T0,
            ),
            Scheduled(confirmed=T0, label="x", occurred_at=T0),
            Rescheduled(due=dt.datetime(2024, 6, 2, 8, 0), when=T0, occurred_at=T0),  # naive: taken as UTC
        ],
    )
    frame = store.to_dataframe()
    for column in ("due", "confirmed", "occurred_at"):
        assert str(frame.dtypes[column]) == TS, column
    assert frame["due"].tolist()[0] == pd.Timestamp("2024-06-01 07:30", tz="UTC")
    assert pd.isna(frame["due"].tolist()[1])  # None -> NaT
    assert frame["due"].tolist()[2] == pd.Timestamp("2024-06-02 08:00", tz="UTC")
    assert frame["confirmed"].tolist()[:2] == [pd.Timestamp(T0)] * 2 and pd.isna(frame["confirmed"][2])
    assert frame.dtypes["label"] == STR and frame["label"][0] == "2024-01-01T00:00:00Z"
    assert frame["when"].dtype != TS and frame["when"].tolist()[:2] == ["soon", ""]
    # Without flattening the payload dicts stay as stored.
    assert (
        depeche_nb.messages_dataframe(store, flatten=False)["message"][0]["due"]
        == "2024-06-01T09:30:00+02:00"
    )


class CamelCase(_Message):
    """Dumped by alias (pydantic >= 2.11): the payload key is `dueAt`."""

    model_config = pydantic.ConfigDict(serialize_by_alias=True)
    due_at: dt.datetime = pydantic.Field(serialization_alias="dueAt")


def test_payload_datetimes_under_their_serialization_alias(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(CamelCase))
    store.write("plan-1", CamelCase(due_at=T0, occurred_at=T0))
    frame = store.to_dataframe()
    assert "due_at" not in frame.columns
    assert str(frame.dtypes["dueAt"]) == TS and frame["dueAt"][0] == pd.Timestamp(T0)


@dataclasses.dataclass
class Raw:
    """A message whose payload is given verbatim (with a raw serializer below)."""

    payload: dict[str, Any]
    message_id: uuid.UUID = dataclasses.field(default_factory=uuid.uuid4)

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return T0


class RawSerializer:
    def serialize(self, message: Raw) -> dict[str, Any]:
        return message.payload

    def deserialize(self, message: dict[str, Any]) -> Raw:
        return Raw(message)


def test_payload_dtypes_from_json_values(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, RawSerializer())
    payloads: list[dict[str, Any]] = [
        {"i": 1, "f": 1.5, "b": True, "s": "x", "n": None, "big": 2**70, "mixed": 1, "deep": {"a": [1]}},
        {"i": 2, "f": 2, "b": False, "s": "y", "n": None, "big": 1, "mixed": "one", "deep": {}},
        {"i": None, "f": None, "b": None, "s": None, "only": 3},
    ]
    store.write_all("raw-1", [Raw(p) for p in payloads])
    frame = store.to_dataframe()
    assert frame["message_type"].isna().all()  # this serializer writes no type key
    assert frame.dtypes["i"] == "Int64"
    assert frame["i"].tolist() == [1, 2, pd.NA]
    assert frame.dtypes["f"] == "float64"
    assert frame.dtypes["b"] == "boolean"
    assert frame.dtypes["s"] == STR
    assert frame.dtypes["n"] == "object"  # never a value: no type to give
    assert frame.dtypes["big"] == "object"  # beyond int64: Python ints are kept
    assert frame.loc[0, "big"] == 2**70
    assert frame.dtypes["mixed"] == "object"
    assert frame.loc[0, "deep"] == {"a": [1]}
    assert frame.dtypes["only"] == "Int64"


def test_many_rows_come_in_several_chunks(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, RawSerializer())
    # More rows than one server-side cursor chunk (5000), with a key that appears
    # only in the last chunk: its column must still be typed over all chunks.
    store.write_all("big-1", [Raw({"n": i}) for i in range(6000)])
    store.write("big-1", Raw({"n": 6000, "late": True}))
    frame = store.to_dataframe(limit=None)
    assert len(frame) == 6001
    assert frame["version"].tolist() == list(range(1, 6002))
    assert frame.dtypes["n"] == "int64"
    assert frame.dtypes["late"] == "boolean"
    assert frame["late"].isna().sum() == 6000
    limited = store.to_dataframe(limit=5500)
    assert len(limited) == 5500 and limited.attrs["more_available"] is True
    assert "late" not in limited.columns  # the cut-off row contributes nothing


def test_streams_dataframe(bank: Bank) -> None:
    frame = bank.store.streams_dataframe()
    assert frame["stream"].tolist() == ["account-1", "account-2", "audit-1"]
    assert frame["messages"].tolist() == [2, 2, 1]
    assert frame["first_global_position"].tolist() == [bank.gps[0], bank.gps[1], bank.gps[4]]
    assert frame["last_global_position"].tolist() == [bank.gps[2], bank.gps[3], bank.gps[4]]
    for column in ("messages", "first_global_position", "last_global_position"):
        assert frame.dtypes[column] == "int64"
    assert frame.dtypes["stream"] == STR
    assert str(frame.dtypes["last_added_at"]) == TS
    messages = bank.store.to_dataframe()
    assert frame["last_added_at"].iloc[2] == messages["added_at"].iloc[4]


# -- aggregated streams ---------------------------------------------------------------------------


def _stream(bank: Bank, name: str) -> depeche_nb.AggregatedStream[Any]:
    return bank.store.aggregated_stream(
        name=f"{name}_agg", partitioner=AccountPartitioner(), stream_wildcards=["account-%"]
    )


def test_partitions_and_unprojected_count(bank: Bank, unique_name: str) -> None:
    stream = _stream(bank, unique_name)
    before = stream.partitions_dataframe()
    assert before.empty
    assert before.attrs["unprojected_messages"] == 4  # audit-1 does not match
    assert list(before.columns) == [
        "partition",
        "messages",
        "head_position",
        "first_global_position",
        "last_global_position",
        "last_projected_at",
    ]

    stream.projector.step(3)
    middle = stream.partitions_dataframe()
    assert middle.attrs["unprojected_messages"] == 1
    assert middle["messages"].sum() == 3

    stream.projector.run()
    frame = depeche_nb.partitions_dataframe(stream)
    assert frame.attrs["unprojected_messages"] == 0
    assert frame["partition"].tolist() == [0, 1]
    assert frame["messages"].tolist() == [2, 2]
    assert frame["head_position"].tolist() == [1, 1]
    # account-2 -> partition 0, account-1 -> partition 1
    assert frame["first_global_position"].tolist() == [bank.gps[1], bank.gps[0]]
    assert frame["last_global_position"].tolist() == [bank.gps[3], bank.gps[2]]
    for column in ("partition", "messages", "head_position", "first_global_position"):
        assert frame.dtypes[column] == "int64"
    assert str(frame.dtypes["last_projected_at"]) == TS
    assert frame["last_projected_at"].notna().all()


def test_assignments(bank: Bank, unique_name: str) -> None:
    stream = _stream(bank, unique_name)
    assert stream.assignments_dataframe().empty
    stream.projector.run()
    frame = stream.assignments_dataframe()
    assert list(frame.columns) == [
        "message_id",
        "origin_stream",
        "version",
        "global_position",
        "partition",
        "position",
        "message_occurred_at",
        "projected_at",
    ]
    for column in ("version", "global_position", "partition", "position"):
        assert frame.dtypes[column] == "int64"
    assert frame.dtypes["message_id"] == STR
    assert frame.dtypes["origin_stream"] == STR
    assert str(frame.dtypes["message_occurred_at"]) == TS
    assert str(frame.dtypes["projected_at"]) == TS
    assert frame["message_id"].tolist() == [str(i) for i in bank.ids[:4]]
    assert frame["origin_stream"].tolist() == ["account-1", "account-2", "account-1", "account-2"]
    assert frame["version"].tolist() == [1, 1, 2, 2]
    assert frame["global_position"].tolist() == bank.gps[:4]
    assert frame["partition"].tolist() == [1, 0, 1, 0]
    assert frame["position"].tolist() == [0, 0, 1, 1]
    assert frame["message_occurred_at"].iloc[0] == pd.Timestamp(T0 + dt.timedelta(minutes=1))

    one = stream.assignments_dataframe(partition=0)
    assert one["position"].tolist() == [0, 1]
    assert one["origin_stream"].tolist() == ["account-2", "account-2"]
    limited = depeche_nb.assignments_dataframe(stream, limit=3)
    assert len(limited) == 3 and limited.attrs["more_available"] is True
    assert stream.assignments_dataframe(limit=None).attrs["more_available"] is False


# -- subscriptions --------------------------------------------------------------------------------

HANDLED: list[str] = []


def handle_opened(message: Opened) -> None:
    HANDLED.append(f"opened {message.account}")


def handle_deposited(message: Deposited) -> None:
    HANDLED.append(f"deposited {message.amount}")


def _register() -> MessageHandlerRegister[Any]:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    register.register(handle_opened)
    register.register(handle_deposited)
    return register


def test_subscription_state_and_live_locks(bank: Bank, unique_name: str, engine: sa.Engine) -> None:
    stream = _stream(bank, unique_name)
    stream.projector.run()
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=_register())

    frame = subscription.state_dataframe()
    assert list(frame.columns) == ["partition", "position", "head", "lag", "locked", "last_acked_at"]
    for column in ("partition", "position", "head", "lag"):
        assert frame.dtypes[column] == "int64"
    assert frame.dtypes["locked"] == "boolean"
    assert str(frame.dtypes["last_acked_at"]) == TS
    assert frame["partition"].tolist() == [0, 1]
    assert frame["position"].tolist() == [-1, -1]
    assert frame["head"].tolist() == [1, 1]
    assert frame["lag"].tolist() == [2, 2]
    assert frame["locked"].tolist() == [False, False]
    assert frame["last_acked_at"].isna().all()
    assert frame.attrs["initialized"] is False  # a view never initialises

    # Another process's runner would hold the partition through its own session.
    other = DbLockProvider(subscription.name, engine)
    try:
        assert other.lock(subscription.partition_lock_name(1))
        held = depeche_nb.subscription_state_dataframe(subscription)
        assert held["locked"].tolist() == [False, True]
        other.unlock(subscription.partition_lock_name(1))
        assert subscription.state_dataframe()["locked"].tolist() == [False, False]
    finally:
        other.finalize()

    subscription.runner.step(3)
    after = subscription.state_dataframe()
    assert after["lag"].sum() == 1
    assert (after["position"] + after["lag"] == after["head"]).all()
    assert after["last_acked_at"].notna().sum() == 2
    assert after.attrs["initialized"] is True
    subscription.runner.run()
    assert subscription.state_dataframe()["lag"].tolist() == [0, 0]


class MemoryLocks:
    """A lock provider the database cannot see into."""

    def __init__(self) -> None:
        self.held: set[str] = set()

    def lock(self, name: str) -> bool:
        if name in self.held:
            return False
        self.held.add(name)
        return True

    def unlock(self, name: str) -> None:
        self.held.discard(name)


def test_subscription_state_with_an_uninspectable_lock_provider(bank: Bank, unique_name: str) -> None:
    stream = _stream(bank, unique_name)
    stream.projector.run()
    subscription = stream.subscription(
        name=f"{unique_name}_mem", handlers=_register(), lock_provider=MemoryLocks()
    )
    frame = subscription.state_dataframe()
    assert frame.dtypes["locked"] == "boolean"
    assert frame["locked"].isna().all()
    assert frame["lag"].tolist() == [2, 2]


def _payload_rows(payloads: list[dict[str, Any]], start: int = 1) -> list[tuple[Any, ...]]:
    """Rows as `frame_sql` selects them: position, stream, version, id, added_at (epoch us), JSON."""
    import json

    return [
        (
            start + i,
            "s-1",
            start + i,
            str(uuid.uuid4()),
            1_700_000_000_000_000,
            json.dumps({**p, "__typename__": "T"}),
        )
        for i, p in enumerate(payloads)
    ]


@pytest.mark.parametrize(
    ("first", "second", "dtype", "values"),
    [
        ([1, 2], [3, 4], "int64", [1, 2, 3, 4]),
        ([1, 2], [0.5, 1.5], "float64", [1.0, 2.0, 0.5, 1.5]),
        ([1, 2], [None, 4], "Int64", [1, 2, pd.NA, 4]),
        ([True, False], [True, None], "boolean", [True, False, True, pd.NA]),
        (["a", "b"], ["c", "d"], STR, ["a", "b", "c", "d"]),
        (["a", "b"], [1, 2], object, ["a", "b", 1, 2]),
        ([1, 2], [2**70, 3], object, [1, 2, 2**70, 3]),
    ],
)
def test_payload_columns_are_typed_over_all_chunks(
    first: list[Any], second: list[Any], dtype: Any, values: list[Any]
) -> None:
    """Columns compacted chunk by chunk end up with the dtype the whole column calls for:
    the same frame as from one chunk holding every row."""
    from depeche_nb.notebook.views.store import messages_frame_from_chunks

    rows = _payload_rows([{"v": v} for v in first]) + _payload_rows([{"v": v} for v in second], start=3)

    def chunks(size: int) -> Any:
        yield from (rows[i : i + size] for i in range(0, len(rows), size))

    chunked = messages_frame_from_chunks(chunks(2), None, flatten=True)
    whole = messages_frame_from_chunks(chunks(4), None, flatten=True)
    assert chunked["v"].dtype == dtype
    assert chunked["v"].tolist() == pd.Series(values, dtype=dtype).tolist()
    pd.testing.assert_frame_equal(chunked, whole)


def test_a_key_missing_from_a_whole_chunk_is_missing_there() -> None:
    from depeche_nb.notebook.views.store import messages_frame_from_chunks

    rows = (
        _payload_rows([{"v": 1}, {"v": 2}])
        + _payload_rows([{}, {}], start=3)
        + _payload_rows([{"v": 5}], start=5)
    )
    frame = messages_frame_from_chunks((rows[i : i + 2] for i in range(0, 5, 2)), None, flatten=True)
    assert frame["v"].dtype == "Int64"
    assert frame["v"].tolist() == [1, 2, pd.NA, pd.NA, 5]


@pytest.mark.skipif(int(pd.__version__.split(".")[0]) < 3, reason="pandas 2 has no default string dtype")
def test_string_columns_live_in_arrow_buffers(bank: Bank) -> None:
    """pandas 3 with pyarrow (a dependency): no Python str object per value."""
    frame = bank.store.to_dataframe()
    for name in ("stream", "message_id", "message_type", "account"):
        assert getattr(frame.dtypes[name], "storage", None) == "pyarrow", (name, frame.dtypes[name])


def test_plain_payload_columns_are_compacted_per_chunk() -> None:
    from depeche_nb.notebook.views.kit import compact_columns

    chunk = pd.DataFrame(
        [{"i": 1, "f": 0.5, "b": True, "s": "x", "m": 1}, {"i": 2, "f": 1.5, "b": False, "s": "y", "m": "z"}],
        dtype=object,
    )
    length, columns = compact_columns(chunk)
    assert length == 2
    assert {key: str(column.dtype) for key, column in columns.items() if key != "s"} == {
        "i": "int64",
        "f": "float64",
        "b": "bool",
        "m": "object",  # mixed kinds: decided over all chunks
    }
    if int(pd.__version__.split(".")[0]) >= 3:
        assert getattr(columns["s"].dtype, "storage", None) == "pyarrow"
    else:  # pandas 2 keeps strings as objects: nothing to gain early
        assert columns["s"].dtype == object
    assert columns["s"].tolist() == ["x", "y"]


@pytest.mark.parametrize(
    "values",
    [
        ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.123456Z", None],  # as pydantic writes UTC
        ["2024-05-01T14:00:00+02:00", "2024-05-01T12:00:00.5-05:30"],  # other offsets
        ["2024-05-01T12:00:00", "2024-05-01T12:00:00.25"],  # naive: taken as UTC
        ["2024-05-01T14:00:00+02:00", None, "2024-05-01T12:00:00"],  # aware and naive mixed
        ["2024-05-01T12:00:00.123456789Z"],  # nanoseconds, cut to microseconds
        ["2024-05-01", "20240501T120000Z", " 2024-05-01T12:00:00Z"],  # forms Arrow does not parse
    ],
)
def test_datetime_strings_parse_as_pandas_parses_them(values: list[Any]) -> None:
    """Arrow-backed string columns are parsed in their buffers where Arrow can, else by
    pandas; either way each value comes out as pandas' ISO 8601 parser makes it."""
    from depeche_nb.notebook.views.kit import datetime_column, string_column

    column = string_column(values)
    # Value by value: pandas 2 reads a naive value after an aware one in the wrong offset.
    expected = pd.Series(
        [pd.to_datetime(pd.Series([v], dtype=object), utc=True, format="ISO8601")[0] for v in values],
        dtype=TS,
    )
    parsed = datetime_column(column)
    assert str(parsed.dtype) == TS
    pd.testing.assert_series_equal(parsed, expected, check_names=False)


def test_strings_that_are_no_datetimes_stay_strings() -> None:
    from depeche_nb.notebook.views.kit import datetime_column, string_column

    parsed = datetime_column(string_column(["2024-05-01T12:00:00Z", "soon"]))
    assert parsed.dtype == STR and parsed.tolist() == ["2024-05-01T12:00:00Z", "soon"]


@pytest.mark.skipif(int(pd.__version__.split(".")[0]) < 3, reason="pandas 2 has no default string dtype")
def test_a_load_builds_its_arrow_buffers_outside_arrows_default_pool(
    engine: sa.Engine, unique_name: str
) -> None:
    """Arrow's default pool (mimalloc) keeps the pages of freed buffers, and a chunked load
    frees many: the frame's strings come from the system allocator, so a large load peaks
    near the frame it builds (bench/bench_frames.py measures how near)."""
    import pyarrow as pa

    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Deposited))
    for n in range(4):
        store.write_all(
            f"account-{n}", [_msg(Deposited, 1000 * n + i, account=f"a{i}", amount=i) for i in range(500)]
        )
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    frame = store.to_dataframe(limit=None)
    held = sum(
        column.array._pa_array.nbytes for _, column in frame.items() if hasattr(column.array, "_pa_array")
    )
    assert held > 100_000  # stream, message_id, message_type, account
    # None of the frame's buffers: what grows, if anything, is a kernel's scratch space.
    assert pool.bytes_allocated() - before < held / 100


def test_the_payload_id_is_the_id_column_not_a_copy(bank: Bank) -> None:
    """A pydantic message carries its id in the payload too: a load holds each id once."""
    frame = bank.store.to_dataframe(limit=None)
    assert frame["message.message_id"].tolist() == frame["message_id"].tolist() == [str(i) for i in bank.ids]
    if int(pd.__version__.split(".")[0]) >= 3:
        ids, payload_ids = frame["message_id"].array._pa_array, frame["message.message_id"].array._pa_array
        assert [c.buffers()[2].address for c in ids.chunks] == [
            c.buffers()[2].address for c in payload_ids.chunks
        ]


@pytest.mark.skipif(int(pd.__version__.split(".")[0]) < 3, reason="pandas 2 has no default string dtype")
def test_datetime_strings_in_arrow_are_parsed_without_a_python_object_each() -> None:
    """pandas' own parser makes a Python object per value (about 100 bytes each)."""
    import tracemalloc

    from depeche_nb.notebook.views.kit import datetime_column, string_column

    base = dt.datetime(2024, 5, 1, tzinfo=UTC)
    column = string_column([(base + dt.timedelta(seconds=i)).isoformat() for i in range(100_000)])
    tracemalloc.start()
    try:
        parsed = datetime_column(column)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed[99_999] == pd.Timestamp(base + dt.timedelta(seconds=99_999))
    assert peak < 2_000_000, f"{peak:,} bytes traced for 100,000 values"


def test_a_chunks_payload_ids_are_its_id_column_while_loading() -> None:
    """Held once from the first chunk on, not a second copy until the columns are joined."""
    import json

    import pandas as pd

    from depeche_nb.notebook.views.kit import compact_columns
    from depeche_nb.notebook.views.store import _MetaColumns

    ids = [str(uuid.UUID(int=n)) for n in range(3)]
    rows = [
        (n, "s-1", n, ids[n], 0, json.dumps({"message_id": ids[n], "__typename__": "T"})) for n in range(3)
    ]
    meta = _MetaColumns()
    _, columns = compact_columns(pd.DataFrame(meta.add(rows), dtype=object))
    shared = meta.share_ids(columns)["message_id"]
    assert shared.tolist() == ids
    if int(pd.__version__.split(".")[0]) >= 3:  # pandas 2 keeps Python str objects anyway
        assert shared is meta._parts["message_id"][-1]
    # Other ids stay the payload's own.
    other = [(n, "s-1", n, ids[n], 0, json.dumps({"message_id": "x", "__typename__": "T"})) for n in range(3)]
    _, columns = compact_columns(pd.DataFrame(meta.add(other), dtype=object))
    assert meta.share_ids(columns)["message_id"].tolist() == ["x"] * 3


def test_freed_heap_holes_go_back_to_the_system() -> None:
    """What lets a load join its columns without keeping the parts' memory (glibc). In a
    fresh interpreter, whose heap has no holes yet for the survivors to fill."""
    import subprocess
    import sys

    from depeche_nb.notebook.views import kit

    if kit._malloc_trim() is None:
        pytest.skip("not glibc: nothing to hand back")
    script = """
import numpy as np
from depeche_nb.notebook.views.kit import return_freed_memory

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

# 40 KB parts (below glibc's mmap threshold, so in its heap), each pinned by a survivor of
# the same size, which no small hole left by the interpreter's start can take instead.
parts, survivors = [], []
for _ in range(2000):
    parts.append(np.ones(5000, dtype=np.int64))
    survivors.append(np.ones(5000, dtype=np.int64))
before = resident()
del parts
freed = resident()
return_freed_memory()
print(before - freed, freed - resident())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    kept_by_glibc, handed_back = map(int, done.stdout.split())
    assert kept_by_glibc < 20_000_000  # glibc kept the holes ...
    assert handed_back > 60_000_000  # ... until handed back (80 MB were freed)


def test_only_a_load_of_several_chunks_hands_memory_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trim walks the whole heap (milliseconds in a big notebook process): a one-chunk load,
    such as every repr's, has no parts to free and must not pay for it."""
    from depeche_nb.notebook.views import store as views

    trims: list[int] = []
    monkeypatch.setattr(views, "return_freed_memory", lambda: trims.append(1))
    rows = _payload_rows([{"v": n} for n in range(4)])

    def chunks(size: int) -> Any:
        yield from (rows[i : i + size] for i in range(0, len(rows), size))

    views.messages_frame_from_chunks(chunks(4), None, flatten=True)
    assert trims == []
    frame = views.messages_frame_from_chunks(chunks(2), None, flatten=True)
    assert frame["v"].tolist() == [0, 1, 2, 3]
    assert len(trims) == len(frame.columns)  # after each column is joined

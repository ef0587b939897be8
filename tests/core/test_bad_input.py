"""Invariant 6 for text PostgreSQL cannot store and numbers JSON cannot hold: a specific
error before any SQL, and nothing written (issue 9, finding 12)."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.core.errors import InvalidStreamNameError, InvalidWildcardError, UnstorablePayloadError
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
from tests.support import Loose


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Loose]:
    return depeche_nb.MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Loose))


def _count(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{name}_messages"').scalar_one())


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Loose(text="a\x00b"), id="nul-in-string"),
        pytest.param(Loose(data={"k\x00": 1}), id="nul-in-key"),
        pytest.param(Loose(data=["ok", {"deep": "x\x00"}]), id="nul-nested"),
        pytest.param(Loose(text="lone \ud800 surrogate"), id="surrogate-in-string"),
        pytest.param(Loose(data={"\udfff": 1}), id="surrogate-in-key"),
        pytest.param(Loose(data=math.nan), id="nan-untyped"),
        pytest.param(Loose(data={"x": [1.0, -math.inf]}), id="infinity-nested-untyped"),
    ],
)
def test_unstorable_payload_is_refused_before_any_sql(
    engine: sa.Engine, unique_name: str, message: Loose
) -> None:
    store = _store(engine, unique_name)
    store.write("bad-1", Loose(text="before"))
    with pytest.raises(UnstorablePayloadError) as caught:
        store.write_all("bad-1", [Loose(text="fine"), message])
    assert isinstance(caught.value, ValueError)
    assert not isinstance(caught.value.__cause__, sa.exc.DBAPIError)
    assert _count(engine, unique_name) == 1
    # A valid astral character travels as a surrogate pair in the escaped JSON and is fine.
    store.write("bad-1", Loose(text="emoji \U0001f600", data={"\U0001f600": [None, 1.5]}))
    assert [m.message.text for m in store.read("bad-1")] == ["before", "emoji \U0001f600"]


@pytest.mark.parametrize("stream", ["a\ud800b", "nul\x00name", "é\x00"])
def test_unstorable_stream_name_is_refused(engine: sa.Engine, unique_name: str, stream: str) -> None:
    store = _store(engine, unique_name)
    with pytest.raises(InvalidStreamNameError):
        store.write(stream, Loose())
    with pytest.raises(InvalidStreamNameError):
        list(store.read(stream))
    assert _count(engine, unique_name) == 0


@pytest.mark.parametrize("pattern", ["orders-\\", "a\\\\\\", "x\ud800%", "x\x00%"])
def test_bad_wildcard_is_refused_at_definition(engine: sa.Engine, unique_name: str, pattern: str) -> None:
    store = _store(engine, unique_name)
    with pytest.raises(InvalidWildcardError):
        store.aggregated_stream(
            name=f"{unique_name}_agg", partitioner=StreamNamePartitioner(), stream_wildcards=[pattern]
        )
    with pytest.raises(InvalidWildcardError):
        list(store.read_wildcard(pattern))
    with engine.connect() as conn:
        tables = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE %s", (f"{unique_name}_agg%",)
        ).scalar_one()
    assert tables == 0


def test_escaped_backslash_wildcard_works(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    store.write("dir\\", Loose(text="one"))
    store.write("dirx", Loose(text="other"))
    assert [m.message.text for m in store.read_wildcard("dir\\\\")] == ["one"]

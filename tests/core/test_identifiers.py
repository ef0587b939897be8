"""Store names become SQL identifiers: anything but a short lowercase identifier is refused before any SQL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import InvalidIdentifierError, MessageStore, Storage
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

BAD_NAMES = [
    "x; DROP TABLE y",
    "x; DROP TABLE y; --",
    'a"b',
    '"quoted"',
    "Robert'); --",
    "Robert'); DROP TABLE students; --",
    "has space",
    " leading",
    "trailing ",
    "tab\there",
    "new\nline",
    "Orders",
    "UPPER",
    "camelCase",
    "1abc",
    "9",
    "",
    "a" * 41,
    "a" * 100,
    "dash-name",
    "dot.name",
    "schema.table",
    "semi;colon",
    "dollar$",
    "percent%",
    "star*",
    "slash/",
    "back\\slash",
    "nul\x00byte",
    "ünïcode",
    "имя",
    "emoji_🎉",
    "full\uff3fwidth",  # FULLWIDTH LOW LINE looks like "_"
    "x\u200b",  # zero-width space
]
NON_STR = [None, 42, 3.5, b"orders", ["orders"], ("orders",), object()]


@pytest.fixture(scope="module")
def counted_engine() -> Iterator[tuple[sa.Engine, list[str]]]:
    """A fresh engine that records every statement sent through it."""
    engine = depeche_nb.connect(os.environ["DEPECHE_NB_DSN"])
    statements: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    yield engine, statements
    engine.dispose()


def public_tables(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).scalars()
        )


def test_statement_counter_sees_store_creation(
    counted_engine: tuple[sa.Engine, list[str]], unique_name: str
) -> None:
    """Sanity check of the probe below: a valid name does run SQL on this engine."""
    engine, statements = counted_engine
    before = len(statements)
    MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
    assert len(statements) > before
    assert Storage.message_table_name(unique_name) in public_tables(engine)


@pytest.mark.parametrize("name", BAD_NAMES + NON_STR, ids=repr)
def test_bad_store_names_are_rejected_before_any_sql(
    counted_engine: tuple[sa.Engine, list[str]], name: object
) -> None:
    engine, statements = counted_engine
    serializer = PydanticMessageSerializer(Numbered)
    before = len(statements)

    with pytest.raises(InvalidIdentifierError) as info:
        MessageStore(name=name, engine=engine, serializer=serializer)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidIdentifierError):
        Storage(name=name, engine=engine)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifierError):
        Storage.message_table_name(name)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifierError):
        Storage.notification_channel_name(name)  # type: ignore[arg-type]

    assert statements[before:] == []


def test_bad_names_leave_the_catalog_unchanged(engine: sa.Engine) -> None:
    tables_before = public_tables(engine)
    with engine.connect() as conn:
        functions_before = conn.exec_driver_sql("SELECT count(*) FROM pg_proc").scalar_one()
    for name in BAD_NAMES + NON_STR:
        with pytest.raises(InvalidIdentifierError):
            MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered))  # type: ignore[arg-type]
    assert public_tables(engine) == tables_before
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_proc").scalar_one() == functions_before
    assert not any("drop" in t.lower() or "robert" in t.lower() for t in public_tables(engine))


def test_error_message_names_the_bad_name(engine: sa.Engine) -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        MessageStore(name="Bad Name", engine=engine, serializer=PydanticMessageSerializer(Numbered))
    assert "Bad Name" in str(info.value)


@pytest.mark.parametrize("suffix_len", [0, 1], ids=["40", "41"])
def test_length_limit_is_40(engine: sa.Engine, unique_name: str, suffix_len: int) -> None:
    name = unique_name.ljust(40, "x") + "y" * suffix_len
    serializer = PydanticMessageSerializer(Numbered)
    if suffix_len:
        with pytest.raises(InvalidIdentifierError):
            MessageStore(name=name, engine=engine, serializer=serializer)
        assert Storage.message_table_name(name[:40]) not in public_tables(engine)
    else:
        store = MessageStore(name=name, engine=engine, serializer=serializer)
        store.write("s", Numbered(number=1))
        assert [m.message.number for m in store.read("s")] == [1]


@pytest.mark.parametrize("prefix", ["_", "a", "z9_"])
def test_valid_lowercase_identifiers_are_accepted(engine: sa.Engine, unique_name: str, prefix: str) -> None:
    name = prefix + unique_name
    store = MessageStore(name=name, engine=engine, serializer=PydanticMessageSerializer(Numbered))
    assert store.write("s", Numbered(number=1)).version == 1
    assert Storage.message_table_name(name) in public_tables(engine)


def test_similar_names_get_separate_tables(engine: sa.Engine, unique_name: str) -> None:
    serializer = PydanticMessageSerializer(Numbered)
    a = MessageStore(name=unique_name, engine=engine, serializer=serializer)
    b = MessageStore(name=unique_name + "_", engine=engine, serializer=serializer)
    a.write("s", Numbered(number=1))
    b.write("s", Numbered(number=2))
    assert [m.message.number for m in a.read("s")] == [1]
    assert [m.message.number for m in b.read("s")] == [2]
    assert a.notification_channel != b.notification_channel


def test_engine_must_be_an_engine(unique_name: str) -> None:
    with pytest.raises(TypeError):
        MessageStore(
            name=unique_name, engine="postgresql://x", serializer=PydanticMessageSerializer(Numbered)
        )  # type: ignore[arg-type]

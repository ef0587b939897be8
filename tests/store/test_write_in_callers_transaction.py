"""`store.write(conn=...)` runs on the caller's DBAPI connection (`rawconn.execute_in`): it
begins the SQLAlchemy transaction, survives psycopg 3 deallocating its prepared
statements, and raises SQLAlchemy's errors."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

pytestmark = pytest.mark.both_drivers


def test_writes_in_callers_transactions_survive_rollbacks_and_ddl(
    engine: sa.Engine, unique_name: str
) -> None:
    """psycopg 3 deallocates every statement it prepared after a rollback or DDL on a
    connection; the writes keep working on the same pooled connection."""
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    one = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    try:
        for round_ in range(8):  # past psycopg's prepare threshold, and again after each reset
            with one.connect() as conn:
                for i in range(6):
                    store.write("w-1", Numbered(number=i), conn=conn)
                conn.rollback()
                conn.exec_driver_sql(f'CREATE TEMP TABLE "x{round_}" (i int)')
                conn.exec_driver_sql(f'DROP TABLE "x{round_}"')
                store.write("w-1", Numbered(number=round_), conn=conn)
                conn.commit()
    finally:
        one.dispose()
    assert [m.message.number for m in store.read("w-1")] == list(range(8))


def test_a_write_on_a_connection_not_yet_begun_commits_with_it(engine: sa.Engine, unique_name: str) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    with engine.connect() as conn:
        store.write("w-1", Numbered(number=1), conn=conn)
        assert conn.in_transaction()
        conn.commit()
    with engine.connect() as conn:
        store.write("w-1", Numbered(number=2), conn=conn)
        # closed without commit: rolled back
    assert [m.message.number for m in store.read("w-1")] == [1]


def test_a_failing_write_in_a_callers_transaction_raises_sqlalchemys_error(
    engine: sa.Engine, unique_name: str
) -> None:
    store = depeche_nb.MessageStore(unique_name, engine, PydanticMessageSerializer(Numbered))
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP FUNCTION "{unique_name}_write"')
    with engine.connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError, match="does not exist"):
            store.write("w-1", Numbered(number=1), conn=conn)
        conn.rollback()

"""Statements prepared once per session on our own connections (`rawconn.Prepared`), and a
lock taken by the statement that needs it (`DbLockProvider.lock_with`)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from depeche_nb.postgres.locks import DbLockProvider
from depeche_nb.postgres.rawconn import Prepared, autocommit_cursor, execute_prepared, prepared_sql

pytestmark = pytest.mark.both_drivers


def test_lock_with_releases_a_lock_its_failing_statement_took(engine: sa.Engine, unique_name: str) -> None:
    provider = DbLockProvider(unique_name, engine)
    failing = Prepared("SELECT pg_try_advisory_lock(%(lock_key)s::bigint), 1 / %(zero)s::int")
    with pytest.raises(Exception, match="division by zero"):
        provider.lock_with("a", failing, {"zero": 0})
    assert provider.held() == frozenset()
    other = DbLockProvider(unique_name, engine)
    assert other.lock("a")  # nobody holds it
    other.finalize()
    granted = Prepared("SELECT pg_try_advisory_lock(%(lock_key)s::bigint), %(value)s::int")
    assert provider.lock_with("b", granted, {"value": 7}) == [(True, 7)]
    assert provider.held() == frozenset({"b"})
    assert provider.lock_with("b", granted, {"value": 7}) is None  # already held here
    provider.unlock("b")
    provider.finalize()


def test_prepared_statements_bind_on_both_drivers(engine: sa.Engine) -> None:
    statement = Prepared(
        "SELECT %(ids)s::uuid[], %(n)s::int + 1, %(n)s::int, %(texts)s::text[], 'x%%' LIKE 'x%%'"
    )
    assert statement.prepare_sql.endswith(
        "SELECT $1::uuid[], $2::int + 1, $2::int, $3::text[], 'x%' LIKE 'x%'"
    )
    assert statement.execute_sql.endswith("(%(ids)s::uuid[], %(n)s::int, %(texts)s::text[])")
    ids = ["00000000-0000-0000-0000-000000000001"]
    with autocommit_cursor(engine) as cursor:
        for texts in (["a", "b'c"], []):
            execute_prepared(cursor, statement, {"ids": ids, "n": 41, "texts": texts})
            row = cursor.fetchone()
            assert [str(i) for i in _as_list(row[0])] == ids
            assert row[1:] == (42, 41, texts, True)
        # Prepared once per session: no second PREPARE.
        assert prepared_sql(cursor, statement) == statement.execute_sql
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = %s", (statement.name,))
        assert cursor.fetchone()[0] == 1
    positional = Prepared("SELECT %s::int * %s::int")
    with autocommit_cursor(engine) as cursor:
        execute_prepared(cursor, positional, (6, 7))
        assert cursor.fetchone()[0] == 42
    with pytest.raises(ValueError):
        Prepared("SELECT %s::int, %(a)s::int")


def _as_list(value: Any) -> list[Any]:
    # psycopg2 leaves a uuid[] as its text form without a registered array type.
    if isinstance(value, str):
        return value.strip("{}").split(",")
    return list(value)

"""Fixtures on the session's real PostgreSQL (started by `depeche_nb.pytest_plugin`).

Both drivers are first-class: tests marked `both_drivers` run once per driver (their
`engine` fixture is parametrised), the rest on the default driver (`DEPECHE_NB_DRIVER`, else
psycopg 3). The store, engine, notification, executor and event-sourcing modules, and the
views that read through raw connections, are marked as a whole
(`pytestmark = pytest.mark.both_drivers`). While an engine of one driver is in use,
`DEPECHE_NB_DSN` names that driver too, so worker processes the tests start use it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from depeche_nb import MessageStore
from depeche_nb.postgres.connection import DSN_ENV, connect
from depeche_nb.postgres.driver import DRIVERS, default_driver
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

# Checks with asserts live in support modules too; pytest rewrites those asserts as it does
# in test modules, so a failing check shows its values.
pytest.register_assert_rewrite("tests.engine.support", "tests.notebook.support", "tests.postgres.support")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" not in metafunc.fixturenames:
        return
    default = default_driver()
    drivers = [default]
    if metafunc.definition.get_closest_marker("both_drivers") is not None:
        drivers += [d for d in DRIVERS if d != default]
    metafunc.parametrize("engine", drivers, indirect=True, scope="session")


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    driver = getattr(request, "param", default_driver())
    session_dsn = os.environ[DSN_ENV]
    url = sa.make_url(session_dsn).set(drivername=f"postgresql+{driver}")
    os.environ[DSN_ENV] = url.render_as_string(hide_password=False)
    eng = connect(os.environ[DSN_ENV], pool_size=10, max_overflow=20)
    yield eng
    eng.dispose()
    os.environ[DSN_ENV] = session_dsn


@pytest.fixture
def unique_name() -> str:
    """A fresh identifier per test, so tests never see each other's tables."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(engine: sa.Engine, unique_name: str) -> MessageStore[Numbered]:
    """An empty store of `Numbered` messages (the store tests' and Depeche DB compatibility's)."""
    return MessageStore(name=unique_name, engine=engine, serializer=PydanticMessageSerializer(Numbered))


@pytest.fixture
def channel(unique_name: str) -> str:
    """A fresh notification channel per test (the listener's and the executor's tests)."""
    return f"{unique_name}_messages"

"""Test session set-up: one real PostgreSQL for the whole run.

With `DEPECHE_NB_DSN` set, tests use that server; otherwise an ephemeral
embedded server is started here (not in a fixture) and its DSN exported, so
notebook kernels run by nbval and worker subprocesses inherit it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from depeche_nb.postgres.connection import DSN_ENV, connect
from depeche_nb.postgres.embedded import EmbeddedServer

_server: EmbeddedServer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _server
    if not os.environ.get(DSN_ENV):
        _server = EmbeddedServer(ephemeral=True)
        os.environ[DSN_ENV] = _server.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.destroy()


@pytest.fixture(scope="session")
def engine() -> Iterator[sa.Engine]:
    eng = connect(pool_size=10, max_overflow=20)
    yield eng
    eng.dispose()


@pytest.fixture
def unique_name() -> str:
    """A fresh identifier per test, so tests never see each other's tables."""
    return f"t_{uuid.uuid4().hex[:12]}"

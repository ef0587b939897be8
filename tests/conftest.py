"""Fixtures on the session's real PostgreSQL (started by `depeche_nb.pytest_plugin`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from depeche_nb.postgres.connection import connect


@pytest.fixture(scope="session")
def engine() -> Iterator[sa.Engine]:
    eng = connect(pool_size=10, max_overflow=20)
    yield eng
    eng.dispose()


@pytest.fixture
def unique_name() -> str:
    """A fresh identifier per test, so tests never see each other's tables."""
    return f"t_{uuid.uuid4().hex[:12]}"

"""A pytest plugin: one real PostgreSQL for a whole test session (`-p depeche_nb.pytest_plugin`).

Without `DEPECHE_NB_DSN`, an ephemeral embedded server is started when
pytest configures itself (before collection, so notebook kernels started by
nbval inherit it) and its DSN is exported; it is removed when pytest ends. Starting it
also removes the ephemeral servers of earlier sessions that were killed instead of
ending (see `depeche_nb.postgres.embedded`).
"""

from __future__ import annotations

import os

import pytest

from depeche_nb.postgres.connection import DSN_ENV
from depeche_nb.postgres.embedded import EmbeddedServer

_server: EmbeddedServer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _server
    if not os.environ.get(DSN_ENV):
        _server = EmbeddedServer(ephemeral=True)
        os.environ[DSN_ENV] = _server.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _server
    if _server is not None:
        _server.destroy()
        os.environ.pop(DSN_ENV, None)
        _server = None

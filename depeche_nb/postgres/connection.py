"""Resolve which PostgreSQL to use and hand out SQLAlchemy engines for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from depeche_nb.postgres.embedded import embedded_server

DSN_ENV = "DEPECHE_NB_DSN"


def normalize_dsn(dsn: str) -> str:
    """Accept libpq-style `postgres://`/`postgresql://` URLs and pin the psycopg2 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg2://" + dsn[len(prefix) :]
    return dsn


def resolve_dsn(
    dsn: str | None = None, *, ephemeral: bool = False, data_dir: str | Path | None = None
) -> str:
    """An explicit DSN, else `DEPECHE_NB_DSN`, else the (started) embedded server's DSN."""
    if dsn is not None:
        return normalize_dsn(dsn)
    if not ephemeral and data_dir is None:
        from_env = os.environ.get(DSN_ENV)
        if from_env:
            return normalize_dsn(from_env)
    return embedded_server(data_dir, ephemeral=ephemeral).start()


def connect(
    dsn: str | sa.Engine | None = None,
    *,
    ephemeral: bool = False,
    data_dir: str | Path | None = None,
    **engine_options: Any,
) -> sa.Engine:
    """Return a SQLAlchemy engine for the database depeche-nb should use.

    Resolution order: an explicit DSN or engine, then the `DEPECHE_NB_DSN`
    environment variable, then an embedded PostgreSQL server (started if
    needed) whose data lives in a per-user folder. `ephemeral=True` starts a
    private server in a temporary folder that is removed when the process exits.
    """
    if isinstance(dsn, sa.Engine):
        if ephemeral or data_dir is not None or engine_options:
            raise ValueError("ephemeral, data_dir and engine options cannot be combined with an engine")
        return dsn
    if dsn is not None and not isinstance(dsn, str):
        raise TypeError(f"dsn must be a str or a SQLAlchemy Engine, got {type(dsn).__name__}")
    if dsn is not None and (ephemeral or data_dir is not None):
        raise ValueError("give either a dsn or ephemeral/data_dir, not both")
    url = resolve_dsn(dsn, ephemeral=ephemeral, data_dir=data_dir)
    return sa.create_engine(url, **engine_options)

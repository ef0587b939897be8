"""Resolve which PostgreSQL to use and hand out SQLAlchemy engines for it."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.identifiers import validate_name
from depeche_nb.postgres.ddl import forget_ddl_for
from depeche_nb.postgres.driver import check_driver, driver_of, with_driver
from depeche_nb.postgres.embedded import embedded_server
from depeche_nb.postgres.names import lock_namespace
from depeche_nb.postgres.server_check import ensure_supported

DSN_ENV = "DEPECHE_NB_DSN"
_checked_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_checked_guard = threading.Lock()
_SCHEMA_LOCK = lock_namespace("ddl", "schemas")


def normalize_dsn(dsn: str, driver: str | None = None) -> str:
    """Accept libpq-style `postgres://`/`postgresql://` URLs and give them a driver:
    `driver`, else `DEPECHE_NB_DRIVER`, else psycopg 3 (what SQLAlchemy 2.1 picks)."""
    return with_driver(dsn, driver)


def resolve_dsn(
    dsn: str | None = None,
    *,
    ephemeral: bool = False,
    data_dir: str | Path | None = None,
    driver: str | None = None,
) -> str:
    """An explicit DSN, else `DEPECHE_NB_DSN`, else the (started) embedded server's DSN;
    a URL that names no driver gets `driver` (default: see `normalize_dsn`)."""
    if dsn is not None:
        return normalize_dsn(dsn, driver)
    if not ephemeral and data_dir is None:
        from_env = os.environ.get(DSN_ENV)
        if from_env:
            return normalize_dsn(from_env, driver)
    started = embedded_server(data_dir, ephemeral=ephemeral).start()
    if driver is None:
        return started
    return (
        sa.make_url(started)
        .set(drivername=f"postgresql+{check_driver(driver)}")
        .render_as_string(hide_password=False)
    )


def connect(
    dsn: str | sa.Engine | None = None,
    *,
    ephemeral: bool = False,
    data_dir: str | Path | None = None,
    schema: str | None = None,
    fresh: bool = False,
    driver: str | None = None,
    **engine_options: Any,
) -> sa.Engine:
    """Return a SQLAlchemy engine for the database depeche-nb should use.

    Resolution order: an explicit DSN or engine, then the `DEPECHE_NB_DSN`
    environment variable, then an embedded PostgreSQL server (started if
    needed) whose data lives in a per-user folder. `ephemeral=True` starts a
    private server in a temporary folder that is removed when the process exits.

    `schema` keeps every table of this engine in that PostgreSQL schema (created
    if missing); `fresh=True` drops it first, so a notebook can start clean on
    any server. `driver` ("psycopg" or "psycopg2") applies to URLs that name none
    (the default: `DEPECHE_NB_DRIVER`, else psycopg 3). Notification channels and
    lock keys are database-wide, so two schemas with equally named stores share
    wake-ups (harmless, only extra work).
    """
    if isinstance(dsn, sa.Engine):
        if ephemeral or data_dir is not None or engine_options or schema is not None or driver:
            raise ValueError(
                "ephemeral, data_dir, schema, driver and engine options cannot be combined with an engine"
            )
        driver_of(dsn)
        return _checked(dsn)
    if fresh and schema is None:
        raise ValueError("fresh=True needs a schema to empty")
    if dsn is not None and not isinstance(dsn, str):
        raise TypeError(f"dsn must be a str or a SQLAlchemy Engine, got {type(dsn).__name__}")
    if dsn is not None and (ephemeral or data_dir is not None):
        raise ValueError("give either a dsn or ephemeral/data_dir, not both")
    if driver is not None:
        check_driver(driver)
    url = resolve_dsn(dsn, ephemeral=ephemeral, data_dir=data_dir, driver=driver)
    # After a server restart every pooled connection is dead; a ping on checkout
    # replaces it instead of failing the caller's first statement.
    engine_options.setdefault("pool_pre_ping", True)
    if schema is None:
        return _checked(sa.create_engine(url, **engine_options))
    validate_name(schema, "schema")
    # In the URL (not connect_args) so the per-URL schema cache tells schemas apart.
    scoped = sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    with _checked(sa.create_engine(url, poolclass=sa.pool.NullPool)).begin() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK}, 0)")
        if fresh:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    if fresh:
        forget_ddl_for(scoped)
    return _checked(sa.create_engine(scoped, **engine_options))


def same_database(a: sa.Engine, b: sa.Engine) -> bool:
    """Whether two engines reach the same database and schema (whatever their drivers and
    however their passwords are given): compared by URL, without connecting."""

    def key(engine: sa.Engine) -> sa.URL:
        return engine.url.set(drivername="postgresql", password=None)

    return a is b or key(a) == key(b)


def _checked(engine: sa.Engine) -> sa.Engine:
    """`engine`, checking on its first pooled connection (once per URL) that the server
    offers what depeche-nb needs (see `server_check`): lazily, so `connect()` itself
    stays cheap and works while the database is still starting."""
    with _checked_guard:
        if engine not in _checked_engines:
            _checked_engines.add(engine)
            sa.event.listen(engine, "connect", lambda dbapi_connection, record: ensure_supported(engine))
    return engine

"""`depeche_nb.connect()` resolution order and the embedded PostgreSQL server's life cycle."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import EmbeddedServerError, MessageStore
from depeche_nb.postgres.connection import DSN_ENV
from depeche_nb.postgres.driver import default_driver
from depeche_nb.postgres.embedded import EmbeddedServer
from depeche_nb.tools import PydanticMessageSerializer
from tests.support import Numbered

BOGUS_DSN = "postgresql+psycopg2://nobody@/no_such_db?host=/nonexistent-depeche-nb-socket-dir&port=1"
JOIN_TIMEOUT_S = 90


def server_facts(engine: sa.Engine) -> tuple[str, Any]:
    """(data directory, postmaster start time) of the server behind `engine`."""
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT current_setting('data_directory'), pg_postmaster_start_time()"
        ).one()
    return row[0], row[1]


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A fresh folder every user can traverse (as root, the server runs as a service user)."""
    base = Path(tempfile.mkdtemp(prefix="depeche-nb-test-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


# -- DSN resolution -------------------------------------------------------------------------------


def test_explicit_dsn_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.environ[DSN_ENV]
    monkeypatch.setenv(DSN_ENV, BOGUS_DSN)
    engine = depeche_nb.connect(real)
    try:
        assert engine.url.render_as_string(hide_password=False) == sa.make_url(real).render_as_string(
            hide_password=False
        )
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        engine.dispose()


def test_environment_is_used_without_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.environ[DSN_ENV]
    engine = depeche_nb.connect()
    try:
        assert engine.url == sa.make_url(real)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        engine.dispose()

    monkeypatch.setenv(DSN_ENV, BOGUS_DSN)
    bogus = depeche_nb.connect()
    try:
        assert bogus.url == sa.make_url(BOGUS_DSN)
        with pytest.raises(sa.exc.OperationalError), bogus.connect():
            pass
    finally:
        bogus.dispose()


def test_libpq_style_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sa.make_url(os.environ[DSN_ENV])
    libpq_style = real.set(drivername="postgresql").render_as_string(hide_password=False)
    assert libpq_style.startswith("postgresql://")
    monkeypatch.setenv(DSN_ENV, BOGUS_DSN)
    engine = depeche_nb.connect(libpq_style)
    try:
        assert engine.dialect.driver == default_driver()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        engine.dispose()


def test_engine_is_returned_unchanged(engine: sa.Engine) -> None:
    assert depeche_nb.connect(engine) is engine


@pytest.mark.parametrize("dsn", [42, b"postgresql://x", ["postgresql://x"], object()], ids=repr)
def test_non_str_non_engine_is_a_type_error(dsn: object) -> None:
    with pytest.raises(TypeError):
        depeche_nb.connect(dsn)  # type: ignore[arg-type]


def test_conflicting_arguments_are_value_errors(engine: sa.Engine) -> None:
    with pytest.raises(ValueError):
        depeche_nb.connect(engine, ephemeral=True)
    with pytest.raises(ValueError):
        depeche_nb.connect(os.environ[DSN_ENV], ephemeral=True)


# -- ephemeral servers ----------------------------------------------------------------------------


def test_connect_ephemeral_starts_a_separate_usable_server(engine: sa.Engine, unique_name: str) -> None:
    main_data_dir, _ = server_facts(engine)
    eph = depeche_nb.connect(ephemeral=True)
    data_dir = None
    try:
        data_dir, _ = server_facts(eph)
        assert data_dir != main_data_dir
        host = eph.url.query.get("host")
        assert host is not None
        assert host != engine.url.query.get("host")  # a different socket directory

        store = MessageStore(name=unique_name, engine=eph, serializer=PydanticMessageSerializer(Numbered))
        store.write("s", Numbered(number=1))
        assert [m.message.number for m in store.read("s")] == [1]
        # the store lives only on the ephemeral server
        with engine.connect() as conn:
            assert (
                conn.exec_driver_sql("SELECT to_regclass(%s)", (f"{unique_name}_messages",)).scalar() is None
            )
    finally:
        eph.dispose()
        if data_dir is not None:
            # connect() keeps no handle on the server; stop it through its data folder
            # (the process's exit hook would delete the folder later anyway).
            EmbeddedServer(data_dir).stop()
            shutil.rmtree(Path(data_dir).parent, ignore_errors=True)


def test_ephemeral_server_destroy_removes_its_data() -> None:
    server = EmbeddedServer(ephemeral=True)
    try:
        engine = depeche_nb.connect(server.start())
        try:
            data_dir, _ = server_facts(engine)
        finally:
            engine.dispose()
        assert Path(data_dir) == server.data_dir
        assert server.is_running()
        assert (server.data_dir / "PG_VERSION").exists()
    finally:
        server.destroy()
    assert not server.data_dir.exists()
    assert not server.data_dir.parent.exists()
    assert not server.is_running()


# -- folders that are not PostgreSQL data ---------------------------------------------------------


def test_non_empty_foreign_folder_is_refused(shared_base: Path) -> None:
    data_dir = shared_base / "precious"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("not a database")
    server = EmbeddedServer(data_dir)
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    assert str(data_dir) in str(info.value)
    assert sorted(p.name for p in data_dir.iterdir()) == ["notes.txt"]
    assert (data_dir / "notes.txt").read_text() == "not a database"


# -- shared persistent servers --------------------------------------------------------------------


def test_second_server_object_reuses_the_running_server(shared_base: Path) -> None:
    data_dir = shared_base / "data"
    first = EmbeddedServer(data_dir)
    try:
        dsn = first.start()
        pid = postmaster_pid(data_dir)
        engine = depeche_nb.connect(dsn)
        try:
            before = server_facts(engine)
        finally:
            engine.dispose()

        second = EmbeddedServer(data_dir)
        assert second.start() == dsn
        assert postmaster_pid(data_dir) == pid
        engine = depeche_nb.connect(dsn)
        try:
            assert server_facts(engine) == before
        finally:
            engine.dispose()
    finally:
        first.stop()
    assert not first.is_running()
    assert not (data_dir / "postmaster.pid").exists()
    assert (data_dir / "PG_VERSION").exists()  # stop keeps the data


def _start_in_child(data_dir: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait()
        server = EmbeddedServer(data_dir)
        dsn = server.start()
        engine = sa.create_engine(dsn)
        try:
            with engine.connect() as conn:
                started = conn.exec_driver_sql("SELECT pg_postmaster_start_time()::text").scalar_one()
        finally:
            engine.dispose()
        results.put((os.getpid(), postmaster_pid(Path(data_dir)), started, None))
    except BaseException as exc:
        results.put((os.getpid(), None, None, repr(exc)))


def test_two_processes_starting_one_data_folder_share_one_server(shared_base: Path) -> None:
    data_dir = shared_base / "data"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=JOIN_TIMEOUT_S)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_start_in_child, args=(str(data_dir), barrier, results), daemon=True)
        for _ in range(2)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=JOIN_TIMEOUT_S) for _ in children]
        for child in children:
            child.join(JOIN_TIMEOUT_S)
        assert [error for *_, error in reports] == [None, None]
        assert all(child.exitcode == 0 for child in children)
        assert len({pid for _, pid, _, _ in reports}) == 1
        assert len({started for _, _, started, _ in reports}) == 1
        # the server outlives the processes that started it (persistent mode)
        assert EmbeddedServer(data_dir).is_running()
        assert postmaster_pid(data_dir) == reports[0][1]
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
        EmbeddedServer(data_dir).stop()
    assert not (data_dir / "postmaster.pid").exists()


def test_an_unknown_driver_is_refused_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="driver must be one of 'psycopg', 'psycopg2', got 'pg8000'"):
        depeche_nb.connect(BOGUS_DSN.replace("+psycopg2", ""), driver="pg8000")
    monkeypatch.setenv("DEPECHE_NB_DRIVER", "asyncpg")
    with pytest.raises(ValueError, match="DEPECHE_NB_DRIVER must be one of"):
        depeche_nb.connect(BOGUS_DSN.replace("+psycopg2", ""))


def test_an_engine_of_another_database_or_driver_is_refused() -> None:
    sqlite = sa.create_engine("sqlite://")
    try:
        with pytest.raises(ValueError, match=r"needs a PostgreSQL engine .* got sqlite\+pysqlite"):
            depeche_nb.connect(sqlite)
    finally:
        sqlite.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_url_without_driver_gets_the_chosen_one_and_an_explicit_one_is_kept(
    monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    real = sa.make_url(os.environ[DSN_ENV])
    plain = real.set(drivername="postgresql").render_as_string(hide_password=False)
    monkeypatch.setenv("DEPECHE_NB_DRIVER", driver)
    for url, expected in ((plain, driver), (real.set(drivername="postgresql+psycopg2"), "psycopg2")):
        engine = depeche_nb.connect(
            url if isinstance(url, str) else url.render_as_string(hide_password=False)
        )
        try:
            assert engine.dialect.driver == expected
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        finally:
            engine.dispose()

"""Explore and adopt a database written by the *published* Depeche DB 0.13.1.

A virtual environment with depeche-db is built once and cached under
~/.cache/depeche-nb-tests, keyed by the requirement string and the Python version.
`tests/engine/depeche_db_scenario.py` runs in it and leaves a database with stores,
aggregated streams (one with messages stored but not projected yet) and a
half-consumed subscription. Each test works on its own copy of that database
(CREATE DATABASE ... TEMPLATE), so they cannot see each other.
"""

from __future__ import annotations

import collections
import datetime as dt
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import (
    AdoptionError,
    MessageHandler,
    MessageStore,
    StoredMessage,
    SubscriptionMessage,
    adopt_depeche_db,
    open_depeche_db,
)
from depeche_nb.postgres.connection import DSN_ENV
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
from tests.notebook.support import check_markup, shown_partitions, true_backlog, true_partitions

pytestmark = [pytest.mark.slow, pytest.mark.both_drivers]

REQUIREMENTS = ["depeche-db==0.13.1", "sqlalchemy<2.1", "sniffio", "psycopg2-binary", "pydantic>=2,<3"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "depeche-nb-tests"
SCENARIO = Path(__file__).with_name("depeche_db_scenario.py")
HERE = Path(__file__).resolve().parents[2]


# -- the published library in a cached virtual environment ------------------------------------


def depeche_db_python() -> Path:
    key = " ".join(REQUIREMENTS) + f" py{sys.version_info.major}.{sys.version_info.minor}"
    folder = CACHE / f"depeche-db-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    python = folder / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several pytest processes may build at once
        if (folder / "ready").read_text() == key if (folder / "ready").exists() else False:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"pip install {REQUIREMENTS} failed:\n{result.stdout}\n{result.stderr}"
        (folder / "ready").write_text(key)
    return python


def url_of(engine: sa.Engine, database: str, driver: str | None = None) -> str:
    url = engine.url.set(database=database)
    if driver is not None:
        url = url.set(drivername=driver)
    return url.render_as_string(hide_password=False)


def create_database(engine: sa.Engine, name: str, template: str | None = None) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))


def drop_database(engine: sa.Engine, name: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def scenario(
    engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(template database name, what the scenario reported)."""
    python = depeche_db_python()
    name = f"ddb_tpl_{uuid.uuid4().hex[:10]}"
    create_database(engine, name)
    out = tmp_path_factory.mktemp("ddb") / "scenario.json"
    env = {**os.environ, "DDB_DSN": url_of(engine, name, "postgresql+psycopg2"), "DDB_OUT": str(out)}
    env.pop("PYTHONPATH", None)  # the venv's own packages only
    try:
        result = subprocess.run(
            [str(python), str(SCENARIO)], capture_output=True, text=True, env=env, timeout=240
        )
        assert result.returncode == 0, f"the Depeche DB scenario failed:\n{result.stdout}\n{result.stderr}"
        yield name, json.loads(out.read_text())
    finally:
        drop_database(engine, name)


@pytest.fixture
def ddb(
    engine: sa.Engine, scenario: tuple[str, dict[str, Any]]
) -> Iterator[tuple[sa.Engine, dict[str, Any]]]:
    """An engine on a fresh copy of the scenario's database (same driver as the session's)."""
    template, info = scenario
    name = f"ddb_{uuid.uuid4().hex[:12]}"
    create_database(engine, name, template)
    copy = sa.create_engine(url_of(engine, name))
    try:
        yield copy, info
    finally:
        copy.dispose()
        drop_database(engine, name)


# -- a full picture of a database, to prove that something changed nothing --------------------


def dump(engine: sa.Engine) -> dict[str, Any]:
    """Catalog counts, every user table's definition and a digest of its rows, sequences and
    user functions."""
    picture: dict[str, Any] = {}
    with engine.connect() as conn:
        for catalog in ("pg_class", "pg_proc", "pg_trigger", "pg_index", "pg_constraint", "pg_attribute"):
            picture[catalog] = conn.exec_driver_sql(f"SELECT count(*) FROM {catalog}").scalar_one()
        tables = conn.exec_driver_sql(
            "SELECT c.oid, n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND NOT starts_with(n.nspname, 'pg_toast') ORDER BY 2, 3"
        ).all()
        for oid, schema, table in tables:
            qualified = f'"{schema}"."{table}"'
            columns = conn.exec_driver_sql(
                "SELECT attname, format_type(atttypid, atttypmod), attnotnull, "
                "pg_get_expr(d.adbin, d.adrelid), attidentity FROM pg_attribute a "
                "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (oid,),
            ).all()
            constraints = conn.exec_driver_sql(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s ORDER BY 1",
                (oid,),
            ).all()
            indexes = conn.exec_driver_sql(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s ORDER BY 1", (oid,)
            ).all()
            triggers = conn.exec_driver_sql(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s ORDER BY 1", (oid,)
            ).all()
            rows = conn.exec_driver_sql(
                "SELECT count(*), md5(coalesce(string_agg(t::text, chr(10) ORDER BY t::text), '')) "
                f"FROM {qualified} t"
            ).one()
            picture[qualified] = {
                "columns": [tuple(c) for c in columns],
                "constraints": [tuple(c) for c in constraints],
                "indexes": [i[0] for i in indexes],
                "triggers": [t[0] for t in triggers],
                "rows": tuple(rows),
            }
        for schema, sequence in conn.exec_driver_sql(
            "SELECT schemaname, sequencename FROM pg_sequences ORDER BY 1, 2"
        ).all():
            picture[f"sequence {schema}.{sequence}"] = tuple(
                conn.exec_driver_sql(f'SELECT last_value, is_called FROM "{schema}"."{sequence}"').one()
            )
        picture["functions"] = [
            tuple(r)
            for r in conn.exec_driver_sql(
                "SELECT p.proname, md5(pg_get_functiondef(p.oid)) FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' ORDER BY 1, 2"
            ).all()
        ]
    return picture


def depeche_db_part(picture: dict[str, Any]) -> dict[str, Any]:
    """Only Depeche DB's own tables, sequences and functions."""
    return {
        k: v
        for k, v in picture.items()
        if "depeche_msgs_" in k or "depeche_stream_" in k or "depeche_subscriptions_" in k
    } | {"functions": [f for f in picture["functions"] if f[0].startswith("depeche_")]}


# -- the same definitions as under Depeche DB ---------------------------------------------------


class OrderEvent(pydantic.BaseModel):
    """The scenario's message type, as the user's code defines it."""

    number: int
    text: str = ""
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


class NumberPartitioner:
    """The scenario's partitioner, as the user would define it again."""

    def get_partition(self, message: StoredMessage[OrderEvent]) -> int:
        return message.message.number % 3


def open_shop(engine: sa.Engine) -> tuple[MessageStore[OrderEvent], Any, Any]:
    shop = MessageStore[OrderEvent](
        name="shop", engine=engine, serializer=PydanticMessageSerializer(OrderEvent)
    )
    orders = shop.aggregated_stream(
        name="shop_orders", partitioner=NumberPartitioner(), stream_wildcards=["order-%"]
    )
    audit = shop.aggregated_stream(
        name="shop_audit", partitioner=StreamNamePartitioner(), stream_wildcards=["audit-%"]
    )
    return shop, orders, audit


def ddb_messages(engine: sa.Engine, store: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT message_id::text, stream, version, global_position, message::text, "
            "added_at AT TIME ZONE current_setting('TimeZone') "
            f"FROM depeche_msgs_{store} ORDER BY global_position"
        ).all()
    return [tuple(r) for r in rows]


def ddb_assignments(engine: sa.Engine, stream: str) -> set[tuple[int, int, str]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT partition, position, message_id::text FROM depeche_stream_{stream}"
        ).all()
    return {(r[0], r[1], r[2]) for r in rows}


def our_assignments(stream: Any) -> set[tuple[int, int, str]]:
    partitions = stream.get_max_aggregated_stream_positions()
    return {(m.partition, m.position, str(m.message_id)) for p in partitions for m in stream.read(p)}


def ddb_state(engine: sa.Engine, provider: str) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT partition, position FROM depeche_subscriptions_{provider} WHERE partition >= 0"
        ).all()
    return {r[0]: r[1] for r in rows}


# -- the tests ----------------------------------------------------------------------------------


def test_explore_is_read_only_and_shows_everything(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    engine, _ = ddb
    read_only = sa.create_engine(engine.url, connect_args={"options": "-c default_transaction_read_only=on"})
    try:
        with read_only.connect() as conn, pytest.raises(sa.exc.DBAPIError, match="read-only"):
            conn.exec_driver_sql("CREATE TABLE proof_that_writes_fail (x int)")
        before = dump(engine)
        explorer = open_depeche_db(read_only)
        assert explorer.stores == ["billing", "shop"]
        assert explorer.aggregated_streams == ["billing_invoices", "shop_audit", "shop_orders"]
        assert explorer.subscriptions == ["shop_mailer"]

        stores = explorer.stores_dataframe().set_index("store")
        assert stores.loc["shop", "messages"] == len(ddb_messages(engine, "shop"))
        assert stores.loc["billing", "messages"] == 5
        assert not stores["adopted"].any()

        messages = explorer.messages_dataframe("shop", limit=None)
        expected = ddb_messages(engine, "shop")
        assert list(messages["global_position"]) == [m[3] for m in expected]
        assert list(messages["message_id"]) == [m[0] for m in expected]
        assert messages["message_type"].eq("OrderEvent").all()
        assert {"number", "text", "occurred_at"} <= set(messages.columns)
        assert str(messages["added_at"].dtype) == "datetime64[us, UTC]"
        one = explorer.messages_dataframe("shop", stream="order-2")
        assert list(one["version"]) == list(range(1, len(one) + 1))
        limited = explorer.messages_dataframe("shop", wildcard="order-%", limit=3)
        assert len(limited) == 3 and limited.attrs["more_available"]

        origin = explorer.streams_dataframe("shop").set_index("stream")
        assert origin.loc["order-6", "messages"] == 1

        aggregated = explorer.aggregated_streams_dataframe().set_index("stream")
        assert aggregated.loc["shop_orders", "store"] == "shop"
        assert aggregated.loc["billing_invoices", "store"] == "billing"
        # The two late order-2 messages; order-6 was never projected, so it cannot be counted.
        assert aggregated.loc["shop_orders", "unprojected"] == 2
        assert aggregated.loc["shop_orders", "messages"] == 30

        partitions = explorer.partitions_dataframe("shop_orders")
        assert list(partitions["partition"]) == [0, 1, 2]
        assert (partitions["head_position"] == partitions["recorded_max_position"]).all()
        assert (partitions["gaps"] == 0).all()

        assignments = explorer.assignments_dataframe("shop_orders", limit=None)
        assert {
            (int(r.partition), int(r.position), r.message_id) for r in assignments.itertuples()
        } == ddb_assignments(engine, "shop_orders")

        subs = explorer.subscriptions_dataframe().set_index("subscription")
        assert subs.loc["shop_mailer", "stream"] == "shop_orders"
        assert bool(subs.loc["shop_mailer", "initialized"])
        state = explorer.subscription_state_dataframe("shop_mailer")
        stored = ddb_state(engine, "shop_mailer")
        for row in state.itertuples():
            assert row.position == stored.get(row.partition, -1)
            assert row.lag == row.head - row.position
        assert subs.loc["shop_mailer", "lag"] == int(state["lag"].sum()) > 0

        page = explorer._repr_html_()
        assert "shop_orders" in page and "shop_mailer" in page and "could not read" not in page
        plan = explorer.adoption_plan()
        assert {i.action for i in plan.items} == {"would adopt"} and not plan.changed
        assert "could not read" not in plan._repr_html_()
    finally:
        read_only.dispose()
    assert dump(engine) == before


def test_adopt_keeps_messages_assignments_and_positions(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    engine, info = ddb
    before = dump(engine)
    report = adopt_depeche_db(engine)
    assert report.changed and not report.dry_run
    assert sorted((i.kind, i.name, i.action) for i in report.items) == [
        ("aggregated_stream", "billing_invoices", "adopted"),
        ("aggregated_stream", "shop_audit", "adopted"),
        ("aggregated_stream", "shop_orders", "adopted"),
        ("store", "billing", "adopted"),
        ("store", "shop", "adopted"),
        ("subscription_state", "shop_mailer", "adopted"),
    ]
    assert "unchanged" in report.kept and "AdoptionReport" in report._repr_html_()
    # The constructed checkpoints are tied to this cluster (see `engine.projector`).
    with engine.connect() as conn:
        clusters = conn.exec_driver_sql(
            "SELECT (SELECT cluster FROM shop_orders_checkpoint), system_identifier::text "
            "FROM pg_control_system()"
        ).one()
    assert clusters[0] == clusters[1]
    after = dump(engine)
    # Depeche DB's tables, sequences, functions and triggers are exactly as they were.
    assert depeche_db_part(after) == depeche_db_part(before)

    # Same messages: ids, streams, versions, global positions, payloads, times.
    shop, orders, audit = open_shop(engine)
    with engine.connect() as conn:
        ours = [
            tuple(r)
            for r in conn.exec_driver_sql(
                "SELECT message_id::text, stream, version, global_position, message::text, added_at "
                "FROM shop_messages ORDER BY global_position"
            ).all()
        ]
    theirs = ddb_messages(engine, "shop")
    assert ours == theirs
    for stream in ("order-1", "order-2", "order-6", "audit-1", "misc-1"):
        read = [(str(m.message_id), m.version, m.global_position) for m in shop.read(stream)]
        assert read == [(t[0], t[2], t[3]) for t in theirs if t[1] == stream]

    # Same assignments and heads.
    assert our_assignments(orders) == ddb_assignments(engine, "shop_orders")
    assert our_assignments(audit) == ddb_assignments(engine, "shop_audit")
    heads = {p: max(pos for q, pos, _ in ddb_assignments(engine, "shop_orders") if q == p) for p in range(3)}
    assert orders.get_max_aggregated_stream_positions() == heads

    # The projector projects exactly the messages Depeche DB had not projected, once each.
    late = info["unprojected_global_positions"]
    projected = _project_all(orders)
    new_in_orders = [p.global_position for p in projected]
    assert new_in_orders == [gp for gp in late if _stream_of(theirs, gp).startswith("order-")]
    assert _project_all(orders) == []  # once only
    assignments = _assignments_by_gp(engine, "shop_orders")
    for gp in new_in_orders:
        partition, position = assignments[gp]
        assert partition == _number_of(theirs, gp) % 3
        assert position > heads[partition]
    assert len(assignments) == 30 + len(new_in_orders)
    _assert_partitions_gapless_and_in_stream_order(engine, "shop_orders")
    audit.projector.run()
    audit_assignments = _assignments_by_gp(engine, "shop_audit")
    assert {gp for gp in audit_assignments if gp in late} == {
        gp for gp in late if _stream_of(theirs, gp) == "audit-1"
    }
    # misc-1 matches no wildcard: never projected.
    misc = {t[3] for t in theirs if t[1] == "misc-1"}
    assert not misc & (set(assignments) | set(audit_assignments))

    # The subscription continues after its stored positions: nothing again, nothing skipped.
    delivered: list[tuple[int, int, str]] = []

    class Handlers(MessageHandler[OrderEvent]):
        @MessageHandler.register
        def handle(self, message: SubscriptionMessage[OrderEvent]) -> None:
            delivered.append((message.partition, message.position, str(message.stored_message.message_id)))

    mailer = orders.subscription(name="shop_mailer", handlers=Handlers())
    mailer.runner.run()
    handled_before = {(h["partition"], h["position"], h["message_id"]) for h in info["handled"]}
    stored = ddb_state(engine, "shop_mailer")
    assert handled_before == {
        a for a in ddb_assignments(engine, "shop_orders") if a[1] <= stored.get(a[0], -1)
    }
    everything = our_assignments(orders)
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    assert not set(delivered) & handled_before, "a message handled under Depeche DB was delivered again"
    assert set(delivered) | handled_before == everything, "a message was skipped"
    for partition in range(3):
        positions = [pos for p, pos, _ in delivered if p == partition]
        assert positions == sorted(positions)
        assert positions == list(
            range(stored.get(partition, -1) + 1, orders.get_max_aggregated_stream_positions()[partition] + 1)
        )

    # A second adoption changes nothing at all.
    settled = dump(engine)
    again = adopt_depeche_db(engine)
    assert not again.changed
    assert {i.action for i in again.items} == {"already adopted"}
    assert dump(engine) == settled

    # New messages written by depeche-nb flow through projector and runner, once each.
    last_gp = max(t[3] for t in theirs)
    written = [
        shop.write(stream="order-6", message=OrderEvent(number=700)),
        shop.write(stream="order-7", message=OrderEvent(number=701)),
        shop.write(stream="order-1", message=OrderEvent(number=702)),
    ]
    assert [w.version for w in written] == [2, 1, 7]
    assert all(w.global_position > last_gp for w in written)
    assert sorted(w.global_position for w in written) == [w.global_position for w in written]
    step = orders.projector.step()
    assert sorted(p.global_position for p in step.projected) == [w.global_position for w in written]
    assert [p.partition for p in step.projected] == [700 % 3, 701 % 3, 702 % 3]
    delivered.clear()
    mailer.runner.run()
    assert sorted(d[2] for d in delivered) == sorted(str(p.message_id) for p in step.projected)
    _assert_partitions_gapless_and_in_stream_order(engine, "shop_orders")
    assert depeche_db_part(dump(engine)) == depeche_db_part(before)


def _project_all(stream: Any) -> list[Any]:
    projected = []
    while True:
        report = stream.projector.step()
        projected.extend(report.projected)
        if not report.more_available:
            return projected


def _assignments_by_gp(engine: sa.Engine, stream: str) -> dict[int, tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT global_position, partition, position FROM {stream}_stream").all()
    return {r[0]: (r[1], r[2]) for r in rows}


def _stream_of(messages: list[tuple[Any, ...]], gp: int) -> str:
    return next(str(m[1]) for m in messages if m[3] == gp)


def _number_of(messages: list[tuple[Any, ...]], gp: int) -> int:
    return int(json.loads(next(m[4] for m in messages if m[3] == gp))["number"])


def _assert_partitions_gapless_and_in_stream_order(engine: sa.Engine, stream: str) -> None:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT partition, position, origin_stream, origin_stream_version FROM {stream}_stream "
            "ORDER BY partition, position"
        ).all()
    by_partition: dict[int, list[Any]] = collections.defaultdict(list)
    for row in rows:
        by_partition[row[0]].append(row)
    for partition, items in by_partition.items():
        assert [r[1] for r in items] == list(range(len(items))), f"gap in partition {partition}"
        versions: dict[str, int] = {}
        for _, _position, origin, version in items:
            assert version > versions.get(origin, 0), f"{origin} out of order in partition {partition}"
            versions[origin] = version


def test_adopt_refuses_without_changing_anything(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    engine, _ = ddb
    before = dump(engine)
    # A Depeche DB writer in the middle of a transaction holds its table: refused at once.
    with engine.connect() as writer:
        writer.exec_driver_sql("LOCK TABLE depeche_msgs_shop IN ROW EXCLUSIVE MODE")
        with pytest.raises(AdoptionError, match="in use"):
            adopt_depeche_db(engine)
        writer.rollback()
    assert dump(engine) == before
    # Bad options: also nothing changed.
    with pytest.raises(ValueError, match="time zone"):
        adopt_depeche_db(engine, timezone="Mars/Olympus")
    with pytest.raises(AdoptionError, match="no such store"):
        adopt_depeche_db(engine, stream_stores={"shop_orders": "nope"})
    assert dump(engine) == before

    # After an adoption, Depeche DB writing on is noticed, not silently ignored.
    adopt_depeche_db(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO depeche_msgs_shop (message_id, global_position, stream, version, message) "
            "VALUES (%s, nextval('depeche_msgs_shop_global_seq'), 'order-9', 1, '{}')",
            (str(uuid.uuid4()),),
        )
    settled = dump(engine)
    with pytest.raises(AdoptionError, match="changed since it was adopted"):
        adopt_depeche_db(engine)
    assert dump(engine) == settled


def test_adopt_into_a_store_depeche_nb_already_uses_is_refused(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    engine, _ = ddb
    shop = MessageStore[OrderEvent](
        name="shop", engine=engine, serializer=PydanticMessageSerializer(OrderEvent)
    )
    shop.write(stream="mine-1", message=OrderEvent(number=1))
    before = dump(engine)
    with pytest.raises(AdoptionError, match="already holds 1 message"):
        adopt_depeche_db(engine)
    assert dump(engine) == before
    # Leaving that store out adopts the rest (billing) and reports shop as skipped.
    report = adopt_depeche_db(engine, exclude=["shop"])
    actions = {(i.kind, i.name): i.action for i in report.items}
    assert actions[("store", "shop")] == "skipped"
    assert actions[("store", "billing")] == "adopted"
    assert actions[("aggregated_stream", "shop_orders")] == "skipped"
    assert actions[("aggregated_stream", "billing_invoices")] == "adopted"


def test_adopt_command(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    engine, _ = ddb
    dsn = engine.url.render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if k != DSN_ENV}
    command = [sys.executable, "-m", "depeche_nb", "adopt-depeche-db"]
    env["PYTHONPATH"] = str(HERE)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, env={**env, **extra}, timeout=120
        )

    missing = run()
    assert missing.returncode == 2 and DSN_ENV in missing.stderr
    before = dump(engine)
    dry = run("--dsn", dsn, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would adopt" in dry.stdout and "Dry run" in dry.stdout
    assert dump(engine) == before
    bad = run("--dsn", dsn, "--stream-store", "oops")
    assert bad.returncode == 2
    done = run(**{DSN_ENV: dsn})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("adopted") >= 6 and "unchanged" in done.stdout
    again = run("--dsn", dsn)
    assert again.returncode == 0 and "already adopted" in again.stdout and "  adopted" not in again.stdout
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM depeche_subscriptions_shop_mailer WHERE partition >= 0")
    refused = run("--dsn", dsn)
    assert refused.returncode == 1 and "changed since it was adopted" in refused.stderr
    unreachable = run("--dsn", "postgresql://nobody@127.0.0.1:1/none")
    assert unreachable.returncode == 3, unreachable.stderr


def test_module_exports() -> None:
    for name in (
        "open_depeche_db",
        "adopt_depeche_db",
        "AdoptionReport",
        "AdoptionError",
        "DepecheDbExplorer",
    ):
        assert name in depeche_nb.__all__ and hasattr(depeche_nb, name)


def test_explore_and_adopt_through_psycopg3(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    """The explorer and the adoption use SQLAlchemy connections only: a psycopg 3 engine works
    as well, and the result is the same as through psycopg2."""
    pytest.importorskip("psycopg")
    engine, _ = ddb
    psycopg3 = sa.create_engine(
        engine.url.set(drivername="postgresql+psycopg"),
        connect_args={"options": "-c default_transaction_read_only=on"},
    )
    writer = sa.create_engine(engine.url.set(drivername="postgresql+psycopg"))
    try:
        before = dump(engine)
        explorer = open_depeche_db(psycopg3)
        assert len(explorer.messages_dataframe("shop", limit=None)) == len(ddb_messages(engine, "shop"))
        assert explorer.subscription_state_dataframe("shop_mailer")["lag"].sum() > 0
        assert "could not read" not in explorer._repr_html_()
        assert dump(engine) == before
        report = adopt_depeche_db(writer)
        assert report.changed
        assert not adopt_depeche_db(writer).changed
    finally:
        psycopg3.dispose()
        writer.dispose()
    _, orders, audit = open_shop(engine)
    assert our_assignments(orders) == ddb_assignments(engine, "shop_orders")
    assert our_assignments(audit) == ddb_assignments(engine, "shop_audit")


def test_an_empty_stream_and_an_unusable_name_are_skipped_not_fatal(
    ddb: tuple[sa.Engine, dict[str, Any]],
) -> None:
    engine, _ = ddb
    with engine.begin() as conn:
        # Depeche DB creates the tables of a stream whose projector never ran, and accepts
        # names depeche-nb cannot use (upper case).
        conn.exec_driver_sql(
            "CREATE TABLE depeche_stream_idle (LIKE depeche_stream_shop_orders INCLUDING ALL)"
        )
        conn.exec_driver_sql('CREATE TABLE "depeche_msgs_Legacy" (LIKE depeche_msgs_billing INCLUDING ALL)')
    report = adopt_depeche_db(engine)
    items = {(i.kind, i.name): i for i in report.items}
    assert items[("aggregated_stream", "idle")].action == "skipped"
    assert "empty" in items[("aggregated_stream", "idle")].note
    assert items[("store", "Legacy")].action == "skipped"
    assert "not a valid identifier" in items[("store", "Legacy")].note
    assert items[("aggregated_stream", "shop_orders")].action == "adopted"
    assert "Legacy" in open_depeche_db(engine).stores


def test_adopted_streams_display_their_true_sizes_and_backlog(ddb: tuple[sa.Engine, dict[str, Any]]) -> None:
    """Position gaps and the constructed checkpoints of an adopted stream: its displays still
    equal what its tables hold (see `tests/notebook/test_display_exact.py`)."""
    engine, info = ddb
    with engine.begin() as conn:
        # A gap below the head, as Depeche DB may leave one: its message is unprojected now.
        conn.exec_driver_sql("DELETE FROM depeche_stream_shop_orders WHERE partition = 0 AND position = 1")
    report = adopt_depeche_db(engine)
    assert any("1 position gap" in warning for warning in report.warnings)
    _, orders, _ = open_shop(engine)
    shown = shown_partitions(orders)
    assert shown == true_partitions(orders)
    assert shown[0][1] == shown[0][2]  # partition 0: one message fewer than positions
    late = [gp for gp in info["unprojected_global_positions"] if gp in _order_positions(engine)]
    backlog = orders.partitions_dataframe().attrs["unprojected_messages"]
    assert backlog == true_backlog(orders) == len(late) + 1
    assert f"unprojected {backlog}" in check_markup(orders._repr_html_())
    _project_all(orders)
    assert shown_partitions(orders) == true_partitions(orders)
    assert orders.partitions_dataframe().attrs["unprojected_messages"] == true_backlog(orders) == 0


def _order_positions(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT global_position FROM depeche_msgs_shop WHERE stream LIKE %s", ("order-%",)
        ).all()
    return {r[0] for r in rows}

"""`engine.dispose()` ends every session depeche-nb opened for that engine, on both drivers,
so a `DROP DATABASE` right after it succeeds."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from depeche_nb import MessageHandler, MessageStore, SubscriptionMessage
from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.driver import DRIVERS
from depeche_nb.tools import DbLockProvider, PgNotificationListener, PydanticMessageSerializer
from tests.support import Numbered


@pytest.fixture
def admin(engine: sa.Engine) -> Iterator[sa.Engine]:
    admin = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    yield admin
    admin.dispose()


def sessions_on(admin: sa.Engine, database: str) -> int:
    with admin.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).scalar_one()
        )


class Count(MessageHandler[Numbered]):
    def __init__(self) -> None:
        self.seen: list[int] = []

    @MessageHandler.register
    def handle(self, message: SubscriptionMessage[Numbered]) -> None:
        self.seen.append(message.stored_message.message.number)


@pytest.mark.parametrize("driver", DRIVERS)
def test_dispose_closes_every_session_and_drop_database_succeeds(admin: sa.Engine, driver: str) -> None:
    database = f"dispose_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    url = admin.url.set(database=database, drivername=f"postgresql+{driver}")
    engine = connect(url.render_as_string(hide_password=False))
    store = MessageStore(name="orders", engine=engine, serializer=PydanticMessageSerializer(Numbered))

    # Write connections of several threads, the pool, a listener and lock sessions.
    def write(number: int) -> None:
        store.write(f"order-{number}", Numbered(number=number))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stream = store.aggregated_stream(
        name="orders_by_id", partitioner=_ByNumber(), stream_wildcards=["order-%"]
    )
    assert len(stream.projector.step()) == 4
    handler = Count()
    subscription = stream.subscription(name="counter", handlers=handler)
    subscription.runner.step()
    assert sorted(handler.seen) == [0, 1, 2, 3]
    locks = DbLockProvider("extra", engine)
    assert locks.lock("held")
    listener = PgNotificationListener(engine, [store.notification_channel])
    listener.start()
    assert sessions_on(admin, database) >= 4

    engine.dispose()

    # Closing is immediate on our side; a backend process may take a moment to exit
    # (DROP DATABASE itself waits up to 5 s for that, too).
    deadline = time.monotonic() + 5
    while sessions_on(admin, database) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions_on(admin, database) == 0
    assert not listener.is_running
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{database}"')
        assert (
            conn.exec_driver_sql("SELECT count(*) FROM pg_database WHERE datname = %s", (database,)).scalar()
            == 0
        )


def test_a_disposed_engine_can_be_used_again(engine: sa.Engine, unique_name: str) -> None:
    """Dispose ends sessions, not the engine: the next write opens a new connection."""
    private = connect(engine.url.render_as_string(hide_password=False))
    store = MessageStore(name=unique_name, engine=private, serializer=PydanticMessageSerializer(Numbered))
    store.write("s-1", Numbered(number=1))
    private.dispose()
    position = store.write("s-1", Numbered(number=2))
    assert position.version == 2
    assert [m.message.number for m in store.read("s-1")] == [1, 2]
    private.dispose()


class _ByNumber:
    def get_partition(self, message: object) -> int:
        return int(message.message.number) % 2  # type: ignore[attr-defined]

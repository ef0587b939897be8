"""Helpers of the listener and executor tests: send a NOTIFY, watch a backend go away."""

from __future__ import annotations

import time

import sqlalchemy as sa

WAIT_S = 1.0


def notify(engine: sa.Engine, channel: str, payload: str = "") -> None:
    with engine.connect() as conn:
        conn.execute(
            sa.text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
        )
        conn.commit()


def backend_alive(engine: sa.Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()
        )


def wait_until_gone(engine: sa.Engine, pid: int, timeout: float = 2.0) -> bool:
    # A backend exits a moment after its client closed the socket.
    deadline = time.monotonic() + timeout
    while backend_alive(engine, pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True

"""A real browser: Voila serves tests/system/browser/console.ipynb, headless Chromium presses Replay
on the OperationsConsole's parked message, then Confirm, and sees it leave the list.

Serving and the browser are `tests/system/test_browser.py`'s (its `serve()` serves the module's
`NOTEBOOK`, pointed at this test's notebook for the test's duration). This process holds one
of `audit`'s partitions meanwhile, as a runner on another machine would, so the page shows a
lock holder whose pid and application_name the test knows. `DEPECHE_NB_UPDATE_SCREENSHOT=1`
also copies the screenshot to docs/console.png (the README shows it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from depeche_nb.engine.parking import PARKED, REPLAYED, ParkedMessages
from depeche_nb.postgres.connection import connect
from depeche_nb.postgres.locks import DbLockProvider
from tests.system import test_browser as served
from tests.system.test_browser import CHROMIUM, CHROMIUM_ARGS, RENDER_MS, UPDATE_MS

NOTEBOOK = Path(__file__).parent / "browser" / "console.ipynb"
SCREENSHOT_COPY = Path(__file__).resolve().parents[2] / "docs" / "console.png"
WORKER_APP = "worker_7_audit"

pytestmark = served.pytestmark


def statuses(engine: sa.Engine, subscription: str) -> list[str]:
    return [p.status for p in ParkedMessages(engine, subscription).list(include_resolved=True)]


@pytest.mark.timeout(240)
def test_console_replay_with_confirmation_in_a_real_browser(
    engine: sa.Engine, tmp_path: Path, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect, sync_playwright

    name = unique_name
    monkeypatch.setattr(served, "NOTEBOOK", NOTEBOOK)
    worker_engine = connect(
        engine.url.update_query_dict({"application_name": WORKER_APP}).render_as_string(hide_password=False)
    )
    # `audit` reads partition 0 (orders 0, 2, 4) and is behind there: a runner elsewhere holds it.
    worker = DbLockProvider(f"{name}_audit", worker_engine)
    assert worker.lock(f"subscription-{name}_audit-0")
    worker_pid = worker.session_pid
    try:
        with served.serve("voila", tmp_path, name) as (base, _), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1400})
                page.set_default_timeout(UPDATE_MS)
                served.open_notebook(page, "voila", base, NOTEBOOK.name, run=False)

                rows = page.locator(".dnb-console-parked-row")
                rows.first.wait_for(state="visible", timeout=RENDER_MS)
                expect(rows).to_have_count(1)
                expect(rows.first).to_contain_text("ValueError: order 2: no stock")
                expect(rows.first).to_contain_text("partition 0 position 1")
                subscriptions = page.locator(".dnb-console-subscriptions")
                expect(subscriptions).to_contain_text(f"pid {worker_pid}")
                expect(subscriptions).to_contain_text(WORKER_APP)
                diagnosis = page.locator(".dnb-console-diagnosis")
                expect(diagnosis).to_contain_text(f"Why is partition 0 of {name}_audit behind?")
                expect(diagnosis).to_contain_text(
                    f"a runner holds the partition: pid {worker_pid} ({WORKER_APP})"
                )

                # The first click only asks.
                confirm_row = page.locator(".dnb-console-confirm-row")
                expect(confirm_row).to_be_hidden()
                rows.first.locator("button.dnb-console-replay").click()
                expect(confirm_row).to_be_visible()
                expect(confirm_row).to_contain_text("Replay parked message #")
                expect(rows).to_have_count(1)
                assert statuses(engine, f"{name}_shipping") == [PARKED]

                shot = tmp_path / "console.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if os.environ.get("DEPECHE_NB_UPDATE_SCREENSHOT") == "1":
                    SCREENSHOT_COPY.parent.mkdir(exist_ok=True)
                    shutil.copyfile(shot, SCREENSHOT_COPY)

                # Confirm: replayed by the kernel's handler, and gone from the list.
                page.locator("button.dnb-console-confirm").click()
                expect(rows).to_have_count(0)
                expect(confirm_row).to_be_hidden()
                expect(page.locator(".dnb-console-outcome")).to_contain_text("Replayed parked message #")
                assert statuses(engine, f"{name}_shipping") == [REPLAYED]
                expect(page.locator(".dnb-error-line .dnb-error")).to_have_count(0)
            finally:
                browser.close()
    finally:
        worker.finalize()
        worker_engine.dispose()

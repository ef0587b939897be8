"""A real browser: Voila serves tests/browser/stepper.ipynb, headless Chromium clicks Step.

This is the one test that sees the widgets as a user does: rendered by the
ipywidgets frontend, a click travelling over the kernel's comm channel, and a
live refresh arriving through LISTEN/NOTIFY and the kernel's io_loop.

Chromium is Debian's (`/usr/bin/chromium`, installed by `.ci/run`); Playwright
only drives it (no browser download). The test is skipped only when that
binary is missing. `DEPECHE_NB_UPDATE_SCREENSHOT=1` also copies the
screenshot to docs/stepper.png.

No `from __future__ import annotations`: the message class below must match
the notebook's (same name and fields) for the store to read it.
"""

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
NOTEBOOK = Path(__file__).parent / "browser" / "stepper.ipynb"
SCREENSHOT_COPY = Path(__file__).resolve().parent.parent / "docs" / "stepper.png"
SERVER_START_S = 90.0
RENDER_MS = 120_000  # the first page load starts a kernel and runs the notebook
UPDATE_MS = 30_000

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)",
)


class Ordered(pydantic.BaseModel):
    """The notebook's message type, so this process can write to its store."""

    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    number: int

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


class ByOrder:
    def get_partition(self, message: Any) -> int:
        return int(message.stream.rsplit("-", 1)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(url: str, process: "subprocess.Popen[bytes]", log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"voila exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            # Any HTTP answer means it serves; "/" itself would already start a kernel.
            with urllib.request.urlopen(url + "voila/static/none", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"voila did not answer within {SERVER_START_S} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def voila(tmp_path: Path, name: str) -> Iterator[str]:
    """Serve the notebook on 127.0.0.1; always stopped, its kernels with it."""
    port = free_port()
    log = tmp_path / "voila.log"
    env = dict(os.environ)  # DEPECHE_NB_DSN: the kernel uses this session's database
    env["DEPECHE_NB_BROWSER_NAME"] = name
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "voila",
                str(NOTEBOOK),
                "--no-browser",
                f"--port={port}",
                "--Voila.ip=127.0.0.1",
                "--show_tracebacks=True",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_until_serving(url, process, log)
            yield url
        finally:
            # SIGTERM lets the server shut its kernels down (they run in sessions of their own).
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.mark.timeout(240)
def test_stepper_in_a_real_browser(engine: sa.Engine, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    name = f"br_{uuid.uuid4().hex[:12]}"
    with voila(tmp_path, name) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(UPDATE_MS)
            page.goto(url, timeout=RENDER_MS)

            step = page.locator("button.dnb-stepper-step")
            step.wait_for(state="visible", timeout=RENDER_MS)
            last_step = page.locator(".dnb-stepper-last-step")
            expect(last_step).to_contain_text("no step yet")
            bars = page.locator(".dnb-stepper-bars")
            expect(bars.locator("tbody tr")).to_have_count(2)  # partitions 0 and 1
            expect(bars).to_contain_text("lag 2")  # order-0 got messages 0 and 2
            # The partition map: one coloured cell per projected message.
            cells = page.locator(".dnb-partition-grid td.dnb-pm-cell")
            expect(cells).to_have_count(3)

            step.click()
            # The last-step table lists the three handled messages.
            rows = last_step.locator("table.dnb-table tbody tr")
            expect(rows).to_have_count(3)
            expect(last_step).to_contain_text("Step: 3 messages handled")
            expect(rows.first).to_contain_text("Ordered")
            expect(rows.first).to_contain_text("handled")
            expect(bars).not_to_contain_text("lag 1")
            expect(bars).not_to_contain_text("lag 2")

            # Live: written and projected by this process, shown without a click.
            store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(Ordered))
            stream = store.aggregated_stream(
                name=f"{name}_agg", partitioner=ByOrder(), stream_wildcards=["order-%"]
            )
            store.write_all("order-1", [Ordered(number=10), Ordered(number=11)])
            stream.projector.run()
            expect(bars).to_contain_text("lag 2")
            expect(cells).to_have_count(5)
            expect(page.locator(".dnb-error-line .dnb-error")).to_have_count(0)  # no widget shows an error

            # The screenshot shows a step's table next to a partition that is behind.
            shot = tmp_path / "stepper.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("DEPECHE_NB_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT_COPY.parent.mkdir(exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT_COPY)

            step.click()
            expect(rows).to_have_count(2)
            expect(last_step).to_contain_text("Step: 2 messages handled")
            expect(bars).not_to_contain_text("lag 2")
        finally:
            browser.close()

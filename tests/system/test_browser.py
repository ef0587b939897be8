"""Real browsers: Voila, JupyterLab and Notebook 7 serve tests/system/browser/widgets.ipynb, headless
Chromium clicks.

These tests see the widgets as a user does: rendered by each frontend's ipywidgets
manager, a click travelling over the kernel's comm channel, and a live refresh
arriving through LISTEN/NOTIFY and the kernel's io_loop. In JupyterLab and Notebook 7
they also open a saved notebook of the widgets' outputs that nobody trusted: there no
widget renders, and the static snapshot (sanitised, without its style sheet) must
still read well.

Chromium is Debian's (`/usr/bin/chromium`, installed by `.ci/run`); Playwright only
drives it (no browser download). The tests are skipped only when that binary is
missing. `DEPECHE_NB_UPDATE_SCREENSHOT=1` also copies Voila's screenshot to
docs/stepper.png.

No `from __future__ import annotations`: the message class below must match the
notebook's (same name and fields) for the store to read it.
"""

import contextlib
import datetime as dt
import json
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

import nbformat
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
NOTEBOOK = Path(__file__).parent / "browser" / "widgets.ipynb"
SCREENSHOT_COPY = Path(__file__).resolve().parents[2] / "docs" / "stepper.png"
SERVER_START_S = 90.0
RENDER_MS = 120_000  # the first page load starts a kernel and runs the notebook
UPDATE_MS = 30_000
REFUSED = 13  # the notebook's handler fails on this number
# Where each Jupyter frontend opens a notebook (Voila serves the one it was given at "/").
NOTEBOOK_URLS = {"lab": "lab/tree/{}", "notebook": "notebooks/{}"}
# JupyterLab and Notebook 7 (with `expose_app_in_browser`): the notebook's panel, once its
# kernel session is ready, runs all cells as Run > Run All Cells does.
APP_READY = "() => window.jupyterapp?.shell.currentWidget?.sessionContext !== undefined"
RUN_ALL = """async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    await window.jupyterapp.commands.execute("notebook:run-all-cells");
}"""

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
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it serves
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"the server did not answer within {SERVER_START_S} s:\n{log.read_text()[-4000:]}")


def jupyter_config(folder: Path) -> None:
    """A private Jupyter configuration: no token, the app exposed to the test's scripts, and
    nothing from the user's own settings. Notebooks render all cells at once (no windowing),
    so every widget is in the page, and no news toast covers them."""
    settings = folder / "lab" / "user-settings" / "@jupyterlab"
    for plugin, values in {
        "notebook-extension/tracker": {"windowingMode": "none"},
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    server = {
        "ServerApp": {"token": "", "password": "", "allow_root": True, "open_browser": False},
        "IdentityProvider": {"token": ""},
        "LabApp": {"expose_app_in_browser": True},
        "JupyterNotebookApp": {"expose_app_in_browser": True},
    }
    (folder / "jupyter_server_config.json").write_text(json.dumps(server))


@contextlib.contextmanager
def serve(frontend: str, tmp_path: Path, name: str) -> Iterator[tuple[str, Path]]:
    """Serve the notebook on 127.0.0.1 with `frontend`; yields the base URL and the folder it
    serves. Always stopped, its kernels with it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    root = tmp_path / "root"
    root.mkdir()
    log = tmp_path / "server.log"
    env = dict(os.environ)  # DEPECHE_NB_DSN: the kernel uses this session's database
    env["DEPECHE_NB_BROWSER_NAME"] = name
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    if frontend == "voila":
        argv = ["voila", str(NOTEBOOK), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"]
        argv.append("--show_tracebacks=True")
        probe = base + "voila/static/none"  # "/" itself would already start a kernel
    else:
        shutil.copyfile(NOTEBOOK, root / NOTEBOOK.name)
        env["JUPYTER_CONFIG_DIR"] = str(tmp_path / "config")
        env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")  # also: no notebook is trusted here
        jupyter_config(tmp_path / "config")
        # JupyterLab's server also serves Notebook 7's pages (its server extension is enabled).
        argv = ["jupyterlab", f"--port={port}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}"]
        probe = base + "api/status"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", *argv], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_until_serving(probe, process, log)
            yield base, root
        finally:
            # SIGTERM lets the server shut its kernels down (they run in sessions of their own).
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def open_notebook(page: Any, frontend: str, base: str, notebook: str, run: bool) -> None:
    if frontend == "voila":
        page.goto(base, timeout=RENDER_MS)  # Voila runs the notebook itself
        return
    page.goto(base + NOTEBOOK_URLS[frontend].format(notebook), timeout=RENDER_MS)
    page.wait_for_function(APP_READY, timeout=RENDER_MS)
    if run:
        page.evaluate(RUN_ALL)


def refusing_register() -> depeche_nb.MessageHandlerRegister[Any]:
    """The notebook's handler, as this process runs it for the saved notebook's stepper."""
    register: depeche_nb.MessageHandlerRegister[Any] = depeche_nb.MessageHandlerRegister()

    def on_ordered(message: Ordered) -> None:
        if message.number == REFUSED:
            raise ValueError(f"order {message.number} cannot be handled")

    register.register(on_ordered)
    return register


@pytest.mark.timeout(240)
@pytest.mark.parametrize("frontend", ["voila", "lab", "notebook"])
def test_widgets_in_a_real_browser(engine: sa.Engine, tmp_path: Path, frontend: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    name = f"br_{uuid.uuid4().hex[:12]}"
    with serve(frontend, tmp_path, name) as (base, root), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.set_default_timeout(UPDATE_MS)
            open_notebook(page, frontend, base, NOTEBOOK.name, run=True)

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
            # The stream browser: two messages a page; Next shows the third.
            messages = page.locator(".dnb-browser-table")
            page.locator("button.dnb-browser-next").wait_for(state="visible", timeout=RENDER_MS)
            expect(messages).to_contain_text("messages 1-2 of 3")
            page.locator("button.dnb-browser-next").click()
            expect(messages).to_contain_text("messages 3-3 of 3")
            expect(messages.locator("tbody tr")).to_have_count(1)

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
            expect(messages).to_contain_text("messages 3-4 of 5")
            expect(page.locator(".dnb-error-line .dnb-error")).to_have_count(0)  # no widget shows an error

            if frontend == "voila":
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

            # A message the handler refuses: the error line, and its traceback on a click.
            store.write("order-0", Ordered(number=REFUSED))
            stream.projector.run()
            expect(bars).to_contain_text("lag 1")
            step.click()
            expect(last_step).to_contain_text("Step: 1 message — 1 failed")
            error_line = page.locator(".dnb-stepper-error")
            expect(error_line).to_contain_text(f"ValueError: order {REFUSED} cannot be handled")
            trace = error_line.locator("details.dnb-traceback pre")
            expect(trace).to_be_hidden()
            error_line.get_by_text("show traceback").click()
            expect(trace).to_be_visible()
            expect(trace).to_contain_text("Traceback (most recent call last)")
            if sys.version_info >= (3, 11):  # the runner's note names the message (exception notes)
                expect(trace).to_contain_text(f"while subscription '{name}_sub' handled message")
            expect(bars).to_contain_text("lag 1")  # not acknowledged

            if frontend != "voila":
                check_untrusted_fallback(browser, frontend, base, root, engine, name)
        finally:
            browser.close()


def check_untrusted_fallback(
    browser: Any, frontend: str, base: str, root: Path, engine: sa.Engine, name: str
) -> None:
    """A notebook of the three widgets' outputs as a kernel saves them, opened untrusted: the
    frontend shows each static snapshot, sanitised, and its text reads well."""
    from depeche_nb.widgets import PartitionMap, StreamBrowser, SubscriptionStepper

    store = depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(Ordered))
    stream = store.aggregated_stream(name=f"{name}_agg", partitioner=ByOrder(), stream_wildcards=["order-%"])
    subscription = stream.subscription(name=f"{name}_sub", handlers=refusing_register())
    stepper = SubscriptionStepper(subscription, live=False)
    made = [stepper, PartitionMap(stream, live=False), StreamBrowser(store, "order-%", live=False)]
    try:
        stepper.step()  # fails on the refused message again: the snapshot shows the error
        outputs = [widget._repr_mimebundle_() for widget in made]
    finally:
        for widget in made:
            widget.close()
    saved = nbformat.v4.new_notebook()
    saved.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for i, bundle in enumerate(outputs):
        cell = nbformat.v4.new_code_cell("widget", execution_count=i + 1)
        cell.outputs = [nbformat.v4.new_output("display_data", data=bundle)]
        saved.cells.append(cell)
    nbformat.write(saved, root / "saved.ipynb")

    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    open_notebook(page, frontend, base, "saved.ipynb", run=False)
    shown = page.locator(".jp-OutputArea-output")
    shown.nth(2).wait_for(state="visible", timeout=RENDER_MS)
    assert [shown.nth(i).get_attribute("data-mime-type") for i in range(3)] == ["text/html"] * 3
    stepper_text, map_text, browser_text = (shown.nth(i).inner_text().splitlines() for i in range(3))

    # Lines as a reader sees them (cells tab-separated); the style sheet is gone, so the
    # separators between facts and legend entries show.
    assert stepper_text[:4] == [
        f"SubscriptionStepper {name}_sub",
        f"stream {name}_agg · 2 partitions · lag 1 · parked 0 · initialised yes",
        "Step stopped by an error (what was not acknowledged will be delivered again): "
        f"ValueError: order {REFUSED} cannot be handled",
        "show traceback",  # closed: the traceback is one click away
    ]
    for line in (
        "Step: 1 message — 1 failed",
        "messages 1 · failed 1",
        "1 message failed: not acknowledged, delivered again by the next step",
        # Partition, percentage acknowledged (the bar), position, head, lag: one line each.
        "0\t67%\t1\t2\tlag 1\t",
        "1\t100%\t2\t2\tlag 0\t",
    ):
        assert line in stepper_text, (line, stepper_text)
    assert map_text[:2] == [
        f"PartitionMap {name}_agg",
        f"store {name} · wildcards order-% · 2 partitions · projected 6",
    ]
    for line in ("0\t0-2\t\tA\tA\tA", "1\t0-2\t\tB\tB\tB", "A order-0 · B order-1"):
        assert line in map_text, (line, map_text)
    assert browser_text[:2] == [f"StreamBrowser {name} · order-%", "messages 1-6 of 6"]
    assert "6\torder-0\t3\tOrdered\t" + '{"number": 13, ' in "\n".join(browser_text)
    assert not page.get_by_text("Error displaying widget").count()
    page.close()

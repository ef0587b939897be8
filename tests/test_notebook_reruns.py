"""What notebook users do all day, through a real kernel: run a cell, edit it, run it again.

The kernel is a real IPython kernel (jupyter_client), so classes are defined in
`__main__` as in a notebook and a re-run cell makes a new class object.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from jupyter_client.manager import KernelManager


class Kernel:
    def __init__(self) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=dict(os.environ), stderr=subprocess.DEVNULL)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str) -> str:
        """Execute one cell; its printed output, or AssertionError with the traceback."""
        printed: list[str] = []
        errors: list[str] = []

        def hook(message: dict[str, object]) -> None:
            content = message["content"]
            assert isinstance(content, dict)
            if message["msg_type"] == "stream":
                printed.append(str(content["text"]))
            elif message["msg_type"] == "error":
                errors.append("\n".join(str(line) for line in content["traceback"]))

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=120)
        if reply["content"]["status"] != "ok":
            raise AssertionError("cell failed:\n" + "\n".join(errors))
        return "".join(printed)

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    yield k
    k.close()


CLASS_CELL = """
class ItemAdded(pydantic.BaseModel):
    sku: str
    {extra}
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.at
"""


def test_a_re_run_event_class_cell_reads_writes_and_dispatches_like_the_old_class(kernel: Kernel) -> None:
    schema = f"rerun_{uuid.uuid4().hex[:8]}"
    kernel.run(
        "import datetime as dt, uuid, pydantic, depeche_nb\n"
        "from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner\n"
        f"engine = depeche_nb.connect(schema={schema!r}, fresh=True)"
    )
    kernel.run(CLASS_CELL.format(extra=""))
    kernel.run(
        "store = depeche_nb.MessageStore(name='cart', engine=engine, "
        "serializer=PydanticMessageSerializer(ItemAdded))\n"
        "for sku in ('a', 'b', 'c'):\n"
        "    store.write('cart-1', ItemAdded(sku=sku))\n"
        "stream = store.aggregated_stream(name='carts', partitioner=StreamNamePartitioner(2), "
        "stream_wildcards=['cart-%'])\n"
        "stream.projector.run()"
    )
    # The user edits the class cell (a new field) and runs it again: a new class object.
    kernel.run(CLASS_CELL.format(extra="quantity: int = 1"))
    out = kernel.run(
        "seen = []\n"
        "class Cart(depeche_nb.MessageHandler[ItemAdded]):\n"
        "    @depeche_nb.MessageHandler.register\n"
        "    def added(self, event: ItemAdded) -> None:\n"
        "        seen.append(event.sku)\n"
        "sub = stream.subscription(name='cart_view', handlers=Cart())\n"
        "report = sub.runner.step()\n"
        "print(sorted(h.outcome for h in report.handled), seen)"
    )
    assert out.strip() == "['handled', 'handled', 'handled'] ['a', 'b', 'c']"
    out = kernel.run(
        "store.write('cart-1', ItemAdded(sku='d', quantity=2))\n"
        "last = list(store.read('cart-1'))[-1].message\n"
        "print(type(last) is ItemAdded, last.sku, last.quantity)"
    )
    assert out.strip() == "True d 2"
    kernel.run(f"engine.dispose(); depeche_nb.connect(schema={schema!r}, fresh=True).dispose()")

"""What notebook users do all day, through a real kernel: run a cell, edit it, run it again.

The kernel is a real IPython kernel (jupyter_client), so classes are defined in
`__main__` as in a notebook and a re-run cell makes a new class object.
"""

from __future__ import annotations

import ast
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
        """Execute one cell; its printed output, or AssertionError with the traceback.
        What it wrote to stderr alone is kept in `stderr`."""
        status, printed, errors = self._execute(code)
        if status != "ok":
            raise AssertionError("cell failed:\n" + errors)
        return printed

    def run_failing(self, code: str) -> str:
        """Execute one cell that must fail; its traceback as text."""
        status, _, errors = self._execute(code)
        assert status != "ok", "the cell was expected to fail"
        return errors

    def _execute(self, code: str) -> tuple[str, str, str]:
        printed: list[str] = []
        errors: list[str] = []
        self.stderr = ""

        def hook(message: dict[str, object]) -> None:
            content = message["content"]
            assert isinstance(content, dict)
            if message["msg_type"] == "stream":
                printed.append(str(content["text"]))
                if content["name"] == "stderr":
                    self.stderr += str(content["text"])
            elif message["msg_type"] == "error":
                errors.append("\n".join(str(line) for line in content["traceback"]))

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=120)
        return str(reply["content"]["status"]), "".join(printed), "\n".join(errors)

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


SETUP_CELL = (
    """
import datetime as dt, uuid, pydantic, depeche_nb
from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner
engine = depeche_nb.connect(schema={schema!r}, fresh=True)
"""
    + CLASS_CELL.format(extra="")
    + """
store = depeche_nb.MessageStore(name='shop', engine=engine, serializer=PydanticMessageSerializer(ItemAdded))
for stream_name, skus in (('cart-1', 'ab'), ('cart-2', 'cde'), ('invoice-1', 'fg')):
    for sku in skus:
        store.write(stream_name, ItemAdded(sku=sku))
seen = []
class Seen(depeche_nb.MessageHandler[ItemAdded]):
    @depeche_nb.MessageHandler.register
    def added(self, event: depeche_nb.StoredMessage[ItemAdded]) -> None:
        seen.append((event.stream, event.version))
"""
)
STREAM_CELL = """
carts = store.aggregated_stream(name='carts', partitioner={partitioner}, stream_wildcards={wildcards}{extra})
carts.projector.run()
view = carts.subscription(name='cart_view', handlers=Seen())
"""
PLACEMENT = """
import collections
placed = collections.defaultdict(set)
for row in carts.assignments_dataframe(limit=None).itertuples():
    placed[row.origin_stream].add(row.partition)
print(sorted((k, sorted(v)) for k, v in placed.items()))
"""


def test_a_re_run_aggregated_stream_cell_with_an_edit_is_refused_until_rebuilt(kernel: Kernel) -> None:
    schema = f"rerun_{uuid.uuid4().hex[:8]}"
    kernel.run(SETUP_CELL.format(schema=schema))
    kernel.run(STREAM_CELL.format(partitioner="StreamNamePartitioner(2)", wildcards="['cart-%']", extra=""))
    kernel.run("view.runner.step(max_messages=3)")
    first = kernel.run(PLACEMENT)
    assert "invoice" not in first
    # The user edits the cell: one more wildcard and another partitioner, and runs it again.
    edited = STREAM_CELL.format(
        partitioner="StreamNamePartitioner(8)", wildcards="['cart-%', 'invoice-%']", extra=""
    )
    error = kernel.run_failing(edited)
    assert "DefinitionChangedError" in error and "rebuild=True" in error
    assert "StreamNamePartitioner(partitions=2), not StreamNamePartitioner(partitions=8)" in error
    assert kernel.run(PLACEMENT) == first, "a refused definition changed the projection"
    # As the error says: the same cell with rebuild=True.
    kernel.run(
        edited.replace(
            "stream_wildcards=['cart-%', 'invoice-%']",
            "stream_wildcards=['cart-%', 'invoice-%'], rebuild=True",
        )
    )
    summary = kernel.run("print(carts.last_rebuild.summary())")
    assert "projected 7 message(s)" in summary and "'cart_view' keeps" in summary
    placed = ast.literal_eval(kernel.run(PLACEMENT).strip())
    assert [stream for stream, _ in placed] == ["cart-1", "cart-2", "invoice-1"]
    assert all(len(partitions) == 1 for _, partitions in placed), f"a stream is split: {placed}"
    out = kernel.run("view.runner.run()\nprint(sorted(set(seen)))")
    assert out.strip() == (
        "[('cart-1', 1), ('cart-1', 2), ('cart-2', 1), ('cart-2', 2), ('cart-2', 3), "
        "('invoice-1', 1), ('invoice-1', 2)]"
    )
    # Running the rebuilt cell once more (the usual re-run) is quiet: no second rebuild.
    kernel.run(edited)
    assert kernel.run("print(carts.last_rebuild)").strip() == "None"


def test_a_subscription_without_a_handler_for_a_type_says_so_in_the_cell(kernel: Kernel) -> None:
    """No logging configured, as in a fresh notebook: the warning shows on the cell's stderr,
    once per message type, next to the report that names the skipped types."""
    schema = f"nohandler_{uuid.uuid4().hex[:8]}"
    kernel.run(
        "import datetime as dt, uuid, pydantic, depeche_nb\n"
        "from depeche_nb.tools import PydanticMessageSerializer, StreamNamePartitioner\n"
        f"engine = depeche_nb.connect(schema={schema!r}, fresh=True)"
    )
    kernel.run(CLASS_CELL.format(extra=""))
    kernel.run(
        CLASS_CELL.replace("ItemAdded", "ItemRemoved").format(extra="")
        + "store = depeche_nb.MessageStore(name='cart', engine=engine, "
        "serializer=PydanticMessageSerializer(ItemAdded | ItemRemoved))\n"
        "stream = store.aggregated_stream(name='carts', partitioner=StreamNamePartitioner(1), "
        "stream_wildcards=['cart-%'])\n"
        "register = depeche_nb.MessageHandlerRegister()\n"
        "def added(event: ItemAdded) -> None:\n"
        "    pass\n"
        "register.register(added)\n"
        "sub = stream.subscription(name='cart_view', handlers=register)\n"
        "store.write_all('cart-1', [ItemAdded(sku='a'), ItemRemoved(sku='a'), ItemRemoved(sku='b')])\n"
        "stream.projector.run()"
    )
    out = kernel.run("print(sub.runner.step())")
    assert out.startswith(
        "subscription 'cart_view' has no handler for ItemRemoved: its messages are acknowledged "
        "unhandled, skipped for good (the first at partition 0, position 1)"
    )
    assert kernel.stderr == out.split("\n", 1)[0] + "\n"  # one line, on stderr
    assert out.endswith(
        "<RunnerReport cart_view: 1 handled, 2 acknowledged without a handler (ItemRemoved ×2)>\n"
    )
    out = kernel.run(
        "store.write('cart-1', ItemRemoved(sku='c')); stream.projector.run()\nprint(sub.runner.step())"
    )
    assert kernel.stderr == ""  # said once per type
    assert out == "<RunnerReport cart_view: 1 acknowledged without a handler (ItemRemoved ×1)>\n"
    kernel.run(f"engine.dispose(); depeche_nb.connect(schema={schema!r}, fresh=True).dispose()")

"""Rich HTML reprs: every one renders, shows the right numbers, escapes user data, stays small.

No `from __future__ import annotations`: handler annotations must be real objects.
"""

import subprocess
import sys
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb import (
    LogAndIgnoreSubscriptionErrorHandler,
    MessageHandlerRegister,
    ProjectionReport,
    RunnerReport,
    StoredMessage,
)
from depeche_nb.notebook import html as h
from depeche_nb.postgres.names import quote_ident
from depeche_nb.tools import DbLockProvider, PydanticMessageSerializer
from tests.notebook.support import check_markup
from tests.support import AnyMessage, Numbered, Renamed

HOSTILE_STREAM = "<script>alert(1)</script>"
HOSTILE_TEXT = "\"'&<b>bold</b>"


class Parity:
    def get_partition(self, message: StoredMessage[Any]) -> int:
        return 0 if isinstance(message.message, Numbered) and message.message.number % 2 == 0 else 1


class ByNumber:
    """`n-<k>` goes to partition k."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        return int(message.stream.rsplit("-", 1)[1])


def handle_numbered(message: Numbered) -> None:
    if message.text == "fail":
        raise RuntimeError(HOSTILE_STREAM)


def handle_renamed(message: Renamed) -> None:
    return None


def _register() -> MessageHandlerRegister[Any]:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    register.register(handle_numbered)
    register.register(handle_renamed)
    return register


def _store(engine: sa.Engine, name: str) -> depeche_nb.MessageStore[Any]:
    return depeche_nb.MessageStore(name, engine, PydanticMessageSerializer(AnyMessage))


# -- store and stored messages --------------------------------------------------------------------


def test_store_repr(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    empty = check_markup(store._repr_html_())
    assert unique_name in empty and "0 messages" in empty and "nothing written yet" in empty

    store.write_all("orders-1", [Numbered(number=1), Numbered(number=2)])
    store.write("orders-2", Renamed(name="second"))
    page = store._repr_html_()
    text = check_markup(page)
    assert "MessageStore" in text and unique_name in text
    assert "3 messages" in text and "2 streams" in text
    assert "orders-1" in text and "orders-2" in text
    assert "Renamed" in text and '"name": "second"' in text  # the latest payload, previewed
    assert "more streams" not in text  # everything fits
    assert repr(store) == f"MessageStore(name={unique_name!r})"


def test_store_repr_escapes_hostile_names_and_payloads(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    store.write(HOSTILE_STREAM, Numbered(number=1, text=HOSTILE_TEXT))
    store.write("x" + HOSTILE_TEXT, Renamed(name=HOSTILE_TEXT))
    page = store._repr_html_()
    text = check_markup(page)
    assert HOSTILE_STREAM not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page
    assert "x&quot;&#x27;&amp;&lt;b&gt;bold&lt;/b&gt;" in page
    # Decoded, the user's text reads as written.
    assert HOSTILE_STREAM in text and "x" + HOSTILE_TEXT in text

    stored = next(store.read(HOSTILE_STREAM))
    message_page = stored._repr_html_()
    message_text = check_markup(message_page)
    assert "<b>" not in message_page and HOSTILE_STREAM not in message_page
    assert HOSTILE_TEXT in message_text and HOSTILE_STREAM in message_text


def test_stored_message_repr(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    store.write("s-1", Numbered(number=41, text="hello"))
    store.write("s-1", Numbered(number=42, text="y" * 5000))
    first, second = list(store.read("s-1"))
    text = check_markup(first._repr_html_())
    assert "StoredMessage" in text and "Numbered" in text
    assert "s-1" in text and str(first.message_id) in text and "41" in text and "hello" in text
    assert str(first.global_position) in text
    long_page = second._repr_html_()
    long_text = check_markup(long_page)
    assert "y" * 100 not in long_text  # long values are cut...
    assert "y" * 500 not in long_page  # ...and so is their hover text
    assert repr(first).startswith("StoredMessage(")


def test_store_repr_is_bounded(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    with engine.begin() as conn:
        for n in range(300):
            store.write_all(f"many-{n}", [Numbered(number=i) for i in range(10)], conn=conn)
    store.write("huge-1", Numbered(number=0, text="z" * 1_000_000))
    page = store._repr_html_()
    text = check_markup(page)
    assert "3,001 messages" in text and "301 streams" in text
    assert "281 more streams not shown" in text
    assert "2,996 earlier messages not shown" in text
    assert "huge-1" in text  # the most recently written stream comes first
    assert "z" * 300 not in page


# -- aggregated streams and projection reports ----------------------------------------------------


def test_aggregated_stream_repr_and_projection_reports(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=Parity(), stream_wildcards=["n-%"]
    )
    for n in range(5):
        store.write(f"n-{n}", Numbered(number=n))
    store.write("other-1", Numbered(number=99))  # does not match: never counts as lag

    text = check_markup(stream._repr_html_())
    assert "AggregatedStream" in text and f"{unique_name}_agg" in text
    assert "unprojected 5" in text and "5 stored messages" in text and "no partitions yet" in text

    report = stream.projector.step(3)
    assert isinstance(report, ProjectionReport)
    report_text = check_markup(report._repr_html_())
    assert "ProjectionReport" in report_text and "3 messages" in report_text
    assert "more to project" in report_text and "n-2" in report_text
    assert repr(report).startswith("<ProjectionReport") and "3 message(s)" in repr(report)

    text = check_markup(stream._repr_html_())
    assert "unprojected 2" in text and "2 partitions" in text and "projected 3" in text

    final = stream.projector.step()
    assert "caught up" in check_markup(final._repr_html_())
    text = check_markup(stream._repr_html_())
    assert "unprojected 0" in text and "projected 5" in text
    assert "not projected yet" not in text
    assert repr(stream).startswith("AggregatedStream(name=")

    locked = ProjectionReport(stream.name, locked=True)
    assert "another projector is running" in check_markup(locked._repr_html_())


def test_projection_report_escapes_origin_streams(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(name=f"{unique_name}_agg", partitioner=Parity(), stream_wildcards=["%"])
    store.write(HOSTILE_STREAM, Numbered(number=1))
    page = stream.projector.step()._repr_html_()
    check_markup(page)
    assert HOSTILE_STREAM not in page and "&lt;script&gt;" in page


def test_aggregated_stream_and_subscription_reprs_are_bounded(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ByNumber(), stream_wildcards=["n-%"]
    )
    with engine.begin() as conn:
        for n in range(200):
            store.write(f"n-{n}", Numbered(number=n), conn=conn)
            if n == 7:
                store.write(f"n-{n}", Numbered(number=n), conn=conn)
    stream.projector.run()
    text = check_markup(stream._repr_html_())
    assert "200 partitions" in text and "180 more partitions not shown" in text

    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=_register())
    sub_text = check_markup(subscription._repr_html_())
    assert "200 partitions" in sub_text and "lag 201" in sub_text
    assert "the 20 partitions furthest behind" in sub_text
    assert "180 more partitions not shown" in sub_text
    # Partition 7 holds two messages, so it is the furthest behind and listed first.
    table = sub_text.split("last ack", 1)[1]
    assert table.split()[:4] == ["7", "-1", "1", "2"]


# -- subscriptions and runner reports -------------------------------------------------------------


def test_subscription_repr_shows_positions_lag_and_locks(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=Parity(), stream_wildcards=["n-%"]
    )
    subscription = stream.subscription(
        name=f"{unique_name}_sub",
        handlers=_register(),
        error_handler=LogAndIgnoreSubscriptionErrorHandler(f"{unique_name}_sub"),
    )
    text = check_markup(subscription._repr_html_())
    assert "Subscription" in text and "0 partitions" in text and "nothing projected" in text

    for n in range(4):
        store.write(f"n-{n}", Numbered(number=n, text="fail" if n == 3 else ""))
    stream.projector.run()
    text = check_markup(subscription._repr_html_())
    assert "2 partitions" in text and "lag 4" in text and "locked now 0" in text
    assert "initialised no" in text

    other = DbLockProvider(subscription.name, engine)
    try:
        assert other.lock(subscription.partition_lock_name(0))
        assert "locked now 1" in check_markup(subscription._repr_html_())
    finally:
        other.finalize()

    report = subscription.runner.step()
    assert isinstance(report, RunnerReport)
    page = report._repr_html_()
    report_text = check_markup(page)
    assert "RunnerReport" in report_text and "messages 4" in report_text
    assert "handled 3" in report_text and "ignored after error 1" in report_text
    # The handler's error text is user data too.
    assert HOSTILE_STREAM not in page and "RuntimeError: " + HOSTILE_STREAM in report_text
    assert repr(report).startswith("<RunnerReport")

    text = check_markup(subscription._repr_html_())
    assert "lag 0" in text and "initialised yes" in text
    empty = subscription.runner.step()
    assert "nothing to do" in check_markup(empty._repr_html_())
    assert repr(subscription) == f"Subscription(name='{unique_name}_sub', stream='{unique_name}_agg')"


# -- failure, style, layering ---------------------------------------------------------------------


def test_a_repr_shows_an_error_instead_of_raising(engine: sa.Engine, unique_name: str) -> None:
    store = _store(engine, unique_name)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {quote_ident(unique_name + '_messages')}")
    text = check_markup(store._repr_html_())
    assert "could not read its state" in text and "UndefinedTable" in text
    assert f"MessageStore(name={unique_name!r})" in text


def test_style_is_theme_neutral() -> None:
    style = h.STYLE.lower()
    assert "color:inherit" in style and "var(--jp-border-color2" in style
    for hard in ("black", "white;", "white}", "#000", "#fff", "background:#", "background-color"):
        assert hard not in style, hard
    assert "<script" not in style


def test_table_bounds_and_escapes() -> None:
    rows = [(i, f"<i>{i}</i>") for i in range(100)]
    page = h.table(("n", "<th>"), rows, max_rows=5)
    assert page.count("<tr>") == 6  # header + 5
    assert "… 95 earlier rows not shown" in page and "<i>" not in page and "&lt;th&gt;" in page
    first = h.table(("n",), [(i,) for i in range(10)], max_rows=3, keep="first", total=1000, noun="stream")
    assert "… 997 more streams not shown" in first


def test_import_does_not_load_notebook_dependencies() -> None:
    code = (
        "import sys, depeche_nb, depeche_nb.notebook, depeche_nb.tools\n"
        "loaded = [m for m in ('pandas', 'ipywidgets', 'IPython', 'numpy') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_frame_functions_are_exported() -> None:
    for name in (
        "messages_dataframe",
        "streams_dataframe",
        "assignments_dataframe",
        "partitions_dataframe",
        "subscription_state_dataframe",
    ):
        assert callable(getattr(depeche_nb, name))
        assert name in depeche_nb.__all__


@pytest.mark.parametrize("value", [None, True, 1.5, float("nan"), {"a": [1, "<x>"]}, uuid.UUID(int=1)])
def test_cell_values_are_escaped_text(value: Any) -> None:
    page = h.cell(value)
    assert page.startswith("<td") and "<x>" not in page


def test_ipython_gets_html_and_plain_text(engine: sa.Engine, unique_name: str) -> None:
    from IPython.core.formatters import DisplayFormatter

    store = _store(engine, unique_name)
    store.write("s-1", Numbered(number=1))
    data, _ = DisplayFormatter().format(store)  # type: ignore[no-untyped-call]
    assert data["text/plain"] == f"MessageStore(name={unique_name!r})"
    assert "1 message" in check_markup(data["text/html"])


def test_reprs_read_as_plain_text_when_the_style_is_stripped(engine: sa.Engine, unique_name: str) -> None:
    """An untrusted notebook (or a sanitising viewer) drops the stylesheet: the facts must
    not run together ("2 partitionslag 4")."""
    import re

    store = _store(engine, unique_name)
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=Parity(), stream_wildcards=["n-%"]
    )
    subscription = stream.subscription(name=f"{unique_name}_sub", handlers=_register())
    for n in range(4):
        store.write(f"n-{n}", Numbered(number=n))
    stream.projector.run()

    def unstyled_text(page: str) -> str:
        return re.sub(r"<[^>]+>", "", re.sub(r"<style>.*?</style>", "", page, flags=re.DOTALL))

    assert "2 partitions · lag 4 · locked now 0" in unstyled_text(subscription._repr_html_())
    assert "2 partitions · projected 4 · unprojected 0" in unstyled_text(stream._repr_html_())
    assert "4 messages · 4 streams" in unstyled_text(store._repr_html_())

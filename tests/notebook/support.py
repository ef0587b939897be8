"""Checks shared by the notebook-layer tests and the tests of views on adopted databases: the
markup rules every rich repr obeys, and the truth the bounded displays are compared with,
computed with plain aggregates over the whole tables."""

from __future__ import annotations

import html.parser
from typing import Any

import sqlalchemy as sa

import depeche_nb
from depeche_nb.postgres.names import quote_ident

# The only markup a repr may contain: no script, no iframe, no event handlers.
ALLOWED_TAGS = {"div", "span", "style", "table", "thead", "tbody", "tr", "th", "td", "code"}
ALLOWED_ATTRS = {"class", "title"}
MAX_HTML = 25_000


class Markup(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)
        self.in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self.in_style = False

    def handle_data(self, data: str) -> None:
        if not self.in_style:
            self.text.append(data)


def check_markup(page: str) -> str:
    """Assert the page is safe and bounded; return its visible text (entities decoded)."""
    assert page.startswith('<div class="dnb">')
    assert len(page) < MAX_HTML, len(page)
    parser = Markup()
    parser.feed(page)
    parser.close()
    assert parser.tags <= ALLOWED_TAGS, parser.tags
    assert parser.attrs <= ALLOWED_ATTRS, parser.attrs
    assert "<script" not in page.lower()
    # One space between text pieces, however the markup nested them.
    return " ".join(" ".join(parser.text).split())


def rows(engine: sa.Engine, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql, params).all()]


def true_streams(store: depeche_nb.MessageStore[Any]) -> list[tuple[Any, ...]]:
    """(stream, messages, first gp, last gp, added_at of the last version), by name."""
    table = quote_ident(store._storage.names.messages_table)
    return rows(
        store.engine,
        f"SELECT stream, count(*), min(global_position), max(global_position), "
        f"(array_agg(added_at ORDER BY version DESC))[1] FROM {table} GROUP BY stream ORDER BY stream",
    )


def true_backlog(stream: depeche_nb.AggregatedStream[Any]) -> int:
    """Matching messages neither projected nor dead-lettered."""
    names = stream.names
    return rows(
        stream.engine,
        f"SELECT count(*) FROM {quote_ident(names.store.messages_table)} m "
        "WHERE m.stream LIKE ANY(%s) AND m.global_position NOT IN "
        f"(SELECT global_position FROM {quote_ident(names.table)}) AND m.global_position NOT IN "
        f"(SELECT global_position FROM {quote_ident(stream.statements.dead_letters.name)})",
        (list(stream.stream_wildcards),),
    )[0][0]


def true_partitions(stream: depeche_nb.AggregatedStream[Any]) -> list[tuple[Any, ...]]:
    """(partition, messages, head, gp at the first position, gp and projected_at at the head)."""
    table = quote_ident(stream.names.table)
    return rows(
        stream.engine,
        "SELECT partition, count(*), max(position), "
        "(array_agg(global_position ORDER BY position))[1], "
        "(array_agg(global_position ORDER BY position DESC))[1], "
        f"(array_agg(projected_at ORDER BY position DESC))[1] FROM {table} GROUP BY partition ORDER BY 1",
    )


def shown_partitions(stream: depeche_nb.AggregatedStream[Any]) -> list[tuple[Any, ...]]:
    frame = stream.partitions_dataframe()
    return [
        (
            int(r.partition),
            int(r.messages),
            int(r.head_position),
            int(r.first_global_position),
            int(r.last_global_position),
            r.last_projected_at.to_pydatetime(),
        )
        for r in frame.itertuples()
    ]

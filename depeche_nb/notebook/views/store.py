"""DataFrame views and the bounded overview of a message store.

Loading is built for large stores:

* rows stream from a server-side (named) cursor in chunks of `CHUNK_ROWS`
  on a connection of their own, so a big result is never held by the driver
  at once;
* no per-message Python objects are built (no `StoredMessage`, no pydantic
  model): payloads arrive as JSON text, one `json.loads` parses a whole
  chunk, pandas builds the payload columns from the resulting dicts, and
  `added_at` arrives as epoch microseconds, converted vectorised;
* the payload columns get their dtype once, after all chunks are joined, so
  a column does not change type because one chunk lacked a key (plain ones
  are compacted chunk by chunk on the way);
* the columns are joined one at a time, each one's chunk parts dropped (and
  their heap pages handed back) before the next, and strings and datetimes
  stay in Arrow buffers, so a load peaks near the frame it builds.
"""

from __future__ import annotations

import contextlib
import dataclasses as _dc
import datetime as _dt
import json
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from depeche_nb.core.display import ABOUT, DEFAULT_LIMIT, STREAMS_LIMIT, Count
from depeche_nb.core.identifiers import validate_stream
from depeche_nb.notebook.views.kit import (
    EPOCH_US,
    INT64,
    MESSAGE_COLUMNS,
    PAYLOAD_PREFIX,
    STRING,
    Cut,
    SharedStrings,
    check_limit,
    compact_columns,
    datetime_column,
    frame_from_rows,
    infer_column_dtype,
    join_columns,
    return_freed_memory,
    since_condition,
    stream_chunks,
    typed_as_datetime,
    typed_column,
)
from depeche_nb.postgres.rawconn import autocommit_cursor
from depeche_nb.store.serializers import TYPE_KEY

if TYPE_CHECKING:
    import pandas as pd

    from depeche_nb.engine.message_store import MessageStore


def messages_dataframe(
    store: MessageStore[Any],
    stream: str | None = None,
    wildcard: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
    since: int | _dt.datetime | None = None,
    *,
    flatten: bool = True,
) -> pd.DataFrame:
    """Messages of one `stream` (by version), of the streams matching `wildcard` (SQL LIKE,
    by global position) or of the whole store (neither given, by global position).

    Columns: `global_position`, `stream`, `version`, `message_id`, `added_at`,
    `message_type` (the stored `__typename__`, missing if the serializer writes
    none), then one column per top-level payload key (`flatten=True`; nested
    objects stay dicts, lists stay lists; a key that equals one of the fixed
    columns becomes `message.<key>`), or a single `message` column of dicts
    (`flatten=False`). Payload columns are typed from their JSON values:
    integers -> int64 (`Int64` when some rows lack the key or hold null),
    numbers -> float64, booleans -> bool/`boolean`, strings -> string dtype,
    anything else -> object. A key that the serializer's model of every message
    type holding it types as a datetime (`PydanticMessageSerializer`: `datetime`,
    `datetime | None`, `AwareDatetime`, ...) becomes `datetime64[us, UTC]`
    (naive values taken as UTC, missing ones NaT); other date strings stay strings.

    `limit`: at most this many rows (default `DEFAULT_LIMIT` = 10,000, so a
    large store cannot flood memory by accident; `None` = all), the first ones
    in the order above. `since`: only rows at or after this global position
    (int) or `added_at` time (tz-aware datetime). `frame.attrs["more_available"]`
    tells whether `limit` cut rows off.
    """

    if stream is not None and wildcard is not None:
        raise ValueError("pass either stream or wildcard, not both")
    row_limit = check_limit(limit)
    condition, params = since_condition(since, "global_position", "added_at")
    where_params: tuple[Any, ...]
    if stream is not None:
        validate_stream(stream)
        where, where_params, order = "stream = %s", (stream,), "version"
    elif wildcard is not None:
        if not isinstance(wildcard, str):
            raise TypeError(f"wildcard must be a str (an SQL LIKE pattern), got {type(wildcard).__name__}")
        where, where_params, order = "stream LIKE %s", (wildcard,), "global_position"
    else:
        where, where_params, order = "TRUE", (), "global_position"
    sql = store._storage.views.frame_sql(where, condition, order)
    # One row beyond the limit tells whether there is more, without a count(*).
    fetch = None if row_limit is None else row_limit + 1
    chunks = stream_chunks(store.engine, sql, (*where_params, *params, fetch))
    datetime_fields = getattr(store.serializer, "datetime_fields", None)
    return messages_frame_from_chunks(
        chunks,
        row_limit,
        flatten=flatten,
        datetime_fields=datetime_fields() if callable(datetime_fields) else None,
    )


def messages_frame_from_chunks(
    chunks: Generator[list[tuple[Any, ...]], None, None],
    row_limit: int | None,
    *,
    flatten: bool,
    datetime_fields: dict[str, frozenset[str]] | None = None,
) -> pd.DataFrame:
    """A messages DataFrame (see `messages_dataframe`) from chunks of message rows, at most
    `row_limit` rows; `attrs["more_available"]` says whether rows were cut off.
    `datetime_fields`: message type -> payload keys its model types as a datetime."""
    import pandas as pd

    cut = Cut(row_limit)
    meta = _MetaColumns()
    payload_chunks: list[tuple[int, dict[str, pd.Series[Any]]]] = []
    raw_payloads: list[dict[str, Any]] = []
    # closing(): release the cursor's transaction at once if building a chunk fails,
    # not when a notebook finally drops the traceback that keeps the generator alive.
    with contextlib.closing(chunks):
        for rows in cut.rows(chunks):
            payloads = meta.add(rows)
            if flatten:
                # dtype=object: the raw JSON values; types are decided once over all
                # chunks (see `infer_column_dtype`), plain ones compacted per chunk.
                length, columns = compact_columns(pd.DataFrame(payloads, dtype=object))
                payload_chunks.append((length, meta.share_ids(columns)))
            else:
                raw_payloads.extend(payloads)
            del payloads
    frame = _assemble(meta, payload_chunks, None if flatten else raw_payloads, datetime_fields or {})
    frame.attrs = {"more_available": cut.more}
    return frame


class _MetaColumns:
    """The fixed columns of a load, chunk by chunk, each kept as its own list of parts until
    `take` joins it and drops them: joined one column at a time, a load peaks at about the
    frame plus one column, where joining per-chunk frames holds every column twice. The
    stream and the type hold one str object per distinct value (see `SharedStrings`)."""

    def __init__(self) -> None:
        self.streams, self.types = SharedStrings(), SharedStrings()
        self._parts: dict[str, list[Any]] = {name: [] for name, _ in _META_KINDS}
        self.chunks = 0

    def add(self, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Take a chunk's fixed columns; returns its payloads as dicts, the type key taken out."""
        self.chunks += 1
        texts = [row[5] for row in rows]
        # One parse per chunk instead of one per row: the per-call overhead of
        # json.loads is a large part of the cost for small payloads.
        payloads: list[dict[str, Any]] = json.loads("[" + ",".join(texts) + "]")
        del texts
        self.types.add(
            [payload.pop(TYPE_KEY, None) if isinstance(payload, dict) else None for payload in payloads]
        )
        self.streams.add([row[1] for row in rows])
        for index, (name, kind) in zip(_META_ROW_INDEX, _META_KINDS, strict=True):
            self._parts[name].append(typed_column([row[index] for row in rows], kind))
        return payloads

    def share_ids(self, payload: dict[str, pd.Series[Any]]) -> dict[str, pd.Series[Any]]:
        """`payload` (the last chunk's compacted payload columns) with a `message_id` column
        that holds exactly the chunk's message ids (pydantic models carry their id) being the
        id column's part itself, so a load holds each id string once."""
        ids = payload.get("message_id")
        part = self._parts["message_id"][-1]
        if ids is not None and ids.dtype == part.dtype != object and bool(ids.equals(part)):
            payload["message_id"] = part
        return payload

    def take(self, name: str) -> pd.Series[Any]:
        """Column `name` (of `MESSAGE_COLUMNS`) over all chunks; its parts are dropped."""
        import pandas as pd

        if name == "stream":
            return self.streams.column()
        if name == "message_type":
            return self.types.column()
        parts = [pd.Series(part) for part in self._parts.pop(name)]
        column: pd.Series[Any]
        if not parts:
            column = pd.Series(typed_column([], dict(_META_KINDS)[name]))
            return column
        column = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        return column


# The fixed columns read from each row (at `_META_ROW_INDEX`); `stream` and `message_type`
# are built beside them (see `_MetaColumns`).
_META_KINDS = (
    ("global_position", INT64),
    ("version", INT64),
    ("message_id", STRING),
    ("added_at", EPOCH_US),
)
_META_ROW_INDEX = (0, 2, 3, 4)


def _assemble(
    meta: _MetaColumns,
    payload_chunks: list[tuple[int, dict[str, pd.Series[Any]]]],
    raw_payloads: list[dict[str, Any]] | None,
    datetime_fields: dict[str, frozenset[str]],
) -> pd.DataFrame:
    """Join the chunks: payload columns from `payload_chunks`, or, when `raw_payloads` is
    given (not flattened), one `message` column of dicts."""
    import pandas as pd

    # The memory of a column's parts handed back before the next column is joined; one
    # chunk has no parts to free (a trim walks the heap: milliseconds in a big process).
    freed = return_freed_memory if meta.chunks > 1 else lambda: None
    columns: dict[str, Any] = {}
    for name in MESSAGE_COLUMNS:
        columns[name] = meta.take(name)
        freed()
    message_type, ids = columns["message_type"], columns["message_id"]
    if raw_payloads is not None:
        columns["message"] = pd.Series(raw_payloads, dtype=object)
    elif payload_chunks:
        for key, column in join_columns(payload_chunks):
            name = str(key)
            while name in columns:
                name = PAYLOAD_PREFIX + name
            if typed_as_datetime(str(key), column, message_type, datetime_fields):
                columns[name] = datetime_column(column)
            elif key == "message_id" and _same_strings(column, ids):
                # The message's own id, as the serializer wrote it (pydantic models carry it):
                # the id column's strings, not a second copy of each.
                columns[name] = ids.copy(deep=False)
            elif column.dtype == object:
                columns[name] = infer_column_dtype(column)
            else:
                columns[name] = column  # compacted in every chunk: its dtype is final
            del column
            freed()
    # copy=False: the columns as they are, not consolidated into blocks (a copy of each).
    frame: pd.DataFrame = pd.DataFrame(columns, copy=False)
    return frame


def _same_strings(column: pd.Series[Any], ids: pd.Series[Any]) -> bool:
    """Whether a payload column holds exactly the row's message ids, as strings."""
    try:
        if len(column) != len(ids):
            return False
        if column.dtype == ids.dtype != object:
            # Compared in their buffers, without a Python object per value.
            return bool(column.equals(ids))
        return bool((column.to_numpy(dtype=object) == ids.to_numpy(dtype=object)).all())
    except (TypeError, ValueError):
        return False


def streams_dataframe(store: MessageStore[Any], limit: int | None = STREAMS_LIMIT) -> pd.DataFrame:
    """One row per stream, by name: `stream`, `messages`, `first_global_position`,
    `last_global_position`, `last_added_at` (when the stream's latest message was added).

    `limit`: at most this many streams (default `STREAMS_LIMIT` = 1,000; None = all), the
    first ones by name; `frame.attrs["more_available"]` tells whether `limit` cut streams
    off. Each stream costs two index lookups, whatever its length, so the default costs
    the same in a store of any size.
    """
    row_limit = check_limit(limit)
    fetch = None if row_limit is None else row_limit + 1
    with autocommit_cursor(store.engine) as cursor:
        cursor.execute(store._storage.views.streams_sql, (fetch,))
        rows = cursor.fetchall()
    more = row_limit is not None and len(rows) > row_limit
    frame = frame_from_rows(rows[:row_limit] if more else rows, _STREAM_KINDS)
    frame.attrs = {"more_available": more}
    return frame


_STREAM_KINDS = (
    ("stream", STRING),
    ("messages", INT64),
    ("first_global_position", INT64),
    ("last_global_position", INT64),
    ("last_added_at", EPOCH_US),
)


# -- bounded overview (for the HTML repr; plain Python, no pandas) ------------------------------


@_dc.dataclass(frozen=True)
class StreamSummary:
    stream: str
    messages: int
    first_global_position: int
    last_global_position: int
    last_added_at: _dt.datetime


@_dc.dataclass(frozen=True)
class MessagePreview:
    """A stored message as a repr shows it: metadata and a bounded payload text."""

    global_position: int
    stream: str
    version: int
    message_id: str
    added_at: _dt.datetime
    message_type: str | None
    payload: str  # JSON text without the type key, cut at `PREVIEW_CHARS`


@_dc.dataclass(frozen=True)
class StoreOverview:
    """Totals of a store, its most recently active streams and its latest messages."""

    name: str
    # Exact up to `EXACT_MESSAGES`; beyond, the span of global positions, which a rolled
    # back write (it consumed a position) can only make larger than the true number.
    messages: Count
    streams: Count  # exact up to `STREAMS_LIMIT`, else "more than"
    last_global_position: int | None
    last_added_at: _dt.datetime | None
    recent_streams: list[StreamSummary]  # most recently written first
    recent_messages: list[MessagePreview]  # in global order, the latest last


PREVIEW_CHARS = 200
# A store's messages are counted exactly up to this many (reading at most this many rows
# or index entries), and estimated beyond.
EXACT_MESSAGES = 10_000
# The recent streams of a store's repr are those of its latest this many messages.
RECENT_WINDOW = 1000


def store_overview(store: MessageStore[Any], max_streams: int = 20, max_messages: int = 5) -> StoreOverview:
    """Everything a store's repr shows, in two statements that each read a bounded number of
    rows, whatever the size of the store: up to `max_streams` of the streams written in the
    latest `RECENT_WINDOW` messages (see `MessagesViews.overview_streams_sql`), the latest
    `max_messages` messages, and the totals."""
    stream_rows, message_rows = store._storage.views.overview(
        store.engine,
        window=RECENT_WINDOW,
        max_streams=max_streams,
        max_messages=max_messages,
        preview_chars=PREVIEW_CHARS + 1,
        messages_cap=EXACT_MESSAGES + 1,
        streams_cap=STREAMS_LIMIT + 1,
    )
    summaries = [StreamSummary(*row[:5]) for row in stream_rows]
    previews = [MessagePreview(*row) for row in reversed(message_rows)]
    if not stream_rows:
        return StoreOverview(store.name, Count(0), Count(0), None, None, [], [])
    last_gp, first_gp, counted, streams = stream_rows[0][5:]
    messages = Count(counted) if counted <= EXACT_MESSAGES else Count(last_gp - first_gp + 1, ABOUT)
    return StoreOverview(
        name=store.name,
        messages=messages,
        streams=Count.capped(streams, STREAMS_LIMIT),
        last_global_position=last_gp,
        last_added_at=max(s.last_added_at for s in summaries),
        recent_streams=summaries,
        recent_messages=previews,
    )

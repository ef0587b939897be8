"""DataFrame views and bounded overviews of a message store.

This module is below the notebook layer on purpose: `MessageStoreBase`
offers `to_dataframe()` / `streams_dataframe()` as thin methods, and the
store layer must not import the notebook layer. pandas (and numpy) are
imported inside the functions only, so a headless worker never loads them.

Loading is built for large stores:

* rows stream from a server-side (named) cursor in chunks of `CHUNK_ROWS`
  on a connection of their own, so a big result is never held by the driver
  at once;
* no per-message Python objects are built (no `StoredMessage`, no pydantic
  model): payloads arrive as JSON text, one `json.loads` parses a whole
  chunk, pandas builds the payload columns from the resulting dicts, and
  `added_at` arrives as epoch microseconds, converted vectorised;
* the payload columns get their dtype once, after all chunks are joined, so
  a column does not change type because one chunk lacked a key.

Column conventions shared by every view of the library: positions and
counts are `int64`; ids and names are strings (pandas' default string dtype,
`str` on pandas 3); timestamps are tz-aware UTC (`datetime64[us, UTC]`).
"""

from __future__ import annotations

import contextlib
import dataclasses as _dc
import datetime as _dt
import json
import numbers
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from depeche_nb.core.identifiers import validate_stream
from depeche_nb.postgres.rawconn import autocommit_cursor, open_dbapi_connection
from depeche_nb.store.serializers import TYPE_KEY

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy as sa

    from depeche_nb.store.message_store import MessageStoreBase

# Rows a view returns unless the caller passes `limit=None`: enough to explore,
# small enough that `store.to_dataframe()` on a million-message store is quick.
DEFAULT_LIMIT = 10_000
# Streams `streams_dataframe()` returns unless the caller passes `limit=None`: reading a
# stream's summary costs two index lookups, so this keeps the view quick in any store.
STREAMS_LIMIT = 1000
# Rows per round trip of the server-side cursor.
CHUNK_ROWS = 5000
# The fixed columns of the message views, in order; payload keys follow.
MESSAGE_COLUMNS = ("global_position", "stream", "version", "message_id", "added_at", "message_type")
# A payload key equal to a fixed column name is shown as "message.<key>".
PAYLOAD_PREFIX = "message."
# Kinds understood by `frame_from_rows`.
INT64 = "int64"  # NOT NULL integers
NULLABLE_INT = "Int64"  # integers that may be NULL
STRING = "str"
UTC = "utc"  # timestamptz as datetime objects (None -> NaT)
EPOCH_US = "epoch_us"  # timestamptz selected as epoch microseconds (see `epoch_us_sql`)
NULLABLE_BOOL = "boolean"
OBJECT = "object"


# -- column building ----------------------------------------------------------------------------


def string_dtype() -> Any:
    """pandas' default string dtype (`str` on pandas 3; object on pandas 2, which has none)."""
    import pandas as pd

    return "str" if int(pd.__version__.split(".", 1)[0]) >= 3 else object


def utc_datetimes(values: Any) -> Any:
    """Datetimes (or None) -> tz-aware UTC series/array at microsecond resolution."""
    import pandas as pd

    return pd.to_datetime(pd.Series(values, dtype=object), utc=True).astype("datetime64[us, UTC]")


def typed_column(values: Sequence[Any], kind: str) -> Any:
    """One column of `values` with the library's dtype for `kind`."""
    import numpy as np
    import pandas as pd

    if kind == INT64:
        return np.fromiter(values, dtype=np.int64, count=len(values))
    if kind == NULLABLE_INT:
        return pd.array(list(values), dtype="Int64")
    if kind == STRING:
        return pd.Series(list(values), dtype=string_dtype())
    if kind == UTC:
        return utc_datetimes(list(values))
    if kind == EPOCH_US:
        micros = np.fromiter(values, dtype=np.int64, count=len(values))
        return pd.to_datetime(micros, unit="us", utc=True).astype("datetime64[us, UTC]")
    if kind == NULLABLE_BOOL:
        return pd.array(list(values), dtype="boolean")
    if kind == OBJECT:
        return pd.Series(list(values), dtype=object)
    raise ValueError(f"unknown column kind {kind!r}")


def frame_from_rows(rows: Sequence[Sequence[Any]], columns: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """A DataFrame from row tuples, column i named and typed by `columns[i]` (also when empty)."""
    import pandas as pd

    transposed: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    data = {
        name: pd.Series(typed_column(values, kind))
        for (name, kind), values in zip(columns, transposed, strict=True)
    }
    frame: pd.DataFrame = pd.DataFrame(data)
    return frame


def stream_chunks(
    engine: sa.Engine, sql: str, params: Sequence[Any], chunk_rows: int = CHUNK_ROWS
) -> Generator[list[tuple[Any, ...]], None, None]:
    """The rows of `sql` in chunks, from a server-side cursor on a connection of its own.

    A separate connection (not the thread's shared autocommit one) because a
    named cursor needs a transaction that stays open while the caller consumes
    the chunks; it is rolled back (the statement only reads) and closed at the
    end, also when the consumer stops early.
    """
    connection = open_dbapi_connection(engine, autocommit=False)
    try:
        with connection.cursor(name=f"depeche_nb_frame_{uuid.uuid4().hex}") as cursor:
            cursor.itersize = chunk_rows
            cursor.execute(sql, tuple(params))
            while True:
                rows = cursor.fetchmany(chunk_rows)
                if not rows:
                    break
                yield rows
        connection.rollback()
    finally:
        connection.close()


def check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or int(limit) < 0:
        raise ValueError(f"limit must be an int >= 0 or None (all rows), got {limit!r}")
    return int(limit)


def since_condition(since: object, position_column: str, time_column: str) -> tuple[str, tuple[Any, ...]]:
    """SQL condition (with its parameters) for `since`: a global position (int, inclusive)
    or a tz-aware datetime (inclusive), or no condition for None."""
    if since is None:
        return "TRUE", ()
    if isinstance(since, bool):
        raise TypeError("since must be a global position (int) or a timezone-aware datetime, got bool")
    if isinstance(since, numbers.Integral):
        return f"{position_column} >= %s", (int(since),)
    if isinstance(since, _dt.datetime):
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware (e.g. datetime.now(timezone.utc))")
        # pandas.Timestamp is a datetime subclass; hand the driver a plain datetime.
        to_py = getattr(since, "to_pydatetime", None)
        moment = to_py() if callable(to_py) else since
        return f"{time_column} >= %s", (moment,)
    raise TypeError(
        f"since must be a global position (int) or a timezone-aware datetime, got {type(since).__name__}"
    )


# -- the message views --------------------------------------------------------------------------


def messages_dataframe(
    store: MessageStoreBase[Any],
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


class _Cut:
    """Takes the first `row_limit` rows of a chunk stream and remembers whether it cut."""

    def __init__(self, row_limit: int | None) -> None:
        self.row_limit = row_limit
        self.more = False

    def rows(self, chunks: Iterable[list[tuple[Any, ...]]]) -> Iterator[list[tuple[Any, ...]]]:
        taken = 0
        for chunk in chunks:
            rows = chunk
            if self.row_limit is not None and taken + len(rows) > self.row_limit:
                rows, self.more = rows[: self.row_limit - taken], True
            taken += len(rows)
            if rows:
                yield rows


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

    cut = _Cut(row_limit)
    meta_chunks: list[pd.DataFrame] = []
    payload_chunks: list[pd.DataFrame] = []
    raw_payloads: list[dict[str, Any]] = []
    # closing(): release the cursor's transaction at once if building a chunk fails,
    # not when a notebook finally drops the traceback that keeps the generator alive.
    with contextlib.closing(chunks):
        for rows in cut.rows(chunks):
            meta, payloads = _message_chunk(rows)
            meta_chunks.append(meta)
            if flatten:
                # dtype=object: keep the raw JSON values per chunk; types are decided
                # once over all chunks (see `infer_column_dtype`).
                payload_chunks.append(pd.DataFrame(payloads, dtype=object))
            else:
                raw_payloads.extend(payloads)
    frame = _assemble(meta_chunks, payload_chunks, None if flatten else raw_payloads, datetime_fields or {})
    frame.attrs = {"more_available": cut.more}
    return frame


def typed_frame_from_chunks(
    chunks: Generator[list[tuple[Any, ...]], None, None],
    row_limit: int | None,
    columns: Sequence[tuple[str, str]],
) -> pd.DataFrame:
    """`frame_from_rows` over chunks, at most `row_limit` rows, with `attrs["more_available"]`."""
    import pandas as pd

    cut = _Cut(row_limit)
    with contextlib.closing(chunks):
        frames = [frame_from_rows(rows, columns) for rows in cut.rows(chunks)]
    frame = pd.concat(frames, ignore_index=True) if frames else frame_from_rows([], columns)
    frame.attrs = {"more_available": cut.more}
    return frame


_META_KINDS = (
    ("global_position", INT64),
    ("stream", STRING),
    ("version", INT64),
    ("message_id", STRING),
    ("added_at", EPOCH_US),
)


def _message_chunk(rows: list[tuple[Any, ...]]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Metadata columns of a chunk, and its payloads as dicts with the type key taken out."""
    import pandas as pd

    texts = [row[5] for row in rows]
    # One parse per chunk instead of one per row: the per-call overhead of
    # json.loads is a large part of the cost for small payloads.
    payloads: list[dict[str, Any]] = json.loads("[" + ",".join(texts) + "]")
    types = [payload.pop(TYPE_KEY, None) if isinstance(payload, dict) else None for payload in payloads]
    meta = frame_from_rows([row[:5] for row in rows], _META_KINDS)
    meta["message_type"] = pd.Series(types, dtype=object)
    return meta, payloads


def _assemble(
    meta_chunks: list[pd.DataFrame],
    payload_chunks: list[pd.DataFrame],
    raw_payloads: list[dict[str, Any]] | None,
    datetime_fields: dict[str, frozenset[str]],
) -> pd.DataFrame:
    """Join the chunks: payload columns from `payload_chunks`, or, when `raw_payloads` is
    given (not flattened), one `message` column of dicts."""
    import pandas as pd

    if meta_chunks:
        meta = pd.concat(meta_chunks, ignore_index=True)
    else:
        meta = frame_from_rows([], _META_KINDS)
        meta["message_type"] = pd.Series([], dtype=object)
    meta["message_type"] = meta["message_type"].astype(string_dtype())
    columns: dict[str, Any] = {str(name): meta[name] for name in meta.columns}
    if raw_payloads is not None:
        columns["message"] = pd.Series(raw_payloads, dtype=object)
    elif payload_chunks:
        payload = pd.concat(payload_chunks, ignore_index=True, sort=False)
        for key in payload.columns:
            name = str(key)
            while name in columns:
                name = PAYLOAD_PREFIX + name
            column = payload[key]
            if _typed_as_datetime(str(key), column, meta["message_type"], datetime_fields):
                columns[name] = _datetime_column(column)
            else:
                columns[name] = infer_column_dtype(column)
    frame: pd.DataFrame = pd.DataFrame(columns)
    return frame


def _typed_as_datetime(
    key: str, column: pd.Series[Any], types: pd.Series[Any], datetime_fields: dict[str, frozenset[str]]
) -> bool:
    """Whether the model of every message type with a value under `key` types it as a datetime
    (a key shared by types that disagree stays as it is)."""
    present = types[column.notna()].unique()
    return len(present) > 0 and all(key in datetime_fields.get(str(name), ()) for name in present)


def _datetime_column(column: pd.Series[Any]) -> pd.Series[Any]:
    """ISO 8601 strings (as pydantic writes datetimes) -> `datetime64[us, UTC]`."""
    import pandas as pd

    try:
        converted: pd.Series[Any] = pd.to_datetime(column, utc=True, format="ISO8601")
    except (TypeError, ValueError, OverflowError):
        return infer_column_dtype(column)  # not what the model promised (an edited row): keep it
    return converted.astype("datetime64[us, UTC]")


def infer_column_dtype(column: pd.Series[Any]) -> pd.Series[Any]:
    """Give a column of Python values (object dtype, NaN/None where a row has none) its dtype:
    a payload column, or a field of events or aggregates (`event_sourcing.history`), where
    timezone-aware datetimes also occur (JSON payloads hold them as strings)."""
    import pandas as pd

    kind = pd.api.types.infer_dtype(column, skipna=True)
    has_missing = bool(column.isna().any())
    if kind == "datetime" and all(value.tzinfo is not None for value in column.dropna()):
        times: pd.Series[Any] = utc_datetimes(column.tolist())
        return times
    try:
        if kind == "integer":
            return column.astype("Int64" if has_missing else "int64")
        if kind in ("floating", "mixed-integer-float"):
            return column.astype("float64")
        if kind == "boolean":
            return column.astype("boolean" if has_missing else "bool")
        if kind == "string":
            return column.astype(string_dtype())
    except (OverflowError, TypeError, ValueError):
        pass  # e.g. an integer beyond int64: keep the Python ints
    return column


def streams_dataframe(store: MessageStoreBase[Any], limit: int | None = STREAMS_LIMIT) -> pd.DataFrame:
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
class Count:
    """A number as a display may claim it: exact, an estimate ("about"), or a lower bound
    ("more than": a count that stopped at a cap)."""

    value: int
    qualifier: str = ""  # "", ABOUT or MORE_THAN

    @property
    def exact(self) -> bool:
        return not self.qualifier

    @classmethod
    def capped(cls, counted: int, cap: int) -> Count:
        """The result of counting at most `cap` + 1 rows."""
        return cls(cap, MORE_THAN) if counted > cap else cls(counted)

    def __str__(self) -> str:
        return f"{self.qualifier} {self.value:,}" if self.qualifier else f"{self.value:,}"


ABOUT = "about"
MORE_THAN = "more than"


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


def store_overview(
    store: MessageStoreBase[Any], max_streams: int = 20, max_messages: int = 5
) -> StoreOverview:
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


__all__ = [
    "ABOUT",
    "CHUNK_ROWS",
    "DEFAULT_LIMIT",
    "EXACT_MESSAGES",
    "MESSAGE_COLUMNS",
    "MORE_THAN",
    "PAYLOAD_PREFIX",
    "PREVIEW_CHARS",
    "RECENT_WINDOW",
    "STREAMS_LIMIT",
    "Count",
    "MessagePreview",
    "StoreOverview",
    "StreamSummary",
    "frame_from_rows",
    "infer_column_dtype",
    "messages_dataframe",
    "messages_frame_from_chunks",
    "store_overview",
    "stream_chunks",
    "streams_dataframe",
    "typed_frame_from_chunks",
]

"""The toolkit of every DataFrame view: the library's column kinds and dtypes, row tuples to
typed frames, chunked reads from a server-side cursor, and the checks of `limit`/`since`.

Column conventions shared by every view of the library: positions and counts are
`int64`; ids and names are strings (pandas' default string dtype, `str` on pandas 3);
timestamps are tz-aware UTC (`datetime64[us, UTC]`). pandas (and numpy) are imported
inside the functions only, so a headless worker never loads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses as _dc
import datetime as _dt
import functools
import numbers
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from depeche_nb.postgres.rawconn import open_dbapi_connection

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy as sa

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


def string_column(values: Sequence[str | None] | Any) -> pd.Series[Any]:
    """str values (None or NaN where missing) as a column of pandas' default string dtype.
    Where that dtype keeps its values in Arrow buffers, they are built here straight from the
    values, from the system allocator: Arrow's default pool (mimalloc) keeps the pages of the
    buffers a load frees, and a chunked load builds and frees many (`ARROW_DEFAULT_MEMORY_POOL`
    stays the user's for everything else)."""
    import pandas as pd

    column: pd.Series[Any]
    if not _arrow_strings():
        column = pd.Series(list(values), dtype=string_dtype())
        return column
    import pyarrow as pa

    array = pa.array(values, type=pa.large_string(), from_pandas=True, memory_pool=pa.system_memory_pool())
    column = pd.Series(pd.array(array, dtype=string_dtype()))
    return column


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
        return string_column(values)
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


class SharedStrings:
    """A string column built chunk by chunk from few distinct values (a store's streams and
    message types): each value is turned into a code as it arrives and the column holds one
    str object per distinct value, where the rows bring one object per row (from the driver
    or the JSON parser): 8 bytes a row instead of about 60. None stays missing."""

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}
        self._chunks: list[Any] = []

    def add(self, values: Sequence[str | None]) -> None:
        import numpy as np

        codes = self._codes
        self._chunks.append(
            np.fromiter(
                (-1 if value is None else codes.setdefault(value, len(codes)) for value in values),
                dtype=np.int32,
                count=len(values),
            )
        )

    def column(self) -> pd.Series[Any]:
        """The values as a column of pandas' default string dtype."""
        import numpy as np
        import pandas as pd

        codes = np.concatenate(self._chunks) if self._chunks else np.empty(0, dtype=np.int32)
        self._chunks = []
        if _arrow_strings():
            import pyarrow as pa
            import pyarrow.compute as pc

            # Gathered in Arrow: no array of a reference per row on the way.
            pool = pa.system_memory_pool()
            distinct_values = pa.array(list(self._codes), type=pa.large_string(), memory_pool=pool)
            indices = pa.array(codes, mask=codes < 0, type=pa.int32(), memory_pool=pool)
            gathered = pc.take(distinct_values, indices, memory_pool=pool)
            strings: pd.Series[Any] = pd.Series(pd.array(gathered, dtype=string_dtype()))
            return strings
        # The distinct values, then None at index -1 for the missing ones.
        distinct = np.array([*self._codes, None], dtype=object)
        column: pd.Series[Any] = pd.Series(distinct.take(codes), dtype=string_dtype())
        return column


def shared_strings(column: pd.Series[Any]) -> pd.Series[Any]:
    """`column` (str values, NaN/None where missing) with equal strings as one object each,
    when at most half of them are distinct: a JSON parser makes an object per value."""
    import numpy as np
    import pandas as pd

    codes, distinct = pd.factorize(column, use_na_sentinel=True)
    if len(distinct) * 2 > len(column):
        return column
    values = np.asarray(distinct, dtype=object)
    shared: pd.Series[Any] = pd.Series(values.take(codes), index=column.index, dtype=object)
    shared[codes < 0] = None
    return shared


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


class Cut:
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


def typed_frame_from_chunks(
    chunks: Generator[list[tuple[Any, ...]], None, None],
    row_limit: int | None,
    columns: Sequence[tuple[str, str]],
) -> pd.DataFrame:
    """`frame_from_rows` over chunks, at most `row_limit` rows, with `attrs["more_available"]`."""
    import pandas as pd

    cut = Cut(row_limit)
    with contextlib.closing(chunks):
        frames = [frame_from_rows(rows, columns) for rows in cut.rows(chunks)]
    frame = pd.concat(frames, ignore_index=True) if frames else frame_from_rows([], columns)
    frame.attrs = {"more_available": cut.more}
    return frame


def compact_columns(chunk: pd.DataFrame) -> tuple[int, dict[str, pd.Series[Any]]]:
    """A chunk's payload columns (object dtype, one Python object per value) with each
    column whose values are all of one plain kind already in its final dtype: integers
    (int64), numbers (float64), booleans (bool) and, where pandas stores strings in Arrow
    buffers, strings. Without this every value stays a Python object until all chunks are
    read, and a large load peaks far above the frame it builds. A column with missing values,
    mixed kinds or integers beyond int64 stays as it is; `join_columns` decides over all
    chunks. Returns the chunk's row count with its columns."""
    return len(chunk), {key: _compact(chunk[key]) for key in chunk.columns}


def _compact(column: pd.Series[Any]) -> pd.Series[Any]:
    import pandas as pd

    kind = pd.api.types.infer_dtype(column, skipna=False)
    try:
        if kind == "integer":
            return column.astype("int64")
        if kind == "floating" and not column.isna().any():
            return column.astype("float64")
        if kind == "boolean":
            return column.astype("bool")
        if kind == "string" and _arrow_strings():
            return string_column(column.to_numpy())
    except (OverflowError, TypeError, ValueError):
        pass
    return column


def return_freed_memory() -> None:
    """Hand the pages of freed heap memory back to the system (glibc's `malloc_trim`; a no-op
    elsewhere). A chunked load frees thousands of small per-chunk parts as it joins them into
    columns; glibc keeps those holes in its heap, so without this every joined column would
    come on top of the parts it replaced."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


@functools.cache
def _arrow_strings() -> bool:
    """Whether pandas' default string dtype keeps its values in Arrow buffers (pandas 3 with
    pyarrow), so that converting early frees the Python strings."""
    import pandas as pd

    dtype = pd.Series([], dtype=string_dtype()).dtype
    return getattr(dtype, "storage", None) == "pyarrow"


def join_columns(
    chunks: list[tuple[int, dict[str, pd.Series[Any]]]],
) -> Iterator[tuple[str, pd.Series[Any]]]:
    """Each key's column over all chunks (in the order keys first appear), emptying `chunks`
    as it goes: the chunks' own dtype where all of them have the key in the same compact
    dtype, else the values as Python objects (NaN where a chunk lacks the key), for
    `infer_column_dtype` to decide as if no chunk had been compacted."""
    import numpy as np
    import pandas as pd

    keys = list(dict.fromkeys(key for _, columns in chunks for key in columns))
    lengths = [length for length, _ in chunks]
    for key in keys:
        parts = [columns.pop(key, None) for _, columns in chunks]
        dtypes = {part.dtype for part in parts if part is not None}
        if all(part is not None for part in parts) and len(dtypes) == 1 and dtypes != {np.dtype(object)}:
            yield key, pd.concat(parts, ignore_index=True)
            continue
        objects = [
            pd.Series(np.full(length, np.nan, dtype=object)) if part is None else part.astype(object)
            for part, length in zip(parts, lengths, strict=True)
        ]
        yield key, pd.concat(objects, ignore_index=True)


def typed_as_datetime(
    key: str, column: pd.Series[Any], types: pd.Series[Any], datetime_fields: dict[str, frozenset[str]]
) -> bool:
    """Whether the model of every message type with a value under `key` types it as a datetime
    (a key shared by types that disagree stays as it is)."""
    present = types[column.notna()].unique()
    return len(present) > 0 and all(key in datetime_fields.get(str(name), ()) for name in present)


def datetime_column(column: pd.Series[Any]) -> pd.Series[Any]:
    """ISO 8601 strings (as pydantic writes datetimes) -> `datetime64[us, UTC]`."""
    import pandas as pd

    parsed = _arrow_datetimes(column)
    if parsed is not None:
        return parsed
    try:
        # Apart: pandas 2 reads a value without an offset in the offset of the aware value
        # before it, where it means UTC.
        aware = column.astype(object).str.contains(_UTC_OFFSET_AT_END, regex=True, na=False)
        converted: pd.Series[Any] = pd.Series(pd.NaT, index=column.index, dtype="datetime64[us, UTC]")
        for group in (aware, ~aware):
            if group.any():
                times = pd.to_datetime(column[group], utc=True, format="ISO8601")
                converted[group] = times.astype("datetime64[us, UTC]")
    except (TypeError, ValueError, OverflowError):
        return infer_column_dtype(column)  # not what the model promised (an edited row): keep it
    return converted


# A time followed by its offset from UTC, in ISO 8601's extended or basic form.
_UTC_OFFSET_AT_END = r"(?:\d\d:\d\d(?::\d\d)?|T\d{4}(?:\d\d)?)(?:[.,]\d+)?\s*(?:[Zz]|[+-]\d\d(?::?\d\d)?)\s*$"


def _arrow_datetimes(column: pd.Series[Any]) -> pd.Series[Any] | None:
    """`datetime_column` of an Arrow-backed string column, parsed in its buffers: pandas'
    parser makes a Python object per value first (about 100 bytes and 2 us each). Only the
    forms Arrow parses exactly as pandas does (all with an offset, or all without, taken as
    UTC); None for anything else, which pandas then parses."""
    array = getattr(column.array, "_pa_array", None)
    if array is None:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    pool = pa.system_memory_pool()
    for target in (pa.timestamp("us", tz="UTC"), pa.timestamp("us")):
        try:
            parsed = pc.cast(array, target, memory_pool=pool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        times = parsed.to_pandas()
        if target.tz is None:
            times = times.dt.tz_localize("UTC")
        result: pd.Series[Any] = times.astype("datetime64[us, UTC]")
        result.index = column.index
        return result
    return None


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
            return shared_strings(column).astype(string_dtype())
    except (OverflowError, TypeError, ValueError):
        pass  # e.g. an integer beyond int64: keep the Python ints
    return column


def records_dataframe(records: Sequence[Any], record_type: type, int_columns: Iterable[str]) -> pd.DataFrame:
    """One row per dataclass record, message ids as strings and positions as int64 (even when empty)."""
    import pandas as pd

    columns = [f.name for f in _dc.fields(record_type)]
    frame: pd.DataFrame = pd.DataFrame([_dc.astuple(r) for r in records], columns=columns)
    frame["message_id"] = frame["message_id"].astype(str)
    for name in int_columns:
        frame[name] = frame[name].astype("int64")
    return frame

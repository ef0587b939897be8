"""DataFrames of step reports (pandas is imported only when one is asked for)."""

from __future__ import annotations

import dataclasses as _dc
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def records_dataframe(records: Sequence[Any], record_type: type, int_columns: Iterable[str]) -> pd.DataFrame:
    """One row per dataclass record, message ids as strings and positions as int64 (even when empty)."""
    import pandas as pd

    columns = [f.name for f in _dc.fields(record_type)]
    frame: pd.DataFrame = pd.DataFrame([_dc.astuple(r) for r in records], columns=columns)
    frame["message_id"] = frame["message_id"].astype(str)
    for name in int_columns:
        frame[name] = frame[name].astype("int64")
    return frame

"""DataFrame views of stores, aggregated streams and subscriptions (the notebook-facing names).

The functions live in the lower layers (`store.frames`, `engine.frames`) so
that `store.to_dataframe()` and friends can exist as methods without those
layers importing this one; this module gathers them in one place. Shared
column conventions: positions and counts int64, ids and names strings,
timestamps tz-aware UTC. Views that can be large take `limit` (default
`DEFAULT_LIMIT` = 10,000 rows; None = all) and set
`frame.attrs["more_available"]`.
"""

from __future__ import annotations

from depeche_nb.engine.frames import (
    assignments_dataframe,
    partitions_dataframe,
    subscription_state_dataframe,
)
from depeche_nb.store.frames import DEFAULT_LIMIT, messages_dataframe, streams_dataframe

__all__ = [
    "DEFAULT_LIMIT",
    "assignments_dataframe",
    "messages_dataframe",
    "partitions_dataframe",
    "streams_dataframe",
    "subscription_state_dataframe",
]

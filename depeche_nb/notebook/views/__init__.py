"""DataFrame views of stores, aggregated streams, subscriptions and reports: the one home of
the library's pandas code.

The lower layers offer the views as thin methods (`store.to_dataframe()`,
`stream.partitions_dataframe()`, `report.to_dataframe()`, ...) that call
`core.display.run_view` with the name registered here, so they never import this
layer. Shared column conventions: positions and counts int64, ids and names strings,
timestamps tz-aware UTC. Views that can be large take `limit` (default
`DEFAULT_LIMIT` = 10,000 rows; None = all) and set `frame.attrs["more_available"]`.
"""

from __future__ import annotations

from depeche_nb.core.display import DEFAULT_LIMIT, View, register_view
from depeche_nb.notebook.views import reports
from depeche_nb.notebook.views.store import messages_dataframe, streams_dataframe
from depeche_nb.notebook.views.streams import (
    assignments_dataframe,
    dead_letters_dataframe,
    partitions_dataframe,
)
from depeche_nb.notebook.views.subscriptions import subscription_state_dataframe

_VIEWS: dict[str, View] = {
    "messages": messages_dataframe,
    "streams": streams_dataframe,
    "assignments": assignments_dataframe,
    "partitions": partitions_dataframe,
    "dead_letters": dead_letters_dataframe,
    "subscription_state": subscription_state_dataframe,
    "parked": reports.parked_dataframe,
    "projection_report": reports.projection_report_dataframe,
    "runner_report": reports.runner_report_dataframe,
    "adoption_report": reports.adoption_report_dataframe,
    "trace": reports.trace_dataframe,
    "history": reports.history_dataframe,
}
for _name, _view in _VIEWS.items():
    register_view(_name, _view)

__all__ = [
    "DEFAULT_LIMIT",
    "assignments_dataframe",
    "messages_dataframe",
    "partitions_dataframe",
    "streams_dataframe",
    "subscription_state_dataframe",
]

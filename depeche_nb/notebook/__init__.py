"""The notebook layer: DataFrame views and rich HTML reprs (widgets build on these).

Importing this package registers the HTML renderers with
`depeche_nb.core.display`, which the lower layers' `RichRepr` objects consult;
nothing below imports this package. It stays light: pandas, ipywidgets and
IPython are imported only inside the functions that need them, so
`import depeche_nb` in a headless worker loads none of them.
"""

from __future__ import annotations

from depeche_nb.core.display import register_html_renderer
from depeche_nb.core.messages import StoredMessage
from depeche_nb.engine.aggregated_stream import AggregatedStream
from depeche_nb.engine.depeche_db_adoption import AdoptionReport
from depeche_nb.engine.health import ExecutorHealth
from depeche_nb.engine.message_store import MessageStore
from depeche_nb.engine.operations import OperationsSnapshot, PartitionDiagnosis
from depeche_nb.engine.projector import ProjectionReport
from depeche_nb.engine.runner import RunnerReport
from depeche_nb.engine.subscription import Subscription
from depeche_nb.engine.trace import MessageTrace
from depeche_nb.notebook import depeche_db_explorer, operations_html, reprs, views
from depeche_nb.notebook.views import *  # noqa: F403 - the views, re-exported

register_html_renderer(MessageStore, reprs.render_store)
register_html_renderer(StoredMessage, reprs.render_stored_message)
register_html_renderer(AggregatedStream, reprs.render_aggregated_stream)
register_html_renderer(Subscription, reprs.render_subscription)
register_html_renderer(ProjectionReport, reprs.render_projection_report)
register_html_renderer(RunnerReport, reprs.render_runner_report)
register_html_renderer(ExecutorHealth, reprs.render_executor_health)
register_html_renderer(MessageTrace, reprs.render_message_trace)
register_html_renderer(OperationsSnapshot, operations_html.render_operations_snapshot)
register_html_renderer(PartitionDiagnosis, operations_html.render_partition_diagnosis)
register_html_renderer(AdoptionReport, depeche_db_explorer.render_adoption_report)

__all__ = list(views.__all__)

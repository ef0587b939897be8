"""Notebook widgets and plots: `from depeche_nb.widgets import SubscriptionStepper`.

A separate module (not imported by `import depeche_nb`) because it loads
ipywidgets; a headless worker never needs it. matplotlib loads only when a
plot function is called.
"""

from __future__ import annotations

from depeche_nb.notebook.plots import plot_partition_sizes, plot_subscription_lag
from depeche_nb.notebook.widgets import (
    AggregateTimeline,
    OperationsConsole,
    PartitionMap,
    StreamBrowser,
    SubscriptionStepper,
)

__all__ = [
    "AggregateTimeline",
    "OperationsConsole",
    "PartitionMap",
    "StreamBrowser",
    "SubscriptionStepper",
    "plot_partition_sizes",
    "plot_subscription_lag",
]

"""The library's ipywidgets, one module each, on a shared base (`base.DnbWidget`) and style
(`style`). The public names are re-exported by `depeche_nb.widgets`."""

from __future__ import annotations

from depeche_nb.notebook.widgets.console import OperationsConsole
from depeche_nb.notebook.widgets.partition_map import PartitionMap
from depeche_nb.notebook.widgets.stepper import SubscriptionStepper
from depeche_nb.notebook.widgets.stream_browser import StreamBrowser
from depeche_nb.notebook.widgets.timeline import AggregateTimeline

__all__ = ["AggregateTimeline", "OperationsConsole", "PartitionMap", "StreamBrowser", "SubscriptionStepper"]

"""matplotlib charts of an aggregated stream's partitions and a subscription's lag.

matplotlib is imported inside the functions (it is in the `tutorials` extra,
not a dependency of a headless worker). Each function returns the Figure.
Without `ax` the figure is created with pyplot and then closed in pyplot's
registry: in Jupyter the returned Figure is shown once (as the cell's
value) instead of twice (once more by the inline backend's end-of-cell
flush), and scripts do not accumulate open figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from depeche_nb.notebook.views.streams import partition_summaries
from depeche_nb.notebook.views.subscriptions import partition_states

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from depeche_nb.engine.aggregated_stream import AggregatedStream
    from depeche_nb.engine.subscription import Subscription


def _axes(ax: Axes | None, width: float) -> tuple[Figure, Axes]:
    if ax is not None:
        figure = ax.get_figure()
        if figure is None:
            raise ValueError("ax is not part of a figure")
        return figure, ax  # type: ignore[return-value]
    import matplotlib.pyplot as plt

    figure, new_ax = plt.subplots(figsize=(width, 3.2))
    plt.close(figure)
    return figure, new_ax


def _width(n: int) -> float:
    return min(max(4.0, 0.35 * n + 2.0), 14.0)


def plot_partition_sizes(aggregated_stream: AggregatedStream[Any], ax: Axes | None = None) -> Figure:
    """One bar per partition: how many messages it holds."""
    summaries = partition_summaries(aggregated_stream)
    figure, axes = _axes(ax, _width(len(summaries)))
    partitions = [s.partition for s in summaries]
    axes.bar([str(p) for p in partitions], [s.messages for s in summaries], color="#4c78a8")
    axes.set_xlabel("partition")
    axes.set_ylabel("messages")
    axes.set_title(f"{aggregated_stream.name}: messages per partition")
    if not summaries:
        axes.text(0.5, 0.5, "nothing projected yet", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    return figure


def plot_subscription_lag(subscription: Subscription[Any], ax: Axes | None = None) -> Figure:
    """Per partition, stacked: messages acknowledged and messages waiting (lag).

    "Acknowledged", not "handled": the position also moves past messages that
    had no handler or were parked.
    """
    states = partition_states(subscription)
    figure, axes = _axes(ax, _width(len(states)))
    labels = [str(s.partition) for s in states]
    acknowledged = [max(s.position + 1, 0) for s in states]
    waiting = [max(s.lag, 0) for s in states]
    axes.bar(labels, acknowledged, color="#54a24b", label="acknowledged")
    axes.bar(labels, waiting, bottom=acknowledged, color="#f58518", label="waiting (lag)")
    axes.set_xlabel("partition")
    axes.set_ylabel("messages")
    axes.set_title(f"{subscription.name}: lag {sum(waiting):,}")
    if states:
        axes.legend(loc="upper right")
    else:
        axes.text(0.5, 0.5, "no partitions yet", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    return figure


__all__ = ["plot_partition_sizes", "plot_subscription_lag"]

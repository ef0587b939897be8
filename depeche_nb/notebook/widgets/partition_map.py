"""`PartitionMap(aggregated_stream)`: which origin stream landed in which partition at which
position, as a coloured grid beside the latest assignments."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from depeche_nb.engine.aggregated_stream import AggregatedStream
from depeche_nb.notebook import html as h
from depeche_nb.notebook.widgets.base import DnbWidget, make_button, page, positive_int
from depeche_nb.notebook.widgets.style import ALT_SEPARATOR, legend_key, stream_colour_index

# -- PartitionMap -------------------------------------------------------------------------------


class PartitionMap(DnbWidget):
    """Which origin stream landed in which partition, at which position.

    One grid row per partition (at most `max_partitions`), its last
    `positions` positions as cells coloured by origin stream (a legend key in
    each cell, so it reads where colours are stripped), beside a table of
    the latest `assignments` projected messages.
    """

    def __init__(
        self,
        aggregated_stream: AggregatedStream[Any],
        *,
        positions: int = 30,
        max_partitions: int = 32,
        assignments: int = 15,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        self.aggregated_stream = aggregated_stream
        self.positions = positive_int("positions", positions, 500)
        self.max_partitions = positive_int("max_partitions", max_partitions, 1000)
        self.assignments = positive_int("assignments", assignments, 500)
        # Read state, kept for the snapshot and for tests.
        self.partitions: dict[int, tuple[int, list[tuple[int, str, int, int]]]] = {}
        self.partition_count = 0
        self.projected = 0
        self.latest: list[tuple[int, str, int, int, int]] = []
        self.stream_keys: dict[str, str] = {}  # origin stream -> legend key

        self.header = widgets.HTML(value="")
        self.grid = widgets.HTML(value="")
        self.grid.add_class("dnb-partition-grid")
        self.assignments_table = widgets.HTML(value="")
        self.refresh_button = make_button(
            "Refresh", "dnb-map-refresh", "read the partitions again", "refresh"
        )
        self.refresh_button.on_click(lambda _: self._run_locked(self._refresh, "busy: try again"))
        self.children = (
            self.header,
            widgets.HBox([self.grid, self.assignments_table], layout=widgets.Layout(grid_gap="24px")),
            widgets.HBox([self.refresh_button]),
            self.status,
            self.error,
        )
        self.refresh()
        self._start_live(live, aggregated_stream.engine, [aggregated_stream.notification_channel])

    def _refresh(self) -> None:
        cell_rows, (partition_count, projected), latest = self.aggregated_stream.views.partition_map(
            self.aggregated_stream.engine, self.max_partitions, self.positions, self.assignments
        )
        partitions: dict[int, tuple[int, list[tuple[int, str, int, int]]]] = {}
        for partition, head, position, stream, version, gp in cell_rows:
            partitions.setdefault(partition, (head, []))[1].append((position, stream, version, gp))
        self.partitions = partitions
        self.partition_count, self.projected = int(partition_count), int(projected)
        self.latest = latest
        self.stream_keys = self._legend_keys()
        self.header.value = page(self._header_html())
        self.grid.value = page(self._grid_html())
        self.assignments_table.value = page(self._assignments_html())

    def _legend_keys(self) -> dict[str, str]:
        # Keys in order of first appearance in the store (global position), so they stay put
        # as new messages arrive.
        first_seen: dict[str, int] = {}
        for _, cells in self.partitions.values():
            for _, stream, _, gp in cells:
                first_seen[stream] = min(gp, first_seen.get(stream, gp))
        for gp, stream, *_ in self.latest:
            first_seen[stream] = min(gp, first_seen.get(stream, gp))
        ordered = sorted(first_seen, key=lambda s: (first_seen[s], s))
        return {stream: legend_key(i) for i, stream in enumerate(ordered)}

    def _header_html(self) -> str:
        return h.title("PartitionMap", self.aggregated_stream.name) + h.facts(
            [
                ("store", self.aggregated_stream.store.name),
                ("wildcards", ", ".join(self.aggregated_stream.stream_wildcards)),
                h.count(self.partition_count, "partition"),
                ("projected", f"{self.projected:,}"),
            ]
        )

    def _grid_html(self) -> str:
        if not self.partitions:
            return h.note("no partitions yet: nothing projected (stream.projector.step() projects)")
        # Every row gets the same number of columns (short rows end in one wide empty cell),
        # so a cell never stretches to the width of a neighbouring row's label.
        width = max(len(cells) for _, cells in self.partitions.values())
        rows = []
        for partition, (head, cells) in sorted(self.partitions.items()):
            hidden = head + 1 - len(cells)
            first = cells[0][0] if cells else head + 1
            parts = [
                f"<th>{h.esc(partition)}</th>",
                f'<td class="dnb-pm-range">{h.esc(f"{first}-{head}")}</td>',
                f'<td class="dnb-pm-more">{h.esc(f"+{hidden:,}") if hidden > 0 else ""}</td>',
            ]
            for position, stream, version, gp in cells:
                tip = f"partition {partition}, position {position}: {stream} v{version} (global {gp})"
                parts.append(
                    f'<td class="dnb-pm-cell dnb-c{stream_colour_index(stream)}" '
                    f'title="{h.esc(h.cut(tip, h.TITLE_CHARS))}">{h.esc(self.stream_keys[stream])}</td>'
                )
            if len(cells) < width:
                parts.append(f'<td colspan="{width - len(cells)}"></td>')
            rows.append("<tr>" + "".join(parts) + "</tr>")
        out = [h.section("Origin stream at each position (left to right: oldest shown to newest)")]
        # No label over the cells: a wide one would stretch every cell to its width.
        head_row = f'<tr><th>partition</th><th>positions</th><th></th><th colspan="{width}"></th></tr>'
        out.append(
            f'<table class="dnb-pm-grid"><thead>{head_row}</thead><tbody>{"".join(rows)}</tbody></table>'
        )
        if self.partition_count > len(self.partitions):
            out.append(h.note(f"… {self.partition_count - len(self.partitions):,} more partitions not shown"))
        out.append(self._legend_html())
        return "".join(out)

    def _legend_html(self, limit: int = 40) -> str:
        items = []
        for stream, key in list(self.stream_keys.items())[:limit]:
            # The space (not a margin) and the separator keep "A order-0 · B order-1" apart
            # where the style is stripped.
            items.append(
                f'<span><span class="dnb-pm-swatch dnb-c{stream_colour_index(stream)}">{h.esc(key)}</span> '
                f'<span class="dnb-name">{h.esc(h.cut(stream, 60))}</span></span>'
            )
        more = len(self.stream_keys) - limit
        legend = f'<div class="dnb-pm-legend">{ALT_SEPARATOR.join(items)}</div>'
        return legend + (h.note(f"… {more:,} more streams") if more > 0 else "")

    def _assignments_html(self) -> str:
        if not self.latest:
            return ""
        return h.section("Latest assignments") + h.table(
            ("global position", "key", "origin stream", "version", "partition", "position"),
            [
                (gp, self.stream_keys.get(stream, ""), stream, v, p, pos)
                for gp, stream, v, p, pos in self.latest
            ],
            total=self.projected,
            noun="assignment",
            hint="stream.assignments_dataframe() has them all",
            max_rows=self.assignments,
        )

    def snapshot_html(self) -> str:
        return page(
            self._header_html(),
            f'<div class="dnb-pm-layout"><div>{self._grid_html()}</div>'
            f"<div>{self._assignments_html()}</div></div>",
            self._error_body,
        )

    def __repr__(self) -> str:
        return (
            f"PartitionMap(stream={self.aggregated_stream.name!r}, partitions={self.partition_count}, "
            f"projected={self.projected})"
        )

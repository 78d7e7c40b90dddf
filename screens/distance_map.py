"""The distance map: how far one donor's weights are from the base's, per layer and component.

The column-wide view of the layer screen's distance figure: every layer's attention, router,
experts, norms... at a glance, so a researcher sees where post-training moved the weights most
before choosing what to transplant. Figures come from a job (screens/job.py) running
`surgeon.features.distance.distance_map` (memory-mapped reads, cached on disk by fingerprint);
`n` shows the next donor (replacing the job), enter opens the layer under the cursor. A cell is
the parameter-weighted mean of its tensors' relative distances (features/distance.py says why).
A cell holding tensors of more than 4M values not computed before first shows an estimate from
samples of them ("≈0.0123" in italics, `estimated_map`), until its exact figure replaces it.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Static

from surgeon.core.workbench import COLUMN_TITLES
from surgeon.features.distance import AGGREGATE

from .job import JobScreen
from .layer import format_distance
from .widgets.keybar import KeyBar


class MapCells(Message):
    """Distances of some cells for one donor: {(layer, kind): value}; `estimate`: from samples
    (surgeon/features/distance.py), the exact figures follow."""

    def __init__(self, donor: str, values: dict, estimate: bool = False):
        super().__init__()
        self.donor = donor
        self.values = values
        self.estimate = estimate


class DistanceMapScreen(JobScreen):
    BINDINGS = [
        Binding("escape", "back", "Back", id="map.back"),
        Binding("n", "next_donor", "Next donor", id="map.next"),
        Binding("enter", "open_layer", "Layer", id="map.layer"),
        Binding("j", "move(1)", "Down", show=False, id="map.down"),
        Binding("k", "move(-1)", "Up", show=False, id="map.up"),
    ]

    def __init__(self):
        super().__init__()
        wb = self.app.wb
        self.others = [d for d in wb.donors if d != wb.base]
        self.donor = self.others[0] if self.others else None
        self.kinds = list(wb.index.columns)
        self.globals = list(wb.index.globals)

    def compose(self) -> ComposeResult:
        yield Static("", id="map-title")
        yield DataTable(id="distance-map", cursor_type="row", zebra_stripes=True)
        yield KeyBar()

    def on_mount(self) -> None:
        table = self.query_one("#distance-map", DataTable)
        table.add_column("layer", key="layer")
        for kind in self.kinds + self.globals:
            table.add_column(COLUMN_TITLES.get(kind, kind), key=kind)
        for layer in range(self.app.wb.index.num_layers):
            table.add_row(str(layer), *[self._blank(kind, layer) for kind in self.kinds + self.globals], key=str(layer))
        if self.globals:
            table.add_row("global", *[self._blank(kind, None) for kind in self.kinds + self.globals], key="global")
        self._show()

    def _blank(self, kind: str, layer: int | None) -> Text:
        is_global = kind in self.globals
        return Text("…", "dim") if is_global == (layer is None) else Text("")

    def _show(self) -> None:
        wb = self.app.wb
        title = self.query_one("#map-title", Static)
        if self.donor is None:
            title.update("Only the base is open: add a donor (d) to see how far its weights are from the base.")
            return
        title.update(f"Distance of donor {self.donor} from the base {wb.base} per layer and component: each cell is "
                     f"the {AGGREGATE} (n: next donor, enter: open layer, escape: back)")
        self.restart_job(self.compute, self.donor, group="map")

    def compute(self, donor_name: str, *, progress, cancel) -> None:
        """The job: every cell's distance, posted 16 at a time so the table fills as they come; cells
        with large tensors not computed before get an estimate first (`estimated_map`)."""
        from surgeon.features.distance import distance_map, estimated_map

        wb = self.app.wb
        base, donor, cache = wb.donors[wb.base], wb.donors[donor_name], self.app.distance_cache()
        for estimate, cells in ((True, estimated_map), (False, distance_map)):
            batch = {}
            try:
                for cell, value in cells(base, donor, cache, progress=progress, cancel=cancel):
                    batch[cell] = value
                    if len(batch) >= 16:
                        self.post_message(MapCells(donor_name, batch, estimate))
                        batch = {}
            finally:
                self.post_message(MapCells(donor_name, batch, estimate))

    def job_failed(self, message: str) -> None:
        self.app.notify(message, severity="error", title="Distance map")

    def job_cancelled(self) -> None:
        pass  # only leaving the screen cancels; a new donor replaces the job instead

    def on_unmount(self) -> None:
        self.cancel_job()

    @on(MapCells)
    def on_cells(self, message: MapCells) -> None:
        if message.donor != self.donor:
            return
        table = self.query_one("#distance-map", DataTable)
        for (layer, kind), value in message.values.items():
            row = "global" if layer is None else str(layer)
            if kind in self.kinds or kind in self.globals:
                table.update_cell(row, kind, format_distance(value, message.estimate), update_width=True)

    def action_next_donor(self) -> None:
        if len(self.others) < 2:
            return
        self.donor = self.others[(self.others.index(self.donor) + 1) % len(self.others)]
        table = self.query_one("#distance-map", DataTable)
        for layer in list(range(self.app.wb.index.num_layers)) + ([None] if self.globals else []):
            for kind in self.kinds + self.globals:
                table.update_cell("global" if layer is None else str(layer), kind, self._blank(kind, layer))
        self._show()

    def action_move(self, step: int) -> None:
        table = self.query_one("#distance-map", DataTable)
        table.move_cursor(row=table.cursor_row + step)

    def action_open_layer(self) -> None:
        table = self.query_one("#distance-map", DataTable)
        self._open(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    @on(DataTable.RowSelected)
    def on_row_selected(self, event: DataTable.RowSelected) -> None:  # enter, as the table sees it
        self._open(event.row_key.value)

    def _open(self, row: str) -> None:
        if row == "global":
            return
        self.app.open_screen("layer", int(row))

    def action_back(self) -> None:
        self.app.pop_screen()

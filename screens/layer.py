"""One layer in detail: its components and every expert as rows, and every tensor.

Experts are marked one by one or as a range (v selects, like the grid). The tensor table shows
shape, dtype, the donor each tensor comes from, and how far each other donor's tensor is from
the base's (relative L2 norm): computed by a job (screens/job.py) from memory maps, cached by
fingerprint, so opening a layer never waits for it. A large tensor (DeepSeek-V3's experts) first
shows an estimate from a sample of its values, "≈0.0123" in italics, until its exact figure comes.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Static

from surgeon.core.anatomy import natural_key
from surgeon.core.workbench import Cell, layer_sheet

from .job import JobScreen
from .marking import MARKING_BINDINGS, MarkingMixin
from .widgets.grid import GridView, donor_style
from .widgets.keybar import KeyBar
from .widgets.status import status_line
from .widgets.tensor_table import TensorTable


class Distances(Message):
    """Distances of some tensors of the layer: {(donor, tensor): (value, an estimate?)}."""

    def can_replace(self, message: Message) -> bool:
        return False

    def __init__(self, layer: int, values: dict[tuple[str, str], tuple[float, bool]]):
        super().__init__()
        self.layer_no = layer
        self.values = values


def format_distance(value: float | None, estimate: bool = False) -> Text:
    """A tensor's distance; an estimate from a sample (surgeon/features/distance.py) reads "≈0.0123"
    in italics until the exact figure replaces it."""
    if value is None:
        return Text("…", "dim")
    if math.isinf(value):
        return Text("inf", "bold red")
    style = "dim" if value == 0 else ("bold red" if value >= 0.5 else ("yellow" if value >= 0.05 else ""))
    if estimate:
        return Text(f"≈{value:.4f}", f"{style} italic".strip())
    return Text(f"{value:.4f}", style)


class LayerScreen(MarkingMixin, JobScreen):
    CSS_PATH = "layer.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        *[b for b in MARKING_BINDINGS if b.id not in ("mark.row", "mark.column")],
        Binding("escape", "back", "Back", id="layer.back"),
        Binding("left_square_bracket", "layer(-1)", "Prev layer", key_display="[", id="layer.prev"),
        Binding("right_square_bracket", "layer(1)", "Next layer", key_display="]", id="layer.next"),
    ]

    def __init__(self, layer: int, focus_kind: str | None = None):
        super().__init__()
        self.layer_no = layer
        self.focus_kind = focus_kind
        self.distances: dict[tuple[str, str], tuple[float, bool]] = {}  # (donor, tensor) -> (value, an estimate?)
        self._names: tuple = (None, [])  # ((base index, layer), its tensor names): _tensor_names
        self._from: dict[str, tuple] = {}  # tensor -> (source text, style) the "from" column shows

    def compose(self) -> ComposeResult:
        yield Static("", id="layer-title")
        with Horizontal(id="layer-body"):
            yield GridView(self.app.wb, layer_sheet(self.app.wb, self.layer_no), id="layer-grid")
            yield TensorTable(id="tensors")
        yield Static("", id="status")
        yield KeyBar()

    @property
    def grid(self) -> GridView:
        return self.query_one("#layer-grid", GridView)

    def on_mount(self) -> None:
        self._show_layer()

    def _show_layer(self) -> None:
        wb = self.app.wb
        self.query_one("#layer-title", Static).update(
            f"Layer {self.layer_no} of {wb.index.num_layers}   [dim](\\[ and ] change layer, escape goes back)[/dim]")
        self.grid.set_sheet(layer_sheet(wb, self.layer_no), wb)
        if self.focus_kind and self.focus_kind != "expert":
            for r, row in enumerate(self.grid.sheet.items):
                if row and isinstance(row[0], Cell) and row[0].kind == self.focus_kind:
                    self.grid.move_to(r, 0)
        elif self.focus_kind == "expert":
            first = min(self.grid.sheet.gaps, default=0)
            self.grid.move_to(first, 0)
        self.grid.focus()
        self._fill_tensors()
        self.refresh_status()
        self.restart_job(self.compute_distances, self.layer_no, group="distance")

    def _tensor_names(self) -> list[str]:
        """The layer's tensors in order, kept while the base and the layer stay: each mark repaints
        their sources (sorting DeepSeek-V3's 1,557 names took 2 ms a key)."""
        wb = self.app.wb
        if self._names[0] != (wb.index, self.layer_no):
            # A fused expert tensor belongs to every expert's unit: listed once.
            names = dict.fromkeys(n for p, ns in wb.index.tensors_of.items() if p.layer == self.layer_no for n in ns)
            self._names = ((wb.index, self.layer_no), sorted(names, key=natural_key))
        return self._names[1]

    def _others(self) -> list[str]:
        wb = self.app.wb
        return [n for n in wb.donors if n != wb.base and wb.problem(n) is None]

    def _fill_tensors(self) -> None:
        wb = self.app.wb
        others = self._others()
        columns = [("tensor", "tensor"), ("shape", "shape"), ("dtype", "dtype"), ("from", "from")]
        columns += [(f"d:{d}", f"Δ{d}") for d in others]
        base = wb.donors[wb.base]
        prefix = f"model.layers.{self.layer_no}."
        rows = []
        self._from = {}
        for name in self._tensor_names():
            info = base.tensors[name]
            src, colour = wb.tensor_origin(name)
            self._from[name] = (src, donor_style(wb, colour))
            row = [name[len(prefix):], "×".join(map(str, info.shape)), info.dtype, Text(f" {src} ", self._from[name][1])]
            row += [format_distance(*self.distances.get((d, name), (None, False))) for d in others]
            rows.append((name, row))
        self.query_one("#tensors", TensorTable).set_rows(columns, rows)

    def refresh_cells(self) -> None:
        """After a mark: the grid, the "from" cells whose source changed, the status line. Only those
        cells get new Text: a new one for each tensor of a DeepSeek-V3 layer (1,557) on every mark
        was memory that lived just long enough to be promoted, bringing Python's full collections on
        sooner."""
        wb = self.app.wb
        self.grid.refresh_cells()
        changed = {}
        for name in self._tensor_names():
            src, colour = wb.tensor_origin(name)
            shown = (src, donor_style(wb, colour))
            if self._from.get(name) != shown:
                self._from[name] = shown
                changed[name] = Text(f" {src} ", shown[1])
        if changed:
            try:
                self.query_one("#tensors", TensorTable).update_column("from", changed)
            except KeyError:  # the table was rebuilt for another layer meanwhile
                pass
        self.refresh_status()

    def refresh_status(self) -> None:
        wb = self.app.wb
        self.query_one("#status", Static).update(status_line(wb, self.app.session_label(), self.app.dirty, self.app.hash_status))

    def compute_distances(self, layer: int, *, progress, cancel) -> None:
        """The job: each other donor's distance per tensor of the layer, posted 24 at a time (a large
        tensor's estimate first, then its exact figure: `tensor_distances`)."""
        from surgeon.features.distance import tensor_distances

        wb = self.app.wb
        others = {d: wb.donors[d] for d in self._others()}
        batch: dict[tuple[str, str], tuple[float, bool]] = {}
        try:
            for found in tensor_distances(wb.donors[wb.base], others, self._tensor_names(),
                                          self.app.distance_cache(), progress=progress, cancel=cancel):
                batch[(found.donor, found.name)] = (found.value, found.estimate)
                if len(batch) >= 24:
                    self.post_message(Distances(layer, batch))
                    batch = {}
        finally:
            self.post_message(Distances(layer, batch))

    def job_cancelled(self) -> None:
        pass  # only leaving the screen cancels; another layer replaces the job instead

    def on_unmount(self) -> None:
        self.cancel_job()

    @on(Distances)
    def on_distances(self, message: Distances) -> None:
        if message.layer_no != self.layer_no:
            return
        self.distances.update(message.values)
        by_donor: dict[str, dict[str, Text]] = {}
        for (d, name), (value, estimate) in message.values.items():
            by_donor.setdefault(d, {})[name] = format_distance(value, estimate)
        table = self.query_one("#tensors", TensorTable)
        for d, values in by_donor.items():
            try:
                table.update_column(f"d:{d}", values)
            except KeyError:  # the table was rebuilt for another layer meanwhile
                pass

    def action_layer(self, step: int) -> None:
        n = self.app.wb.index.num_layers
        self.layer_no = (self.layer_no + step) % n
        self.distances = {}
        self.focus_kind = None
        self._show_layer()

    def action_paint_all(self) -> None:
        self._paint(self.grid.all_items())

    def action_back(self) -> None:
        self.app.pop_screen()

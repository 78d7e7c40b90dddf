"""The surgery grid: rows are layers, columns the base's component kinds, globals last.

This is where the user spends the session. The screen is thin: keys become workbench calls
(see marking.py), and the app repaints the grid and the status line after every change.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Static

from surgeon.core.workbench import Cell, surgery_sheet

from .marking import MARKING_BINDINGS, MarkingMixin
from .widgets.grid import GridView
from .widgets.keybar import KeyBar
from .widgets.status import legend, status_line

WELCOME = (
    "Welcome: three demo donors of one tiny OLMoE are open (A is the base). Move with the arrows "
    "or hjkl, press 2 to give a cell to donor B, enter to open a layer, ctrl+s to save, ? for every key."
)


class SurgeryScreen(MarkingMixin, Screen):
    CSS_PATH = "surgery.tcss"  # its own rules, which the app reads at start; the shared ones are in app.tcss
    BINDINGS = [
        *MARKING_BINDINGS,
        Binding("enter", "open_layer", "Layer", id="surgery.layer", tooltip="Open the layer under the cursor"),
        Binding("d", "app.donors", "Donors", id="surgery.donors"),
        Binding("e", "app.export", "Export", id="surgery.export"),
        Binding("p", "probes", "Probes", id="surgery.probes",
                tooltip="Probe the hybrid against every donor"),
        Binding("m", "distance_map", "Distances", id="surgery.map",
                tooltip="How far each donor's weights are from the base, per layer and component"),
        Binding("w", "dismiss_welcome", "Hide welcome", show=False, id="surgery.welcome"),
        Binding("s", "sweep", "Sweep", show=False, id="surgery.sweep",
                tooltip="Sweep: every subset of component groups from a donor, probed, as a table and heatmap"),
        Binding("R", "routing", "Routing", show=False, id="surgery.routing",
                tooltip="Routing heatmap: which experts each model uses"),
        Binding("L", "gates", "Layer gates", show=False, id="surgery.gates",
                tooltip="Self-MoE layer gates of the hybrid: which lower their layer's perplexity, drop the rest"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("", id="welcome", markup=False)
        yield Static("opening donors…", id="legend")
        with Vertical(id="grid-box"):
            yield Static("", id="empty", markup=False)
        yield Static("", id="status")
        yield KeyBar()

    grid: GridView | None = None

    def show_workbench(self, welcome: bool = False) -> None:
        """(Re)build the grid for the app's workbench: after loading, a new base, a restored session."""
        wb = self.app.wb
        box = self.query_one("#grid-box")
        empty = self.query_one("#empty", Static)
        self.query_one("#welcome", Static).display = welcome
        if welcome:
            self.query_one("#welcome", Static).update(WELCOME)
        if wb is None:
            empty.display = True
            if self.grid is not None:
                self.grid.remove()
                self.grid = None
            return
        empty.display = False
        sheet = surgery_sheet(wb)
        if self.grid is None:
            self.grid = GridView(wb, sheet, id="grid")
            box.mount(self.grid)
            self.grid.focus()
        else:
            self.grid.set_sheet(sheet, wb)
        self.refresh_status()

    def show_empty(self, message: str) -> None:
        empty = self.query_one("#empty", Static)
        empty.update(message)
        empty.display = True
        self.query_one("#legend", Static).update("")

    def refresh_cells(self) -> None:
        if self.grid is not None:
            self.grid.refresh_cells()
        self.refresh_status()

    def refresh_status(self) -> None:
        wb = self.app.wb
        if wb is None:
            return
        try:
            legend_line, status = self.query_one("#legend", Static), self.query_one("#status", Static)
        except NoMatches:  # the app is taking its screens down (quit as the background hash ended)
            return
        legend_line.update(legend(wb, self.app.labels, self.app.brush_donor()))
        status.update(status_line(wb, self.app.session_label(), self.app.dirty, self.app.hash_status))

    def check_action(self, action: str, parameters) -> bool | None:
        if self.app.wb is None and action not in ("app.donors",):
            return False if action.startswith(("paint", "cycle", "undo", "redo", "reset", "open_layer", "probes",
                                               "sweep", "routing", "gates")) else True
        return True

    def on_grid_view_clicked(self, event: GridView.Clicked) -> None:
        self.action_cycle()

    def action_open_layer(self) -> None:
        grid = self.grid
        if grid is None:
            return
        item = grid.current_item()
        if isinstance(item, Cell) and item.layer is not None:
            self.app.open_screen("layer", item.layer, focus_kind=item.kind)
        else:
            self.app.notify("the globals have no layer to open", timeout=2)

    # Screen actions, not the app's, so check_action can hide them with no donors open; the screens
    # and how each opens (kept, refused without donors) are the app's table (screen_table.py).
    def action_probes(self) -> None:
        self.app.open_screen("probes")

    def action_sweep(self) -> None:
        self.app.open_screen("sweep")

    def action_routing(self) -> None:
        self.app.open_screen("routing")

    def action_gates(self) -> None:
        self.app.open_screen("gates")

    def action_distance_map(self) -> None:
        self.app.open_screen("distance_map")

    def action_dismiss_welcome(self) -> None:
        self.query_one("#welcome", Static).display = False

"""The marking keys, shared by the surgery grid and the layer detail.

Both screens show a GridView over the app's workbench; this mixin turns a key into one workbench
call and reports refusals (an incompatible donor) as a notification naming the tensor at fault.
"""

from __future__ import annotations

from textual.binding import Binding

from surgeon.errors import SurgeonError

DIGIT_BINDINGS = [
    Binding(str(i), f"paint({i - 1})", f"Paint with donor {i}", show=(i == 1), key_display="1-9",
            id=f"mark.donor{i}", tooltip="Give the cell or selection to donor N (1 = A) and make it the brush")
    for i in range(1, 10)
]

MARKING_BINDINGS = [
    Binding("space", "cycle", "Cycle", id="mark.cycle", tooltip="Give the cell or selection the next donor"),
    *DIGIT_BINDINGS,
    Binding("b", "next_brush", "Brush", id="mark.brush", tooltip="Choose the donor that r/c/a apply"),
    Binding("r", "paint_row", "Row", id="mark.row", tooltip="Give the whole row to the brush donor"),
    Binding("c", "paint_column", "Column", id="mark.column", tooltip="Give the whole column to the brush donor"),
    Binding("a", "paint_all", "All", id="mark.all", tooltip="Give everything to the brush donor"),
    Binding("u", "undo", "Undo", id="mark.undo"),
    Binding("U,ctrl+r,ctrl+y", "redo", "Redo", id="mark.redo"),
    Binding("X", "reset", "Reset", id="mark.reset", tooltip="Every cell back to the base donor (undoable)"),
]


class MarkingMixin:
    """Needs `self.grid` (a GridView) and `self.app.workbench_changed()`."""

    def _apply(self, fn) -> bool:
        wb = self.app.wb
        if wb is None:
            return False
        try:
            changed = fn(wb)
        except SurgeonError as e:
            self.app.notify(str(e), title="Cannot mark", severity="error", timeout=8)
            return False
        if changed:
            self.app.workbench_changed()
        return bool(changed)

    def _paint(self, items) -> None:
        brush = self.app.brush_donor()
        if brush is not None:
            self._apply(lambda wb: wb.set_cells(items, brush))

    def action_cycle(self) -> None:
        self._apply(lambda wb: wb.cycle(self.grid.selected_items()) is not None)

    def action_paint(self, index: int) -> None:
        wb = self.app.wb
        if wb is None:
            return
        names = list(wb.donors)
        if index >= len(names):
            self.app.notify(f"no donor {index + 1}: {len(names)} open (d opens the donors screen)", severity="warning")
            return
        self.app.brush = names[index]
        if not self._apply(lambda wb: wb.set_cells(self.grid.selected_items(), names[index])):
            self.app.refresh_status()  # the brush changed even when the cells did not

    def action_next_brush(self) -> None:
        wb = self.app.wb
        if wb is None:
            return
        names = list(wb.donors)
        cur = self.app.brush_donor()
        self.app.brush = names[(names.index(cur) + 1) % len(names)] if cur in names else names[0]
        self.app.refresh_status()

    def action_paint_row(self) -> None:
        self._paint(self.grid.row_items())

    def action_paint_column(self) -> None:
        self._paint(self.grid.column_items())

    def action_paint_all(self) -> None:
        self._paint(self.grid.all_items())

    def action_undo(self) -> None:
        if not self._apply(lambda wb: wb.undo()):
            self.app.notify("nothing to undo", timeout=2)

    def action_redo(self) -> None:
        if not self._apply(lambda wb: wb.redo()):
            self.app.notify("nothing to redo", timeout=2)

    def action_reset(self) -> None:
        self._apply(lambda wb: wb.reset())

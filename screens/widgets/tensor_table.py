"""TensorTable: the layer screen's tensors, one line each, drawn with the Line API.

Textual's DataTable measures and renders every cell it is given, and the layer screen gives it
every tensor of the layer: a DeepSeek-V3 layer has over 1,500 (256 experts' three projections and
their FP8 scales), and the table took 0.28 s of the 0.34 s from `enter` to the layer's first frame
(an OLMoE layer: 0.06 of 0.12 s). Here each column's width is the longest of its texts, found in
one pass, and a frame draws only the lines on screen. It looks as the DataTable did: a header line
that stays put, zebra stripes, a row cursor.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = str | Text  # a Text is drawn in its own style (spans are not kept)


class TensorTable(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("up", "move(-1)", "Cursor up", show=False),
        Binding("down", "move(1)", "Cursor down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(-1)", "Top", show=False),
        Binding("end", "edge(1)", "Bottom", show=False),
    ]
    COMPONENT_CLASSES = {"tensor-table--header", "tensor-table--even-row", "tensor-table--cursor"}
    DEFAULT_CSS = """
    TensorTable {
        background: $surface;
        color: $foreground;
        & > .tensor-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        &:dark > .tensor-table--even-row {
            background: $surface-darken-1 40%;
        }
        & > .tensor-table--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .tensor-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:focus {
            background-tint: $foreground 5%;
            & > .tensor-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .tensor-table--header {
                background-tint: $foreground 5%;
            }
        }
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.columns: list[tuple[str, str]] = []  # (key, title)
        self.row_keys: list[str] = []
        self._cells: dict[str, dict[str, Cell]] = {}
        self._widths: dict[str, int] = {}
        self.cursor = 0

    # ------------------------------------------------------------ content
    def set_rows(self, columns: list[tuple[str, str]], rows: list[tuple[str, list[Cell]]]) -> None:
        """Replace the whole table: `columns` (key, title), `rows` (key, one cell per column)."""
        self.columns = list(columns)
        keys = [key for key, _ in self.columns]
        self.row_keys = [key for key, _ in rows]
        self._cells = {key: dict(zip(keys, cells)) for key, cells in rows}
        self._widths = {key: cell_len(title) for key, title in self.columns}
        for cells in self._cells.values():
            for key, cell in cells.items():
                width = cell_len(_plain(cell))
                if width > self._widths[key]:
                    self._widths[key] = width
        self.cursor = 0  # a new table (another layer) starts at its top, as the DataTable's clear() did
        self.scroll_to(0, 0, animate=False)
        self._resize()

    def update_cell(self, row_key: str, column_key: str, value: Cell) -> None:
        """Change one cell (a KeyError for a row or column the table does not have)."""
        self.update_column(column_key, {row_key: value})

    def update_column(self, column_key: str, values: dict[str, Cell]) -> None:
        """Change cells of one column, {row key: value}, with one repaint: a mark in a DeepSeek-V3
        layer changes the source of 1,557 tensors. A KeyError, and nothing changed, for a row or
        column the table does not have."""
        missing = next((key for key in values if key not in self._cells), None)
        if column_key not in self._widths or missing is not None:
            raise KeyError(column_key if missing is None else missing)
        widest = self._widths[column_key]
        for row_key, value in values.items():
            self._cells[row_key][column_key] = value
            widest = max(widest, cell_len(_plain(value)))
        if widest > self._widths[column_key]:
            self._widths[column_key] = widest
            self._resize()
        self.refresh()

    def get_cell(self, row_key: str, column_key: str) -> Cell:
        return self._cells[row_key][column_key]

    @property
    def row_count(self) -> int:
        return len(self.row_keys)

    def _resize(self) -> None:
        self.virtual_size = Size(sum(w + 2 for w in self._widths.values()), len(self.row_keys) + 1)
        self.refresh()

    # ------------------------------------------------------------ drawing
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        scroll_x, scroll_y = self.scroll_offset
        cursor = None  # as the DataTable drew it: the cursor's colours over a cell's own
        if y == 0:
            style = base + self.get_component_rich_style("tensor-table--header")
            cells = [(title, None) for _, title in self.columns]
        else:
            row = y - 1 + scroll_y
            if row >= len(self.row_keys):
                return Strip.blank(width, base)
            style = base
            if row % 2 == 0:
                style += self.get_component_rich_style("tensor-table--even-row")
            if row == self.cursor:
                cursor = self.get_component_rich_style("tensor-table--cursor")
                style += cursor
            cells = [self._cell_text(self.row_keys[row], key) for key, _ in self.columns]
        segments = []
        for (text, own), (key, _) in zip(cells, self.columns):
            segments.append(Segment(" ", style))
            if own is not None:
                segments.append(Segment(text, style + own + cursor if cursor else style + own))
            else:
                segments.append(Segment(text, style))
            segments.append(Segment(" " * (self._widths[key] - cell_len(text) + 1), style))
        return Strip(segments).crop_extend(scroll_x, scroll_x + width, Style(bgcolor=style.bgcolor))

    def _cell_text(self, row_key: str, column_key: str) -> tuple[str, Style | None]:
        cell = self._cells[row_key].get(column_key, "")
        if isinstance(cell, Text):
            own = cell.style if isinstance(cell.style, Style) else Style.parse(cell.style) if cell.style else None
            return cell.plain, own
        return str(cell), None

    # ------------------------------------------------------------ the cursor
    def move_to(self, row: int) -> None:
        self.cursor = max(0, min(row, len(self.row_keys) - 1))
        visible = max(1, self.size.height - 1)
        _, top = self.scroll_offset
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False)
        self.refresh()

    def action_move(self, step: int) -> None:
        self.move_to(self.cursor + step)

    def action_page(self, direction: int) -> None:
        self.move_to(self.cursor + direction * max(1, self.size.height - 2))

    def action_edge(self, direction: int) -> None:
        self.move_to(0 if direction < 0 else len(self.row_keys) - 1)

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1:
            self.move_to(event.y - 1 + self.scroll_offset.y)


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)

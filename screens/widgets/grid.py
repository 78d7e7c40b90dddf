"""GridView: the surgery grid drawn with the Line API, one Strip per row.

A DataTable would rebuild its rows on every mark; this widget only asks the workbench for the
text of the cells it draws, cached per workbench version, so a key press costs one repaint of the
visible lines whatever the checkpoint's size. The header line stays put while rows scroll.
"""

from __future__ import annotations

from functools import lru_cache

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from surgeon.core.workbench import Cell, Sheet, Workbench, global_label

# One colour per donor position (A, B, C, ...), readable on dark and light themes.
DONOR_COLOURS = ["#5f87af", "#d75f00", "#5faf5f", "#af5fd7", "#d7af00", "#00afaf", "#d70000", "#87875f"]


def donor_colour(wb: Workbench, name: str) -> str:
    names = list(wb.donors)
    i = names.index(name) if name in names else 0
    return DONOR_COLOURS[i % len(DONOR_COLOURS)]


def donor_style(wb: Workbench, name: str) -> Style:
    """The base is plain coloured text; any other donor is a coloured block, so changes stand out."""
    return _donor_style(donor_colour(wb, name), name == wb.base)


@lru_cache(maxsize=64)
def _donor_style(colour: str, base: bool) -> Style:
    # A Style parses its colours when made: once per colour, not once per cell drawn or tensor listed.
    return Style(color=colour) if base else Style(color="black", bgcolor=colour, bold=True)


class GridView(ScrollView, can_focus=True):
    """Cursor and rectangle selection over a Sheet; the screen owns what a key does to cells."""

    BINDINGS = [
        Binding("up", "move(-1, 0)", "Up", show=False),
        Binding("down", "move(1, 0)", "Down", show=False),
        Binding("left", "move(0, -1)", "Left", show=False),
        Binding("right", "move(0, 1)", "Right", show=False),
        Binding("k", "move(-1, 0)", "Up", show=False),
        Binding("j", "move(1, 0)", "Down", show=False),
        Binding("h", "move(0, -1)", "Left", show=False),
        Binding("l", "move(0, 1)", "Right", show=False),
        Binding("g,home", "edge(-1)", "First row", show=False),
        Binding("G,end", "edge(1)", "Last row", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("v", "toggle_select", "Select", id="grid.select", tooltip="Start or drop a rectangle selection"),
        Binding("escape", "clear_select", "Clear selection", show=False),
    ]

    class CursorMoved(Message):
        def __init__(self, grid: "GridView") -> None:
            super().__init__()
            self.grid = grid

    class Clicked(Message):
        """A click on the cell that already had the cursor."""

        def __init__(self, grid: "GridView") -> None:
            super().__init__()
            self.grid = grid

    def __init__(self, wb: Workbench, sheet: Sheet, *, name=None, id=None, classes=None):
        super().__init__(name=name, id=id, classes=classes)
        self.wb = wb
        self.sheet = sheet
        self.cursor = (0, 0)
        self.anchor: tuple[int, int] | None = None
        self._texts: dict[tuple[int, int], str] = {}
        self._texts_version = -1
        self._widths: list[int] = []
        self._label_width = 0
        self._row_line: list[int] = []
        self._line_row: dict[int, int] = {}
        self.set_sheet(sheet)

    # ------------------------------------------------------------ layout
    def set_sheet(self, sheet: Sheet, wb: Workbench | None = None) -> None:
        self.wb = wb or self.wb
        self.sheet = sheet
        self._row_line, self._line_row, line = [], {}, 0
        for r in range(len(sheet.items)):
            if r in sheet.gaps:
                line += 1
            self._row_line.append(line)
            self._line_row[line] = r
            line += 1
        self._lines = line
        self._texts_version = -1
        r, c = self.cursor
        self.cursor = (min(r, max(0, len(sheet.items) - 1)), c)
        self.cursor = self._snap(self.cursor)
        self.anchor = None
        self._measure()
        self.refresh()

    def _text(self, r: int, c: int) -> str:
        if self._texts_version != self.wb.version:
            self._texts = {}
            self._texts_version = self.wb.version
        key = (r, c)
        if key not in self._texts:
            item = self.sheet.item(r, c)
            if item is None:
                self._texts[key] = ""
            else:
                text = self.wb.cell_text(item)
                if isinstance(item, Cell) and item.layer is None:
                    text = f"{global_label(item.kind)} {text}"
                self._texts[key] = text
        return self._texts[key]

    def _measure(self) -> None:
        ncols = max((len(row) for row in self.sheet.items), default=0)
        ncols = max(ncols, len(self.sheet.titles))
        widths = []
        for c in range(ncols):
            title = self.sheet.titles[c] if c < len(self.sheet.titles) else ""
            longest = max((len(self._text(r, c)) for r in range(len(self.sheet.items))), default=0)
            widths.append(max(len(title), longest, 3) + 2)
        self._widths = widths
        self._label_width = max([len(x) for x in self.sheet.labels] + [5]) + 1
        self.virtual_size = Size(self._label_width + sum(w + 1 for w in widths), self._lines + 1)

    def refresh_cells(self) -> None:
        """The workbench changed: re-measure (an experts summary may have grown) and repaint."""
        self._texts_version = -1
        self._measure()
        self.refresh()

    # ------------------------------------------------------------ drawing
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        scroll_x, scroll_y = self.scroll_offset
        if y == 0:
            segs = [Segment(f"{self.sheet.corner:<{self._label_width}}", base + Style(bold=True, dim=True))]
            for c, w in enumerate(self._widths):
                title = self.sheet.titles[c] if c < len(self.sheet.titles) else ""
                segs.append(Segment(f" {title:<{w}}", base + Style(bold=True)))
        else:
            row = self._line_row.get(y - 1 + scroll_y)
            if row is None:
                return Strip.blank(width, base)
            segs = self._row_segments(row, base)
        return Strip(segs).crop_extend(scroll_x, scroll_x + width, base)

    def _row_segments(self, r: int, base: Style) -> list[Segment]:
        cr, cc = self.cursor
        label_style = base + Style(bold=(r == cr), dim=(r != cr))
        segs = [Segment(f"{self.sheet.labels[r]:>{self._label_width - 1}} ", label_style)]
        sel = self.selection_bounds()
        for c, w in enumerate(self._widths):
            segs.append(Segment(" ", base))
            item = self.sheet.item(r, c)
            if item is None:
                segs.append(Segment(" " * w, base))
                continue
            at_cursor = (r, c) == self.cursor and self.has_focus
            selected = sel is not None and sel[0] <= r <= sel[2] and sel[1] <= c <= sel[3]
            segs.extend(self._cell_segments(r, c, item, w, base, at_cursor, selected))
        return segs

    def _cell_segments(self, r, c, item, w, base, at_cursor, selected) -> list[Segment]:
        donors = self.wb.cell_donors(item)
        prefix = ""
        if isinstance(item, Cell) and item.layer is None:
            prefix = global_label(item.kind) + " "
        mixed = isinstance(item, Cell) and item.kind == "expert" and len(self.wb.parts(item)) > 1
        pieces: list[tuple[str, Style]] = []
        if prefix:
            pieces.append((prefix, base + Style(dim=True)))
        for i, (name, n) in enumerate(donors):
            text = f"{name}×{n}" if mixed else name
            pieces.append(((" " if i else "") + text, base + donor_style(self.wb, name)))
        left, right = ("[", "]") if at_cursor else (" ", " ")
        used = 2 + sum(len(t) for t, _ in pieces)
        edge = base + Style(bold=True, reverse=at_cursor)
        fill = base + (Style(bgcolor="#3a3a5a") if selected else Style())
        out = [Segment(left, edge)]
        for text, style in pieces:
            if at_cursor:
                style = style + Style(reverse=True)
            elif selected:
                style = style + Style(underline=True)
            out.append(Segment(text, style))
        out.append(Segment(right, edge))
        out.append(Segment(" " * max(0, w - used), fill))
        return out

    # ------------------------------------------------------------ cursor and selection
    def _snap(self, pos: tuple[int, int]) -> tuple[int, int]:
        """Move to the nearest existing cell of the row (the globals row is shorter)."""
        r, c = pos
        row = self.sheet.items[r] if 0 <= r < len(self.sheet.items) else []
        present = [i for i, it in enumerate(row) if it is not None]
        if not present:
            return (r, 0)
        if c in present:
            return (r, c)
        return (r, min(present, key=lambda i: abs(i - c)))

    def move_to(self, r: int, c: int) -> None:
        nrows = len(self.sheet.items)
        if not nrows:
            return
        r = max(0, min(nrows - 1, r))
        c = max(0, min(len(self._widths) - 1, c))
        self.cursor = self._snap((r, c))
        self._scroll_to_cursor()
        self.refresh()
        self.post_message(self.CursorMoved(self))

    def _scroll_to_cursor(self) -> None:
        line = self._row_line[self.cursor[0]]
        visible = max(1, self.size.height - 1)
        _, sy = self.scroll_offset
        if line < sy:
            self.scroll_to(y=line, animate=False)
        elif line >= sy + visible:
            self.scroll_to(y=line - visible + 1, animate=False)

    def action_move(self, dr: int, dc: int) -> None:
        r, c = self.cursor
        if dc:
            row = self.sheet.items[r]
            present = [i for i, it in enumerate(row) if it is not None]
            later = [i for i in present if (i - c) * dc > 0]
            if later:
                c = min(later, key=lambda i: abs(i - c))
            self.move_to(r, c)
        else:
            self.move_to(r + dr, c)

    def action_edge(self, direction: int) -> None:
        self.move_to(0 if direction < 0 else len(self.sheet.items) - 1, self.cursor[1])

    def action_page(self, direction: int) -> None:
        self.move_to(self.cursor[0] + direction * max(1, self.size.height - 2), self.cursor[1])

    def action_toggle_select(self) -> None:
        self.anchor = None if self.anchor is not None else self.cursor
        self.refresh()
        self.post_message(self.CursorMoved(self))

    def check_action(self, action: str, parameters) -> bool | None:
        # With no selection to drop, escape falls through to the screen (it closes the layer detail).
        if action == "clear_select":
            return self.anchor is not None
        return True

    def action_clear_select(self) -> None:
        self.anchor = None
        self.refresh()
        self.post_message(self.CursorMoved(self))

    def selection_bounds(self) -> tuple[int, int, int, int] | None:
        if self.anchor is None:
            return None
        (r0, c0), (r1, c1) = self.anchor, self.cursor
        return min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1)

    # ------------------------------------------------------------ what the keys act on
    def current_item(self):
        return self.sheet.item(*self.cursor)

    def selected_items(self) -> list:
        """The rectangle when one is selected, else the cell under the cursor."""
        b = self.selection_bounds()
        if b is None:
            item = self.current_item()
            return [] if item is None else [item]
        return [it for r in range(b[0], b[2] + 1) for c in range(b[1], b[3] + 1)
                if (it := self.sheet.item(r, c)) is not None]

    def row_items(self) -> list:
        return [it for it in self.sheet.items[self.cursor[0]] if it is not None]

    def column_items(self) -> list:
        r, c = self.cursor
        in_gap_section = [row for row in range(len(self.sheet.items)) if self._section(row) == self._section(r)]
        return [it for row in in_gap_section if (it := self.sheet.item(row, c)) is not None]

    def all_items(self) -> list:
        return [it for row in self.sheet.items for it in row if it is not None]

    def _section(self, row: int) -> int:
        return sum(1 for g in self.sheet.gaps if g <= row)

    # ------------------------------------------------------------ mouse
    def on_click(self, event) -> None:
        scroll_x, scroll_y = self.scroll_offset
        row = self._line_row.get(event.y - 1 + scroll_y) if event.y >= 1 else None
        if row is None:
            return
        x = event.x + scroll_x - self._label_width
        col, left = None, 0
        for c, w in enumerate(self._widths):
            if left <= x < left + w + 1:
                col = c
                break
            left += w + 1
        if col is None or self.sheet.item(row, col) is None:
            return
        if (row, col) == self.cursor and self.has_focus:
            self.post_message(self.Clicked(self))
        else:
            self.focus()
            self.move_to(row, col)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()


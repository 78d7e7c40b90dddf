"""HeatmapGrid: a routing view (layers x experts) drawn with the Line API, colour = value.

A 48-layer x 64-expert model is 3,000 cells; drawing only the visible lines from cached texts
and styles keeps a key press cheap whatever the model's size. The colours are the ones the SVG
and PNG writers use (surgeon.features.routing.view), so the screen and the saved figure agree.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from surgeon.features.routing.view import RoutingView, hex_colour, ink_for


class HeatmapGrid(ScrollView, can_focus=True):
    """A cursor over the cells of a RoutingView; the screen decides what the view is."""

    BINDINGS = [
        Binding("up,k", "move(-1, 0)", "Up", show=False),
        Binding("down,j", "move(1, 0)", "Down", show=False),
        Binding("left,h", "move(0, -1)", "Left", show=False),
        Binding("right,l", "move(0, 1)", "Right", show=False),
        Binding("g,home", "edge(-1)", "First layer", show=False),
        Binding("G,end", "edge(1)", "Last layer", show=False),
    ]

    class CursorMoved(Message):
        def __init__(self, grid: "HeatmapGrid") -> None:
            super().__init__()
            self.grid = grid

    def __init__(self, *, name=None, id=None, classes=None):
        super().__init__(name=name, id=id, classes=classes)
        self.view: RoutingView | None = None
        self.placeholder = ""
        self.cursor = (0, 0)
        self._texts: list[list[str]] = []
        self._styles: list[list[Style]] = []
        self._cell_w = 6
        self._label_w = 6

    def set_view(self, view: RoutingView | None, placeholder: str = "") -> None:
        self.view = view
        self.placeholder = placeholder
        if view is None:
            self._texts, self._styles = [], []
            self.virtual_size = Size(max(1, len(placeholder)), 1)
            self.refresh()
            return
        fmt = view.value_format()
        colours = view.colours()
        self._texts = [[fmt.format(v) for v in row] for row in view.values]
        self._styles = [[Style(color=ink_for(c), bgcolor=hex_colour(c)) for c in row] for row in colours]
        rows, cols = view.values.shape
        self._cell_w = max([len(t) for row in self._texts for t in row] + [len(f"e{cols - 1}")]) + 2
        self._label_w = max(len("layer"), len(str(max(view.layers, default=0)))) + 1
        r, c = self.cursor
        self.cursor = (min(r, max(0, rows - 1)), min(c, max(0, cols - 1)))
        self.virtual_size = Size(self._label_w + cols * self._cell_w, rows + 1)
        self.refresh()
        self.post_message(self.CursorMoved(self))

    # ------------------------------------------------------------ drawing
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        scroll_x, scroll_y = self.scroll_offset
        if self.view is None:
            text = self.placeholder if y == 0 else ""
            return Strip([Segment(text, base + Style(dim=True))]).crop_extend(0, width, base)
        cr, cc = self.cursor
        if y == 0:  # the expert numbers; the row labels stay put while the cells scroll sideways
            head = base + Style(bold=True)
            label = Segment(f"{'layer':<{self._label_w}}", head + Style(dim=True))
            cells = [Segment(f"{'e' + str(c):^{self._cell_w}}", head + Style(dim=(c != cc)))
                     for c in range(self.view.num_experts)]
        else:
            r = y - 1 + scroll_y
            if r >= len(self._texts):
                return Strip.blank(width, base)
            label = Segment(f"{self.view.layers[r]:>{self._label_w - 1}} ", base + Style(bold=(r == cr), dim=(r != cr)))
            inner = self._cell_w - 2
            cells = []
            for c, text in enumerate(self._texts[r]):
                style = base + self._styles[r][c]
                if (r, c) == self.cursor:
                    style += Style(bold=True, reverse=self.has_focus)
                    cells.append(Segment(f"[{text:>{inner}}]", style))
                else:
                    cells.append(Segment(f" {text:>{inner}} ", style))
        shown = Strip(cells).crop_extend(scroll_x, scroll_x + max(0, width - self._label_w), base)
        return Strip([label, *shown]).crop_extend(0, width, base)

    # ------------------------------------------------------------ cursor
    def move_to(self, r: int, c: int) -> None:
        if self.view is None:
            return
        rows, cols = self.view.values.shape
        self.cursor = (max(0, min(rows - 1, r)), max(0, min(cols - 1, c)))
        self._scroll_to_cursor()
        self.refresh()
        self.post_message(self.CursorMoved(self))

    def _scroll_to_cursor(self) -> None:
        r, c = self.cursor
        visible_rows = max(1, self.size.height - 1)
        sx, sy = self.scroll_offset
        y = sy
        if r < sy:
            y = r
        elif r >= sy + visible_rows:
            y = r - visible_rows + 1
        left, room = c * self._cell_w, max(self._cell_w, self.size.width - self._label_w)
        x = sx
        if left < sx:
            x = left
        elif left + self._cell_w > sx + room:
            x = left + self._cell_w - room
        self.scroll_to(x=x, y=y, animate=False)

    def action_move(self, dr: int, dc: int) -> None:
        self.move_to(self.cursor[0] + dr, self.cursor[1] + dc)

    def action_edge(self, direction: int) -> None:
        self.move_to(0 if direction < 0 else len(self._texts) - 1, self.cursor[1])

    def on_click(self, event) -> None:
        if self.view is None or event.y < 1 or event.x < self._label_w:
            return
        sx, sy = self.scroll_offset
        r = event.y - 1 + sy
        c = (event.x + sx - self._label_w) // self._cell_w
        if 0 <= r < len(self._texts) and 0 <= c < self.view.num_experts:
            self.focus()
            self.move_to(r, c)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

"""The key bar at the foot of every screen: the screen's shown bindings on one line.

It looks and behaves as Textual's `Footer` (a key and its description per action, disabled keys
dim, a click presses the key, the key's tooltip on hover, the command palette's key on the right,
the mouse wheel scrolls keys that do not fit), but it is one widget: the footer mounts a widget per
key and mounts them all again whenever the bindings change, which was a tenth of the workbench's
launch (22 keys on the grid's screen) and about half of every switch between screens.
"""

from __future__ import annotations

from typing import NamedTuple

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual import events
from textual.widget import Widget


class Key(NamedTuple):
    key: str  # what a click presses
    display: str
    description: str
    enabled: bool
    tooltip: str


class KeyBar(Widget, can_focus=False):
    ALLOW_SELECT = False
    COMPONENT_CLASSES = {"keybar--key", "keybar--description", "keybar--hover", "keybar--divider"}
    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        color: $footer-foreground;
        background: $footer-background;
        .keybar--key {
            color: $footer-key-foreground;
            background: $footer-key-background;
            text-style: bold;
        }
        .keybar--description {
            color: $footer-description-foreground;
            background: $footer-description-background;
        }
        .keybar--hover {
            color: $footer-key-foreground;
            background: $block-hover-background;
        }
        .keybar--divider {
            color: $foreground 20%;
        }
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.first = 0  # index of the first key shown: the mouse wheel moves it when keys overflow
        self.more = False  # keys after the last one drawn in full: the wheel can show them
        self._spans: list[tuple[int, int, Key]] = []  # (first column, end column, key) as last drawn
        self._hover: Key | None = None

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen) -> None:
        if screen is self.screen:
            self.refresh()

    # ------------------------------------------------------------ what it shows
    def keys(self) -> tuple[list[Key], Key | None]:
        """The shown keys, one per action (the first key bound to it), and the command palette's."""
        app = self.app
        active = self.screen.active_bindings
        palette_key = app.COMMAND_PALETTE_BINDING if app.ENABLE_COMMAND_PALETTE else None
        shown: dict[str, Key] = {}
        for key, (_node, binding, enabled, tooltip) in active.items():
            if binding.show and key != palette_key and binding.action not in shown:
                shown[binding.action] = Key(binding.key, app.get_key_display(binding), binding.description,
                                            enabled, tooltip)
        palette = None
        if palette_key in active:
            _node, binding, enabled, tooltip = active[palette_key]
            palette = Key(binding.key, app.get_key_display(binding), binding.description, enabled,
                          binding.tooltip or binding.description)
        return list(shown.values()), palette

    def render(self) -> Text:
        keys, palette = self.keys()
        width = self.size.width
        key_style = self.get_component_rich_style("keybar--key")
        text_style = self.get_component_rich_style("keybar--description")
        hover_style = self.get_component_rich_style("keybar--hover")
        self.first = max(0, min(self.first, len(keys) - 1))
        spans: list[tuple[int, int, Key]] = []
        line = Text(no_wrap=True, overflow="crop", end="")

        def add(key: Key, key_text: str, description: str) -> None:
            start = line.cell_len
            dim = Style(dim=True) if not key.enabled else Style()
            line.append(key_text, key_style + dim)
            line.append(description, text_style + dim)
            if key == self._hover:
                line.stylize_before(hover_style, start, len(line))
            spans.append((start, line.cell_len, key))

        tail = 0
        if palette is not None:
            # As Textual's footer draws it: docked right, a divider, the key and its name unpadded.
            tail = cell_len(palette.display) + cell_len(palette.description) + 3
            if tail > width // 2:  # a narrow terminal: the screen's own keys first
                palette, tail = None, 0
        self.more = False
        for key in keys[self.first:]:
            if line.cell_len >= width - tail:
                self.more = True
                break
            add(key, f" {key.display} ", f"{key.description} " if key.description else "")
        self.more = self.more or line.cell_len > width - tail
        line.truncate(max(0, width - tail))
        line.append(" " * (width - tail - line.cell_len))
        spans = [(a, min(b, width - tail), k) for a, b, k in spans if a < width - tail]
        if palette is not None:
            line.append("▏", self.get_component_rich_style("keybar--divider"))
            add(palette, palette.display, f" {palette.description}")
            line.append(" ")
            spans[-1] = (spans[-1][0] - 1, spans[-1][1] + 1, palette)  # the divider and the margin click too
        self._spans = spans
        return line

    # ------------------------------------------------------------ the mouse
    def key_at(self, x: int) -> Key | None:
        return next((key for start, end, key in self._spans if start <= x < end), None)

    def on_mouse_move(self, event: events.MouseMove) -> None:
        key = self.key_at(event.x)
        if key != self._hover:
            self._hover = key
            self.tooltip = (key.tooltip or None) if key else None
            self.refresh()

    def on_leave(self, event: events.Leave) -> None:
        if self._hover is not None:
            self._hover = None
            self.tooltip = None
            self.refresh()

    def on_mouse_down(self, event: events.MouseDown) -> None:
        key = self.key_at(event.x)
        if key is None:
            return
        if key.enabled:
            self.app.simulate_key(key.key)
        else:
            self.app.bell()

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        self._scroll(1, event)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self._scroll(-1, event)

    def _scroll(self, step: int, event: events.MouseEvent) -> None:
        if (step > 0 and self.more) or (step < 0 and self.first > 0):
            self.first += step
            self.refresh()
            event.stop()

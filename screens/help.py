"""Help: every binding of the screen it was opened from, of its focused widget and of the app.

Built from the BINDINGS lists themselves, so a new key can never be missing from it.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Static

INTRO = ("Marks say which donor each part of the base comes from; later marks win. "
         "Every change is autosaved to a recovery file. ctrl+p opens the command palette.")


def binding_rows(screen: Screen) -> list[tuple[str, str, str]]:
    """(where, keys, what) for every binding reachable from `screen`."""
    rows, seen = [], set()
    sources = [("app", screen.app), (type(screen).__name__.replace("Screen", "").lower() or "screen", screen)]
    if screen.focused is not None:
        sources.append(("grid" if type(screen.focused).__name__ == "GridView" else "widget", screen.focused))
    for where, node in sources:
        for b in node.BINDINGS:
            if not isinstance(b, Binding):
                continue
            if b.id and b.id.startswith("mark.donor") and b.id != "mark.donor1":
                continue  # 1-9 are one row
            key = (b.key, b.action)
            if key in seen:
                continue
            seen.add(key)
            keys = b.key_display if b.key_display else ", ".join(b.key.split(","))
            rows.append((where, keys, b.tooltip or b.description))
    return rows


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close")]

    def __init__(self, source: Screen):
        super().__init__()
        self.rows = binding_rows(source)

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static("[b]moe-surgeon keys[/b]  (escape closes)")
            yield Static(INTRO, classes="hint")
            table = DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("where", "keys", "what")
            for row in self.rows:
                table.add_row(*row)
            yield table

    def action_close(self) -> None:
        self.dismiss(None)

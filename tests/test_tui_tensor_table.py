"""The layer screen's tensor table (screens/widgets/tensor_table.py), driven with Pilot in a bare app:
what it draws, the cursor, scrolling under a fixed header, and cells that change."""

from contextlib import asynccontextmanager

import pytest
from rich.text import Text
from test_tui_helpers import sync
from textual.app import App

from screens.widgets.tensor_table import TensorTable

COLUMNS = [("tensor", "tensor"), ("shape", "shape"), ("from", "from"), ("d:B", "ΔB")]
ROWS = [(f"t{i}", [f"layer.{i}.weight", f"{i}×8", Text(" A ", "bold"), "…"]) for i in range(50)]


class Host(App):
    def compose(self):
        yield TensorTable(id="tensors")

    def on_mount(self):
        self.query_one(TensorTable).set_rows(COLUMNS, ROWS)


@asynccontextmanager
async def focused_table(size=(60, 12)):
    """(pilot, the table of 50 rows, focused) in a bare app."""
    app = Host()
    async with app.run_test(size=size) as pilot:
        table = app.query_one(TensorTable)
        table.focus()
        await pilot.pause()
        yield pilot, table


def line(table: TensorTable, y: int) -> str:
    return "".join(seg.text for seg in table.render_line(y)).rstrip()


@sync
async def test_rows_are_drawn_under_a_header_that_stays_while_they_scroll():
    async with focused_table() as (pilot, table):
        # Each column as wide as its longest text ("layer.49.weight"), one space either side.
        assert line(table, 0) == f" {'tensor':<15}  {'shape':<5}  {'from':<4}  ΔB"
        assert line(table, 1) == f" {'layer.0.weight':<15}  {'0×8':<5}  {' A ':<4}  …"
        assert table.row_count == 50 and table.cursor == 0
        await pilot.press("end")
        await pilot.pause()
        assert table.cursor == 49 and table.scroll_offset.y > 0
        assert line(table, 0).startswith(" tensor")  # the header stays
        assert line(table, table.size.height - 1).startswith(" layer.49.weight")
        await pilot.press("home", "down", "down", "pagedown")
        assert table.cursor == 2 + table.size.height - 2
        await pilot.press("home")
        await pilot.click(TensorTable, (3, 4))  # the fourth row
        assert table.cursor == 3


@sync
async def test_a_changed_cell_is_drawn_and_widens_its_column():
    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        table = app.query_one(TensorTable)
        await pilot.pause()
        table.update_cell("t1", "d:B", Text("0.12345678", "yellow"))
        await pilot.pause()
        assert str(table.get_cell("t1", "d:B")) == "0.12345678"
        assert line(table, 2).endswith("0.12345678")
        assert line(table, 1).endswith(f"{' A ':<4}  …")  # the other rows keep their text
        assert table.virtual_size.width == sum(w + 2 for w in (15, 5, 4, 10))
        styles = [seg.style for seg in table.render_line(2) if seg.text == "0.12345678"]
        assert styles and styles[0].color.name == "yellow"
        table.update_column("from", {"t2": Text(" B ", "bold"), "t3": Text(" C ", "bold")})  # one repaint
        await pilot.pause()
        assert [str(table.get_cell(k, "from")) for k in ("t1", "t2", "t3")] == [" A ", " B ", " C "]
        assert line(table, 4).startswith(f" {'layer.3.weight':<15}  {'3×8':<5}   C  ")
        with pytest.raises(KeyError):  # a row the table does not have: nothing changes
            table.update_column("from", {"t4": "x", "t99": "y"})
        assert str(table.get_cell("t4", "from")) == " A "


@sync
async def test_new_rows_start_at_the_top():
    async with focused_table() as (pilot, table):
        await pilot.press("end")
        await pilot.pause()
        table.set_rows(COLUMNS, ROWS[:20])  # another layer
        await pilot.pause()
        assert table.cursor == 0 and table.scroll_offset.y == 0 and table.row_count == 20
        assert line(table, 1).startswith(" layer.0.weight")

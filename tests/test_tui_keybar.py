"""The key bar at the foot of every screen (screens/widgets/keybar.py), driven with Pilot: what it
shows, what a click, a hover and the mouse wheel do, and that it follows the bindings as they change."""

from contextlib import asynccontextmanager

import pytest
from test_tui_helpers import settle, sync
from textual import events
from textual.app import App
from textual.binding import Binding
from textual.widgets import Input, Static

from screens.app import SurgeonApp
from screens.widgets.keybar import KeyBar
from surgeon.core.workbench import Cell

SIZE = (100, 32)


@pytest.fixture
def olmoe2(donors_of):
    return [str(p) for p in donors_of("olmoe", 2)]


@asynccontextmanager
async def grid_bar(specs, tmp_path):
    """(app, pilot, the grid screen's key bar) once the workbench on `specs` is settled."""
    app = SurgeonApp(specs, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        yield app, pilot, app.screen.query_one(KeyBar)


def bar_text(app) -> str:
    bar = app.screen.query_one(KeyBar)
    return "".join(seg.text for seg in bar.render_line(0))


def column_of(bar: KeyBar, key: str) -> int:
    return next(start for start, _end, k in bar._spans if k.key == key)


async def wheel(pilot, bar: KeyBar, down: bool = True) -> None:
    # Pilot has no wheel of its own; its mouse helper posts the event where a wheel would.
    await pilot._post_mouse_events([events.MouseScrollDown if down else events.MouseScrollUp], bar, (1, 0))
    await pilot.pause()


@sync
async def test_the_grid_shows_its_keys_in_order_and_the_palette_at_the_right(olmoe2, tmp_path):
    async with grid_bar(olmoe2, tmp_path) as (app, _pilot, _bar):
        text = bar_text(app)
        assert len(text) == SIZE[0]
        assert text.startswith(" v Select  space Cycle  1-9 Paint with donor 1  b Brush ")
        assert text.endswith("▏^p palette ")
        assert "Hide welcome" not in text  # show=False keys stay off the bar, as in Textual's footer


@sync
async def test_a_click_presses_the_key_and_a_hover_shows_its_tooltip(olmoe2, tmp_path):
    async with grid_bar(olmoe2, tmp_path) as (app, pilot, bar):
        await pilot.hover(KeyBar, (column_of(bar, "space") + 1, 0))
        assert bar.tooltip == "Give the cell or selection the next donor"
        await pilot.click(KeyBar, (column_of(bar, "space") + 1, 0))  # space: the cell under the cursor cycles
        await settle(pilot)
        assert app.wb.donor_of(Cell(0, "attention")) == "B"
        await pilot.hover(KeyBar, (column_of(bar, "ctrl+p") + 1, 0))
        assert bar.tooltip == "Open the command palette"
        await pilot.hover("#status")
        assert bar.tooltip is None


@sync
async def test_the_wheel_shows_the_keys_that_do_not_fit(olmoe2, tmp_path):
    async with grid_bar(olmoe2, tmp_path) as (app, pilot, bar):
        assert "Probes" not in bar_text(app) and bar.more
        await wheel(pilot, bar, down=False)  # nothing before the first key
        assert bar.first == 0
        for _ in range(30):
            await wheel(pilot, bar)
        assert "p Probes " in bar_text(app) and not bar.more
        assert bar_text(app).startswith(" ") and "v Select" not in bar_text(app)
        last = bar.first
        await wheel(pilot, bar)  # past the last key: the bar stays put
        assert bar.first == last
        await pilot.click(KeyBar, (column_of(bar, "p") + 1, 0))  # a key scrolled into view clicks too
        await settle(pilot)
        assert type(app.screen).__name__ == "ProbesScreen"


class Host(App):
    """A bare app with one disabled key and one that a focused input hides."""

    BINDINGS = [Binding("f2", "ring", "Ring"), Binding("f3", "off", "Off"), Binding("f4", "plain", "Plain")]

    def __init__(self):
        super().__init__()
        self.rang = 0

    def compose(self):
        yield Static("host")
        yield Input(id="field")
        yield KeyBar()

    def check_action(self, action, parameters):
        if action == "off":
            return None  # shown, disabled
        if action == "plain":
            return not isinstance(self.focused, Input)
        return True

    def action_ring(self):
        self.rang += 1


@sync
async def test_disabled_keys_are_dim_and_do_nothing_and_the_bar_follows_focus():
    app = Host()
    async with app.run_test(size=(80, 6)) as pilot:
        await pilot.pause()
        bar = app.query_one(KeyBar)
        strip = list(bar.render_line(0))
        off = [seg for seg in strip if "Off" in seg.text]
        assert off and all(seg.style.dim for seg in off)
        assert not any(seg.style.dim for seg in strip if "Ring" in seg.text)
        await pilot.click(KeyBar, (column_of(bar, "f3") + 1, 0))
        await pilot.click(KeyBar, (column_of(bar, "f2") + 1, 0))
        await pilot.pause()
        assert app.rang == 1
        app.set_focus(None)
        await pilot.pause()
        assert "Plain" in bar_text(app)
        app.query_one("#field").focus()
        await pilot.pause()
        assert "Plain" not in bar_text(app)


@sync
async def test_a_narrow_terminal_keeps_the_screens_own_keys():
    app = Host()
    async with app.run_test(size=(20, 6)) as pilot:
        await pilot.pause()
        text = bar_text(app)
        assert len(text) == 20 and text.startswith(" f2 Ring ") and "palette" not in text

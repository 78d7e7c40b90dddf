"""The workbench driven through the real Textual app with Pilot."""

import os
import subprocess
import sys
import time

import pytest
from test_tui_helpers import (
    notifications,
    save_as,
    screen_text,
    settle,
    sync,
    write_synthetic,
)
from textual.widgets import Input
from tiny_models import make_donor

from screens.app import SurgeonApp
from screens.dialogs import ConfirmScreen, ErrorScreen
from screens.donors import DonorsScreen
from screens.export import ExportScreen
from screens.help import HelpScreen
from screens.layer import LayerScreen
from surgeon.core.plan import Assignment
from surgeon.core.recovery import load_recovery
from surgeon.core.session import load_session
from surgeon.core.workbench import Cell

SIZE = (100, 32)


@pytest.fixture
def olmoe3(donors_of):
    return [str(p) for p in donors_of("olmoe", 3)]


def make_app(tmp_path, specs=None, session=None, **kw):
    kw.setdefault("offer_recovery", False)
    return SurgeonApp(specs, session, state_dir=tmp_path / "state", **kw)


@sync
async def test_grid_marks_cells_rows_columns_and_rectangles(olmoe3, tmp_path):
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        wb = app.wb
        assert app.ready and wb.columns == ["attention", "router", "expert", "norms"]
        await pilot.press("2")  # layer 0 attention -> B
        assert wb.donor_of(Cell(0, "attention")) == "B"
        await pilot.press("l", "space")  # layer 0 router: cycles A -> B
        assert wb.donor_of(Cell(0, "router")) == "B"
        await pilot.press("j", "3")  # layer 1 router -> C, brush C
        await pilot.press("r")  # the whole row 1 -> C
        assert [wb.donor_of(c) for c in wb.row_cells(1)] == ["C"] * 4
        await pilot.press("k", "l", "b", "b")  # layer 0 experts; brush C -> A -> B
        assert app.brush_donor() == "B"
        await pilot.press("c")  # the experts column -> B
        assert wb.cell_text(Cell(0, "expert")) == "B×4" and wb.cell_text(Cell(1, "expert")) == "B×4"
        # A rectangle: layers 0-1 x attention..router, from donor A.
        await pilot.press("g", "h", "h", "v", "j", "l", "1")
        assert {wb.donor_of(Cell(l, k)) for l in (0, 1) for k in ("attention", "router")} == {"A"}
        await pilot.press("escape", "G")  # the globals row
        assert app.surgery.grid.current_item().layer is None
        await pilot.press("h", "2")
        await pilot.pause()
        text = screen_text(app)
        assert "emb B" in text and "global" in text
        assert wb.plan().assignments == [
            Assignment("embedding", "B"), Assignment("norms", "C", (1,)), Assignment("experts", "B")]
        # The status line is resolve()'s view of the plan.
        from surgeon.core.resolve import resolve

        r = resolve(wb.plan(), wb.donors)
        share_b = 100 * r.parameters_by_donor()["B"] / sum(r.parameters_by_donor().values())
        assert f"{len(r.changed())} of {len(r.sources)} tensors changed" in text
        assert f"{share_b:.1f}%" in text


@sync
async def test_full_collections_wait_until_nobody_types(olmoe3, tmp_path):
    """A full collection walks everything made since the donors were frozen (13-35 ms at DeepSeek-V3
    size): while keys come, none runs; once the app has been idle a moment, the one held back does."""
    import asyncio
    import gc

    collections = []

    def seen(phase, info):
        if phase == "start" and info["generation"] == 2:
            collections.append(time.monotonic())

    before = gc.get_threshold()
    app = make_app(tmp_path, olmoe3)
    gc.callbacks.append(seen)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            assert gc.get_threshold()[2] > before[2]
            collections.clear()
            # Enough that lives on for a full collection to be due by the collector's own rule.
            kept = [[] for _ in range((len(gc.get_objects()) + gc.get_freeze_count()) // 2)]
            typing_until, key = time.monotonic() + 1.2, "j"
            while time.monotonic() < typing_until:  # keys every 0.1 s, each making garbage cycles
                for _ in range(20_000):
                    a = []
                    a.append(a)
                await pilot.press(key)
                key = "k" if key == "j" else "j"
                await asyncio.sleep(0.1)
            assert collections == [] and kept
            await asyncio.sleep(2.5 * app.IDLE_SECONDS)  # idle (keys came every 0.1-0.2 s)
            assert collections and collections[0] > typing_until
    finally:
        gc.callbacks.remove(seen)
    assert gc.get_threshold() == before  # the app ended: the collector decides again


@sync
async def test_the_open_donors_are_kept_out_of_the_collectors_walks_while_the_app_runs(olmoe3, tmp_path):
    import gc

    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        tensors = list(app.wb.donors["A"].tensors.values())
        assert gc.get_freeze_count() > len(tensors)
        await pilot.press("2", "a")  # marks keep them frozen
        await settle(pilot)
        assert gc.get_freeze_count() > len(tensors)
    assert gc.get_freeze_count() == 0  # and once the app has ended, the collector sees them again


@sync
async def test_a_closed_screen_leaves_no_widget_caches_behind(olmoe3, tmp_path):
    import gc

    from textual._styles_cache import StylesCache

    def caches() -> int:
        gc.collect()
        return sum(isinstance(o, StylesCache) for o in gc.get_objects())

    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        counts = []
        for _ in range(4):
            app.open_screen("layer", 1)
            await settle(pilot)
            await pilot.press("escape")
            await settle(pilot)
            counts.append(caches())
        assert counts[-1] <= counts[0]  # Textual's lru_cache kept each closed screen's (its issue 6665)


@sync
async def test_the_autosave_makes_the_session_off_the_ui_thread(olmoe3, tmp_path, monkeypatch):
    # A DeepSeek-V3 pair's session (a stat per shard for its known hashes, then the JSON) was 4.5 ms
    # of every mark's handler.
    import threading

    import surgeon.core.session as sessions

    on_ui_thread = []
    real = sessions.make_session

    def make_session(*args, **kwargs):
        on_ui_thread.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions, "make_session", make_session)
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        on_ui_thread.clear()
        await pilot.press("2")
        await settle(pilot)
        assert on_ui_thread == [False]
        recovered = load_recovery(app.recovery.path)
    assert recovered.session.plan.assignments == app.wb.plan().assignments != []


@sync
async def test_undo_redo_and_reset_keys(olmoe3, tmp_path):
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        wb = app.wb
        await pilot.press("2", "j", "3", "a")
        assert wb.marks == len(wb.state)  # everything from C
        await pilot.press("u")
        assert wb.marks == 2 and wb.donor_of(Cell(1, "attention")) == "C"
        await pilot.press("u", "u")
        assert wb.marks == 0
        await pilot.press("U", "ctrl+r")
        assert wb.marks == 2
        await pilot.press("X")
        assert wb.marks == 0
        await pilot.press("u")
        assert wb.marks == 2
        await pilot.press("u", "u", "u")
        assert "nothing to undo" in notifications(app)


@pytest.mark.slow
@sync
async def test_per_expert_marks_and_distances_in_layer_detail(olmoe3, tmp_path):
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("j", "l", "l", "enter")  # layer 1, experts column
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, LayerScreen) and screen.layer_no == 1
        assert screen.grid.current_item()[0].expert == 0
        await pilot.press("j", "v", "j", "j", "2")  # experts 1-3 -> B
        await pilot.press("escape", "G", "3")  # drop the selection; expert 3 -> C
        wb = app.wb
        assert [wb.state[p] for p in wb.index.experts_of[1]] == ["A", "B", "B", "C"]
        assert wb.plan().assignments == [
            Assignment("expert", "B", (1,), (1, 2)), Assignment("expert", "C", (1,), (3,))]
        await settle(pilot)
        # Distances of B and C from A, computed by the worker, are in the tensor table.
        table = screen.query_one("#tensors")
        name = "model.layers.1.mlp.experts.2.up_proj.weight"
        value = float(str(table.get_cell(name, "d:B")))
        assert value == pytest.approx(app.distance_cache().tensor(wb.donors["A"], wb.donors["B"], name), abs=1e-4)
        assert 0 < value < 10
        assert str(table.get_cell(name, "from")).strip() == "B"
        await pilot.press("escape")
        assert not isinstance(app.screen, LayerScreen)
        assert "B×2 A×1 C×1" in screen_text(app)


@pytest.mark.slow
@sync
async def test_save_then_open_round_trip(olmoe3, tmp_path):
    session = tmp_path / "s" / "work.json"
    session.parent.mkdir()
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "j", "l", "l", "enter", "j", "3", "escape")
        await save_as(pilot, session)
        saved_plan = app.wb.plan()
        assert session.is_file() and not app.dirty
        await pilot.press("3")  # a later change is saved without asking again
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert load_session(session).plan.assignments == app.wb.plan().assignments
        assert app.wb.plan().assignments != saved_plan.assignments
    reopened = make_app(tmp_path, session=str(session))
    async with reopened.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert reopened.wb.plan() == load_session(session).plan
        assert reopened.wb.state == app.wb.state
        assert reopened.session_path == str(session)
    # ctrl+o from a workbench opened on donors
    other = make_app(tmp_path, olmoe3)
    async with other.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        other.screen.query_one(Input).value = str(session)
        await pilot.press("enter")
        await settle(pilot)
        assert other.wb.state == app.wb.state


@pytest.mark.slow
@sync
async def test_recovery_after_a_simulated_crash(olmoe3, tmp_path):
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "j", "j", "3")
        await settle(pilot)
        state = dict(app.wb.state)
        own = app.recovery.path
        assert own.is_file()
    # The process "died": its recovery file stays, under a pid that no longer runs.
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    os.rename(own, own.with_name(f"recovery-{dead}.json"))
    again = make_app(tmp_path, olmoe3, offer_recovery=True)
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(again.screen, ConfirmScreen)
        assert "did not exit cleanly" in screen_text(again)
        await pilot.press("y")
        await settle(pilot)
        assert again.wb.state == state and again.dirty
        assert not own.with_name(f"recovery-{dead}.json").exists()
        await pilot.press("ctrl+q")  # unsaved marks: asks first
        await pilot.pause()
        assert isinstance(again.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
    assert not again.recovery.path.exists()  # a clean quit leaves no recovery file


def read_shards(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.slow
@sync
async def test_export_from_tui_equals_replay_export(olmoe3, tmp_path, run_cli):
    session = tmp_path / "s.json"
    out = tmp_path / "tui-out"
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "j", "l", "l", "3", "enter", "j", "2", "escape", "G", "3")
        await save_as(pilot, session)
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, ExportScreen)
        app.screen.query_one("#export-out", Input).value = str(out)
        app.screen.query_one("#export-shard", Input).value = "40KB"
        await pilot.click("#export-start")
        await settle(pilot)
        assert not isinstance(app.screen, ExportScreen)
        assert any(str(out) in n for n in notifications(app))
    r = run_cli("replay", session, "--export", tmp_path / "cli-out", "--max-shard-size", "40KB")
    assert r.returncode == 0, r.stderr
    tui, ref = read_shards(out), read_shards(tmp_path / "cli-out")
    assert len(tui) > 1 and tui == ref
    assert (out / "model.safetensors.index.json").read_text() == (tmp_path / "cli-out" / "model.safetensors.index.json").read_text()


@pytest.mark.slow
@sync
async def test_export_cancel_leaves_nothing(tmp_path):
    a = write_synthetic(tmp_path / "a", 0, layers=16, experts=64, hidden=64, inter=32)
    b = write_synthetic(tmp_path / "b", 1, layers=16, experts=64, hidden=64, inter=32)
    out = tmp_path / "exports" / "hybrid"
    out.parent.mkdir()
    app = make_app(tmp_path, [str(a), str(b)])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "a", "e")
        await pilot.pause()
        app.screen.query_one("#export-out", Input).value = str(out)
        app.screen.query_one("#export-shard", Input).value = "1MB"
        dialog = app.screen
        dialog.start()  # what the Export button does ...
        dialog.action_cancel()  # ... and escape at once, while the worker resolves the plan
        await settle(pilot)
        assert "export cancelled; nothing was written" in notifications(app)
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
@sync
async def test_bad_path_and_incompatible_donor_in_donors_screen(olmoe3, tmp_path):
    odd = make_donor(tmp_path / "odd", "olmoe", seed=7, intermediate_size=24)
    app = make_app(tmp_path, olmoe3[:2])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, DonorsScreen)
        field = app.screen.query_one("#donor-add", Input)
        field.value = str(tmp_path / "nowhere")
        field.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert f"{tmp_path / 'nowhere'}: no such directory" in screen_text(app)
        field.value = str(odd)
        field.focus()
        await pilot.press("enter")
        await settle(pilot)
        wb = app.wb
        assert list(wb.donors) == ["A", "B", "C"] and wb.problem("C")
        text = screen_text(app)
        assert "incompatible" in text
        app.screen.query_one("#donor-table").move_cursor(row=2)
        await pilot.pause()
        assert "cannot be marked" in screen_text(app) and "shape [" in screen_text(app)
        await pilot.press("escape", "l", "l", "3")  # layer 0 experts from C: refused
        await pilot.pause()
        assert wb.marks == 0
        assert any("mlp.experts" in n and "shape" in n for n in notifications(app))
        await pilot.press("h", "h", "3")  # attention shapes agree: allowed
        assert wb.donor_of(Cell(0, "attention")) == "C"
        # Remove B: a base donor cannot be removed, another one can.
        await pilot.press("d")
        await pilot.pause()
        app.screen.query_one("#donor-table").move_cursor(row=1)
        await pilot.press("delete")
        await pilot.pause()
        assert list(wb.donors) == ["A", "C"]


@sync
async def test_corrupt_session_opens_an_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "donors": [], "base": "A", "plan": []}')
    app = make_app(tmp_path, session=str(bad))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)
        assert "field donors" in screen_text(app) and "Traceback" not in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        assert "No session open" in screen_text(app)


@sync
async def test_help_lists_every_binding_and_the_palette_has_every_action(olmoe3, tmp_path):
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        surgery = app.screen
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        rows = app.screen.rows
        keys = {r[1] for r in rows}
        for b in list(surgery.BINDINGS) + list(app.BINDINGS) + list(surgery.grid.BINDINGS):
            if b.key_display:
                assert b.key_display in keys, b
            elif not b.key.startswith(tuple("23456789")):
                assert ", ".join(b.key.split(",")) in keys, b
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(surgery)}
        assert {"Cycle", "Row", "Column", "All", "Undo", "Redo", "Reset", "Layer", "Donors", "Export",
                "Save", "Open", "Help", "Quit", "Theme"} <= titles


@sync
async def test_no_arguments_opens_the_demo_with_a_welcome(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert list(app.wb.donors) == ["A", "B", "C"] and "Welcome" in screen_text(app)


@sync
async def test_distance_map_shows_every_layer_and_component(olmoe3, tmp_path):
    from screens.distance_map import DistanceMapScreen
    from surgeon.features.distance import component_tensors

    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, DistanceMapScreen) and screen.donor == "B"
        table = screen.query_one("#distance-map")
        wb = app.wb
        base, donor = wb.donors["A"], wb.donors["B"]
        groups = component_tensors(base)
        for (layer, kind), names in groups.items():
            row = "global" if layer is None else str(layer)
            want = app.distance_cache().group(base, donor, names)
            assert float(str(table.get_cell(row, kind))) == pytest.approx(want, abs=1e-4)
        await pilot.press("n")  # next donor: C
        await settle(pilot)
        assert screen.donor == "C"
        names = groups[(1, "attention")]
        want = app.distance_cache().group(base, wb.donors["C"], names)
        assert float(str(table.get_cell("1", "attention"))) == pytest.approx(want, abs=1e-4)
        await pilot.press("j", "enter")  # open layer 1 from the map
        await settle(pilot)
        assert isinstance(app.screen, LayerScreen) and app.screen.layer_no == 1


def test_every_screen_of_the_table_is_a_screen_whose_styles_are_beside_it():
    """The one table of screens (screens/screen_table.py) names importable Screen classes, and the
    styles a screen names (CSS_PATH) lie beside its module."""
    from pathlib import Path

    from textual.screen import Screen

    from screens.screen_table import SCREENS, screen_class

    for name in SCREENS:
        cls = screen_class(name)
        assert issubclass(cls, Screen), name
        if cls.CSS_PATH:
            assert (Path(sys.modules[cls.__module__].__file__).parent / cls.CSS_PATH).is_file(), name

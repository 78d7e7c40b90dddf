"""The Sweep screen driven through the real app with Pilot, checked against the sweep engine.

Tiny real OLMoE donors with a character tokenizer (conftest's donors_of), a tiny multiple-choice
file written here, two groups (four configurations). The reference is run_sweep + analyze run in
the test on its own donors, with a donor score cache of its own.
"""

import json
import random

from test_tui_helpers import settle, sync
from textual.widgets import DataTable, Input

from screens.app import SurgeonApp
from screens.sweep import SweepScreen, heatmap
from surgeon.core.donor import open_donor
from surgeon.core.session import load_session
from surgeon.core.workbench import Workbench
from surgeon.features.sweep.report import analyze, cell_text
from surgeon.features.sweep.runner import (
    SweepSpec,
    find_sweep,
    parse_group,
    plan_for,
    run_sweep,
)
from surgeon.probes import parse_probe

SIZE = (110, 36)
GROUPS = ["router", "attention@0"]


def write_mc(path, n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 3))) for _ in range(3)]
        rows.append({"id": f"q{i}", "question": f"{rng.randint(1, 99)}+{rng.randint(1, 99)}",
                     "choices": {"text": choices, "label": ["A", "B", "C"]}, "answerKey": "ABC"[rng.randint(0, 2)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(paths, probe, monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "reference-cache"))
    donors = {"A": open_donor(paths[0]), "B": open_donor(paths[1])}
    spec = SweepSpec("A", "B", [parse_group(g) for g in GROUPS], [parse_probe(probe)], device="cpu")
    record = run_sweep(spec, donors)
    monkeypatch.undo()
    return spec, donors, record


@sync
async def test_sweep_screen_runs_stores_and_opens_a_configuration(donors_of, tmp_path, monkeypatch):
    paths = [str(p) for p in donors_of("olmoe", 2)]
    mc = write_mc(tmp_path / "mc.jsonl", 10)
    probe = f"mc:{mc},limit=8"
    app = SurgeonApp(paths, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, SweepScreen)
        assert [s.strip() for s in screen.query_one("#sweep-groups", Input).value.split(";")] == \
               ["router", "attention", "experts"]
        assert screen.query_one("#sweep-donor", Input).value == "B"  # the first donor besides the base
        screen.query_one("#sweep-groups", Input).value = "; ".join(GROUPS)
        screen.query_one("#sweep-probes", Input).value = probe
        screen.query_one("#sweep-table").focus()
        await pilot.press("r")
        await settle(pilot)
        assert not screen.running

        spec, donors, want = reference(paths, probe, monkeypatch, tmp_path)
        # The session holds the record, under the same id the CLI would resume it by.
        stored = app.records.extensions["sweeps"]
        assert [r["id"] for r in stored] == [spec.key(donors)]
        got = stored[0]
        assert sorted(c["mask"] for c in got["configurations"]) == [0, 1, 2, 3]
        for c in want["configurations"]:
            mine = next(x for x in got["configurations"] if x["mask"] == c["mask"])
            for label, rec in c["results"].items():
                assert mine["results"][label]["outcomes"] == rec["outcomes"]
                assert mine["results"][label]["score"] == rec["score"]
        # The table shows exactly the report's cells, row by row.
        a = analyze(want)
        table = screen.query_one("#sweep-table", DataTable)
        assert table.row_count == len(a.rows) and {r.mask for r in a.rows if r.kind == "configuration"} >= {1, 2, 3}
        label = parse_probe(probe).label
        for r in a.rows:
            key = f"donor:{r.name}" if r.kind == "donor" else f"mask:{r.mask}"
            assert str(table.get_cell(key, "configuration")) == r.label
            assert str(table.get_cell(key, label)) == cell_text(r.cells.get(label))
        # The heatmap is the deltas against the base.
        assert heatmap(a).plain == screen.query_one("#sweep-heatmap").render().plain

        # ctrl+s writes the sweep into the session file, where `moe-surgeon sweep` finds it.
        app.session_path = str(tmp_path / "s.json")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert find_sweep(load_session(tmp_path / "s.json"), spec.key(donors))["configurations"] == \
               json.loads(json.dumps(got["configurations"]))

        # o on a configuration makes it the current plan (undoable), and the grid shows it.
        row = next(i for i, r in enumerate(a.rows) if r.mask == 3)
        table.move_cursor(row=row)
        await pilot.press("o")
        await settle(pilot)
        expected = Workbench(dict(app.wb.donors), "A", plan_for(got, 3)).plan()
        assert app.wb.plan() == expected and app.wb.marks > 0
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, SweepScreen)
        await pilot.press("u")
        assert app.wb.marks == 0


@sync
async def test_bad_group_is_one_error_dialog_and_nothing_runs(donors_of, tmp_path):
    from screens.dialogs import ErrorScreen

    paths = [str(p) for p in donors_of("olmoe", 2)]
    app = SurgeonApp(paths, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await settle(pilot)
        screen = app.screen
        screen.query_one("#sweep-groups", Input).value = "attnetion"
        screen.query_one("#sweep-table").focus()
        await pilot.press("r")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen) and not screen.running
        assert "sweeps" not in app.records.extensions


@sync
async def test_escape_stops_a_sweep_at_the_next_batch_and_r_resumes_it(donors_of, tmp_path):
    from screens.probes import ProbesScreen
    from surgeon.features.sweep.runner import is_complete

    paths = [str(p) for p in donors_of("olmoe", 2)]
    # Three groups (8 configurations) and 400 items: under load the escape must still land long
    # before the walk ends, or the test measures the machine instead of the screen.
    mc = write_mc(tmp_path / "mc.jsonl", 400, seed=3)
    app = SurgeonApp(paths, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await settle(pilot)
        screen = app.screen
        screen.query_one("#sweep-groups", Input).value = "; ".join([*GROUPS, "norms@1"])
        screen.query_one("#sweep-probes", Input).value = f"mc:{mc},seed=7"
        screen.query_one("#sweep-table").focus()
        await pilot.press("r")
        seen = set()
        for _ in range(6000):  # until the first configuration past the base is measured and stored
            await pilot.pause(0.01)
            seen.add(str(screen.query_one("#sweep-stats").render()))
            stored = app.records.extensions.get("sweeps")
            if not screen.running or (stored and len(stored[0]["configurations"]) >= 2):
                break
        assert screen.running and any("items/s" in s and "ETA" in s for s in seen)
        await pilot.press("escape")  # cancels; a second escape would go back
        await settle(pilot)
        assert not screen.running and app.screen is screen
        (record,) = app.records.extensions["sweeps"]
        stopped_at = len(record["configurations"])
        assert 2 <= stopped_at < 8 and not is_complete(record)
        assert "stopped: r resumes" in str(screen.query_one("#sweep-stats").render())
        probes = app.get_screen("probes")
        assert isinstance(probes, ProbesScreen) and app.hybrids.hybrid.resolution.plan == app.wb.plan()
        await pilot.press("r")  # resumes: only what is missing is measured
        await settle(pilot)
        (record,) = app.records.extensions["sweeps"]
        assert is_complete(record) and record["runs"][-1]["configurations_measured"] == 8 - stopped_at

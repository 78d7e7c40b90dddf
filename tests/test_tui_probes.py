"""The Probes screen driven through the real app with Pilot, checked against the probe engine.

Tiny real OLMoE donors with a character tokenizer (conftest's donors_of); probe files are written
here. References are computed independently in the test: a freshly materialised hybrid, run_probes
and summarize, with a donor score cache of their own.
"""

import json
import random

import pytest
from test_tui_helpers import notifications, save_as, screen_text, settle, sync
from textual.widgets import Input, SelectionList

from screens.app import SurgeonApp
from screens.dialogs import ErrorScreen
from screens.help import HelpScreen
from screens.probes import ProbesScreen
from surgeon.core.session import load_session
from surgeon.core.workbench import Cell
from surgeon.features.probe import split_runs

SIZE = (100, 32)
LETTERS = "abcdefghij"


def write_mc(path, n, seed=0):
    """An ARC-format file of `n` items in the char tokenizer's alphabet."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3))) for _ in range(3)]
        rows.append({"id": f"q{i}", "question": f"{rng.randint(1, 99)}+{rng.randint(1, 99)}",
                     "choices": {"text": choices, "label": ["A", "B", "C"]}, "answerKey": "ABC"[rng.randint(0, 2)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def olmoe3(donors_of):
    return [str(p) for p in donors_of("olmoe", 3)]


def make_app(tmp_path, specs):
    return SurgeonApp(specs, None, state_dir=tmp_path / "state", offer_recovery=False)


async def open_probes(pilot, *specs) -> ProbesScreen:
    """Open the Probes screen and check exactly `specs` (typed into the add field)."""
    await pilot.press("p")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ProbesScreen)
    screen.query_one(SelectionList).deselect_all()
    for spec in specs:
        field = screen.query_one("#probe-add", Input)
        field.value = spec
        field.focus()
        await pilot.press("enter")
        await pilot.pause()
    return screen


async def run(pilot, screen):
    await pilot.press("r")
    await settle(pilot)
    assert not screen.running


def reference(app, monkeypatch, tmp_path, specs, compare_donors=True):
    """run_probes + summarize on a hybrid materialised here, with its own donor score cache."""
    from surgeon.live.devices import default_device
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes import parse_probe
    from surgeon.probes.run import run_probes, summarize

    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "reference-cache"))
    plan, device = app.wb.plan(), default_device()  # the screen's device
    hybrid = Hybrid.materialize(plan, dict(app.wb.donors), device=device)
    records = run_probes(hybrid, plan, [parse_probe(s) for s in specs], device=device,
                         compare_donors=compare_donors)
    monkeypatch.undo()
    return records, summarize(records)


def cell(screen, row, column) -> str:
    return str(screen.query_one("#probe-results").get_cell(f"{row['model']}|{row['probe']}", column))


def percent(text: str) -> float:
    return float(text.rstrip("%")) / 100


def mcnemar_stars(mine: list[float], theirs: list[float]) -> str:
    """Tiwari (2026)'s marks for an exact two-sided McNemar test, computed here from the outcomes."""
    from math import comb

    b = sum(x > y for x, y in zip(mine, theirs))
    c = sum(x < y for x, y in zip(mine, theirs))
    p = min(1.0, 2 * sum(comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)) if b + c else 1.0
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def assert_table_shows(screen, records: list[dict]) -> None:
    """Every cell read back as a number and compared, to display precision, with what the test
    recomputes from the per-item outcomes the engine recorded (accuracy, deltas, McNemar marks),
    never with the screen's own formatting."""
    plain = {(r["model"], r["label"]): r for r in records if "vs" not in r}
    donors = sorted(m.split(":")[1] for m, _ in plain if m.startswith("donor:"))
    assert screen.query_one("#probe-results").row_count == len(plain)
    for (model, label), r in plain.items():
        row, outcomes = {"model": model, "probe": label}, r["outcomes"]
        accuracy = sum(outcomes) / len(outcomes)
        assert int(cell(screen, row, "n")) == len(outcomes)
        assert percent(cell(screen, row, "score")) == pytest.approx(accuracy, abs=0.0005)
        lo, hi = (float(x) / 100 for x in cell(screen, row, "ci").strip("[]").split(","))
        assert lo <= accuracy <= hi and (lo, hi) == pytest.approx(r["ci"], abs=0.0005)
        for donor in donors:
            got = cell(screen, row, f"d:{donor}")
            if model != "hybrid":
                assert got == ""
                continue
            theirs = plain[f"donor:{donor}", label]["outcomes"]
            number = got.rstrip("*")
            assert float(number) / 100 == pytest.approx(accuracy - sum(theirs) / len(theirs), abs=0.0005)
            assert got[len(number):] == mcnemar_stars(outcomes, theirs)


@sync
async def test_results_table_shows_the_engines_numbers_and_ctrl_s_saves_them(olmoe3, tmp_path, monkeypatch):
    mc = write_mc(tmp_path / "mc.jsonl", 12)
    specs = [f"mc:{mc}", f"mc:{mc},limit=8,seed=3"]
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")  # layer 0 attention from B
        screen = await open_probes(pilot, *specs)
        assert [s.label for s in screen.checked_specs()] == specs
        await run(pilot, screen)
        records, rows = reference(app, monkeypatch, tmp_path, specs)
        mine = app.records.results
        assert [(r["model"], r["label"]) for r in mine] == [(r["model"], r["label"]) for r in records]
        for got, want in zip(mine, records):  # per item, and every statistic, exactly
            assert (got["ids"], got["outcomes"], got["score"], got["ci"]) == \
                   (want["ids"], want["outcomes"], want["score"], want["ci"])
        assert {r["model"] for r in rows} == {"hybrid", "donor:A", "donor:B", "donor:C"}
        assert_table_shows(screen, records)
        # The chart has a bar per model and probe; the history one run.
        chart = screen.query_one("#probe-chart")
        assert [len(g.bars) for g in chart.groups] == [4, 4]
        assert chart.groups[0].bars[0].tag == "H" and chart.groups[0].bars[0].score == rows[0]["score"]
        assert screen.query_one("#probe-history").row_count == 1
        assert app.dirty  # unsaved results, autosaved to the recovery file
        # ctrl+s: the session holds the specs and the records, as `moe-surgeon probe SESSION` writes them.
        session_path = tmp_path / "s.json"
        await save_as(pilot, session_path)
        saved = load_session(session_path)
        assert saved.probes == [{"kind": "mc", "data": str(mc), "seed": 0, "cot": False,
                                 "extract": "exact", "fewshot_order": "lmeval"},
                                {"kind": "mc", "data": str(mc), "limit": 8, "seed": 3, "cot": False,
                                 "extract": "exact", "fewshot_order": "lmeval"}]
        assert saved.results == json.loads(json.dumps(mine))
        assert {"device", "dtype", "seed", "versions", "plan"} <= set(saved.results[0])


@sync
async def test_a_rerun_after_a_mark_swaps_only_the_changed_tensors_into_the_same_hybrid(olmoe3, tmp_path, monkeypatch):
    from surgeon.core.resolve import resolve

    mc = write_mc(tmp_path / "mc.jsonl", 10, seed=1)
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_probes(pilot, f"mc:{mc}")
        await run(pilot, screen)
        hybrid, first_plan = app.hybrids.hybrid, app.wb.plan()
        assert hybrid is not None and "materialised on " in screen_text(app)
        await pilot.press("escape", "j", "3")  # back to the grid; layer 1 attention from C
        assert app.wb.donor_of(Cell(1, "attention")) == "C"
        await pilot.press("p")
        await settle(pilot)
        assert app.screen is screen and "shown run: other marks" in screen_text(app)
        await run(pilot, screen)
        plan = app.wb.plan()
        before, after = resolve(first_plan, app.wb.donors).sources, resolve(plan, app.wb.donors).sources
        changed = [n for n, s in after.items() if (s.donor, s.tensor) != (before[n].donor, before[n].tensor)]
        assert app.hybrids.hybrid is hybrid  # the same live model ...
        assert 0 < screen.last_swap.tensors == len(changed) < len(after)  # ... with only the changes copied
        assert f"swapped {len(changed)} tensor(s)" in screen_text(app)
        # The hot-swapped hybrid measures what a freshly materialised one of the new plan measures.
        records, _ = reference(app, monkeypatch, tmp_path, [f"mc:{mc}"], compare_donors=False)
        second = [r for r in app.records.results if r["model"] == "hybrid"][-1]
        assert second["outcomes"] == records[0]["outcomes"] and second["plan"] == records[0]["plan"]
        # Two runs in the history; the newest is shown, an older one can be picked.
        history = screen.query_one("#probe-history")
        assert history.row_count == 2 and screen.shown_run == 1
        assert "shown run: other marks" not in screen_text(app)
        history.move_cursor(row=0)
        await pilot.pause()
        first = [r for r in app.records.results if r["model"] == "hybrid"][0]
        assert screen.shown_run == 0 and screen.rows[0]["score"] == first["score"]


@sync
async def test_bad_probe_input_is_an_error_and_leaves_the_results_alone(olmoe3, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}\n')
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        recorded = [{"probe": {"kind": "mc", "data": "x"}, "label": "mc:x", "model": "hybrid", "metric": "accuracy",
                     "n": 2, "score": 0.5, "ci": [0.0, 1.0], "ids": ["1", "2"], "outcomes": [1.0, 0.0], "plan": []}]
        app.records.results = json.loads(json.dumps(recorded))
        screen = await open_probes(pilot)
        assert screen.query_one("#probe-history").row_count == 1  # runs already in the session are listed
        # A malformed spec is refused in the field, and nothing is added.
        n_specs = len(screen.specs)
        field = screen.query_one("#probe-add", Input)
        field.value = "bogus:arith"
        field.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert "unknown probe 'bogus'" in screen_text(app) and len(screen.specs) == n_specs
        # A probe file with a missing field: one clear error in a dialog, no model loaded.
        field.value = f"mc:{bad},fmt=arc"
        await pilot.press("enter")
        await pilot.pause()
        await run(pilot, screen)
        assert isinstance(app.screen, ErrorScreen)
        assert app.screen.message == f"{bad}:1: field 'answerKey' is missing"
        await pilot.pause()
        text = screen_text(app)
        assert "'answerKey' is missing" in text and "Traceback" not in text
        await pilot.press("escape")
        assert app.records.results == recorded and not app.records.probes
        assert app.hybrids.hybrid is None and "nothing was recorded" in screen_text(app)
        # The help lists the screen's own keys.
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert {("probes", "r"), ("probes", "+"), ("probes", "escape")} <= {r[:2] for r in app.screen.rows}


@sync
async def test_cancel_stops_a_run_and_records_nothing(olmoe3, tmp_path, monkeypatch):
    big = write_mc(tmp_path / "big.jsonl", 3000, seed=2)
    small = write_mc(tmp_path / "small.jsonl", 6, seed=4)
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("l", "2")  # layer 0 router from B
        screen = await open_probes(pilot, f"mc:{big},seed=11")
        await pilot.press("r")
        seen = ""
        for _ in range(3000):  # until the first batch of items is scored
            await pilot.pause(0.01)
            if screen.items_done > 0 or not screen.running:
                seen = str(screen.query_one("#probe-stats").render())
                break
        assert screen.running and "items/s" in seen and "ETA" in seen and "of 12,000 items" in seen
        await pilot.press("escape")  # cancels; a second escape would go back
        await settle(pilot)
        assert not screen.running and app.screen is screen
        assert "probe run cancelled; the session's results are unchanged" in notifications(app)
        assert not app.records.results and "cancelled" in screen_text(app)
        # The kept hybrid is still usable: a new run measures the current plan correctly.
        screen.query_one(SelectionList).deselect_all()
        field = screen.query_one("#probe-add", Input)
        field.value = f"mc:{small}"
        field.focus()
        await pilot.press("enter")
        await run(pilot, screen)
        records, _ = reference(app, monkeypatch, tmp_path, [f"mc:{small}"], compare_donors=False)
        assert app.records.results[0]["outcomes"] == records[0]["outcomes"]


def test_split_runs_groups_records_as_the_cli_and_the_screen_write_them():
    def rec(model, label, plan=None, vs=None):
        r = {"model": model, "label": label}
        if plan is not None:
            r["plan"] = plan
        if vs:
            r["vs"] = vs
        return r

    p1, p2 = [], [{"spec": "attention", "donor": "B"}]
    records = [rec("hybrid", "mc:a", p1), rec("hybrid", "em:b", p1), rec("donor:A", "mc:a"), rec("donor:A", "em:b"),
               rec("hybrid", "mc:a", p2), rec("donor:A", "mc:a"),
               rec("hybrid", "mc:a", p2),  # a --no-donors run right after
               rec("hybrid", "kl:t", vs="donor:A"), rec("hybrid", "kl:t", vs="donor:B"),  # kl records carry no plan
               rec("hybrid", "mc:a", p1)]  # another plan, hybrid only
    assert [len(r) for r in split_runs(records)] == [4, 2, 3, 1]


def test_the_offered_probes_are_the_recorded_ones_first_then_every_built_in_set_once():
    from surgeon.features.probe import default_specs
    from surgeon.probes import parse_probe
    from surgeon.probes.run import builtin_probes

    builtins = builtin_probes()
    mine = parse_probe("em:arith,limit=3")
    recorded = [mine.to_json(), builtins[0].to_json(), mine.to_json(), {"kind": "nope"}, "junk"]
    specs, n = default_specs(recorded)
    assert n == 2 and specs[:2] == [mine, builtins[0]]  # repeats and unreadable records dropped
    assert specs[2:] == builtins[1:]
    assert default_specs([]) == (builtins, 0)


@sync
async def test_the_cli_and_the_workbench_record_the_same_probe_run(olmoe3, tmp_path, monkeypatch, cli):
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan, parse_spec
    from surgeon.core.session import make_session, save_session

    donors = {n: open_donor(p) for n, p in zip("ABC", olmoe3)}
    plan = Plan("A", [parse_spec("attention@0", "B"), parse_spec("router@1", "C")])
    spec = f"mc:{write_mc(tmp_path / 'mc.jsonl', 10, seed=5)},limit=8"
    for name in ("cli.json", "app.json"):
        save_session(make_session(plan, donors, tmp_path / name), tmp_path / name)
    # Each side measures its donors itself (a score cache of its own), as on two machines.
    r = cli("probe", tmp_path / "cli.json", "--probe", spec, "--json", env={"MOE_SURGEON_CACHE": str(tmp_path / "c1")})
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "c2"))
    app = SurgeonApp(None, str(tmp_path / "app.json"), state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await open_probes(pilot, spec)
        await run(pilot, screen)
        assert_table_shows(screen, app.records.results)
        for row in json.loads(r.stdout)["results"]:  # the CLI's own summary, to display precision
            assert percent(cell(screen, row, "score")) == pytest.approx(row["score"], abs=0.0005)
        await pilot.press("ctrl+s")
        await settle(pilot)

    def comparable(results):
        return [{k: v for k, v in rec.items() if k not in ("time", "run", "forward")} for rec in results]

    by_cli, by_app = load_session(tmp_path / "cli.json"), load_session(tmp_path / "app.json")
    assert by_app.probes == by_cli.probes and len(by_cli.probes) == 1
    assert [rec["model"] for rec in by_cli.results] == ["hybrid", "donor:A", "donor:B", "donor:C"]
    # The command line ran our own forward, the workbench transformers' classes (its live hybrid is
    # hooked by routing and gates): every score and every item's outcome agrees all the same.
    assert by_cli.results[0]["forward"] == "native" and by_app.results[0]["forward"] == "transformers"
    assert comparable(by_app.results) == comparable(by_cli.results)


@sync
async def test_every_probe_starts_checked_and_the_check_reads_without_colour(olmoe3, tmp_path):
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("p")
        await settle(pilot)
        screen = app.screen
        picker = screen.query_one(SelectionList)
        n = picker.option_count
        assert n >= 4 and len(picker.selected) == n
        prompts = [str(picker.get_option_at_index(i).prompt) for i in range(n)]
        assert all(p.startswith("[x] ") for p in prompts)
        assert picker.border_title == f"{n} of {n} checked · r runs these {n}"
        picker.focus()
        picker.highlighted = 0
        await pilot.press("space")  # uncheck the first
        await pilot.pause()
        assert str(picker.get_option_at_index(0).prompt).startswith("[ ] ")
        assert picker.border_title.startswith(f"{n - 1} of {n} checked")
        assert "[ ] " in screen_text(app) and "[x] " in screen_text(app)

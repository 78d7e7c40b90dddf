"""Snapshots of every screen at 80x24 and 120x40 (pytest-textual-snapshot; --snapshot-update to accept).

Donors are written by test_tui_helpers.write_synthetic (fixed bytes, fixed config) and opened by
relative paths from the test's directory, so nothing machine-specific reaches the screen.
"""

import pytest
from test_tui_helpers import settle, write_synthetic

from screens.app import SurgeonApp

SIZES = [(80, 24), (120, 40)]


@pytest.fixture
def donors_here(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "base", 0)
    write_synthetic(tmp_path / "tuned", 1)
    write_synthetic(tmp_path / "other", 2)
    monkeypatch.chdir(tmp_path)
    return ["base", "tuned", "other"]


def app_for(tmp_path, specs):
    return SurgeonApp(specs, None, state_dir=tmp_path / "state", offer_recovery=False)


async def marked(pilot):
    await settle(pilot)
    await pilot.press("2", "j", "l", "l", "3", "j", "v", "j", "l", "2", "escape", "G")
    await settle(pilot)


def keys(*k):
    async def run(pilot):
        await marked(pilot)
        await pilot.press(*k)
        await settle(pilot)
    return run


def probe_records(plan: list[dict], seed: int) -> list[dict]:
    """One run of two probes as run_probes records it, from seeded outcomes (no time field: a
    snapshot shows no dates)."""
    import random

    from surgeon.probes.stats import bootstrap_ci

    rng = random.Random(seed)
    hybrid, donors = [], []
    for kind, data, rates in (("em", "arith", (0.55, 0.2, 0.9, 0.3)), ("mc", "arith_mc", (0.6, 0.35, 0.95, 0.4))):
        for model, rate in zip(("hybrid", "donor:A", "donor:B", "donor:C"), rates):
            outcomes = [float(rng.random() < rate) for _ in range(60)]
            score, lo, hi = bootstrap_ci(outcomes)
            record = {"probe": {"kind": kind, "data": data, "seed": 0}, "label": f"{kind}:{data}", "model": model,
                      "metric": "accuracy", "n": 60, "score": score, "ci": [lo, hi],
                      "ids": [str(i) for i in range(60)], "outcomes": outcomes, "device": "cpu", "dtype": "keep"}
            if model == "hybrid":
                record["plan"] = plan
            (hybrid if model == "hybrid" else donors).append(record)
    return hybrid + donors


async def probes(pilot):
    """Two runs in the session (the base alone, then the marks), the newest shown."""
    await marked(pilot)
    app = pilot.app
    plan = [{"spec": a.spec, "donor": a.donor} for a in app.wb.plan().assignments]
    app.records.probes = [{"kind": "em", "data": "arith"}, {"kind": "mc", "data": "arith_mc"}]
    app.records.results = probe_records([], 1) + probe_records(plan, 2)
    await pilot.press("p")
    await settle(pilot)


SCREENS = {
    "surgery": marked,
    "layer": keys("g", "l", "l", "enter", "j", "v", "j", "j", "3"),
    "donors": keys("d"),
    "export": keys("e"),
    "help": keys("question_mark"),
    "save_prompt": keys("ctrl+s"),
    "probes": probes,
    "distance_map": keys("m"),
    "sweep": keys("s"),
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_snapshot(screen, size, snap_compare, donors_here, tmp_path):
    assert snap_compare(app_for(tmp_path, donors_here), terminal_size=size, run_before=SCREENS[screen])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_error_modal_snapshot(size, snap_compare, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"schema_version": 1, "donors": [], "base": "A", "plan": []}')
    app = SurgeonApp([], "bad.json", state_dir=tmp_path / "state", offer_recovery=False)
    assert snap_compare(app, terminal_size=size, run_before=settle)

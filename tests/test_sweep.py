"""The component-transfer sweep: power set in Gray-code order, live weights equal fresh
materialisations, kill-and-resume equals an uninterrupted run, and bad input is one line."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_bad_input import assert_one_line_error

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan
from surgeon.core.session import load_session, make_session, save_session
from surgeon.errors import SurgeonError
from surgeon.features.sweep.report import (
    analyze,
    effect_chart,
    to_csv,
    to_json,
    to_markdown,
)
from surgeon.features.sweep.runner import (
    SweepSpec,
    check_groups,
    default_donor,
    default_probes,
    find_sweep,
    gray_order,
    is_complete,
    parse_group,
    plan_for,
    run_sweep,
)
from surgeon.live.hybrid import Hybrid
from surgeon.probes import parse_probe

PROBES = ["mc:arith_mc,limit=12", "mc:reverse_mc,limit=12", "em:arith,limit=6,max_new_tokens=3"]


@pytest.fixture(scope="module")
def donors(donors_of):
    a, b = donors_of("olmoe", 2)
    return {"A": open_donor(a), "B": open_donor(b)}


def make_spec(groups=("router", "attention", "experts"), probes=PROBES, **kw):
    return SweepSpec("A", "B", [parse_group(g) for g in groups], [parse_probe(p) for p in probes], **kw)


def session_file(donors, path):
    save_session(make_session(Plan("A"), donors, path), path)
    return path


def comparable(report: dict) -> dict:
    """The JSON report without timings (which differ from run to run)."""
    report = copy.deepcopy(report)
    for c in report["configurations"]:
        c.pop("swap")
    return report


# ---------------------------------------------------------------- groups and order
@pytest.mark.parametrize("k", range(1, 7))
def test_gray_order_is_the_power_set_one_bit_per_step(k):
    order = gray_order(k)
    assert sorted(order) == list(range(1 << k)) and order[0] == 0
    for a, b in zip(order, order[1:]):
        assert bin(a ^ b).count("1") == 1


def test_parse_group():
    g = parse_group("experts@0-1")
    assert (g.name, g.specs) == ("experts@0-1", ("experts@0-1",))
    g = parse_group("early = router@0 + attention@0,1 + router@0")
    assert (g.name, g.specs) == ("early", ("router@0", "attention@0-1"))
    assert parse_group("expert:3,1@1").specs == ("expert:1,3@1",)
    for bad, needle in [("attnetion", "unknown component"), ("router+", "expected"), ("=router", "expected"),
                        ("expert:x", "bad expert")]:
        with pytest.raises(SurgeonError, match=needle):
            parse_group(bad)


def test_check_groups(donors):
    groups = [parse_group(g) for g in ("experts", "expert:1@0")]
    warnings = check_groups(groups, donors, "A", "B")
    assert len(warnings) == 1 and "share 3 tensor(s)" in warnings[0]
    with pytest.raises(SurgeonError, match="at most 6"):
        check_groups([parse_group(f"expert:{e}@{l}") for e in range(4) for l in range(2)], donors, "A", "B")
    with pytest.raises(SurgeonError, match="same SPECs"):
        check_groups([parse_group("router"), parse_group("r=router")], donors, "A", "B")
    with pytest.raises(SurgeonError, match="layer 5 out of range"):
        check_groups([parse_group("router@5")], donors, "A", "B")


def test_default_probes_and_donor():
    assert [s.label for s in default_probes([])] == ["em:arith", "mc:arith_mc", "em:reverse", "mc:reverse_mc"]
    recorded = [{"kind": "kl", "data": "arith"}, {"kind": "mc", "data": "arith_mc", "limit": 5}]
    assert [s.label for s in default_probes(recorded)] == ["mc:arith_mc,limit=5"]
    assert default_donor(["A", "B"], "B") == "A"
    with pytest.raises(SurgeonError, match="choose one with --donor"):
        default_donor(["A", "B", "C"], "A")


def test_the_workbench_offers_the_recorded_sweepable_probes_else_the_built_in_sets_cut():
    from surgeon.features.sweep.runner import offered_probes

    recorded = [{"kind": "kl", "data": "arith"}, {"kind": "mc", "data": "arith_mc", "limit": 5}, "junk"]
    assert offered_probes(recorded, 50) == ["mc:arith_mc,limit=5"]
    cut = ["em:arith,limit=50", "mc:arith_mc,limit=50", "em:reverse,limit=50", "mc:reverse_mc,limit=50"]
    assert offered_probes([], 50) == cut
    assert offered_probes([{"kind": "kl", "data": "arith"}], 50) == cut  # nothing a sweep can run
    assert offered_probes([{"kind": "mc"}], 50) == cut  # a record that no longer reads


# ---------------------------------------------------------------- the walk
def test_power_set_one_group_per_step_and_live_weights_equal_fresh(donors):
    spec = make_spec(("router", "attention@1", "expert:0,2@0+norms@0", "experts@1"), PROBES[:1])
    anatomy = donors["A"].anatomy
    sizes = [len({n for n, p in anatomy.parts.items() if any(a.covers(p) for a in g.assignments("B"))})
             for g in spec.groups]
    own_plan = Plan("A", [parse_group("attention@0").assignments("B")[0]])
    hybrid = Hybrid.materialize(own_plan, donors, device="cpu")
    visits, swaps = [], {}

    def on_event(e):
        if e.kind == "swap":
            swaps[e.mask] = e.swap.tensors
        if e.kind == "configuration":
            visits.append(e.mask)
            assert e.entry["groups"] == [g.name for j, g in enumerate(spec.groups) if e.mask >> j & 1]
            fresh = Hybrid.materialize(spec.plan(e.mask), donors, device="cpu").model.state_dict()
            live = hybrid.model.state_dict()
            assert fresh.keys() == live.keys()
            for name, want in fresh.items():
                assert torch.equal(live[name], want), (e.mask, name)

    record = run_sweep(spec, donors, hybrid=hybrid, on_event=on_event)
    assert visits == gray_order(4)  # every subset once, in Gray-code order
    assert sorted(visits) == list(range(16))
    for prev, mask in zip(visits, visits[1:]):
        flipped = prev ^ mask
        assert bin(flipped).count("1") == 1
        assert swaps[mask] == sizes[flipped.bit_length() - 1]  # exactly that group's tensors moved
    assert is_complete(record)
    assert hybrid.resolution.plan == own_plan  # a caller's hybrid is handed back on its own plan
    # a stored configuration opens as a plan
    assert plan_for(record, 0b0101).assignments == spec.plan(0b0101).assignments


def test_exception_from_a_callback_then_resume_equals_uninterrupted(donors):
    spec = make_spec()
    whole = run_sweep(spec, donors)
    stored = {}

    def save(rec):
        stored["record"] = json.loads(json.dumps(rec))  # what a session file would hold

    def crash(e):
        if e.kind == "configuration" and e.done == 3:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        run_sweep(spec, donors, save=save, on_event=crash)
    assert len(stored["record"]["configurations"]) == 3 and not is_complete(stored["record"])
    measured = []
    resumed = run_sweep(spec, donors, record=stored["record"], save=save,
                        on_event=lambda e: e.kind == "configuration" and measured.append(e.mask))
    assert measured == gray_order(3)[3:]  # only what was missing
    assert resumed["runs"][-1]["configurations_measured"] == 5 and resumed["runs"][-1]["ceilings_measured"] == 0
    a, b = analyze(whole), analyze(resumed)
    assert to_markdown(a) == to_markdown(b) and to_csv(a) == to_csv(b)
    assert comparable(to_json(a)) == comparable(to_json(b))
    for c in whole["configurations"]:
        other = next(x for x in resumed["configurations"] if x["mask"] == c["mask"])
        for label, rec in c["results"].items():
            assert other["results"][label]["outcomes"] == rec["outcomes"]
    # a finished sweep measures nothing and loads no model
    again = run_sweep(spec, donors, record=resumed)
    assert len(again["runs"]) == len(resumed["runs"])
    # a probe added later is measured on every configuration, the others are kept
    more = make_spec(probes=PROBES + ["mc:arith_mc,limit=5,seed=3"])
    counted = []
    extended = run_sweep(more, donors, record=again, on_event=lambda e: e.kind == "probe" and counted.append(e.probe))
    assert set(counted) == {"mc:arith_mc,limit=5,seed=3"}
    assert is_complete(extended) and len(extended["probes"]) == 4


def test_cancel_stops_the_sweep_between_configurations_and_a_rerun_resumes_it(donors):
    from surgeon.jobs import Cancelled, CancelToken

    spec = make_spec(probes=PROBES[:1])
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu")
    token, steps, stored = CancelToken(), [], {}

    def on_event(e):
        if e.kind == "configuration" and e.done == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        run_sweep(spec, donors, hybrid=hybrid, save=lambda r: stored.update(record=json.loads(json.dumps(r))),
                  on_event=on_event, progress=steps.append, cancel=token)
    assert len(stored["record"]["configurations"]) == 3  # what was saved stays; nothing after the cancel
    assert hybrid.resolution.plan == Plan("A")  # the caller's hybrid is back on its own plan
    assert {s.unit for s in steps} == {"items"} and 0 < steps[-1].done < steps[-1].total
    assert steps[-1].total - (len(spec.order()) - 1) * 12 in (0, 12, 24)  # configurations + uncached ceilings
    resumed = run_sweep(spec, donors, record=stored["record"], hybrid=hybrid)
    assert is_complete(resumed) and resumed["runs"][-1]["configurations_measured"] == 5


def test_killed_cli_sweep_resumes_to_the_same_table(cli, donors, tmp_path):
    args = ["--json", "--device", "cpu"] + [a for p in PROBES for a in ("--probe", p)]
    full = to_json(analyze(run_sweep(make_spec(), donors)))  # the same sweep, uninterrupted
    path = session_file(donors, tmp_path / "killed.json")
    proc = subprocess.Popen([sys.executable, "-m", "surgeon.cli", "sweep", str(path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        for line in proc.stderr:
            if line.startswith("[3/8]") and line.rstrip().endswith("saved"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    session = load_session(path)  # still a valid session: every save was atomic
    (record,) = session.extensions["sweeps"]
    stopped_at = len(record["configurations"])
    assert 3 <= stopped_at < 8
    resumed = cli("sweep", path, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {stopped_at} of 8 configurations" in resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 8 - stopped_at  # finished configurations are never measured again
    assert "ceiling" not in resumed.stderr  # nor the donors: their scores are in the session
    assert comparable(json.loads(resumed.stdout)) == comparable(json.loads(json.dumps(full)))
    report = json.loads(resumed.stdout)
    assert len(report["configurations"]) == 8 and report["sweep"]["complete"]
    assert set(report["ceilings"]) == {"A", "B"}
    assert {tuple(c["groups"]) for c in report["configurations"]} == {
        (), ("router",), ("attention",), ("experts",), ("router", "attention"), ("router", "experts"),
        ("attention", "experts"), ("router", "attention", "experts")}


# ---------------------------------------------------------------- the report
def _synthetic_record():
    """Two groups on one 40-item probe: transferring g1 alone beats both donors (made-up outcomes)."""
    n = 40
    ids = [str(i) for i in range(n)]

    def rec(k):
        outcomes = [1.0] * k + [0.0] * (n - k)
        return {"metric": "accuracy", "n": n, "score": k / n, "ci": [k / n - 0.1, k / n + 0.1], "ids": ids,
                "outcomes": outcomes, "label": "em:x"}

    scores = {0: 20, 1: 38, 2: 20, 3: 37}
    return {
        "id": "x", "base": "A", "donor": "B", "labels": {"A": "old", "B": "new"}, "fingerprints": {},
        "groups": [{"name": "g1", "specs": ["experts"]}, {"name": "g2", "specs": ["router"]}],
        "device": "cpu", "dtype": "keep", "batch_size": 16, "probes": [{"kind": "em", "data": "x"}],
        "ceilings": {"A": {"em:x": rec(20)}, "B": {"em:x": rec(22)}},
        "configurations": [{"mask": m, "groups": [], "results": {"em:x": rec(k)}, "swap": None}
                           for m, k in scores.items()],
    }


def test_report_best_recommendation_and_formats():
    a = analyze(_synthetic_record())
    assert a.complete
    best = a.best["em:x"]
    assert (best.name, best.beats_both) == ("g1", True) and best.verdict == "significantly beats both donors"
    rec = a.recommendations["em:x"]
    assert rec.choice == {"g1": "B", "g2": "either"}
    assert [(e.group, round(100 * e.delta)) for e in a.effects] == [("g1", 45), ("g2", 0)]
    assert a.delta(1, "em:x") == pytest.approx(18 / 40) and a.delta(1, "em:x", "B") == pytest.approx(16 / 40)
    md = to_markdown(a)
    assert "| g1 | 95.0 ± 10.0 +A*** +B*** |" in md and "| em:x | new | either |" in md
    assert "g1  " in effect_chart(a) and "+45.0 ***" in effect_chart(a)
    rows = to_csv(a).splitlines()
    assert rows[0].startswith("kind,configuration,mask,groups,probe") and len(rows) == 1 + 5
    js = to_json(a)
    assert [c["name"] for c in js["configurations"]] == ["none", "g1", "g2", "g1 + g2"]
    assert js["best"]["em:x"]["beats_both_donors"] and js["recommendation"]["em:x"]["from"]["g2"] == "either"
    # an unfinished record still renders, with what is missing marked
    partial = _synthetic_record()
    partial["configurations"] = partial["configurations"][:2]
    p = analyze(partial)
    assert not p.complete and not p.best and "…" in to_markdown(p)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, needles", [
    (["--donor", "Z"], ["--donor 'Z'", "no donor of that name", "A, B"]),
    (["--donor", "A"], ["that is the base"]),
    (["--group", "attnetion"], ["attnetion", "unknown component"]),
    (["--group", "experts@7"], ["layer 7 out of range"]),
    (["--group", "router+"], ["expected [NAME=]SPEC"]),
    ([a for e in range(4) for l in range(2) for a in ("--group", f"expert:{e}@{l}")], ["8 groups", "at most 6"]),
    (["--probe", "kl:arith"], ["kl compares"]),
    (["--probe", "em:nope"], ["nope", "neither a probe file nor a built-in probe set"]),
])
def test_bad_input_is_one_line(cli, donors, tmp_path, extra, needles):
    path = session_file(donors, tmp_path / "s.json")
    before = path.read_bytes()
    assert_one_line_error(cli("sweep", path, *extra), *needles)
    assert path.read_bytes() == before


def test_missing_session_needs_base_and_donor(cli, tmp_path):
    assert_one_line_error(cli("sweep", tmp_path / "none.json"), "no such session file", "--base DIR")
    assert not (tmp_path / "none.json").exists()


def test_session_with_one_donor(cli, donors, tmp_path):
    path = tmp_path / "one.json"
    save_session(make_session(Plan("A"), {"A": donors["A"]}, path), path)
    assert_one_line_error(cli("sweep", path), "only the base donor")


def test_cli_creates_session_and_keeps_sweep_in_it(cli, donors, tmp_path):
    path = tmp_path / "new.json"
    r = cli("sweep", path, "--base", donors["A"].path, "--donor", donors["B"].path, "--group", "router",
            "--probe", PROBES[0], "--csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("kind,configuration") and len(r.stdout.splitlines()) == 1 + 3
    assert "items/s" in r.stderr and "ETA" in r.stderr  # item progress even when stderr is not a terminal
    session = load_session(path)
    spec = SweepSpec("A", "B", [parse_group("router")], [parse_probe(PROBES[0])])
    assert find_sweep(session, spec.key(donors)) is not None
    again = cli("sweep", path, "--group", "router", "--csv")  # probes default to the stored sweep's
    assert again.returncode == 0 and again.stdout == r.stdout
    assert "[" not in again.stderr and "ceiling" not in again.stderr  # nothing re-measured

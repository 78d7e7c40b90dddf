"""The workbench's engine parts, without Textual: grid model, distances, recovery file."""

import json
import os
import random
import subprocess
import sys
import weakref

import numpy as np
import pytest
from tiny_models import make_donor

from surgeon.core.anatomy import Part
from surgeon.core.donor import open_donor
from surgeon.core.plan import Assignment
from surgeon.core.recovery import RecoveryWriter, load_recovery, orphans
from surgeon.core.resolve import resolve
from surgeon.core.session import make_session
from surgeon.core.workbench import Cell, Workbench, layer_sheet, surgery_sheet
from surgeon.errors import SurgeonError
from surgeon.features.distance import DistanceCache


@pytest.fixture(scope="module")
def olmoe(donors_of):
    paths = donors_of("olmoe", 3)
    return {n: open_donor(p) for n, p in zip("ABC", paths)}


def test_grid_columns_and_globals_follow_the_base_anatomy(olmoe):
    wb = Workbench(olmoe, "A")
    assert wb.columns == ["attention", "router", "expert", "norms"]
    assert wb.globals == ["embedding", "final_norm", "lm_head"]
    sheet = surgery_sheet(wb)
    assert sheet.labels == ["0", "1", "global"] and sheet.titles[2] == "experts"
    assert sheet.item(2, 0) == Cell(None, "embedding")
    assert wb.cell_text(Cell(0, "expert")) == "A×4"


def test_tally_equals_resolve_for_random_marks(olmoe):
    rng = random.Random(3)
    wb = Workbench(olmoe, "A")
    cells = wb.all_cells()
    for _ in range(25):
        wb.set_cells(rng.sample(cells, 3), rng.choice("ABC"))
        if rng.random() < 0.3:
            wb.set_parts(rng.sample(wb.index.experts_of[1], 2), rng.choice("ABC"))
        if rng.random() < 0.2:
            wb.undo()
        r = resolve(wb.plan(), olmoe)
        tally = wb.tally()
        assert tally.params == {k: v for k, v in r.parameters_by_donor().items() if v}
        assert tally.changed_tensors == len(r.changed())
        # The canonical plan reproduces the state exactly.
        plan = wb.plan()
        assert all(plan.donor_for(p) == d for p, d in wb.state.items())
        # What the grid shows, from caches an undo updates only where it moved something, is what a
        # workbench opened afresh on that plan shows.
        fresh = Workbench(olmoe, "A", plan)
        assert [wb.cell_text(c) for c in cells] == [fresh.cell_text(c) for c in cells]


def test_tally_counts_layer_gates_from_the_donor_that_gives_them(olmoe, tmp_path):
    """A layer gate has no base tensor where the base has none: its figures come from its donor."""
    import shutil

    import torch

    from surgeon.core.gates_sidecar import write_gates

    gated = tmp_path / "gated"
    shutil.copytree(olmoe["B"].path, gated)
    hidden = json.loads((gated / "config.json").read_text())["hidden_size"]
    write_gates(gated, {0: torch.ones(hidden), 1: torch.ones(hidden, hidden)}, hidden)
    donors = {"A": olmoe["A"], "G": open_donor(gated)}
    wb = Workbench(donors, "A")
    rng = random.Random(5)
    cells = wb.all_cells()
    gate_cells = wb.column_cells("layer_gate")
    assert len(gate_cells) == 2
    for _ in range(12):
        wb.set_cells(rng.sample(cells, 2) + rng.sample(gate_cells, 1), rng.choice("AG"))
        r = resolve(wb.plan(), donors)
        tally = wb.tally()
        assert tally.params == {k: v for k, v in r.parameters_by_donor().items() if v}
        assert tally.changed_tensors == len(r.changed())
        assert tally.total_tensors == len(r.sources)
    wb.set_cells(gate_cells, "G")
    assert wb.tally().changed_tensors >= 2


def test_mixed_experts_summary_and_canonical_plan(olmoe):
    wb = Workbench(olmoe, "A")
    experts = wb.index.experts_of[1]
    wb.set_parts(experts[1:4], "B")
    assert wb.cell_text(Cell(1, "expert")) == "B×3 A×1"
    wb.set_cells([Cell(0, "expert")], "C")
    assert wb.plan().assignments == [
        Assignment("experts", "C", (0,)), Assignment("expert", "B", (1,), (1, 2, 3))]
    wb.set_cells(wb.column_cells("attention"), "B")
    assert Assignment("attention", "B", None) in wb.plan().assignments


def test_undo_redo_and_reset(olmoe):
    wb = Workbench(olmoe, "A")
    wb.set_cells(wb.row_cells(0), "B")
    wb.set_cells(wb.row_cells(None), "C")
    assert wb.marks == 4 + 3 + 3  # attention, router, norms, 4 experts; 3 globals
    wb.undo()
    assert wb.donor_of(Cell(None, "embedding")) == "A" and wb.donor_of(Cell(0, "router")) == "B"
    wb.redo()
    assert wb.donor_of(Cell(None, "lm_head")) == "C"
    wb.reset()
    assert wb.marks == 0 and wb.plan().assignments == []
    assert wb.undo() is True
    assert wb.marks == 10
    # The undone reset is the one step to redo: it clears the marks again, then nothing is left.
    assert wb.redo() is True
    assert wb.marks == 0 and wb.plan().assignments == []
    assert wb.redo() is False
    assert wb.marks == 0
    # A new edit after an undo drops the redo history.
    wb.undo()
    wb.set_cells([Cell(1, "router")], "B")
    assert wb.redo() is False
    assert wb.marks == 11


def test_each_undo_step_keeps_a_byte_per_unit_not_a_copy_of_the_marks(olmoe):
    # A dict copy per step made DeepSeek-V3's history grow by 590 KB a mark, and every full
    # collection of the workbench walked every copy.
    wb = Workbench(olmoe, "A")
    for donor in "BCAB":
        wb.set_cells(wb.column_cells("router"), donor)
    step = wb.undo_stack[-1]
    assert isinstance(step.codes, bytes) and len(step.codes) == len(wb.index.units)
    assert step.units is wb.index.units and step.names == ("A", "B", "C")
    assert [wb.undo() and wb.donor_of(Cell(0, "router")) for _ in range(4)] == ["A", "C", "B", "A"]
    assert [wb.redo() and wb.donor_of(Cell(1, "router")) for _ in range(4)] == ["B", "C", "A", "B"]


def test_the_collector_skips_what_is_kept_for_good_until_let_go(olmoe):
    import gc

    from surgeon.core import collector

    try:
        collector.keep_for_good()
        kept = gc.get_freeze_count()
        assert kept > 0

        class Screen:
            pass

        screen = Screen()  # a cycle alive while a block runs, as an open screen is
        screen.me = screen
        alive = weakref.ref(screen)
        with collector.paused():  # a block that builds tables thaws nothing and freezes nothing
            tables = [[i] for i in range(1000)]
        assert gc.get_freeze_count() == kept and gc.is_tracked(tables[0])
        del screen  # closed: its cycle was not frozen with the block's tables, so it is collected
        gc.collect()
        assert alive() is None
    finally:
        collector.let_go()
    assert gc.get_freeze_count() == 0
    with collector.paused():
        tables = [[i] for i in range(1000)]
    assert gc.get_freeze_count() == 0 and gc.is_tracked(tables[0])


def full_collections(run) -> int:
    """How many full collections happen while `run()` runs."""
    import gc

    seen = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(count)
    try:
        run()
    finally:
        gc.callbacks.remove(count)
    return len(seen)


def make_cycles(n: int = 100_000) -> None:
    """Garbage cycles, so the young generations fill and are collected again and again."""
    for _ in range(n):
        a = []
        a.append(a)


def make_due() -> list:
    """Cycles, and lists that live on, enough for a full collection to be due by the collector's own
    rule (what reached the oldest generation since the last one is a quarter of what lived there)."""
    import gc

    kept = [[] for _ in range(len(gc.get_objects()) // 2)]
    make_cycles()
    return kept


def test_full_collections_held_run_when_asked_and_only_then(olmoe):
    import gc

    from surgeon.core import collector

    before = gc.get_threshold()
    gc.collect()
    assert full_collections(make_due) > 0  # the collector's own way
    try:
        collector.hold_full_collections()
        gc.collect()
        assert full_collections(make_due) == 0
        assert full_collections(lambda: collector.collect_held(idle=False)) == 0  # someone is typing
        ran = []
        assert full_collections(lambda: ran.append(collector.collect_held(idle=True))) == 1 and ran == [True]
        assert not collector.collect_held(idle=True)  # nothing is due right after one
        # Never idle: a full collection still comes once it is long overdue.
        assert full_collections(lambda: [make_cycles(10_000) or collector.collect_held(idle=False)
                                         for _ in range(150)]) >= 1  # 150 x 10,000 cycles: 200+ middle ones
    finally:
        collector.let_go()
    assert gc.get_threshold() == before
    assert not collector.collect_held(idle=True)  # let go: the collector decides again


def test_cycle_goes_through_donors_in_order(olmoe):
    wb = Workbench(olmoe, "A")
    cell = Cell(1, "router")
    assert [wb.cycle([cell]) for _ in range(3)] == ["B", "C", "A"]


def test_incompatible_donor_cannot_be_marked_and_says_why(olmoe, tmp_path):
    odd = open_donor(make_donor(tmp_path / "odd", "olmoe", seed=9, intermediate_size=24))
    wb = Workbench(dict(olmoe), "A")
    name = wb.add_donor(odd)
    problem = wb.problem(name)
    assert problem and "shape" in problem and "experts" in problem
    with pytest.raises(SurgeonError, match=r"mlp\.experts\.\d+\.\w+_proj\.weight: shape \[\d+, \d+\]"):
        wb.set_cells([Cell(0, "expert")], name)
    # Attention has the same shapes: taking it from the odd donor is allowed.
    assert wb.set_cells([Cell(0, "attention")], name)
    assert wb.marks == 1


def test_a_donor_is_checked_by_its_layout_not_its_files(tmp_path):
    """The workbench compares donors of one layout at once (their headers' bytes, else a table of
    every tensor's dtype and shape): the same tensors cut into other shards still fit, and a donor
    whose headers differ by one tensor's dtype is still refused, naming that tensor."""
    import torch

    base = open_donor(make_donor(tmp_path / "base", "olmoe", seed=1))
    resharded = open_donor(make_donor(tmp_path / "resharded", "olmoe", seed=2, max_shard_size="100KB"))
    assert len(resharded.shards) > 1 and len(base.shards) == 1
    half = open_donor(make_donor(tmp_path / "half", "olmoe", seed=3, dtype=torch.bfloat16))
    wb = Workbench({"A": base, "B": resharded, "C": half}, "A")
    assert wb.problem("B") is None
    assert wb.set_cells([Cell(0, "expert")], "B")
    assert "dtype BF16" in wb.problem("C")


def test_check_plan_names_the_problem_resolve_names(tmp_path):
    """check_plan checks in the files' order (no sort of every name) but must report what resolve
    reports: the first problem in write order."""
    from surgeon.core.plan import Assignment, Plan
    from surgeon.core.resolve import check_plan, resolve

    # 12 experts: the files list expert 10 before expert 2, write order the other way round.
    base = open_donor(make_donor(tmp_path / "base", "olmoe", seed=8, num_experts=12))
    odd = open_donor(make_donor(tmp_path / "odd", "olmoe", seed=9, num_experts=12, intermediate_size=24))
    donors = {"A": base, "Z": odd}
    plan = Plan("A", [Assignment("expert", "Z", (0,), (2, 10)), Assignment("attention", "Z")])
    with pytest.raises(SurgeonError) as by_resolve:
        resolve(plan, donors)
    with pytest.raises(SurgeonError) as by_check:
        check_plan(plan, donors)
    assert str(by_check.value) == str(by_resolve.value)
    assert "layers.0.mlp.experts.2." in str(by_check.value)  # write order: expert 2 before expert 10
    check_plan(Plan("A", [Assignment("attention", "Z")]), donors)  # what fits raises nothing
    with pytest.raises(SurgeonError, match=r"experts\.10\."):
        check_plan(Plan("A", [Assignment("expert", "Z", (0,), (10,))]), donors)


def test_set_base_keeps_marks_and_remove_donor_reverts_its_cells(olmoe):
    wb = Workbench(olmoe, "A")
    wb.set_cells([Cell(0, "attention")], "C")
    wb.set_base("B")
    assert wb.base == "B" and wb.donor_of(Cell(0, "attention")) == "C"
    assert wb.donor_of(Cell(1, "attention")) == "B"
    wb.remove_donor("C")
    assert wb.marks == 0 and "C" not in wb.donors
    with pytest.raises(SurgeonError, match="is the base"):
        wb.remove_donor("B")


def test_layer_sheet_lists_components_then_every_expert(olmoe):
    wb = Workbench(olmoe, "A")
    sheet = layer_sheet(wb, 1)
    assert sheet.labels == ["attention", "router", "norms", "expert 0", "expert 1", "expert 2", "expert 3"]
    assert sheet.item(3, 0) == (Part("expert", 1, 0),)


def test_distance_is_relative_l2_from_memory_maps(olmoe):
    a, b = olmoe["A"], olmoe["B"]
    from safetensors.numpy import load_file

    ta = load_file(str(a.path / "model.safetensors"))
    tb = load_file(str(b.path / "model.safetensors"))
    cache = DistanceCache()
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    want = np.linalg.norm(tb[name].astype(np.float64) - ta[name]) / np.linalg.norm(ta[name].astype(np.float64))
    # float32 squares summed in float32 runs of DOT values, then in float64 (distance.py): within 1e-7
    assert cache.tensor(a, b, name) == pytest.approx(want, rel=1e-6)
    assert cache.tensor(a, a, name) == 0.0
    assert cache.cached(a, b, name) == pytest.approx(want, rel=1e-6)


def test_distance_reads_bf16(tmp_path):
    import torch

    a = open_donor(make_donor(tmp_path / "a", "olmoe", seed=0, dtype=torch.bfloat16))
    b = open_donor(make_donor(tmp_path / "b", "olmoe", seed=1, dtype=torch.bfloat16))
    from safetensors.torch import load_file

    name = "model.layers.0.self_attn.q_proj.weight"
    ta, tb = load_file(a.path / "model.safetensors")[name].double(), load_file(b.path / "model.safetensors")[name].double()
    want = float((tb - ta).norm() / ta.norm())
    assert DistanceCache().tensor(a, b, name) == pytest.approx(want, rel=1e-6)  # as above: float32 runs


def test_recovery_writer_keeps_the_newest_and_orphans_are_dead_processes(olmoe, tmp_path):
    wb = Workbench(olmoe, "A")
    w = RecoveryWriter(tmp_path)
    wb.set_cells([Cell(0, "router")], "B")
    newer = make_session(wb.plan(), wb.donors, None).to_json()
    assert w.write(2, newer, "s.json")
    assert not w.write(1, {"stale": True}, None)  # an older snapshot arriving late is dropped
    assert orphans(tmp_path) == []  # our own file: we are alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    moved = tmp_path / f"recovery-{int(dead.stdout)}.json"
    os.rename(w.path, moved)
    assert orphans(tmp_path) == [moved]
    rec = load_recovery(moved)
    assert rec.session.plan.assignments == [Assignment("router", "B", (0,))] and rec.session_path == "s.json"
    w.discard()
    assert not w.write(3, newer, None)  # after a clean quit nothing comes back


def test_corrupt_recovery_file_is_a_surgeon_error(tmp_path):
    bad = tmp_path / "recovery-1.json"
    bad.write_text("{not json")
    with pytest.raises(SurgeonError, match="unreadable recovery file"):
        load_recovery(bad)
    bad.write_text(json.dumps({"session": {"schema_version": 1}}))
    with pytest.raises(SurgeonError, match="field"):
        load_recovery(bad)


def test_engine_never_imports_textual():
    code = "import sys, surgeon.core.workbench, surgeon.core.recovery, surgeon.features.distance; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_distance_map_is_saved_and_reused_from_disk(olmoe, tmp_path):
    from surgeon.features.distance import component_tensors, distance_map

    base, donor = olmoe["A"], olmoe["B"]
    first = DistanceCache(tmp_path)
    cells = dict(distance_map(base, donor, first))
    groups = component_tensors(base)
    assert set(cells) == set(groups)
    attn = groups[(1, "attention")]
    assert cells[(1, "attention")] == pytest.approx(first.group(base, donor, attn))
    saved = list(tmp_path.glob("*.json"))
    assert len(saved) == 1
    # a new cache (a new process) reads the figures back instead of recomputing them
    second = DistanceCache(tmp_path)
    assert all(second.cached(base, donor, n) is not None for names in groups.values() for n in names)
    assert dict(distance_map(base, donor, second)) == cells


def test_distance_cli(olmoe, run_cli):
    r = run_cli("distance", olmoe["A"].path, olmoe["B"].path, "--json")
    assert r.returncode == 0, r.stderr
    cells = {(c["layer"], c["component"]): c["distance"] for c in json.loads(r.stdout)["cells"]}
    from surgeon.features.distance import component_tensors

    groups = component_tensors(olmoe["A"])
    assert set(cells) == set(groups)
    want = DistanceCache().group(olmoe["A"], olmoe["B"], groups[(0, "attention")])
    assert want > 0 and cells[(0, "attention")] == pytest.approx(want, rel=1e-6)
    r = run_cli("distance", olmoe["A"].path, olmoe["A"].path)
    assert r.returncode == 0 and "0.0000" in r.stdout

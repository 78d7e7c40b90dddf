"""The Layer gates screen driven through the real app with Pilot, checked against select_gates.

Donors: A, a tiny 3-layer llama with a character tokenizer; B, a byte copy of A with trained
vector gates on every layer (as `gates add` + `gates train` make one); C, another plain llama.
The reference selection runs here on A loaded by transformers with B's gates attached from the
sidecar, apart from the hybrid machinery the screen uses.
"""

import pytest
import torch
from test_tui_helpers import notifications, screen_text, settle, sync
from tiny_models import make_donor, save_char_tokenizer
from transformers import AutoModelForCausalLM

from screens.app import SurgeonApp
from screens.dialogs import ErrorScreen
from screens.gates import CorpusScreen, GatesScreen
from screens.surgery import SurgeryScreen
from screens.widgets.gate_chart import GateChart, change_text
from surgeon.core.anatomy import Part
from surgeon.core.donor import open_donor
from surgeon.core.gates_sidecar import read_gates, write_gates
from surgeon.core.plan import Plan
from surgeon.core.resolve import resolve
from surgeon.core.workbench import Workbench
from surgeon.errors import SurgeonError
from surgeon.features.export import export_hybrid
from surgeon.features.gates.select import keep_gate, select_gates
from surgeon.features.gates.train import TrainSettings, load_data, train_gates
from surgeon.features.gates.workbench import drop_gates, hybrid_gates
from surgeon.live.layer_gates import (
    add_zero_gates,
    attach_gates,
    gate_modules,
    gate_state,
)
from surgeon.probes.scoring import load_tokenizer

SIZE = (110, 34)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    """(A, B, C): plain, A with trained vector gates on layers 0-2 (layer 1's set by hand), plain."""
    root = tmp_path_factory.mktemp("gates-tui")
    a, c = (save_char_tokenizer(make_donor(root / name, "llama", seed=seed, num_hidden_layers=3))
            for name, seed in (("a", 0), ("c", 1)))
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    add_zero_gates(model, "vector", [0, 1, 2])
    data = load_data(load_tokenizer(a), "arith", 64)
    train_gates(model, data, TrainSettings(steps=30, lr=5e-2, warmup=2, batch_size=16, seq_len=64, seed=0))
    with torch.no_grad():
        gate_modules(model)[1].weight.fill_(-3.0)
    gates = gate_state(model)
    opened = {"A": open_donor(a)}
    b = root / "b"
    export_hybrid(resolve(Plan("A"), opened), opened, b, before_rename=lambda tmp: write_gates(tmp, gates, 32))
    return a, b, c


def reference(a, b, corpus="arith"):
    """select_gates on A with B's gates attached by hand, on the corpus as the screen reads it."""
    model = AutoModelForCausalLM.from_pretrained(a, dtype="auto").eval()
    gates, _ = read_gates(b)
    with torch.no_grad():
        attach_gates(model, {layer: tuple(g.shape) for layer, g in gates.items()})
        for layer, module in gate_modules(model).items():
            module.weight.copy_(gates[layer])
    return select_gates(model, load_data(load_tokenizer(a), corpus, 64), batch_size=16)


def table_rows(screen) -> dict[int, list[str]]:
    table = screen.query_one("#gates-table")
    return {int(str(r[0])): [str(c) for c in r] for r in (table.get_row_at(i) for i in range(table.row_count))}


def assert_shows(screen, ref, min_gain=0.0):
    """The table's numbers, the chart's rows and the kept selection are those of `ref`."""
    sel = screen.current()[0]
    assert sel.tokens == ref.tokens
    rows = table_rows(screen)
    for mine, want in zip(sel.layers, ref.layers, strict=True):
        assert mine.layer == want.layer
        assert mine.ppl_without == pytest.approx(want.ppl_without, rel=1e-6)
        assert mine.ppl_with == pytest.approx(want.ppl_with, rel=1e-6)
        verdict = keep_gate(want.ppl_without, want.ppl_with, min_gain)
        assert rows[want.layer] == [str(want.layer), "vector", "32", " B  b", f"{want.ppl_without:.4f}",
                                    f"{want.ppl_with:.4f}", change_text(want.change), "keep" if verdict else "drop"]
    chart = screen.query_one(GateChart)
    assert [(r.label, r.keep) for r in chart.rows] == [
        (f"layer {r.layer}", keep_gate(r.ppl_without, r.ppl_with, min_gain)) for r in ref.layers]
    assert [r.change for r in chart.rows] == pytest.approx([r.change for r in ref.layers], rel=1e-6)


def gate_donors(wb) -> dict[int, str]:
    return {p.layer: d for p, d in wb.state.items() if p.kind == "layer_gate"}


@sync
async def test_gates_screen_measures_the_hybrids_gates_and_drops_the_bad_ones_in_one_undo(donors, tmp_path):
    a, b, _ = donors
    ref = reference(a, b)
    assert ref.kept and ref.dropped, ref.to_json()  # both verdicts occur
    app = SurgeonApp([str(a), str(b)], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        wb = app.wb
        # B's gates are open but the hybrid takes none yet: the screen says how to take them.
        await pilot.press("L")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, GatesScreen)
        assert "The hybrid has no layer gates. Donors with gates: B in layer(s) 0-2" in screen_text(app)
        assert not screen.results and all(r[1] == "no gate" for r in table_rows(screen).values())
        # Give the layer gate column to B on the grid (c paints the column with the brush, B).
        await pilot.press("escape", *["l"] * wb.columns.index("layer_gate"), "c", "L")
        await settle(pilot)
        assert app.screen is screen
        assert gate_donors(wb) == {0: "B", 1: "B", 2: "B"}
        assert_shows(screen, ref)
        text = screen_text(app)
        assert f"per-layer logit-lens perplexity on {ref.tokens} calibration tokens" in text
        assert "helps ◀" in text and "layer 2 " in text
        # m raises the min gain: verdicts change, numbers stay, nothing runs again.
        await pilot.press("m")
        await settle(pilot)
        assert screen.min_gain == 0.01 and "min gain 1%" in screen_text(app)
        assert_shows(screen, ref, 0.01)
        await pilot.press("m", "m", "m", "m")  # 2, 5, 10, back to 0
        assert screen.min_gain == 0.0
        # a: the dropped layers' gate cells go to A (the base has no gates) as ONE change.
        undo_depth = len(wb.undo_stack)
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, SurgeryScreen)
        assert len(wb.undo_stack) == undo_depth + 1
        assert gate_donors(wb) == {layer: ("B" if layer in ref.kept else "A") for layer in range(3)}
        assert sorted(info.layer for info in hybrid_gates(wb).values()) == ref.kept
        assert any("now comes from donor A" in n for n in notifications(app))
        await pilot.press("u")
        assert gate_donors(wb) == {0: "B", 1: "B", 2: "B"}
        # Back on the screen, the kept selection of these marks shows at once; f changes the data.
        await pilot.press("L")
        await pilot.pause()
        assert screen.pending is None and screen.current() is not None
        await pilot.press("f")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, CorpusScreen)
        dialog.query_one("#path").value = "no-such-set"
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is dialog and "no such file, nor a built-in set" in screen_text(app)
        dialog.query_one("#path").value = "reverse"
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen is screen and screen.corpus == "reverse"
        assert "calibration reverse" in screen_text(app)
        assert_shows(screen, reference(a, b, "reverse"))
        # Data the engine refuses: one dialog, then the screen says so and does not retry by itself.
        await pilot.press("f")
        await pilot.pause()
        app.screen.query_one("#path").value = "arith_mc"
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen) and "no prompt/answer items" in screen_text(app)
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen is screen and screen.pending is None and screen.current() is None
        assert "the selection failed: calibration data arith_mc: no prompt/answer items" in screen_text(app)


@sync
async def test_without_gated_donors_the_screen_says_how_to_add_gates(donors, tmp_path):
    a, _, c = donors
    app = SurgeonApp([str(a), str(c)], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("L")
        await settle(pilot)
        assert isinstance(app.screen, GatesScreen)
        text = screen_text(app)
        assert "No open donor has layer gates. Add some with `moe-surgeon gates add OUT --base DIR" in text
        assert not app.screen.query_one("#gates-table").display and not app.screen.results
        await pilot.press("a")
        assert "no selection for the current marks: run it first (r)" in notifications(app)[-1]


def test_dropping_the_gates_of_a_gated_base_takes_a_gateless_donor_or_says_it_cannot(donors):
    a, b, c = donors
    wb = Workbench({"A": open_donor(b), "B": open_donor(a), "C": open_donor(c)}, "A")  # the base has the gates
    assert {l: (g.gate_type, g.parameters, g.donor) for l, g in hybrid_gates(wb).items()} == {
        l: ("vector", 32, "A") for l in range(3)}
    assert drop_gates(wb, [0, 2]) == "B"  # the first donor without gates there
    assert [a.spec for a in wb.plan().assignments] == ["layer_gate@0,2"]
    assert sorted(hybrid_gates(wb)) == [1]
    assert wb.undo() and sorted(hybrid_gates(wb)) == [0, 1, 2] and not wb.undo()
    only_gated = Workbench({"A": open_donor(b)}, "A")
    with pytest.raises(SurgeonError, match=r"every open donor has a gate in layer\(s\) 1, the base included"):
        drop_gates(only_gated, [1])


def test_gate_cells_go_back_to_a_gateless_base_by_mark_cycle_and_reset(donors):
    """Giving a gate cell to the base where the base has none means "no gate here": never refused."""
    a, b, _ = donors
    wb = Workbench({"A": open_donor(a), "B": open_donor(b)}, "A")
    column = wb.column_cells("layer_gate")
    assert wb.set_cells(column, "B") and sorted(hybrid_gates(wb)) == [0, 1, 2]
    assert wb.set_parts([Part("layer_gate", 1)], "A") and sorted(hybrid_gates(wb)) == [0, 2]
    assert wb.cycle([column[0]]) == "A" and sorted(hybrid_gates(wb)) == [2]
    assert wb.reset() and wb.plan().assignments == [] and hybrid_gates(wb) == {}

"""The workbench on families whose layout differs from OLMoE's, driven through the real app: each
family is shown as it is (mixers marked per layer, shared experts and their gates as columns) and a
fused expert tensor still offers one unit per expert."""

import pytest
from test_tui_helpers import screen_text, settle, sync

from screens.app import SurgeonApp
from screens.layer import LayerScreen
from surgeon.core.plan import Assignment
from surgeon.core.workbench import Cell

SIZE = (110, 32)


@pytest.fixture
def pair_of(moe_pair):
    return lambda model_type: [str(p) for p in moe_pair(model_type)]


def make_app(tmp_path, specs):
    return SurgeonApp(specs, None, state_dir=tmp_path / "state", offer_recovery=False)


@sync
async def test_linear_attention_layers_are_marked_and_shared_parts_have_columns(pair_of, tmp_path):
    app = make_app(tmp_path, pair_of("qwen3_next"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.wb.columns == ["attention", "router", "expert", "shared_expert", "gate", "norms"]
        text = screen_text(app)
        assert "0 linear" in text and "shared" in text
        await pilot.press("2")  # layer 0's attention (its linear attention) -> B
        assert app.wb.plan().assignments == [Assignment("attention", "B", (0,))]


@sync
async def test_one_expert_of_a_fused_tensor_is_marked_in_the_layer_detail(pair_of, tmp_path):
    app = make_app(tmp_path, pair_of("gpt_oss"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.wb.columns == ["attention", "router", "expert", "norms"]
        await pilot.press("j", "l", "l", "enter")  # layer 1, experts column
        await settle(pilot)
        assert isinstance(app.screen, LayerScreen) and app.screen.layer_no == 1
        await pilot.press("j", "j", "2")  # expert 2 -> B
        wb = app.wb
        assert [wb.state[p] for p in wb.index.experts_of[1]] == ["A", "A", "B", "A"]
        assert wb.plan().assignments == [Assignment("expert", "B", (1,), (2,))]
        await settle(pilot)
        table = app.screen.query_one("#tensors")
        fused = "model.layers.1.mlp.experts.gate_up_proj"
        assert table.row_keys.count(fused) == 1  # listed once, not once per expert
        assert str(table.get_cell(fused, "from")).strip() == "A×3 B×1"
        await pilot.press("escape")
        await settle(pilot)
        assert wb.cell_text(Cell(1, "expert")) == "A×3 B×1"
        assert "A×3 B×1" in screen_text(app)
        from surgeon.core.resolve import resolve

        r = resolve(wb.plan(), wb.donors)  # the status line counts tensors as resolve does
        assert f"{len(r.changed())} of {len(r.sources)} tensors changed" in screen_text(app)

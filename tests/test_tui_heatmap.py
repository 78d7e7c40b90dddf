"""The Routing screen driven through the real app with Pilot, on the shipped demo donors.

References are computed here: each demo donor loaded by transformers itself (bf16, as stored and
as the screen's materialisation keeps it) and probed with surgeon.features.routing.probe on the same corpora;
the selection actions are checked against routing.most_used / most_changed on those references.
One app session covers the whole screen, so the donors are probed once.
"""

import json

import numpy as np
import pytest
from test_tui_helpers import notifications, screen_text, settle, sync
from transformers import AutoModelForCausalLM

from screens.app import DEMO_SPECS, SurgeonApp
from screens.dialogs import PathScreen
from screens.heatmap import RoutingScreen, TakeScreen, parse_take
from screens.surgery import SurgeryScreen
from screens.widgets.heatmap import HeatmapGrid
from surgeon.core.anatomy import Part
from surgeon.errors import SurgeonError
from surgeon.features.routing.corpora import corpus_texts, parse_corpus
from surgeon.features.routing.probe import (
    expert_similarity,
    most_changed,
    most_used,
    probe_routing,
)
from surgeon.live.hybrid import Hybrid
from surgeon.probes.scoring import load_tokenizer

SIZE = (100, 30)
CORPORA = ("arith", "reverse")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def probe(model, tokenizer) -> dict:
    return {name: probe_routing(model, tokenizer, corpus_texts(parse_corpus(name)[1]), batch_size=32)
            for name in CORPORA}


@pytest.fixture(scope="module")
def donor_stats():
    """Routing of demo:base, demo:arith and demo:reverse (donors A, B, C) on both demo corpora."""
    from surgeon.core.donor import resolve_path

    out = {}
    for name, spec in zip("ABC", DEMO_SPECS):
        path = resolve_path(spec)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        out[name] = probe(model, load_tokenizer(path))
    return out


def shown_rows(app) -> list[list[str]]:
    """The heatmap's rows as the terminal shows them: [layer, value, value, ...]."""
    lines = screen_text(app).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer ") and " e0 " in line)
    rows = []
    for line in lines[start + 1:]:
        cells = line.replace("[", " ").replace("]", " ").split()
        if not cells or not cells[0].isdigit():
            break
        rows.append(cells)
    return rows


def assert_shows(app, values, fmt="{:.2f}"):
    grid = app.screen.query_one(HeatmapGrid)
    np.testing.assert_allclose(grid.view.values, values, rtol=0, atol=1e-12)
    assert shown_rows(app) == [[str(layer)] + [fmt.format(v) for v in row] for layer, row in zip(range(4), values)]


def expert_donors(wb) -> dict[tuple[int, int], str]:
    return {(p.layer, p.expert): d for p, d in wb.state.items() if p.kind == "expert"}


async def take(pilot, key, n, layers):
    await pilot.press(key)
    await pilot.pause()
    dialog = pilot.app.screen
    assert isinstance(dialog, TakeScreen)
    dialog.query_one("#take-n").value = str(n)
    dialog.query_one("#take-layers").value = layers
    await pilot.press("enter")
    await settle(pilot)


def test_take_fields_parse_like_the_cli():
    assert parse_take(" 3 ", "") == (3, None)
    assert parse_take("1", "0-2,5") == (1, (0, 1, 2, 5))
    for n, layers, says in (("0", "", "at least one"), ("x", "", "whole number"), ("2", "3-1", "layers 3-1")):
        with pytest.raises(SurgeonError, match=says):
            parse_take(n, layers)


@sync
async def test_routing_screen_views_selection_actions_and_save(donor_stats, tmp_path):
    app = SurgeonApp(DEMO_SPECS, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")  # layer 0 attention from B: the hybrid is not any donor
        await pilot.press("R")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, RoutingScreen)
        wb = app.wb
        # Opens on the brush donor (B, demo:arith) on the first corpus, activation frequency.
        assert_shows(app, donor_stats["B"]["arith"].frequency)
        assert "activation frequency of B (demo:arith) on arith (1648 tokens)" in screen_text(app)
        await pilot.press("d")  # corpus
        assert_shows(app, donor_stats["B"]["reverse"].frequency)
        await pilot.press("m")  # model
        assert_shows(app, donor_stats["C"]["reverse"].frequency)
        assert "activation frequency of C (demo:reverse) on reverse" in screen_text(app)
        await pilot.press("t")  # metric
        assert_shows(app, donor_stats["C"]["reverse"].top1)
        await pilot.press("x")  # minus the first other model on this corpus
        assert_shows(app, donor_stats["C"]["reverse"].top1 - donor_stats["A"]["reverse"].top1, "{:+.2f}")
        assert "top-1 share on reverse: C (demo:reverse) minus A (demo:base)" in screen_text(app)
        await pilot.press("x", "x", "x")  # B, the hybrid, then this model on the other corpus
        assert_shows(app, donor_stats["C"]["reverse"].top1 - donor_stats["C"]["arith"].top1, "{:+.2f}")
        assert "top-1 share of C (demo:reverse): reverse minus arith" in screen_text(app)
        await pilot.press("x", "t", "t", "m", "d")  # difference off, back to frequency, the hybrid, arith
        hybrid = probe(Hybrid.materialize(wb.plan(), dict(wb.donors), device="cpu").model,
                       load_tokenizer(wb.donors["A"].path))
        assert_shows(app, hybrid["arith"].frequency)
        assert not np.allclose(hybrid["arith"].frequency, donor_stats["A"]["arith"].frequency)
        # Save the view: JSON holds exactly the numbers shown; SVG and PNG are written too.
        for name in ("hybrid.json", "hybrid.png"):
            await pilot.press("s")
            await pilot.pause()
            assert isinstance(app.screen, PathScreen)
            app.screen.query_one("#path").value = str(tmp_path / name)
            await pilot.press("enter")
            await settle(pilot)
        data = json.loads((tmp_path / "hybrid.json").read_text())
        np.testing.assert_array_equal(np.array(data["values"]), screen.query_one(HeatmapGrid).view.values)
        assert data["a"]["model"] == "the hybrid" and (tmp_path / "hybrid.png").read_bytes()[:4] == b"\x89PNG"

        # Take from B the 2 experts it uses most on arith in layers 1-3: exactly routing.most_used.
        await pilot.press("m", "m")  # hybrid -> A -> B
        await pilot.press("u")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#take-n").value = "0"
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is dialog and "at least one" in str(dialog.query_one("#take-error").render())
        dialog.query_one("#take-n").value = "2"
        dialog.query_one("#take-layers").value = "9"
        await pilot.press("enter")
        await pilot.pause()
        assert "layer 9: not an MoE layer" in str(dialog.query_one("#take-error").render())
        dialog.query_one("#take-layers").value = "1-3"
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, SurgeryScreen)  # back on the grid
        chosen = most_used(donor_stats["B"]["arith"], 2, [1, 2, 3])
        expected = {(layer, e): "B" if e in chosen.get(layer, ()) else "A" for layer in range(4) for e in range(8)}
        assert expert_donors(wb) == expected
        assert wb.state[Part("attention", 0)] == "B" and wb.marks == 1 + 6
        assert any("6 experts" in n or "layer: experts 1:" in n for n in notifications(app))
        # The routing of the new hybrid is measured again when the screen comes back.
        await pilot.press("R")
        await settle(pilot)
        await pilot.press("m", "m")  # B -> C -> hybrid
        new = probe(Hybrid.materialize(wb.plan(), dict(wb.donors), device="cpu").model,
                    load_tokenizer(wb.donors["A"].path))
        assert_shows(app, new["arith"].frequency)
        await pilot.press("escape")
        await pilot.press("u")  # one undo takes the whole selection back
        await pilot.pause()
        assert set(expert_donors(wb).values()) == {"A"} and wb.marks == 1

        # Take from C the experts whose weights changed most from the base: routing.most_changed.
        await pilot.press("R")
        await settle(pilot)
        await pilot.press("m")  # hybrid -> A: the base has nothing to give
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, RoutingScreen) and "is the base" in notifications(app)[-1]
        await pilot.press("m", "m")  # C
        await take(pilot, "c", 1, "")
        assert isinstance(app.screen, SurgeryScreen)
        chosen = most_changed(expert_similarity(wb.donors["A"], wb.donors["C"]), 1)
        assert expert_donors(wb) == {(layer, e): "C" if e in chosen[layer] else "A"
                                     for layer in range(4) for e in range(8)}

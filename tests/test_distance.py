"""The distance map's figure for a part (a layer's attention, an expert...): the parameter-weighted
mean of its tensors' relative L2 distances, checked against numbers computed here with torch from
the demo donors' safetensors files, so a moved matrix shows even next to norm weights near 1."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_tui_helpers import screen_text, settle, sync

from screens.app import SurgeonApp
from surgeon.core.donor import open_donor
from surgeon.features.distance import (
    AGGREGATE,
    PIECE,
    SAMPLE_EVERY,
    DistanceCache,
    component_tensors,
    distance_map,
    estimated_map,
    relative,
    squared_norms,
    tensor_distances,
)


@pytest.fixture(scope="module")
def demo():
    base, arith = open_donor("demo:base"), open_donor("demo:arith")
    weights = {"base": {}, "arith": {}}
    for name, donor in (("base", base), ("arith", arith)):
        for f in sorted(donor.path.glob("*.safetensors")):
            weights[name].update(load_file(f))
    return base, arith, weights


def per_tensor(weights, name) -> float:
    b, d = weights["base"][name].double(), weights["arith"][name].double()
    return float(torch.linalg.vector_norm(d - b) / torch.linalg.vector_norm(b))


def expected_cells(base, weights) -> dict:
    cells = {}
    for cell, names in component_tensors(base).items():
        sizes = [weights["base"][n].numel() for n in names]
        cells[cell] = sum(s * per_tensor(weights, n) for s, n in zip(sizes, names)) / sum(sizes)
    return cells


def test_every_cell_is_the_parameter_weighted_mean_of_its_tensors(demo, tmp_path):
    base, arith, weights = demo
    got = dict(distance_map(base, arith, DistanceCache(tmp_path)))
    want = expected_cells(base, weights)
    assert set(got) == set(want)
    for cell, value in want.items():
        assert got[cell] == pytest.approx(value, rel=1e-6), cell


def test_moved_attention_projections_show_next_to_unmoved_norms(demo, tmp_path):
    # The case that made one L2 over the whole part misleading: layer 1's q/k/v/o projections
    # moved 0.7-0.9, its attention norms hardly at all, and the cell read 0.21.
    base, arith, weights = demo
    names = component_tensors(base)[(1, "attention")]
    projections = [n for n in names if n.endswith("_proj.weight")]
    assert len(projections) == 4
    moved = [per_tensor(weights, n) for n in projections]
    assert min(moved) > 0.6
    cell = DistanceCache(tmp_path).group(base, arith, names)
    assert min(moved) * 0.9 < cell <= max(moved)


def test_cli_says_which_aggregate_it_prints(demo, run_cli):
    base, arith, weights = demo
    want = expected_cells(base, weights)
    r = run_cli("distance", "demo:base", "demo:arith")
    assert r.returncode == 0, r.stderr
    assert AGGREGATE in r.stdout.splitlines()[1]
    row = next(line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["1"])
    assert float(row[1]) == pytest.approx(want[(1, "attention")], abs=1e-4)
    r = run_cli("distance", "demo:base", "demo:arith", "--json")
    out = json.loads(r.stdout)
    assert out["aggregate"] == AGGREGATE
    cells = {(c["layer"], c["component"]): c["distance"] for c in out["cells"]}
    assert cells[(1, "attention")] == pytest.approx(want[(1, "attention")], rel=1e-6)


@sync
async def test_distance_map_screen_names_its_aggregate_and_shows_it(demo, tmp_path):
    from screens.distance_map import DistanceMapScreen, MapCells

    base, _, weights = demo
    want = expected_cells(base, weights)
    app = SurgeonApp(["demo:base", "demo:arith"], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, DistanceMapScreen)
        assert AGGREGATE in " ".join(screen_text(app).split())  # the title wraps at word boundaries
        table = screen.query_one("#distance-map")
        assert float(str(table.get_cell("1", "attention"))) == pytest.approx(want[(1, "attention")], abs=1e-2)
        screen.post_message(MapCells("B", {(1, "attention"): 0.25}, estimate=True))  # a large tensor's, at first
        await pilot.pause()
        assert str(table.get_cell("1", "attention")) == "≈0.2500"


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """Two OLMoE donors whose embeddings hold 1.28M values: several sampled pieces (PIECE) each."""
    from tiny_models import make_donor

    root = tmp_path_factory.mktemp("wide")
    return tuple(open_donor(make_donor(root / n, "olmoe", seed, vocab_size=40_000)) for seed, n in enumerate("ab"))


def test_an_estimate_reads_pieces_spread_over_the_whole_tensor(wide_vocab):
    from safetensors.numpy import load_file

    a, b = wide_vocab
    name = "model.embed_tokens.weight"
    ta, tb = (load_file(str(d.path / "model.safetensors"))[name].reshape(-1).astype("float64") for d in wide_vocab)
    spans = [(i, min(i + PIECE, ta.size)) for i in range(0, ta.size, PIECE * 8)]
    assert len(spans) == 3  # at 0, 0.52M and 1.05M of its 1.28M values
    diff, ref = squared_norms(a, b, name, every=8)
    assert diff == pytest.approx(sum(float(((tb[s:e] - ta[s:e]) ** 2).sum()) for s, e in spans), rel=1e-6)
    assert ref == pytest.approx(sum(float((ta[s:e] ** 2).sum()) for s, e in spans), rel=1e-6)
    assert squared_norms(a, b, name)[1] > 3 * ref  # a sample, not the whole tensor


def test_a_large_tensor_shows_an_estimate_first_then_its_exact_figure(wide_vocab, tmp_path):
    a, b = wide_vocab
    big, small = "model.embed_tokens.weight", "model.norm.weight"
    cache = DistanceCache(tmp_path)
    got = list(tensor_distances(a, {"B": b}, [big, small], cache, estimate_above=1 << 20))
    assert [(d.name, d.estimate) for d in got] == [(big, True), (small, False), (big, False)]
    estimate, exact = got[0].value, got[2].value
    assert estimate == relative(*squared_norms(a, b, big, every=SAMPLE_EVERY))
    assert exact == cache.tensor(a, b, big) and estimate != exact
    assert estimate == pytest.approx(exact, rel=0.1)  # random weights moved alike everywhere
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(saved) == {big, small} and relative(*saved[big]) == exact  # only exact figures are kept
    again = list(tensor_distances(a, {"B": b}, [big, small], DistanceCache(tmp_path), estimate_above=1 << 20))
    assert [(d.name, d.estimate, d.value) for d in again] == [(big, False, exact), (small, False, got[1].value)]


@sync
async def test_the_layer_screen_marks_an_estimate_until_the_exact_figure_comes(tmp_path):
    from screens.layer import Distances, LayerScreen

    app = SurgeonApp(["demo:base", "demo:arith"], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot)
        app.open_screen("layer", 1)
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, LayerScreen)
        table = screen.query_one("#tensors")
        name = "model.layers.1.self_attn.q_proj.weight"
        exact = float(str(table.get_cell(name, "d:B")))
        screen.post_message(Distances(1, {("B", name): (0.1234, True)}))
        await pilot.pause()
        assert str(table.get_cell(name, "d:B")) == "≈0.1234"
        screen.post_message(Distances(1, {("B", name): (exact, False)}))
        await pilot.pause()
        assert str(table.get_cell(name, "d:B")) == f"{exact:.4f}"


def test_the_map_estimates_cells_of_large_tensors_first(wide_vocab, tmp_path):
    a, b = wide_vocab
    cache = DistanceCache(tmp_path)
    estimates = dict(estimated_map(a, b, cache, estimate_above=1 << 20))
    assert set(estimates) == {(None, "embedding"), (None, "lm_head")}  # the only tensors over 1M values
    name = "model.embed_tokens.weight"
    assert estimates[(None, "embedding")] == relative(*squared_norms(a, b, name, every=SAMPLE_EVERY))
    exact = dict(distance_map(a, b, cache))
    assert exact[(None, "embedding")] == cache.tensor(a, b, name) != estimates[(None, "embedding")]
    assert dict(estimated_map(a, b, cache, estimate_above=1 << 20)) == {}  # computed: nothing left to estimate


def test_the_distance_command_estimates_only_when_asked_and_says_so(tmp_path, run_cli):
    from tiny_models import make_donor

    a, b = (make_donor(tmp_path / n, "olmoe", seed, vocab_size=140_000) for seed, n in enumerate("ab"))  # 4.48M values
    name = "model.embed_tokens.weight"
    estimated = json.loads(run_cli("distance", str(a), str(b), "--json", "--estimate").stdout)
    exact = json.loads(run_cli("distance", str(a), str(b), "--json").stdout)  # and now cached: no estimate after it
    assert exact["estimated"] is None and "1/16" in estimated["estimated"]
    cell = {(c["layer"], c["component"]): c["distance"] for c in estimated["cells"]}
    donors = open_donor(a), open_donor(b)
    assert cell[(None, "embedding")] == relative(*squared_norms(*donors, name, every=SAMPLE_EVERY))
    exact_cells = {(c["layer"], c["component"]): c["distance"] for c in exact["cells"]}
    assert exact_cells[(None, "embedding")] == pytest.approx(relative(*squared_norms(*donors, name)), rel=1e-12)
    again = run_cli("distance", str(a), str(b), "--estimate").stdout
    assert "estimates: each tensor of more than 4,194,304 values" in again
    assert f"{exact_cells[(None, 'embedding')]:.4f}" in again

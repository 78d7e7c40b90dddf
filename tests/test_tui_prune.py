"""Pruning and merging from the Routing screen, driven through the real app with Pilot, on the demo donors.

References are independent of the screen: demo:arith loaded by transformers itself and probed with
surgeon.features.routing.probe on the same corpora (REAP in the same pass), the kept experts chosen
from that by the engine's `choose`; the exported shards are compared with what `moe-surgeon prune`
writes for the same choice in a subprocess, and the session ctrl+s saves is replayed by the command
line to the same bytes. Merging's clusters are compared with `moe-surgeon merge-experts`'s record.
"""

import json

import numpy as np
import pytest
from conftest import subprocess_cli
from test_tui_helpers import screen_text, settle, sync
from textual.widgets import DataTable, Input, SelectionList
from transformers import AutoModelForCausalLM

from screens.app import DEMO_SPECS, SurgeonApp
from screens.dialogs import PathScreen
from screens.heatmap import RoutingScreen
from screens.prune import PruneScreen, next_saliency
from screens.widgets.heatmap import HeatmapGrid
from surgeon.core.plan import format_ranges
from surgeon.features.prune.choose import choose
from surgeon.features.prune.saliency import from_routing
from surgeon.features.routing.corpora import corpus_texts, parse_corpus
from surgeon.features.routing.probe import probe_routing
from surgeon.probes.scoring import load_tokenizer

SIZE = (100, 30)
CORPORA = ("arith", "reverse")
LAYERS = [0, 1, 2, 3]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def arith_stats():
    """demo:arith's routing with REAP on both corpora, batch 32 as the Routing screen measures it."""
    from surgeon.core.donor import resolve_path

    path = resolve_path("demo:arith")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    tokenizer = load_tokenizer(path)
    return {name: probe_routing(model, tokenizer, corpus_texts(parse_corpus(name)[1]), batch_size=32, reap=True)
            for name in CORPORA}


def expected_preview(kept: dict) -> list[tuple[str, str, str]]:
    return [(str(layer), format_ranges(kept[layer]), format_ranges([e for e in range(8) if e not in kept[layer]]))
            for layer in LAYERS]


def shards(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}


async def answer_path(pilot, path) -> None:
    await pilot.pause()
    assert isinstance(pilot.app.screen, PathScreen)
    pilot.app.screen.query_one(Input).value = str(path)
    await pilot.press("enter")
    await settle(pilot)


def test_saliency_layers_cycle():
    assert [next_saliency(m) for m in ("frequency", "gate", "reap", "top1")] == ["gate", "reap", "frequency",
                                                                                 "frequency"]


@sync
async def test_prune_from_routing_previews_tries_exports_and_saves_a_replayable_session(arith_stats, tmp_path):
    app = SurgeonApp(DEMO_SPECS, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        # Only em:arith checked on the Probes screen: the prune screen tries what is checked there.
        await pilot.press("p")
        await settle(pilot)
        probes = app.screen
        picker = probes.query_one("#probe-list", SelectionList)
        picker.deselect_all()
        picker.select(next(i for i, s in enumerate(probes.specs) if s.label == "em:arith"))
        await pilot.press("escape")
        await pilot.press("R")
        await settle(pilot)
        routing = app.screen
        assert isinstance(routing, RoutingScreen) and routing.model == "B"

        # S: frequency -> mean gate weight -> REAP -> frequency, the title saying which.
        grid = routing.query_one(HeatmapGrid)
        for values, title in ((arith_stats["arith"].mean_weight, "mean gate weight of B (demo:arith) on arith"),
                              (arith_stats["arith"].reap, "REAP score of B (demo:arith) on arith"),
                              (arith_stats["arith"].frequency, "activation frequency of B (demo:arith) on arith")):
            await pilot.press("S")
            await pilot.pause()
            np.testing.assert_allclose(grid.view.values, values, rtol=0, atol=1e-12)
            assert title in screen_text(app)

        # p: the preview keeps what `choose` keeps for the same saliency, pooled over the corpora.
        await pilot.press("p")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, PruneScreen)
        saliency = from_routing(arith_stats)
        assert screen.preview() == expected_preview(choose(LAYERS, 8, 4, scores=saliency.reap))
        assert "Prune B (demo:arith) to 4 of 8 experts per MoE layer" in screen_text(app)
        await pilot.press("b")  # frequency
        await pilot.pause()
        assert screen.preview() == expected_preview(choose(LAYERS, 8, 4, scores=saliency.frequency))
        await pilot.press("b", "b", "b")  # gate, random, back to REAP
        await pilot.press("n")
        field = screen.query_one("#prune-n", Input)
        field.value = "x"
        await pilot.press("enter")
        await pilot.pause()
        assert "expected a whole number" in str(screen.query_one("#prune-error").render())
        field.value = "3"
        await pilot.press("enter")
        await pilot.pause()
        kept = choose(LAYERS, 8, 3, scores=saliency.reap)
        assert screen.preview() == expected_preview(kept)

        # r: the smaller model against the original on the checked probe, per item.
        await pilot.press("r")
        await settle(pilot)
        table = screen.query_one("#prune-results", DataTable)
        assert table.row_count == 1 and [r["probe"] for r in screen.comparison] == ["em:arith"]
        row = screen.comparison[0]
        assert row["original"] == 1.0 and row["n"] == 200  # demo:arith solves every sum
        assert row["lost"] == round(200 * (1 - row["score"])) and row["gained"] == 0
        assert row["delta"] == pytest.approx(row["score"] - 1.0) and 0 <= row["mcnemar_p"] <= 1

        # e exports; ctrl+s here saves the pruning as a session.
        await pilot.press("e")
        await answer_path(pilot, tmp_path / "pruned")
        assert screen.exported is not None
        await pilot.press("ctrl+s")
        await answer_path(pilot, tmp_path / "prune-session.json")

    out = tmp_path / "pruned"
    record = json.loads((out / "moe-surgeon-prune.json").read_text())
    assert record["kept"] == {str(layer): list(kept[layer]) for layer in LAYERS}
    assert record["command"] == ("moe-surgeon prune OUT --base demo:arith --keep 3 --by reap --corpus arith "
                                 "--corpus reverse --batch-size 32")
    by_command = tmp_path / "by-command"
    done = subprocess_cli(*record["command"].replace("OUT", str(by_command)).split()[1:])
    assert done.returncode == 0, done.stderr
    assert shards(out) == shards(by_command) and "model.safetensors" in shards(out)
    assert json.loads((by_command / "moe-surgeon-prune.json").read_text())["kept"] == record["kept"]

    session = json.loads((tmp_path / "prune-session.json").read_text())
    assert session["extensions"]["prune"]["kept"] == record["kept"]
    assert {r["model"] for r in session["extensions"]["prune_probes"]["records"]} == {"pruned", "donor:A"}
    assert session["extensions"]["prune_probes"]["comparison"] == [row]
    again = tmp_path / "replayed"
    done = subprocess_cli("replay", tmp_path / "prune-session.json", "--export", again)
    assert done.returncode == 0, done.stderr
    assert shards(again) == shards(out)


async def check_only(pilot, label: str) -> None:
    """Only `label` checked on the Probes screen: the prune screen tries what is checked there."""
    await pilot.press("p")
    await settle(pilot)
    probes = pilot.app.screen
    picker = probes.query_one("#probe-list", SelectionList)
    picker.deselect_all()
    picker.select(next(i for i, s in enumerate(probes.specs) if s.label == label))
    await pilot.press("escape")


@sync
async def test_merge_from_routing_previews_tries_exports_and_records_what_it_cost(tmp_path):
    """o switches the dialog to merging: the preview is merge-experts' clusters, r probes the merged model
    beside the original, e writes what `moe-surgeon merge-experts` writes, and ctrl+s saves a session that
    replays to the same bytes and records the probe results of the trial (per item, McNemar)."""
    from surgeon.probes.stats import compare

    app = SurgeonApp(DEMO_SPECS, None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await check_only(pilot, "em:arith")
        await pilot.press("R")
        await settle(pilot)
        routing = app.screen
        await pilot.press("m", "m")  # C, then the hybrid: no files of its own to prune
        assert routing.model == "hybrid"
        await pilot.press("p")
        await pilot.pause()
        assert app.screen is routing and "Cannot prune the hybrid" in [n.title for n in app._notifications]
        await pilot.press("m", "m")  # A, B
        await pilot.press("p")
        await settle(pilot)
        screen = app.screen
        await pilot.press("o")  # merge: one measuring pass, then the clusters
        await settle(pilot)
        preview = screen.preview()
        assert "Merge B (demo:arith) to 4 of 8" in screen_text(app)

        await pilot.press("r")
        await settle(pilot)
        assert [r["probe"] for r in screen.comparison] == ["em:arith"]
        row = screen.comparison[0]
        assert row["original"] == 1.0 and row["n"] == 200 and row["gained"] == 0
        assert row["lost"] == round(200 * (1 - row["score"])) and 0 <= row["mcnemar_p"] <= 1
        assert screen.query_one("#prune-results", DataTable).row_count == 1

        await pilot.press("e")
        await answer_path(pilot, tmp_path / "merged-here")
        assert screen.exported is not None
        await pilot.press("ctrl+s")
        await answer_path(pilot, tmp_path / "merge-session.json")
        assert "with the probe results of the trial" in str(screen.query_one("#prune-status").render())

    out = tmp_path / "merged"
    done = subprocess_cli("merge-experts", out, "--base", "demo:arith", "--into", "4", "--by", "frequency",
                          "--corpus", "arith", "--corpus", "reverse", "--batch-size", "32")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "moe-surgeon-merge.json").read_text())
    clusters = record["clusters"]
    expected = []
    for layer in LAYERS:
        cs = clusters[str(layer)]
        expected.append((str(layer), " ".join(f"{i}={'+'.join(map(str, c))}" for i, c in enumerate(cs) if len(c) > 1)
                         or "-", format_ranges([c[0] for c in cs if len(c) == 1]) or "-"))
    assert preview == expected
    here = tmp_path / "merged-here"
    assert json.loads((here / "moe-surgeon-merge.json").read_text())["command"] == record["command"]
    assert shards(here) == shards(out) and "model.safetensors" in shards(out)

    session = json.loads((tmp_path / "merge-session.json").read_text())
    ext = session["extensions"]["prune"]
    assert ext["operation"] == "merge" and ext["clusters"] == clusters and ext["weights"] == record["weights"]
    assert [c["name"] for c in ext["corpora"]] == list(CORPORA) and ext["criterion"] == "frequency"
    # the trial's probe results: the merged model and the original (donor A), per item, and the comparison;
    # not among the session's own results, which would read as its plan's (the original's)
    trial = session["extensions"]["prune_probes"]
    results = {r["model"]: r for r in trial["records"]}
    assert set(results) == {"merged", "donor:A"} and [p["data"] for p in trial["probes"]] == ["arith"]
    assert session["results"] == [] and trial["model"] == "merged" and trial["against"] == "donor:A"
    mine, original = results["merged"], results["donor:A"]
    assert mine["ids"] == original["ids"] and mine["score"] == row["score"] and original["score"] == 1.0
    c = compare(mine["outcomes"], original["outcomes"])
    assert trial["comparison"] == [row]
    assert (c["b01"], c["b10"], c["mcnemar_p"]) == (row["lost"], row["gained"], row["mcnemar_p"])
    again = tmp_path / "replayed"
    done = subprocess_cli("replay", tmp_path / "merge-session.json", "--export", again)
    assert done.returncode == 0, done.stderr
    assert shards(again) == shards(out)

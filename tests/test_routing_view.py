"""Routing views and their writers (CSV, JSON, SVG, PNG), checked against real probes of tiny donors;
and `moe-surgeon routing` --save/--diff and --drift on a saved session, against the engine."""

import csv
import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from surgeon.errors import SurgeonError
from surgeon.features.routing.probe import probe_routing, routing_drift
from surgeon.features.routing.view import (
    DIVERGING,
    SEQUENTIAL,
    difference_view,
    layout_for,
    palette_rgb,
    save_view,
    stats_view,
    view_lines,
)
from surgeon.probes.scoring import load_tokenizer

SUMS = ["12+7=19", "3+4=7", "88+12=100", "5+5=10", "40+2=42"]
REVS = ["rev:abc=cba", "rev:dog=god", "rev:hello=olleh", "rev:xy=yx"]
SVG = "{http://www.w3.org/2000/svg}"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for the CLI subprocesses, as the one_torch_thread fixture


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def probed(donors_of):
    """Routing of two tiny OLMoE donors on two corpora, as the CLI's default batch size reads them."""
    paths = donors_of("olmoe", 2)
    tok = load_tokenizer(paths[0])
    out = {}
    for i, p in enumerate(paths):
        model = load(p)
        out[i] = {name: probe_routing(model, tok, texts, batch_size=32) for name, texts in (("sums", SUMS), ("rev", REVS))}
    return paths, out


def rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def expected_colour(v, lo, hi, palette):
    """Linear interpolation between the palette's evenly spaced anchors, written out here."""
    t = min(max((v - lo) / (hi - lo), 0.0), 1.0) * (len(palette) - 1)
    i = min(int(t), len(palette) - 2)
    a, b = rgb(palette[i]), rgb(palette[i + 1])
    return tuple(int(round(x + (y - x) * (t - i))) for x, y in zip(a, b))


def near(a, b, tol=2):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_csv_and_json_round_trip_the_probed_numbers_exactly(probed, tmp_path):
    _, stats = probed
    a = stats[0]["sums"]
    view = stats_view(a, "frequency", "donor0", "sums")
    save_view(view, tmp_path / "v.csv")
    save_view(view, tmp_path / "v.json")
    rows = list(csv.reader(io.StringIO((tmp_path / "v.csv").read_text())))
    assert rows[0] == ["layer"] + [f"e{e}" for e in range(a.num_experts)]
    assert [int(r[0]) for r in rows[1:]] == a.layers
    np.testing.assert_array_equal(np.array([[float(x) for x in r[1:]] for r in rows[1:]]), a.frequency)
    data = json.loads((tmp_path / "v.json").read_text())
    np.testing.assert_array_equal(np.array(data["values"]), a.frequency)
    assert (data["metric"], data["difference"], data["a"], data["b"]) == \
           ("frequency", False, {"model": "donor0", "domain": "sums", "tokens": a.tokens}, None)
    assert data["layers"] == a.layers and data["experts"] == list(range(a.num_experts))
    assert data["scale"] == [0.0, float(a.frequency.max())]
    # Other metrics and a difference: the values are the engine's, minus the other side's.
    top1 = json.loads((save_view(stats_view(a, "top1", "donor0", "sums"), tmp_path / "t.json"), tmp_path / "t.json")[1]
                      .read_text())
    np.testing.assert_array_equal(np.array(top1["values"]), a.top1)
    diff = difference_view(a, stats[1]["sums"], "mean_prob", ("donor0", "sums"), ("donor1", "sums"))
    save_view(diff, tmp_path / "d.json")
    data = json.loads((tmp_path / "d.json").read_text())
    np.testing.assert_array_equal(np.array(data["values"]), a.mean_prob - stats[1]["sums"].mean_prob)
    top = float(np.abs(data["values"]).max())
    assert data["difference"] and data["scale"] == [-top, top]
    assert data["title"] == "mean router probability on sums: donor0 minus donor1"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary behind


def test_svg_has_one_rect_per_cell_in_the_palette_with_labels_and_a_colour_bar(probed, tmp_path):
    _, stats = probed
    a = stats[0]["rev"]
    for view in (stats_view(a, "frequency", "donor0", "rev"),
                 difference_view(a, stats[0]["sums"], "frequency", ("donor0", "rev"), ("donor0", "sums"))):
        save_view(view, tmp_path / "v.svg")
        root = ET.parse(tmp_path / "v.svg").getroot()
        cells = root.find(f"{SVG}g[@id='cells']").findall(f"{SVG}rect")
        L, E = view.values.shape
        assert len(cells) == L * E
        got = np.array([rgb(c.get("fill")) for c in cells]).reshape(L, E, 3)
        palette = DIVERGING if view.is_difference else SEQUENTIAL
        lo, hi = view.colour_range()
        # Sequential from 0 to the largest value; a difference is symmetric about 0 (white).
        top = float(np.abs(view.values).max())
        assert (lo, hi) == ((-top, top) if view.is_difference else (0.0, float(view.values.max())))
        assert tuple(got[np.unravel_index(view.values.argmax(), (L, E))]) == rgb(palette[-1])
        for (r, c), v in np.ndenumerate(view.values):
            assert near(tuple(got[r, c]), expected_colour(v, lo, hi, palette)), (r, c, v)
        tips = [float(c.find(f"{SVG}title").text.rsplit(": ", 1)[1]) for c in cells]
        np.testing.assert_allclose(tips, view.values.flatten(), rtol=1e-5, atol=1e-9)
        texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
        assert texts[0] == view.title and "MoE layer" in texts and "expert" in texts
        assert [str(layer) for layer in view.layers] == texts[texts.index(view.title) + 1 + L * E:][:L]
        stops = root.find(f"{SVG}g[@id='colour-bar']").iter(f"{SVG}stop")
        assert [s.get("stop-color") for s in stops] == palette
    # Differences read as signed numbers in the cells; plain views do not.
    assert any(t.startswith(("+", "-")) for t in texts if t[1:2].isdigit())


def test_png_opens_with_pillow_at_the_layout_size_with_cell_colours(probed, tmp_path):
    from PIL import Image

    _, stats = probed
    view = difference_view(stats[0]["sums"], stats[0]["rev"], "frequency", ("donor0", "sums"), ("donor0", "rev"))
    save_view(view, tmp_path / "v.png")
    img = Image.open(tmp_path / "v.png")
    lay = layout_for(view)
    assert img.format == "PNG" and img.size == (2 * lay.width, 2 * lay.height)
    img = img.convert("RGB")
    colours = view.colours()
    for r in range(lay.rows):
        for c in range(lay.cols):
            x, y, w, h = lay.cell_box(r, c)
            assert img.getpixel((2 * x + 3, 2 * y + 3)) == tuple(int(v) for v in colours[r, c])  # a corner: no text
    assert img.getpixel((2, 2)) == (255, 255, 255)
    # The colour bar runs from the palette's low end (bottom) to its high end (top).
    assert near(img.getpixel((2 * lay.bar_x + 8, 2 * lay.top + 1)), rgb(DIVERGING[-1]), 12)
    assert near(img.getpixel((2 * lay.bar_x + 8, 2 * lay.grid_bottom - 2)), rgb(DIVERGING[0]), 12)
    assert near(palette_rgb(0.0, -1, 1, diverging=True), rgb("#f7f7f7"), 0)  # zero is white-ish


def test_save_view_refuses_unknown_formats_and_unwritable_paths(probed, tmp_path):
    _, stats = probed
    view = stats_view(stats[0]["sums"], "frequency", "d", "sums")
    with pytest.raises(SurgeonError, match=r"v\.txt: unknown view format '\.txt'"):
        save_view(view, tmp_path / "v.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SurgeonError, match="cannot write"):
        save_view(view, tmp_path / "file" / "v.svg")
    with pytest.raises(SurgeonError, match="importance"):
        stats_view(stats[0]["sums"], "importance", "d", "sums")
    assert view_lines(view)[0].split() == ["layer"] + [f"e{e}" for e in range(4)]


def test_cli_saves_the_domain_and_model_difference_views(run_cli, probed, tmp_path):
    paths, stats = probed
    (tmp_path / "sums.txt").write_text("\n\n".join(SUMS) + "\n")
    (tmp_path / "rev.txt").write_text("\n\n".join(REVS) + "\n")
    corpora = ["--corpus", f"sums={tmp_path / 'sums.txt'}", "--corpus", f"rev={tmp_path / 'rev.txt'}"]
    out = tmp_path / "figs"
    r = run_cli("routing", paths[0], *corpora, "--diff", "sums", "rev", "--save", out / "d.svg", "--save", out / "d.csv",
            "--save", out / "d.png", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert f"saved {out / 'd.svg'} (svg)" in r.stdout and f"saved {out / 'd.png'} (png)" in r.stdout
    assert "sums - rev (frequency" in r.stdout  # the text heatmap of the same difference
    rows = list(csv.reader(io.StringIO((out / "d.csv").read_text())))
    np.testing.assert_allclose(np.array([[float(x) for x in row[1:]] for row in rows[1:]]),
                               stats[0]["sums"].frequency - stats[0]["rev"].frequency, atol=1e-12)
    title = ET.parse(out / "d.svg").getroot().find(f"{SVG}title").text
    assert title == f"activation frequency of {paths[0]}: sums minus rev"
    # Two models on one corpus: the target minus an --against donor, top-1 share, as JSON.
    r = run_cli("routing", paths[0], *corpora, "--against", paths[1], "--diff", "target", paths[1], "--view", "rev",
            "--metric", "top1", "--save", out / "m.json", "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["saved"] == [{"path": str(out / "m.json"), "format": "json"}]
    data = json.loads((out / "m.json").read_text())
    assert data["title"] == f"top-1 share on rev: {paths[0]} minus {paths[1]}"
    np.testing.assert_allclose(data["values"], stats[0]["rev"].top1 - stats[1]["rev"].top1, atol=1e-12)
    # Bad view arguments are refused before any model loads, in one line.
    for args, says in ((["--diff", "sums", "nope"], "--diff sums nope: expected two corpora"),
                       (["--save", out / "x.bmp"], "unknown format '.bmp'"),
                       (["--view", "nope", "--save", out / "x.svg"], "--view 'nope': no such corpus")):
        r = run_cli("routing", paths[0], *corpora, *args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_drift_on_a_saved_session_equals_the_engine(run_cli, tmp_path):
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan
    from surgeon.core.session import (
        load_session,
        make_session,
        open_session_donors,
        save_session,
    )
    from surgeon.features.routing.corpora import corpus_texts, parse_corpus
    from surgeon.live.hybrid import Hybrid

    donors = {"A": open_donor("demo:arith"), "B": open_donor("demo:reverse")}
    path = tmp_path / "s.json"
    save_session(make_session(Plan("A", [Assignment("experts", "B", (0, 1))]), donors, path), path)
    r = run_cli("routing", path, "--drift", "--corpus", "arith", "--max-tokens", "300", "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    drift = json.loads(r.stdout)["drift"]
    assert [(d["against"], d["corpus"]) for d in drift] == [(str(donors[n].path), "arith") for n in "AB"]
    # The engine, independently: the session's hybrid and each donor read the same 300 tokens.
    session = load_session(path)
    opened = open_session_donors(session, path)
    texts = corpus_texts(parse_corpus("arith")[1])
    tok = load_tokenizer(opened["A"].path)
    kw = dict(batch_size=32, max_tokens=300, keep_probs=True)
    hybrid = probe_routing(Hybrid.materialize(session.plan, opened, device="cpu").model, tok, texts, **kw)
    for d, name in zip(drift, "AB"):
        donor = AutoModelForCausalLM.from_pretrained(opened[name].path, dtype="auto").eval()  # bf16, as stored
        ref = routing_drift(hybrid, probe_routing(donor, tok, texts, **kw))
        assert d["layers"] == ref["layers"] == [0, 1, 2, 3]
        np.testing.assert_allclose(d["token_jsd"], ref["token_jsd"], atol=2e-6)
        np.testing.assert_allclose(d["usage_jsd"], ref["usage_jsd"], atol=2e-6)
    # The hybrid has A's attention and routers, B's experts in layers 0-1: layer 0's router reads
    # what A's reads, so it routes exactly as A does; the swapped experts move every later layer.
    against_a = drift[0]
    assert against_a["token_jsd"][0] == 0 and against_a["usage_jsd"][0] == 0
    assert all(v > 1e-3 for v in against_a["token_jsd"][1:])
    assert all(v > 1e-3 for v in drift[1]["token_jsd"])

"""Expert pruning (`moe-surgeon prune`): saliency from one forward pass, and a smaller MoE that plain
transformers loads and that computes what the original computes with the pruned experts unreachable.

The oracle of a pruned model is the original model whose router can no longer choose the pruned
experts: their router logits set to -inf before the router's softmax and top-k (OLMoE, Mixtral,
Qwen-MoE: softmax over the logits, top-k, optional renormalisation, so a softmax over all logits with
the pruned ones at -inf equals a softmax over the kept ones, with or without norm_topk_prob);
for routers that choose by logits plus a bias (gpt-oss's router bias, DeepSeek-V3's
e_score_correction_bias, whose sigmoid weights are taken from the chosen experts only) the bias of
the pruned experts is -inf, which removes them from the choice and from nothing else.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_conformance import ROUTING_UNREADABLE
from tiny_models import (
    CONFORMANCE,
    EXPERTS_PREFIX,
    conformance_donor,
    make_donor,
    mtp_donor,
    pruned_experts_unreachable,
    routers,
    save_char_tokenizer,
    text_moe_types,
)

from surgeon.core.architectures import ARCHITECTURES, UNSUPPORTED
from surgeon.features.prune.run import PRUNE_FILE, PruneRequest, run_prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = "12+34=46\n\n7+8=15\n\nrev abc = cba\n\n55+45=100\n\nrev hello = olleh\n\n3+4=7\n\n19+23=42\n"


def _model(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (3, 12), generator=g)


def _record(out) -> dict:
    return json.loads((out / PRUNE_FILE).read_text())


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _check_bytes_and_logits(donor, out, record, experts_prefix="mlp.experts", router="mlp.gate"):
    """Kept experts and router rows are the original's bytes, renumbered; the model loads and computes
    what the oracle computes."""
    before = load_file(donor / "model.safetensors")
    after = load_file(out / "model.safetensors")
    for layer, kept in record["kept"].items():
        for new, old in enumerate(kept):
            prefix = f"model.layers.{layer}.{experts_prefix}."
            mine = {k[len(prefix + str(new)) + 1:]: v for k, v in after.items() if k.startswith(f"{prefix}{new}.")}
            theirs = {k[len(prefix + str(old)) + 1:]: v for k, v in before.items() if k.startswith(f"{prefix}{old}.")}
            assert mine and mine.keys() == theirs.keys()
            assert all(_bits(mine[k]) == _bits(theirs[k]) for k in mine), (layer, old, new)
        assert not any(k.startswith(f"model.layers.{layer}.{experts_prefix}.{len(kept)}.") for k in after)
        for name, t in before.items():
            if name.startswith(f"model.layers.{layer}.{router}."):
                assert _bits(after[name]) == _bits(t[torch.tensor(kept)]), name
    _check_oracle(donor, out, record)


def _check_oracle(donor, out, record, tokenizer=None, routing=True):
    """Every token takes the same experts (original indices) in the pruned model as in the oracle, and the
    logits agree to float rounding: the router's matmul over fewer rows may round a logit differently
    in the last bit, and DeepSeek-V3 takes its top-k unsorted, so a token's expert outputs may be summed
    in another order. A wrong expert or router row shows as a difference of 1e-2, not 1e-7."""
    from transformers import AutoTokenizer

    from surgeon.features.routing.probe import probe_routing

    original, pruned = _model(donor), _model(out)
    tok = AutoTokenizer.from_pretrained(tokenizer or donor)
    texts = CORPUS.split("\n\n")
    ids = _ids(original.config.vocab_size)
    with pruned_experts_unreachable(original, {int(k): v for k, v in record["pruned"].items()}):
        expected = _logits(original, ids)
        want = probe_routing(original, tok, texts, batch_size=4).selected if routing else None
    torch.testing.assert_close(_logits(pruned, ids), expected, rtol=1e-5, atol=1e-6)
    if not routing:
        return
    got = probe_routing(pruned, tok, texts, batch_size=4).selected
    # [MoE layers, experts after]: new index -> original; -1 for a global pruning's padding experts
    size = max(map(len, record["kept"].values()))
    kept = np.array([list(k) + [-1] * (size - len(k)) for k in record["kept"].values()])
    mapped = kept[np.arange(len(kept))[None, :, None], got.astype(np.int64)]
    assert (mapped >= 0).all()  # no token is routed to a padding expert
    assert np.array_equal(np.sort(mapped, -1), np.sort(want, -1))


# ---------------------------------------------------------------- saliency
@pytest.fixture(scope="module")
def olmoe_donor(tmp_path_factory):
    """A tiny OLMoE (8 experts, top-2, norm_topk_prob off: applied weights are router probabilities)."""
    root = tmp_path_factory.mktemp("prune-olmoe")
    return save_char_tokenizer(make_donor(root / "d", "olmoe", seed=3, num_experts=8, norm_topk_prob=False))


def _saliency(model, tokenizer, **kw):
    from surgeon.features.prune.saliency import collect_saliency

    return collect_saliency(model, tokenizer, {"c": [t for t in CORPUS.split("\n\n")]}, batch_size=3, **kw)


def test_reap_from_the_forward_pass_equals_recomputing_every_expert(olmoe_donor):
    """REAP's norms are read from the experts' own forward; the routing probe's importance recomputes
    each expert on its tokens. With norm_topk_prob off the applied weight is the router probability,
    so the two must agree; and the pass computes the model's own logits."""
    from transformers import AutoTokenizer

    from surgeon.features.routing.probe import probe_routing

    model, tok = _model(olmoe_donor), AutoTokenizer.from_pretrained(olmoe_donor)
    texts = CORPUS.split("\n\n")
    stats = probe_routing(model, tok, texts, batch_size=3, reap=True, importance=True)
    assert stats.reap is not None and (stats.reap > 0).any()
    np.testing.assert_allclose(stats.reap, stats.importance, rtol=1e-5, atol=1e-7)
    s = _saliency(model, tok)
    np.testing.assert_allclose(s.frequency, stats.frequency)
    np.testing.assert_allclose(s.gate, stats.mean_weight)
    np.testing.assert_allclose(s.frequency.sum(1), s.top_k)  # every token takes top-k experts

    from surgeon.features.routing.probe import _Recorder, moe_layers

    ids = _ids(model.config.vocab_size)
    plain = _logits(model, ids)
    rec = _Recorder(moe_layers(model), "cpu", importance=False, keep_probs=False, reap=True)
    try:
        assert torch.equal(_logits(model, ids), plain)
        assert rec.reap_sum.sum() > 0
    finally:
        rec.close()
    assert "forward" not in vars(model.model.layers[0].mlp.experts)  # the experts' own forward is back


def test_an_expert_no_token_routes_to_scores_zero(olmoe_donor):
    from transformers import AutoTokenizer

    model, tok = _model(olmoe_donor), AutoTokenizer.from_pretrained(olmoe_donor)
    layers = sorted(routers(model))
    with pruned_experts_unreachable(model, {layer: [5] for layer in layers}):
        s = _saliency(model, tok)
    assert (s.frequency[:, 5] == 0).all() and (s.reap[:, 5] == 0).all() and (s.gate[:, 5] == 0).all()
    assert (np.delete(s.reap, 5, axis=1).sum(1) > 0).all()


# ---------------------------------------------------------------- the pruned checkpoint
def test_prune_command_writes_a_smaller_moe_with_the_originals_bytes_and_the_oracles_logits(olmoe_donor, tmp_path,
                                                                                         cli):
    corpus = tmp_path / "calib.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "pruned"
    r = cli("prune", out, "--base", olmoe_donor, "--ratio", "0.5", "--by", "reap", "--corpus", f"calib={corpus}",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "keep 4 per layer by reap" in r.stdout and "calib (" in r.stdout
    record = _record(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert record["criterion"] == "reap" and record["corpora"][0]["name"] == "calib"
    assert all(len(k) == 4 for k in record["kept"].values())
    # what was chosen is what the saliency says: the kept experts have the highest REAP scores
    reap = np.array(record["saliency"]["reap"])
    for i, kept in enumerate(record["kept"].values()):
        assert set(kept) == set(np.argsort(-reap[i], kind="stable")[:4].tolist())
    _check_bytes_and_logits(olmoe_donor, out, record)
    card = (out / "README.md").read_text()
    assert "REAP" in card and "calib" in card and "| 0 | " in card
    # the manifest says which rows of which original tensor each sliced one is, and verify checks them
    assert cli("verify", out, "--donors").returncode == 0
    # the same command on the same inputs writes the same weights
    again = tmp_path / "again"
    r = cli("prune", again, "--base", olmoe_donor, "--ratio", "0.5", "--by", "reap", "--corpus", f"calib={corpus}",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert _record(again)["kept"] == record["kept"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_every_described_expert_layout_prunes_to_the_oracle(donors_of, model_type, tmp_path):
    donor = donors_of(model_type, 1)[0]
    out = tmp_path / "out"
    run_prune(PruneRequest(out=str(out), base=str(donor), keep=3, by="frequency", corpora=(f"c={_corpus(tmp_path)}",),
                           device="cpu"))
    record = _record(out)
    config = json.loads((out / "config.json").read_text())
    assert record["experts_keys"] and all(config[k] == 3 for k in record["experts_keys"])
    block = EXPERTS_PREFIX.get(model_type, "mlp.experts").rpartition(".")[0]
    _check_bytes_and_logits(donor, out, record, EXPERTS_PREFIX.get(model_type, "mlp.experts"), f"{block}.gate")


def _corpus(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS)
    return path


@pytest.mark.parametrize("model_type,router", [("gpt_oss", "mlp.router"), ("llama4_text", "feed_forward.router")])
def test_fused_expert_tensors_are_sliced_along_the_expert_axis(tmp_path, model_type, router):
    donor = save_char_tokenizer(conformance_donor(tmp_path / "d", model_type, 0))
    out = tmp_path / "out"
    result = run_prune(PruneRequest(out=str(out), base=str(donor), keep=2, by="reap",
                                    corpora=(f"c={_corpus(tmp_path)}",), device="cpu"))
    assert result.saliency.reap is not None
    record = _record(out)
    before, after = load_file(donor / "model.safetensors"), load_file(out / "model.safetensors")
    fused = [n for n in before if ".experts." in n and n.split(".experts.")[1].split(".")[0].isalpha()
             or n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused
    for name in fused:
        layer = name.split(".")[2]
        kept = torch.tensor(record["kept"][layer])
        assert after[name].shape[0] == 2 and _bits(after[name]) == _bits(before[name][kept]), name
    for name, t in before.items():
        if f".{router}." in name:
            kept = torch.tensor(record["kept"][name.split(".")[2]])
            assert _bits(after[name]) == _bits(t[kept]), name
    _check_oracle(donor, out, record)


def test_random_is_seeded_and_needs_no_corpus(olmoe_donor, tmp_path):
    kept = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        kept.append(run_prune(PruneRequest(out=str(tmp_path / name), base=str(olmoe_donor), keep=4, by="random",
                                           seed=seed)).kept)
    assert kept[0] == kept[1] and kept[0] != kept[2]
    assert _record(tmp_path / "a")["saliency"] is None


# ---------------------------------------------------------------- refused with one line
def test_top_k_above_what_remains_is_refused(olmoe_donor, tmp_path, run_cli):
    r = run_cli("prune", tmp_path / "out", "--base", olmoe_donor, "--keep", "1", "--by", "random")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "num_experts_per_tok is 2" in r.stderr and "1 a pruning" in r.stderr
    assert not (tmp_path / "out").exists()


def test_models_pruning_cannot_describe_are_refused(tmp_path, run_cli):
    mtp = mtp_donor(tmp_path / "mtp", 0)
    r = run_cli("prune", tmp_path / "out", "--base", mtp, "--keep", "3", "--by", "random")
    assert r.returncode == 2 and "multi-token-prediction" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("prune", tmp_path / "out", "--base", mtp, "--keep", "9", "--by", "random")
    assert r.returncode == 2
    dense = make_donor(tmp_path / "dense", "llama", seed=0)
    r = run_cli("prune", tmp_path / "out", "--base", dense, "--ratio", "0.5", "--by", "random")
    assert r.returncode == 2 and "no routed experts" in r.stderr
    assert not (tmp_path / "out").exists()


def test_docs_show_what_prune_prints_on_the_demo_donor(tmp_path, run_cli):
    from test_examples import docs_run, shows_up_to_rounding

    shown = docs_run("prune.md", "moe-surgeon prune /tmp/pr --base demo:arith --ratio 0.5 --by reap --corpus arith")
    r = run_cli("prune", tmp_path / "pr", "--base", "demo:arith", "--ratio", "0.5", "--by", "reap", "--corpus",
                "arith", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = r.stdout.replace(str(tmp_path / "pr"), "/tmp/pr").splitlines()
    assert shows_up_to_rounding(got, shown), "\n".join(got)


# ---------------------------------------------------------------- sessions, and a pruned model among the rest
def test_replay_of_a_prune_session_rebuilds_the_same_bytes_from_the_recorded_choice(olmoe_donor, tmp_path, cli):
    """The rebuild reads no corpus and measures nothing: the calibration file is gone when it runs."""
    corpus = _corpus(tmp_path)
    out, session = tmp_path / "pruned", tmp_path / "prune.json"
    r = cli("prune", out, "--base", olmoe_donor, "--ratio", "0.5", "--by", "reap", "--corpus", f"calib={corpus}",
            "--device", "cpu", "--save-session", session)
    assert r.returncode == 0, r.stderr
    assert "saved session" in r.stdout
    data = json.loads(session.read_text())
    ext = data["extensions"]["prune"]
    assert ext["operation"] == "prune" and ext["kept"] == _record(out)["kept"] and ext["saliency"]["reap"]
    assert ext["corpora"][0]["sha256"] and data["exports"][0]["kind"] == "prune"
    corpus.unlink()
    r = cli("replay", session, "--export", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "config.json").read_bytes() == (out / "config.json").read_bytes()
    # a prune session's plan is the original: commands on a plan refuse it, and mergekit cannot prune
    r = cli("recipe", "export", session, "-o", tmp_path / "r.yaml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mergekit has no expert pruning" in r.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_a_hand_edited_prune_session_is_refused_naming_the_field(olmoe_donor, tmp_path, run_cli):
    session = tmp_path / "s.json"
    run_prune(PruneRequest(out=str(tmp_path / "p"), base=str(olmoe_donor), keep=4, by="random",
                           save_session=str(session)))
    data = json.loads(session.read_text())
    data["extensions"]["prune"]["kept"]["1"] = [0, 1, 2, 9]
    session.write_text(json.dumps(data))
    r = run_cli("replay", session, "--export", tmp_path / "again")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "field extensions/prune/kept/1" in r.stderr
    r = run_cli("probe", session)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "prune or merge-experts session" in r.stderr
    assert not (tmp_path / "again").exists()


def test_a_pruned_model_is_a_donor_like_any_other(olmoe_donor, tmp_path, run_cli):
    """Two prunings of one model to the same expert count: experts of one transfer into the other."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_prune(PruneRequest(out=str(a), base=str(olmoe_donor), keep=4, by="random", seed=1))
    run_prune(PruneRequest(out=str(b), base=str(olmoe_donor), keep=4, by="random", seed=2))
    r = run_cli("inspect", a)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hybrid"
    r = run_cli("export", out, "--base", a, "--take", f"expert:1@1={b}")
    assert r.returncode == 0, r.stderr
    mine, theirs, base = (load_file(p / "model.safetensors") for p in (out, b, a))
    moved = [n for n in mine if n.startswith("model.layers.1.mlp.experts.1.")]
    assert moved and all(_bits(mine[n]) == _bits(theirs[n]) for n in moved)
    assert all(_bits(t) == _bits(base[n]) for n, t in mine.items() if n not in moved)
    assert _model(out).config.num_experts == 4


# ---------------------------------------------------------------- --global
def test_global_ranks_experts_by_their_share_of_their_layer_with_a_top_k_floor():
    """Scores are compared across layers as shares of their layer's total, so a layer whose scores are
    10x larger overall is not favoured; the floor keeps top-k in a layer the ranking would starve."""
    from surgeon.features.prune.choose import choose_global, layer_shares

    flat = np.array([0.25, 0.25, 0.25, 0.25])
    peaked = np.array([0.7, 0.1, 0.1, 0.1])
    scores = np.stack([flat, 10 * peaked, 3 * flat])
    np.testing.assert_allclose(layer_shares(scores).sum(1), 1.0)
    kept, raised = choose_global([0, 2, 5], 4, 2, 1, scores=scores)
    # 6 kept: expert 0 of layer 2 (0.7) first, then the 0.25s in layer order, never the 0.1s
    assert kept == {0: (0, 1, 2, 3), 2: (0,), 5: (0,)} and raised == {}
    kept, raised = choose_global([0, 2, 5], 4, 2, 2, scores=scores)  # top-2: every layer keeps 2 or more
    assert kept == {0: (0, 1), 2: (0, 1), 5: (0, 1)} and raised == {2: 1, 5: 1}
    # equal shares tie to the lower layer, then the lower expert
    assert choose_global([0, 1], 4, 1, 1, scores=np.ones((2, 4)))[0] == {0: (0,), 1: (0,)}
    # random: seeded, the same ranking of uniform scores
    a, b = (choose_global([0, 1], 8, 3, 2, seed=s)[0] for s in (4, 4))
    assert a == b and sum(map(len, a.values())) == 6 and min(map(len, a.values())) >= 2


def _global_bytes(donor, out, record):
    """Kept experts and their router rows are the original's bits, renumbered, along the expert axis (first,
    or after axes of size 1); router rows after the experts' (a skip class, shared experts) follow them as
    they were, and router tensors without an expert axis are whole. Padding experts are zeros, and so are
    their router rows, but for a choice bias (router bias, e_score_correction_bias): -inf."""
    from surgeon.core.donor import open_donor
    from surgeon.features.prune.layout import is_choice_bias

    before, after = load_file(donor / "model.safetensors"), load_file(out / "model.safetensors")
    anatomy, size = open_donor(out).anatomy, record.get("experts_after", record["keep"])
    originals = open_donor(donor).anatomy.parts
    for name, t in after.items():
        part = anatomy.parts.get(name)
        kept = record["kept"].get(str(part.layer)) if part is not None else None
        if kept is None or part.kind not in ("expert", "router"):
            assert _bits(t) == _bits(before[name]), name
        elif part.expert is not None:  # one tensor per expert
            if part.expert >= len(kept):
                assert not t.any() and part.expert < size, name
            else:
                segs = name.split(".")
                segs[segs.index(str(part.expert), 3)] = str(kept[part.expert])
                assert _bits(t) == _bits(before[".".join(segs)]), name
        elif t.shape == before[name].shape:  # no expert axis
            assert _bits(t) == _bits(before[name]), name
        else:  # an expert axis: fused experts, router rows and biases
            axis = next(i for i, (a, b) in enumerate(zip(t.shape, before[name].shape)) if a != b)
            old = before[name].flatten(0, axis) if axis else before[name]
            t = t.flatten(0, axis) if axis else t
            extra = old.shape[0] - record["num_experts"]
            assert t.shape[0] == size + extra and _bits(t[:len(kept)]) == _bits(old[torch.tensor(kept)]), name
            assert _bits(t[size:]) == _bits(old[old.shape[0] - extra:]), name
            pad = t[len(kept):size]
            bias = originals[name].kind == "router" and is_choice_bias(name, before[name])
            assert (pad == float("-inf")).all() if bias else not pad.any(), name


@pytest.mark.parametrize("model_type,overrides", [
    ("gpt_oss", {"num_local_experts": 8}),
    ("deepseek_v3", {"n_routed_experts": 8, "n_group": 1, "topk_group": 1, "num_hidden_layers": 3}),
])
def test_a_global_pruning_with_uneven_layers_is_padded_where_the_router_has_a_bias(tmp_path, model_type, overrides,
                                                                                   cli):
    """Seed 1 keeps 3 and 5 of 8: config.json says 5, and the 3-expert layer holds 2 padding experts that
    no token reaches (router bias -inf). It loads, computes the oracle (the original with the pruned
    experts' bias at -inf), and a saved session replays to the same bytes without measuring anything."""
    donor = save_char_tokenizer(conformance_donor(tmp_path / "d", model_type, 0, **overrides))
    out, session = tmp_path / "out", tmp_path / "s.json"
    r = cli("prune", out, "--base", donor, "--keep", "4", "--global", "--by", "random", "--seed", "1",
            "--save-session", session)
    assert r.returncode == 0, r.stderr
    record = _record(out)
    counts = sorted(len(k) for k in record["kept"].values())
    assert record["scope"] == "global" and counts == [3, 5] and record["total_kept"] == 8
    short = next(layer for layer, k in record["kept"].items() if len(k) == 3)
    assert record["experts_after"] == 5 and record["padded"] == {short: 2} and record["floor"] == 2
    assert f"layer {short}: padded with 2 unreachable expert(s)" in r.stdout and "keep 8 in all" in r.stdout
    assert all(json.loads((out / "config.json").read_text())[k] == 5 for k in record["experts_keys"])
    assert "--global" in record["command"] and "padding expert" in (out / "README.md").read_text()
    _global_bytes(donor, out, record)
    _check_oracle(donor, out, record)
    # padding experts and a padded layer's router rows are new bytes; the rest verifies against the original
    assert cli("verify", out, "--donors").returncode == 0
    ext = json.loads(session.read_text())["extensions"]["prune"]
    assert ext["scope"] == "global" and ext["kept"] == record["kept"]
    r = cli("replay", session, "--export", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes(), f


def test_a_global_pruning_of_a_router_without_a_bias_is_written_only_when_layers_stay_even(olmoe_donor, tmp_path,
                                                                                           run_cli, cli):
    """OLMoE's config states one expert count and its router has no bias, so a padding expert could not
    be made unreachable: an uneven choice is refused in one line before anything is written (after
    the saliency pass, for a criterion that needs one). An even one (here --keep 2: the top-2 floor
    gives every layer 2) is written, loads, computes the oracle, and replays byte for byte."""
    r = run_cli("prune", tmp_path / "out", "--base", olmoe_donor, "--ratio", "0.5", "--global", "--by", "random",
                "--seed", "1")  # keeps 3 and 5 of 8
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "keeps 3 in layer 0, 5 in layer 1" in r.stderr
    assert "prune --global: the choice keeps" in r.stderr and "`num_experts`" in r.stderr
    assert "no per-expert bias" in r.stderr and "drop --global" in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("prune", tmp_path / "out", "--base", olmoe_donor, "--keep", "4", "--global", "--per-layer",
                "--by", "random")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr

    out, session = tmp_path / "even", tmp_path / "even.json"
    r = cli("prune", out, "--base", olmoe_donor, "--keep", "2", "--global", "--by", "random", "--seed", "2",
            "--save-session", session)
    assert r.returncode == 0, r.stderr
    record = _record(out)
    assert all(len(k) == 2 for k in record["kept"].values()) and record["padded"] == {}
    # the floor of top-2 set every layer's count; the ranking alone would have kept 3 and 1
    assert record["raised"] == {"1": 1}
    for layer, n in record["raised"].items():
        assert f"layer {layer}: the ranking alone kept {n}; raised to 2" in r.stdout
    assert json.loads((out / "config.json").read_text())["num_experts"] == 2
    _check_bytes_and_logits(olmoe_donor, out, record)
    r = cli("replay", session, "--export", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # a hand edit that makes the layers uneven is refused naming the field: this router cannot be padded
    data = json.loads(session.read_text())
    data["extensions"]["prune"]["kept"]["0"] = [0, 1, 2]
    session.write_text(json.dumps(data))
    r = run_cli("replay", session, "--export", tmp_path / "edited")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "field extensions/prune/kept: the choice keeps" in r.stderr
    assert not (tmp_path / "edited").exists()


def test_global_compares_shares_not_raw_scores(olmoe_donor):
    """Every layer with the same REAP profile at a larger scale (later layers' outputs are larger): shares
    are equal, so the global choice keeps what the per-layer choice keeps; ranked by the raw scores the
    last layer would take everything it has."""
    from surgeon.core.donor import open_donor
    from surgeon.features.prune.run import prune_report
    from surgeon.features.prune.saliency import Saliency

    donor = open_donor(olmoe_donor)
    layers = sorted(donor.anatomy.experts_per_layer)
    profile = np.random.default_rng(0).random(8)
    reap = profile[None, :] * 100.0 ** np.arange(len(layers))[:, None]
    s = Saliency(layers=layers, num_experts=8, top_k=2, tokens=10, frequency=np.full((len(layers), 8), 0.25),
                 gate=np.full((len(layers), 8), 0.5), reap=reap)

    def kept(scope):
        r = PruneRequest(out="", base=str(olmoe_donor), keep=4, by="reap", scope=scope)
        return prune_report(r, donor, saliency=s, corpora=[], device="cpu", max_shard=10**9)["kept"]

    assert kept("global") == kept("per-layer")
    raw = sorted(((reap[i, e], i) for i in range(len(layers)) for e in range(8)), reverse=True)[:4 * len(layers)]
    assert sum(i == len(layers) - 1 for _, i in raw) == 8  # what ranking the raw scores would do


def test_docs_show_what_a_global_prune_prints_on_the_demo_donor(tmp_path, run_cli):
    from test_examples import docs_run, shows_up_to_rounding

    shown = docs_run("prune.md", "moe-surgeon prune /tmp/pg --base demo:arith --keep 2 --global --by reap "
                                 "--corpus arith")
    r = run_cli("prune", tmp_path / "pg", "--base", "demo:arith", "--keep", "2", "--global", "--by", "reap",
                "--corpus", "arith", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = r.stdout.replace(str(tmp_path / "pg"), "/tmp/pg").splitlines()
    assert shows_up_to_rounding(got, shown), "\n".join(got)
    r = run_cli("prune", tmp_path / "refused", "--base", "demo:arith", "--ratio", "0.5", "--global", "--by", "reap",
                "--corpus", "arith", "--device", "cpu")
    assert r.returncode == 2 and "the choice keeps 3 in layer 0, 4 in layer 1, 5 in layer 2, 4 in layer 3" in r.stderr


# ---------------------------------------------------------------- every text MoE family
FAMILIES = sorted(t for t in text_moe_types() if t not in UNSUPPORTED)
# Families pruning refuses, and the words of the reason (docs/prune.md lists them).
PRUNE_REFUSED = {
    "deepseek_v4": "hash-routed layers choose experts by token id",
    "doge": "routes by product keys",
    "jetmoe": "mixture of attention heads",
    "longcat_flash": "zero_expert_num experts that hold no weights",
}
# Group-limited routing is refused wherever a config asks for it (DeepSeek-V3's n_group 8, Ling's
# num_expert_group); the family is then pruned from a config with one group.
GROUPED = {t for t in FAMILIES if (CONFORMANCE[t].overrides.get("n_group") or 1) > 1}
# One family measures saliency (a forward pass over the corpus); the rest choose at random.
BY_FREQUENCY = "glm4_moe"


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    return save_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_prunes_to_the_oracle_or_is_refused_in_one_line(model_type, moe_pair, char_tokenizer, tmp_path,
                                                                     run_cli):
    """Every text MoE family transformers registers: pruned to max(top-k, E/2) experts, the export loads with
    no missing, unexpected or mismatched keys, states the kept count, holds the original's bits of every
    kept expert and router row in the recorded order, and computes what the original computes with the
    pruned experts unreachable. A family whose routing pruning cannot reproduce is refused in one line."""
    donor = moe_pair(model_type)[0]
    arch = ARCHITECTURES[model_type]
    config = json.loads((donor / "config.json").read_text())
    experts, top_k = CONFORMANCE[model_type].experts, config.get(arch.top_k_key) or 1
    keep = max(top_k, experts // 2)
    args = ("prune", tmp_path / "out", "--base", donor, "--keep", keep, "--by", "random")
    if model_type in PRUNE_REFUSED or model_type in GROUPED:
        r = run_cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert (PRUNE_REFUSED.get(model_type) or "group-limited routing") in r.stderr
        assert not (tmp_path / "out").exists()
        if model_type in PRUNE_REFUSED:
            return
        donor = conformance_donor(tmp_path / "one-group", model_type, 0, n_group=1, topk_group=1)
    by = "frequency" if model_type == BY_FREQUENCY else "random"
    if by != "random":  # the saliency pass reads the corpus with the donor's tokenizer
        donor = save_char_tokenizer(conformance_donor(tmp_path / "with-tokenizer", model_type, 0))
    out = tmp_path / "out"
    corpora = (f"c={_corpus(tmp_path)}",) if by != "random" else ()
    run_prune(PruneRequest(out=str(out), base=str(donor), keep=keep, by=by, seed=1, corpora=corpora, device="cpu",
                           batch_size=8))
    record = _record(out)
    assert record["criterion"] == by and (record["saliency"] is None) == (by == "random")
    written = json.loads((out / "config.json").read_text())
    assert record["experts_keys"] and all(written[k] == keep for k in record["experts_keys"])
    assert written.get(arch.top_k_key, top_k) <= keep
    assert all(len(k) == keep for k in record["kept"].values())
    _global_bytes(donor, out, record)
    _check_oracle(donor, out, record, tokenizer=char_tokenizer, routing=model_type not in ROUTING_UNREADABLE)

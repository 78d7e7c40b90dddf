"""Routing analysis against independent recomputation on real tiny models (no mocks)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgeon.core.donor import open_donor
from surgeon.core.plan import parse_spec
from surgeon.errors import SurgeonError
from surgeon.features.routing.probe import (
    RoutingStats,
    cofiring,
    common_experts,
    expert_similarity,
    expert_tokens,
    jsd,
    most_changed,
    probe_routing,
    routing_drift,
    take_most_changed,
    take_most_used,
    top_fraction,
)
from surgeon.probes.scoring import load_tokenizer

TEXTS = ["12+7=19", "rev:abc=cba", "the cat sat on the mat", "99+1=100", "rev:hello=olleh", "a", "zebra: 42"]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_routing(model, tokenizer, texts):
    """Independent count: each text alone, the model's own router_logits, softmax then top-k."""
    k = model.config.num_experts_per_tok
    out = None
    for t in texts:
        ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids, output_router_logits=True).router_logits
        probs = [F.softmax(l.float(), -1) for l in logits]
        if out is None:
            E = probs[0].shape[-1]
            out = {"counts": np.zeros((len(probs), E)), "prob_sum": np.zeros((len(probs), E)),
                   "top1": np.zeros((len(probs), E)), "sel": [[] for _ in probs], "probs": [[] for _ in probs]}
        for li, p in enumerate(probs):
            top = p.topk(k, -1).indices
            for row in top.tolist():
                for e in row:
                    out["counts"][li, e] += 1
                out["top1"][li, row[0]] += 1
            out["prob_sum"][li] += p.sum(0).numpy()
            out["sel"][li].extend(top.tolist())
            out["probs"][li].append(p)
    return out


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_frequencies_equal_count_from_router_logits(model_type, batch_size, donors_of):
    path = donors_of(model_type, 2)[0]
    model, tok = load(path), load_tokenizer(path)
    stats = probe_routing(model, tok, TEXTS, batch_size=batch_size)
    ref = reference_routing(model, tok, TEXTS)
    n = sum(len(t) for t in TEXTS)
    assert stats.tokens == n and stats.layers == list(range(model.config.num_hidden_layers))
    np.testing.assert_array_equal(stats.counts, ref["counts"])
    np.testing.assert_array_equal(stats.top1_counts, ref["top1"])
    np.testing.assert_allclose(stats.prob_sum, ref["prob_sum"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.frequency.sum(1), model.config.num_experts_per_tok)
    np.testing.assert_allclose(stats.usage.sum(1), 1.0)
    assert np.all((stats.entropy > 0) & (stats.entropy <= 1 + 1e-9))
    for li in range(len(stats.layers)):  # the trace holds the same selections, token by token
        assert [sorted(r) for r in stats.selected[:, li].tolist()] == [sorted(r) for r in ref["sel"][li]]


def test_deepseek_skips_dense_layers_and_counts_every_selection(donors_of):
    path = donors_of("deepseek_v3", 1)[0]
    model, tok = load(path), load_tokenizer(path)
    stats = probe_routing(model, tok, TEXTS, batch_size=3)
    assert stats.layers == [1, 2]  # layer 0 is first_k_dense_replace
    np.testing.assert_array_equal(stats.counts.sum(1), [2 * stats.tokens] * 2)
    np.testing.assert_allclose(stats.mean_prob.sum(1), 1.0, rtol=1e-5)  # sigmoid scores, normalised


def test_importance_and_cofiring_equal_independent_recomputation(donors_of):
    path = donors_of("olmoe", 2)[0]
    model, tok = load(path), load_tokenizer(path)
    stats = probe_routing(model, tok, TEXTS, batch_size=4, importance=True)
    weights = load_file(str(path / "model.safetensors"))
    L, E, k = model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok
    # The router's input, caught on a different module than the probe hooks: post_attention_layernorm.
    captured = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda m, a, o, li=li: captured.setdefault(li, []).append(o[0].detach()))
        for li, layer in enumerate(model.model.layers)]
    probs = [[] for _ in range(L)]
    for t in TEXTS:
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            for li, lg in enumerate(model(ids, output_router_logits=True).router_logits):
                probs[li].append(F.softmax(lg.float(), -1))
    for h in hooks:
        h.remove()
    imp_sum, counts = np.zeros((L, E)), np.zeros((L, E))
    same, nxt = np.zeros((L, E, E)), np.zeros((L - 1, E, E))
    sels = []
    for li in range(L):
        x, p = torch.cat(captured[li]), torch.cat(probs[li])
        sel = p.topk(k, -1).indices.tolist()
        sels.append(sel)
        for tkn, row in enumerate(sel):
            for e in row:
                w = lambda n: weights[f"model.layers.{li}.mlp.experts.{e}.{n}.weight"]  # noqa: E731
                h = F.linear(F.silu(F.linear(x[tkn], w("gate_proj"))) * F.linear(x[tkn], w("up_proj")), w("down_proj"))
                imp_sum[li, e] += float(p[tkn, e]) * float(h.norm())
                counts[li, e] += 1
                for f in row:
                    same[li, e, f] += 1
                if li > 0:
                    for prev in sels[li - 1][tkn]:
                        nxt[li - 1, prev, e] += 1
    np.testing.assert_allclose(stats.importance, imp_sum / np.maximum(counts, 1), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(stats.cofire, same)
    np.testing.assert_array_equal(stats.cofire_next, nxt)
    e = int(counts[0].argmax())
    co = cofiring(stats, 0, e)
    expected = same[0, e] / counts[0, e]
    expected[e] = 0
    np.testing.assert_allclose(co["same_layer"], expected)
    np.testing.assert_allclose(co["next_layer"], nxt[0, e] / counts[0, e])
    assert cofiring(stats, L - 1, e)["next_layer"] is None
    # What the expert does: token counts from the trace, and contexts that end in the token.
    tops = expert_tokens(stats, tok, 0, e, n=50)
    assert sum(t["count"] for t in tops) == counts[0, e]
    for t in tops:
        assert 0 < t["share"] <= 1 and all(c.endswith(f"[{t['token']}]") for c in t["contexts"])


def _fake(freq: np.ndarray) -> RoutingStats:
    L, E = freq.shape
    z = np.zeros((L, E))
    return RoutingStats(list(range(L)), E, 1, 100, freq * 100, z, z, z, np.zeros((L, E, E)), np.zeros((L - 1, E, E)),
                        np.zeros(0), np.zeros(0), np.zeros((0, L, 1)))


def test_common_experts_on_constructed_frequencies():
    a = np.array([[0.9, 0.8, 0.1, 0.0, 0.3, 0.2, 0.05, 0.05], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    b = np.array([[0.7, 0.1, 0.9, 0.0, 0.3, 0.2, 0.05, 0.05], [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    assert top_fraction(a[0], 0.25) == {0, 1}
    assert common_experts({"x": a, "y": b}, 0.25) == [[0], []]
    assert common_experts({"x": a, "y": b}, 0.5) == [[0, 4, 5], []]
    assert common_experts({"x": a, "y": b}, 1.0) == [list(range(8))] * 2
    assert common_experts({"x": a}, 0.25) == [[0, 1], [6, 7]]
    with pytest.raises(SurgeonError):
        top_fraction(a[0], 0)
    # Selection actions: the N most used per layer, grouped into SPECs that parse back.
    specs = [s.spec for s in take_most_used(_fake(a), 2, "B")]
    assert specs == ["expert:0-1@0", "expert:6-7@1"]
    assert parse_spec(specs[0], "B").experts == (0, 1)
    assert [s.spec for s in take_most_used(_fake(np.stack([a[0], a[0]])), 1, "B", layers=[1])] == ["expert:0@1"]


def test_jsd_on_constructed_distributions():
    assert jsd([0.25] * 4, [0.25] * 4) == pytest.approx(0)
    assert jsd([1, 0], [0, 1]) == pytest.approx(1)
    m = np.array([0.75, 0.25])
    expected = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert jsd([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert jsd([2, 0], [1, 1]) == pytest.approx(expected)  # counts normalise
    assert jsd(np.array([[1, 0], [1, 1]]), np.array([[0, 1], [1, 1]]), axis=1) == pytest.approx([1, 0])
    assert jsd([0.2, 0.8], m) == pytest.approx(jsd(m, [0.2, 0.8]))


def test_routing_drift_between_models(donors_of):
    paths = donors_of("olmoe", 2)
    tok = load_tokenizer(paths[0])
    a = probe_routing(load(paths[0]), tok, TEXTS, keep_probs=True)
    again = probe_routing(load(paths[0]), tok, TEXTS, keep_probs=True)
    b = probe_routing(load(paths[1]), tok, TEXTS, keep_probs=True)
    same = routing_drift(a, again)
    np.testing.assert_allclose(same["token_jsd"], 0, atol=1e-6)
    np.testing.assert_allclose(same["usage_jsd"], 0, atol=1e-12)
    d = routing_drift(a, b)
    assert np.all(d["token_jsd"] > 1e-3) and np.all(d["token_jsd"] <= 1)
    # Per-token JSD is the mean of each token's JSD between the two router distributions.
    ref = np.mean([jsd(a.probs[i, 0].astype(np.float64), b.probs[i, 0].astype(np.float64)) for i in range(a.tokens)])
    assert d["token_jsd"][0] == pytest.approx(ref)
    np.testing.assert_allclose(d["usage_jsd"], jsd(a.counts, b.counts, axis=1))


def test_expert_similarity_and_most_changed(donors_of):
    paths = donors_of("mixtral", 2)
    a, b = open_donor(paths[0]), open_donor(paths[1])
    self_sim = expert_similarity(a, a)
    for m in self_sim.values():
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    sim = expert_similarity(a, b)
    wa, wb = load_file(str(paths[0] / "model.safetensors")), load_file(str(paths[1] / "model.safetensors"))

    def flat(w, layer, e):
        pre = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
        return torch.cat([w[pre + n + ".weight"].double().flatten() for n in ("w1", "w2", "w3")])

    for layer, m in sim.items():
        assert m.shape == (4, 4)
        for i in range(4):
            for j in range(4):
                assert m[i, j] == pytest.approx(float(F.cosine_similarity(flat(wa, layer, i), flat(wb, layer, j), 0)))
    lowest = {l: tuple(sorted(np.argsort(np.diag(m), kind="stable")[:2].tolist())) for l, m in sim.items()}
    assert most_changed(sim, 2) == lowest
    for s in take_most_changed(sim, 2, "B", layers=[1]):
        assert s.layers == (1,) and s.experts == lowest[1] and parse_spec(s.spec, "B") == s


def test_cli_json_on_a_tiny_donor(run_cli, donors_of, tmp_path):
    path = donors_of("olmoe", 2)[0]
    (tmp_path / "a.txt").write_text("12+7=19\n\n3+4=7\n\n88+12=100\n")
    (tmp_path / "b.jsonl").write_text('{"text": "rev:abc=cba"}\n{"text": "rev:dog=god"}\n')
    r = run_cli("routing", path, "--corpus", f"sums={tmp_path / 'a.txt'}", "--corpus", f"rev={tmp_path / 'b.jsonl'}",
            "--expert", "1:0", "--take-used", "2", "--layers", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["domains"]) == {"sums", "rev"} and out["top_k"] == 2
    for d in out["domains"].values():
        for row in d["layers"]:
            assert sum(row["frequency"]) == pytest.approx(2, abs=1e-4)
    assert out["takes"][0].startswith("expert:") and out["takes"][0].endswith(f"@1={path}")
    assert {e["corpus"] for e in out["experts"]} == {"sums", "rev"}


def test_cli_bad_input_gives_one_line_errors(run_cli, donors_of, tmp_path):
    moe, dense = donors_of("olmoe", 2)[0], donors_of("llama", 1)[0]
    r = run_cli("routing", moe, "--corpus", f"x={tmp_path / 'missing.txt'}")
    assert r.returncode == 2 and "missing.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("routing", dense, "--corpus", "arith")
    assert r.returncode == 2 and "no routed experts" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("routing", moe, "--expert", "nine")
    assert r.returncode == 2 and "LAYER:EXPERT" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_routes_a_pickle_only_donor_like_its_safetensors_twin(run_cli, donors_of, tmp_path):
    import shutil

    path = donors_of("olmoe", 2)[0]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pickled / f.name)
    torch.save(load_file(path / "model.safetensors"), pickled / "pytorch_model.bin")
    (tmp_path / "a.txt").write_text("12+7=19\n\n3+4=7\n")
    rows = []
    for target, extra in ((path, []), (pickled, ["--allow-pickle"])):
        r = run_cli("routing", target, "--corpus", f"sums={tmp_path / 'a.txt'}", "--json", *extra)
        assert r.returncode == 0, r.stderr
        rows.append([row["frequency"] for row in json.loads(r.stdout)["domains"]["sums"]["layers"]])
    assert rows[0] == rows[1]

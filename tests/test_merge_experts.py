"""Expert merging (`moe-surgeon merge-experts`): clusters of experts found by output similarity, each
written as one expert whose tensors and router rows are the weighted average of its members'.

The oracle here is the rule itself, recomputed in the test from the original's state dict: merged =
sum of w_m x member in float64, w_m = member frequency / the cluster's total, rounded once to the
tensor's dtype; a cluster of one is the member's bytes. Clustering is checked against scipy's average
linkage on the similarity the record states, and the similarity itself by a donor whose two experts
are copies of each other (similarity 1: they must be merged first).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import conformance_donor, fp8_donor, make_donor, save_char_tokenizer

from surgeon.features.prune.merge import MergeRequest, run_merge
from surgeon.features.prune.write import MERGE_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = "12+34=46\n\n7+8=15\n\nrev abc = cba\n\n55+45=100\n\nrev hello = olleh\n\n3+4=7\n\n19+23=42\n"


@pytest.fixture(scope="module")
def olmoe_donor(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-olmoe")
    return save_char_tokenizer(make_donor(root / "d", "olmoe", seed=3, num_experts=8))


def _corpus(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS)
    return path


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _record(out) -> dict:
    return json.loads((out / MERGE_FILE).read_text())


def _expected(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += t.double() * w
    return acc.to(tensors[0].dtype)


def _check_merged(donor, out, record, num_experts: int):
    """Every expert tensor and every tensor with the expert axis first follows the rule; weights are the
    members' recorded frequencies over their cluster's sum; nothing else changed."""
    from surgeon.core.donor import open_donor

    anatomy = open_donor(donor).anatomy
    before, after = load_file(donor / "model.safetensors"), load_file(out / "model.safetensors")
    freq = np.array(record["saliency"]["frequency"])
    layers = [int(k) for k in record["clusters"]]
    seen = set()
    for name, t in before.items():
        part = anatomy.parts.get(name)
        if part is None or part.layer not in layers or part.kind not in ("expert", "router"):
            assert _bits(after[name]) == _bits(t), name
            seen.add(name)
            continue
        li = layers.index(part.layer)
        clusters = record["clusters"][str(part.layer)]
        shares = [[freq[li, e] / sum(freq[li, m] for m in c) for e in c] for c in clusters]
        got = record["weights"][str(part.layer)]
        assert [len(w) for w in got] == [len(w) for w in shares]
        assert sum(got, []) == pytest.approx([float(x) for x in sum(shares, [])], rel=1e-12)
        weights = record["weights"][str(part.layer)]
        if part.kind == "expert" and part.expert is not None:
            for new, c in enumerate(clusters):
                if c[0] != part.expert:
                    continue
                segs = name.split(".")
                at = segs.index(str(part.expert), 3)
                out_name = ".".join(segs[:at] + [str(new)] + segs[at + 1:])
                members = [before[".".join(segs[:at] + [str(e)] + segs[at + 1:])] for e in c]
                want = members[0] if len(c) == 1 else _expected(members, weights[new])
                assert _bits(after[out_name]) == _bits(want), (out_name, c)
                seen.add(out_name)
            continue
        assert t.shape[0] == num_experts
        rows = [t[c[0]] if len(c) == 1 else _expected([t[e] for e in c], w) for c, w in zip(clusters, weights)]
        assert after[name].dtype == t.dtype and _bits(after[name]) == _bits(torch.stack(rows)), name
        seen.add(name)
    assert seen == set(after)  # no tensor the rule does not account for


def _model(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def test_merge_command_writes_the_weighted_average_of_each_cluster_and_it_loads(olmoe_donor, tmp_path, cli):
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    out = tmp_path / "merged"
    r = cli("merge-experts", out, "--base", olmoe_donor, "--into", "4", "--corpus", f"calib={_corpus(tmp_path)}",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "4 per layer, members averaged by frequency" in r.stdout and "approximate" in r.stdout
    record = _record(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 4 and config["num_experts_per_tok"] == 2
    _check_merged(olmoe_donor, out, record, 8)
    # the clusters are average linkage on 1 - similarity, as scipy computes it
    for li, (layer, clusters) in enumerate(record["clusters"].items()):
        sim = np.array(record["saliency"]["similarity"][li])
        assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0, atol=1e-5)
        labels = fcluster(linkage(squareform(1 - sim, checks=False), "average"), 4, "maxclust")
        theirs = sorted(sorted(np.flatnonzero(labels == k).tolist()) for k in set(labels))
        assert sorted(clusters) == theirs, layer
    model = _model(out)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    card = (out / "README.md").read_text()
    assert "HC-SMoE" in card and "Approximate" in card and "| 0 |" in card
    # untouched and kept-alone tensors are still proven against the original; merged ones are new bytes
    assert cli("verify", out, "--donors").returncode == 0


def test_two_copies_of_an_expert_are_merged_first_and_give_that_expert_back(olmoe_donor, tmp_path):
    """The similarity is of what the experts compute: copy expert 2 over expert 5 (weights and router row)
    and they are the one pair at similarity 1, so merging 8 into 7 joins exactly them, and their average
    is the expert itself."""
    donor = tmp_path / "twins"
    donor.mkdir()
    for f in olmoe_donor.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (donor / f.name).write_bytes(f.read_bytes())
    tensors = load_file(olmoe_donor / "model.safetensors")
    for name in list(tensors):
        if ".mlp.experts.5." in name:
            tensors[name] = tensors[name.replace(".experts.5.", ".experts.2.")].clone()
        elif name.endswith("mlp.gate.weight"):
            tensors[name][5] = tensors[name][2]
    save_file(tensors, str(donor / "model.safetensors"), metadata={"format": "pt"})
    result = run_merge(MergeRequest(out=str(tmp_path / "out"), base=str(donor), into=7,
                                    corpora=(f"c={_corpus(tmp_path)}",), device="cpu"))
    for li, clusters in result.clusters.items():
        assert [c for c in clusters if len(c) > 1] == [(2, 5)], li
    after = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in tensors.items():
        if ".mlp.experts.2." in name:
            assert torch.equal(after[name], t), name


@pytest.mark.parametrize("model_type", ["gpt_oss", "deepseek_v3"])
def test_fused_experts_router_biases_and_fp32_correction_bias_are_merged_by_the_same_rule(tmp_path, model_type):
    """gpt-oss stores its experts fused ([E, ...], with biases) and has a router bias; DeepSeek-V3 keeps
    e_score_correction_bias in fp32, which stays fp32."""
    groups = {"n_group": 1, "topk_group": 1} if model_type == "deepseek_v3" else {}  # group routing is refused
    donor = save_char_tokenizer(conformance_donor(tmp_path / "d", model_type, 0, **groups))
    num = json.loads((donor / "config.json").read_text())
    num = num.get("num_local_experts") or num.get("n_routed_experts")
    top_k = json.loads((donor / "config.json").read_text())["num_experts_per_tok"]
    out = tmp_path / "out"
    run_merge(MergeRequest(out=str(out), base=str(donor), into=max(top_k, num // 2),
                           corpora=(f"c={_corpus(tmp_path)}",), device="cpu"))
    _check_merged(donor, out, _record(out), num)
    _model(out)


def test_replay_of_a_merge_session_rebuilds_the_same_bytes_without_the_corpus(olmoe_donor, tmp_path, cli):
    corpus = _corpus(tmp_path)
    out, session = tmp_path / "merged", tmp_path / "merge.json"
    r = cli("merge-experts", out, "--base", olmoe_donor, "--ratio", "0.5", "--by", "reap", "--corpus",
            f"calib={corpus}", "--device", "cpu", "--save-session", session)
    assert r.returncode == 0, r.stderr
    ext = json.loads(session.read_text())["extensions"]["prune"]
    assert ext["operation"] == "merge" and ext["criterion"] == "reap" and ext["corpora"][0]["path"] == "calib.txt"
    corpus.unlink()  # the rebuild uses the recorded clusters and weights: nothing is measured again
    r = cli("replay", session, "--export", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    assert "from its recorded choice" in r.stdout
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "config.json").read_bytes() == (out / "config.json").read_bytes()


# ---------------------------------------------------------------- refused with one line
def test_merge_refusals_are_one_line_and_write_nothing(olmoe_donor, tmp_path, run_cli):
    corpus = f"c={_corpus(tmp_path)}"
    r = run_cli("merge-experts", tmp_path / "out", "--base", olmoe_donor, "--into", "1", "--corpus", corpus)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "num_experts_per_tok is 2" in r.stderr
    r = run_cli("merge-experts", tmp_path / "out", "--base", olmoe_donor, "--into", "8", "--corpus", corpus)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--into 8" in r.stderr
    fp8 = fp8_donor(tmp_path / "fp8", "qwen3_moe", 0)
    r = run_cli("merge-experts", tmp_path / "out", "--base", fp8, "--into", "2", "--corpus", corpus)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "F8_E4M3" in r.stderr and "tensor model.layers." in r.stderr
    dense = make_donor(tmp_path / "dense", "llama", seed=0)
    r = run_cli("merge-experts", tmp_path / "out", "--base", dense, "--into", "2", "--corpus", corpus)
    assert r.returncode == 2 and "no routed experts" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_hand_edited_merge_session_is_refused_naming_the_field(olmoe_donor, tmp_path, run_cli):
    session = tmp_path / "s.json"
    run_merge(MergeRequest(out=str(tmp_path / "m"), base=str(olmoe_donor), into=4,
                           corpora=(f"c={_corpus(tmp_path)}",), device="cpu", save_session=str(session)))
    data = json.loads(session.read_text())
    clusters = data["extensions"]["prune"]["clusters"]
    layer = next(iter(clusters))
    clusters[layer][0] = clusters[layer][0] + clusters[layer][1]  # an expert in two clusters
    session.write_text(json.dumps(data))
    r = run_cli("replay", session, "--export", tmp_path / "again")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"field extensions/prune/clusters/{layer}" in r.stderr
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "llama4_text"])
def test_every_layout_merges_by_the_rule_and_loads(tmp_path, model_type):
    """Mixtral (block_sparse_moe.experts.E.w1/w2/w3), Qwen2-MoE (a shared expert and its gate beside the
    routed ones), Qwen3-MoE and Llama 4 (fused feed_forward.experts.gate_up_proj / down_proj, [E, ...],
    and a shared expert): config.json states N, every expert tensor and router row is the documented
    weighted average of its cluster (a cluster of one: its member's bytes), the shared expert is the
    original's, and transformers loads the result with no missing, unexpected or mismatched key."""
    from surgeon.core.donor import open_donor

    if model_type == "llama4_text":  # one MoE layer (1) beside a dense one, as Llama 4 interleaves them
        donor = save_char_tokenizer(conformance_donor(tmp_path / "d", model_type, 0, num_local_experts=6))
    else:
        donor = save_char_tokenizer(make_donor(tmp_path / "d", model_type, 0, **{
            "mixtral": {"num_local_experts": 6}}.get(model_type, {"num_experts": 6})))
    out = tmp_path / "out"
    result = run_merge(MergeRequest(out=str(out), base=str(donor), into=3, corpora=(f"c={_corpus(tmp_path)}",),
                                    device="cpu"))
    record = _record(out)
    config = json.loads((out / "config.json").read_text())
    original = json.loads((donor / "config.json").read_text())
    assert record["experts_keys"] and all(config[k] == 3 for k in record["experts_keys"])
    assert config["num_experts_per_tok"] == original["num_experts_per_tok"]
    assert all(len(c) == 3 and sorted(sum(map(list, c), [])) == list(range(6)) for c in result.clusters.values())
    assert any(len(m) > 1 for c in result.clusters.values() for m in c)  # something was merged
    _check_merged(donor, out, record, 6)
    merged = open_donor(out)
    assert set(merged.anatomy.experts_per_layer.values()) == {3}
    before, after = load_file(donor / "model.safetensors"), load_file(out / "model.safetensors")
    fused = [n for n in after if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    if model_type == "llama4_text":
        assert fused and all(after[n].shape[0] == 3 for n in fused)
    shared = [n for n in before if "shared_expert" in n]
    if model_type in ("qwen2_moe", "llama4_text"):
        assert shared and all(_bits(after[n]) == _bits(before[n]) for n in shared)
    model = _model(out)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

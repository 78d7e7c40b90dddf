"""Tucker compression of chosen experts (XPERT): the HOSVD, the compact dense export, the CLI.

The oracles are independent of the code under test: numpy's SVD of the unfoldings for the
HOSVD, and for the export a reference built here from the source's own model and its state dict
(every MoE block replaced by one expert computed from the safetensors file).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import EXPERTS_PREFIX, make_donor, save_char_tokenizer

from surgeon.core.donor import open_donor
from surgeon.features import compress as C
from surgeon.live.hybrid import TensorReader

DISK_ROLES = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down; others: gate_proj, up_proj, down_proj


def _stacked(donor, layer=0, experts=None):
    experts = experts or tuple(range(donor.anatomy.experts_per_layer[layer]))
    return C.stacked_experts(TensorReader({"source": donor}), donor, layer, experts).double()


def _numpy_hosvd_error(x: np.ndarray, ranks) -> float:
    """Truncated HOSVD from SVDs of the three unfoldings of x [n, I, H], ranks (I, H, n)."""
    r_i, r_h, r_e = ranks
    u_e = np.linalg.svd(x.reshape(x.shape[0], -1), full_matrices=False)[0][:, :r_e]
    u_i = np.linalg.svd(x.transpose(1, 0, 2).reshape(x.shape[1], -1), full_matrices=False)[0][:, :r_i]
    u_h = np.linalg.svd(x.transpose(2, 0, 1).reshape(x.shape[2], -1), full_matrices=False)[0][:, :r_h]
    core = np.einsum("nih,na,ic,hd->acd", x, u_e, u_i, u_h)
    x_hat = np.einsum("acd,na,ic,hd->nih", core, u_e, u_i, u_h)
    return float(np.linalg.norm(x - x_hat) / np.linalg.norm(x))


def test_full_rank_hosvd_reconstructs_and_lower_ranks_err_more(donors_of):
    donor = open_donor(donors_of("olmoe", 1)[0])
    x = _stacked(donor)  # [3, 4 experts, 16, 32]
    _, n, inter, hidden = x.shape
    full = C.hosvd(x, (inter, hidden, n))
    assert (full.reconstruct() - x).abs().max() < 1e-12 * x.abs().max()
    for u in (full.expert, full.inter, full.hidden):  # orthogonal factors
        eye = torch.eye(u.shape[-1], dtype=u.dtype)
        assert torch.allclose(u.transpose(1, 2) @ u, eye.expand_as(u.transpose(1, 2) @ u), atol=1e-12)

    def error(ranks):
        return C.relative_error(x, C.hosvd(x, ranks).reconstruct())[1]

    by_rank = [error((r, hidden, n)) for r in range(inter, 0, -1)]
    assert by_rank[0] < 1e-14
    assert all(b >= a - 1e-12 for a, b in zip(by_rank, by_rank[1:]))  # lower rank, never a smaller error
    assert by_rank[-1] > 0.5  # rank 1 of 16 random neurons loses most of them
    assert error((inter, hidden // 2, n)) > 1e-3 and error((inter, hidden, 1)) > 1e-3
    # the same truncated HOSVD as numpy's SVDs of the unfoldings, projection by projection
    for ranks in ((5, 20, 3), (inter, 7, 2)):
        ours = C.relative_error(x, C.hosvd(x, ranks).reconstruct())[0]
        for p in range(3):
            assert ours[p] == pytest.approx(_numpy_hosvd_error(x[p].numpy(), ranks), rel=1e-9)


def test_rank_cut_keeps_the_neurons_the_experts_use():
    """Experts that only use neurons S (every other row zero) have intermediate rank |S|: the
    leverage picks exactly S, and the compact FFN is the mean of the experts on S, exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 5, 12, 8, dtype=torch.float64)
    used = [1, 4, 5, 9]
    x[:, :, used] = torch.randn(3, 5, len(used), 8, generator=g, dtype=torch.float64)
    r = C.compress_layer(x, 0, tuple(range(5)), rank=len(used), hidden_rank=8, expert_rank=5)
    assert r.neurons == used
    assert r.errors["all"] < 1e-14
    mean = x.mean(1)
    assert torch.allclose(r.ffn["gate"], mean[0, used], atol=1e-14)
    assert torch.allclose(r.ffn["up"], mean[1, used], atol=1e-14)
    assert torch.allclose(r.ffn["down"], mean[2, used].T, atol=1e-14)


def _expert_weights(path, model_type, layer, expert):
    state = load_file(str(path / "model.safetensors"))
    prefix = f"model.layers.{layer}.{EXPERTS_PREFIX.get(model_type, 'mlp.experts')}.{expert}"
    return [state[f"{prefix}.{p}.weight"] for p in DISK_ROLES.get(model_type, ("gate_proj", "up_proj", "down_proj"))]


class _OneExpert(torch.nn.Module):
    """The reference FFN: one expert of the source, weight 1, nothing else."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x):
        f = torch.nn.functional
        return f.linear(f.silu(f.linear(x, self.gate)) * f.linear(x, self.up), self.down)


@pytest.mark.parametrize("model_type,overrides,dense", [
    ("olmoe", {}, "OlmoeForCausalLM"),
    ("mixtral", {}, "MistralForCausalLM"),
    ("qwen2_moe", {"qkv_bias": False}, "Qwen2ForCausalLM"),
    ("qwen3_moe", {}, "Qwen3ForCausalLM"),
])
def test_one_expert_at_full_rank_is_that_expert(tmp_path, model_type, overrides, dense):
    """The compact model's logits equal the source model with every MoE block replaced by expert 1."""
    from transformers import AutoModelForCausalLM

    src = save_char_tokenizer(make_donor(tmp_path / "src", model_type, seed=3, **overrides))
    donor = open_donor(src)
    chosen = C.parse_expert_choice(["1"], donor)
    results = C.compress(donor, chosen)
    out = tmp_path / "compact"
    written = C.write_compact(donor, results, out)
    assert written["architecture"] == dense

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert type(model).__name__ == dense
    assert model.config.intermediate_size == 16
    if model_type == "olmoe":
        assert (model.config.num_experts, model.config.num_experts_per_tok) == (1, 1)

    reference = AutoModelForCausalLM.from_pretrained(src)
    for layer, block in enumerate(reference.model.layers):
        block.mlp = _OneExpert(*_expert_weights(src, model_type, layer, 1))
    compact = load_file(str(out / "model.safetensors"))
    ffn = "mlp.experts.0" if model_type == "olmoe" else "mlp"
    for layer in range(2):  # full rank: the expert's weights, bit for bit
        gate, up, down = _expert_weights(src, model_type, layer, 1)
        assert torch.equal(compact[f"model.layers.{layer}.{ffn}.gate_proj.weight"], gate)
        assert torch.equal(compact[f"model.layers.{layer}.{ffn}.down_proj.weight"], down)
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(src)(ids).logits, atol=1e-3)


def test_several_experts_average_and_cut_rank_loads(tmp_path, donors_of):
    from transformers import AutoModelForCausalLM

    src = donors_of("mixtral", 1)[0]
    donor = open_donor(src)
    chosen = C.parse_expert_choice(["0,2", "1:0-3"], donor)
    assert chosen == {0: (0, 2), 1: (0, 1, 2, 3)}
    full = C.compress(donor, chosen)
    gate0 = torch.stack([w[0] for w in (_expert_weights(src, "mixtral", 0, e) for e in (0, 2))]).double().mean(0)
    assert torch.allclose(full[0].ffn["gate"], gate0, atol=1e-12)  # full rank: the average expert
    cut = C.compress(donor, chosen, rank=6, hidden_rank=20, expert_rank=1)
    assert cut[0].ranks == {"intermediate": 6, "hidden": 20, "expert": 1}
    assert all(c.errors["all"] > f.errors["all"] for c, f in zip(cut, full))
    C.write_compact(donor, cut, tmp_path / "cut", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert model.config.intermediate_size == 6 and model.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6]])).logits).all()
    card = (tmp_path / "cut" / "README.md").read_text()
    assert donor.fingerprint in card and "| 1 | 0-3 |" in card


def test_cli_compress_and_bad_input(tmp_path, donors_of, run_cli):
    src = donors_of("olmoe", 1)[0]
    out = tmp_path / "compact"
    r = run_cli("compress", out, src, "--experts", "0:0,2", "--rank", "8", "--device", "cpu", "--check", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [row["experts"] for row in report["layers"]] == [[0, 2], [0, 1, 2, 3]]
    assert report["written"]["intermediate_size"] == 8 and report["check"]["class"] == "OlmoeForCausalLM"
    assert all(0 < row["error"]["all"] < 1 for row in report["layers"])
    assert json.loads((out / C.REPORT_FILE).read_text())["layers"] == report["layers"]
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".compact*"))

    dense = donors_of("llama", 1)[0]
    for args, needle in [
        ((out, src), "not empty; pass --force"),
        ((tmp_path / "a", src, "--rank", "0"), "--rank 0: out of range (1-16"),
        ((tmp_path / "a", src, "--rank", "17"), "--rank 17: out of range"),
        ((tmp_path / "a", src, "--experts", "0:9"), "expert 9 out of range"),
        ((tmp_path / "a", src, "--experts", "5:1"), "layer 5 out of range"),
        ((tmp_path / "a", dense), "has no routed experts"),
    ]:
        r = run_cli("compress", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "a").exists()


def test_cli_common_experts_match_routing(tmp_path, run_cli):
    """--common stacks exactly the experts routing.common_experts finds on the same corpora."""
    from transformers import AutoModelForCausalLM

    from surgeon.features.routing.corpora import corpus_texts, parse_corpus
    from surgeon.features.routing.probe import common_experts, probe_domains
    from surgeon.probes.scoring import load_tokenizer

    r = run_cli("compress", tmp_path / "c", "demo:arith", "--common", "arith", "reverse", "--q", "50",
            "--rank", "16", "--max-tokens", "400", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    donor = open_donor("demo:arith")
    model = AutoModelForCausalLM.from_pretrained(donor.path)
    corpora = {n: corpus_texts(p) for n, p in (parse_corpus(a) for a in ("arith", "reverse"))}
    stats = probe_domains(model, load_tokenizer(donor.path), corpora, max_tokens=400)
    want = common_experts({n: s.frequency for n, s in stats.items()}, 0.5)
    assert [row["experts"] for row in report["layers"]] == want
    assert report["chosen_by"] == "--common arith reverse --q 50"

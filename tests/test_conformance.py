"""Every text MoE family transformers registers, tried as a user would: a tiny random pair built with
the family's own config class and saved with save_pretrained, then classified, transferred, exported,
loaded and hot-swapped.

The list is enumerated from transformers' own auto mapping, so a family added upstream shows up here
as a failure until it is described in `surgeon/core/architectures.py` or listed as unsupported there
with its reason. The oracle for each transfer is built in this file from the donors' raw safetensors
with torch: whole tensors by name, and a fused expert tensor's rows sliced by hand.
"""

from __future__ import annotations

import pytest

from surgeon.core.architectures import ARCHITECTURES, UNSUPPORTED
from tiny_models import CONFORMANCE, text_moe_types

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = sorted(t for t in text_moe_types() if t not in UNSUPPORTED)


def test_every_registered_text_moe_is_described_or_listed_as_unsupported():
    registered = set(text_moe_types())
    undescribed = sorted(registered - set(ARCHITECTURES) - set(UNSUPPORTED))
    assert not undescribed, f"text MoE types with no description and no reason: {undescribed}"
    assert len([t for t in registered if t in ARCHITECTURES and ARCHITECTURES[t].moe]) >= 30
    assert set(CONFORMANCE) >= set(FAMILIES)  # every family has its tiny config


@pytest.fixture
def pairs(moe_pair):
    return moe_pair


def _plan_for(anatomy):
    """Attention of the first layer, every router, expert 1 everywhere, and the shared experts, gates
    and dense MLPs the family has: every component group at once, from donor B."""
    from surgeon.core.plan import Assignment, Plan

    kinds = {p.kind for p in anatomy.parts.values()}
    steps = [Assignment("attention", "B", (0,)), Assignment("router", "B"), Assignment("expert", "B", None, (1,))]
    steps += [Assignment(k, "B") for k in ("shared_expert", "gate", "mlp") if k in kinds]
    steps.append(Assignment("norms", "B", (anatomy.num_layers - 1,)))
    return Plan("A", steps)


def _oracle(a_dir, b_dir, plan, anatomy):
    """The hybrid's tensors from the raw files: B's where the plan says so, a fused tensor row by row."""
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = load(a_dir), load(b_dir)
    want = {}
    for name, t in a.items():
        part = anatomy.parts[name]
        if part.fused:
            t = t.clone()
            t[1] = b[name][1]  # expert 1 is the second row of the expert axis
            want[name] = t
        else:
            want[name] = b[name] if plan.donor_for(part) == "B" else t
    return want


def _logits(model, vocab):
    import torch

    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (2, 9))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_classifies_transfers_exports_and_swaps(model_type, pairs, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.features.verify import run_verify
    from surgeon.live.hybrid import Hybrid

    a_dir, b_dir = pairs(model_type)
    donors = {"A": open_donor(a_dir), "B": open_donor(b_dir)}
    anatomy = donors["A"].anatomy
    assert anatomy.known and anatomy.architecture.model_type == model_type
    assert anatomy.unclassified == []
    assert anatomy.experts_per_layer, "no routed experts found"
    assert set(anatomy.experts_per_layer.values()) == {CONFORMANCE[model_type].experts}

    plan = _plan_for(anatomy)
    out = tmp_path / "hybrid"
    run_export(ExportRequest(plan, donors, out))
    assert run_verify(out, donors=True).problem is None

    want = _oracle(a_dir, b_dir, plan, anatomy)
    got = {}
    for f in sorted(out.glob("model*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(want)
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, f"tensors differ from the oracle: {differ[:5]}"
    assert any(not torch.equal(want[n], load_file_any(a_dir)[n]) for n in want)  # the plan moved something

    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    oracle_dir = tmp_path / "oracle"
    _save_oracle(oracle_dir, a_dir, want)
    oracle = AutoModelForCausalLM.from_pretrained(oracle_dir)
    vocab = donors["A"].config["vocab_size"]
    expected = _logits(oracle.eval(), vocab)
    assert torch.equal(_logits(exported.eval(), vocab), expected)

    fresh = Hybrid.materialize(plan, donors, device="cpu")
    assert torch.equal(_logits(fresh.model, vocab), expected)
    swapped = Hybrid.materialize(Plan("A"), donors, device="cpu")
    report = swapped.apply(plan)
    assert report.tensors > 0
    assert torch.equal(_logits(swapped.model, vocab), expected)


def load_file_any(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _save_oracle(directory, base_dir, tensors):
    import shutil

    from safetensors.torch import save_file

    directory.mkdir()
    shutil.copyfile(base_dir / "config.json", directory / "config.json")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def test_one_expert_of_a_fused_tensor_is_a_grid_unit_and_a_byte_range(pairs, tmp_path):
    """gpt-oss keeps a layer's experts in one [E, ...] tensor: the grid still offers each expert, the
    export splices the chosen expert's rows from its donor, the manifest says which rows came from
    where, and `verify --donors` compares each range with the donor it names (and only that one)."""
    import json
    import shutil

    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment
    from surgeon.core.workbench import Workbench, layer_sheet
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.features.verify import run_verify
    from tiny_models import flip_byte

    a_dir, b_dir = pairs("gpt_oss")
    b_copy = tmp_path / "b"
    shutil.copytree(b_dir, b_copy)
    donors = {"A": open_donor(a_dir), "B": open_donor(b_copy)}
    wb = Workbench(donors, "A")
    assert [p.expert for p in wb.index.experts_of[1]] == [0, 1, 2, 3]
    assert layer_sheet(wb, 1).labels[-4:] == ["expert 0", "expert 1", "expert 2", "expert 3"]
    wb.set_parts([wb.index.experts_of[1][2]], "B")
    plan = wb.plan()
    assert plan.assignments == [Assignment("expert", "B", (1,), (2,))]

    out = tmp_path / "out"
    run_export(ExportRequest(plan, donors, out))
    manifest = json.loads((out / "moe-surgeon-manifest.json").read_text())
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert manifest["tensors"][name]["source"]["experts"] == [
        {"from": 0, "to": 2, "donor": "A"}, {"from": 2, "to": 3, "donor": "B"}, {"from": 3, "to": 4, "donor": "A"}]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in [n for n, t in manifest["tensors"].items()
                                                            if "experts" in t.get("source", {})]
    assert run_verify(out, donors=True).problem is None

    info = donors["B"].tensors[name]
    row = info.nbytes // info.shape[0]
    flip_byte(b_copy / info.file, info.start + 0 * row + 5)  # expert 0 of B: not in the hybrid
    assert run_verify(out, donors=True).problem is None
    flip_byte(b_copy / info.file, info.start + 2 * row + 5)  # expert 2 of B: in the hybrid
    problem = run_verify(out, donors=True).problem
    assert problem is not None and name in problem and "donor B" in problem


def test_mixers_are_marked_per_layer_in_the_grid(pairs):
    """Qwen3-Next mixes linear-attention layers with full attention: the grid says which is which."""
    from surgeon.core.donor import open_donor
    from surgeon.core.workbench import Workbench, surgery_sheet

    a_dir, b_dir = pairs("qwen3_next")
    donors = {"A": open_donor(a_dir), "B": open_donor(b_dir)}
    assert donors["A"].anatomy.mixers == {0: "linear"}
    assert surgery_sheet(Workbench(donors, "A")).labels[:2] == ["0 linear", "1"]
    for model_type, want in (("minimax", {0: "linear"}), ("jamba", {0: "mamba", 2: "mamba"}),
                             ("nemotron_h", {0: "mamba"})):
        assert open_donor(pairs(model_type)[0]).anatomy.mixers == want, model_type


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_reads_every_family_with_a_router(model_type, pairs, tmp_path):
    """The routing analysis finds each MoE layer's router through transformers' own declaration of
    it, and counts exactly top-k choices per token in every MoE layer."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.core.donor import open_donor
    from surgeon.errors import SurgeonError
    from surgeon.features.routing.probe import probe_routing
    from tiny_models import save_char_tokenizer

    a_dir, _ = pairs(model_type)
    model = AutoModelForCausalLM.from_pretrained(a_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(save_char_tokenizer(tmp_path / "tok"))
    texts = ["12+30=42", "the cat sat on the mat", "abc def ghi"]
    if model_type in ROUTING_UNREADABLE:
        with pytest.raises(SurgeonError, match=ROUTING_UNREADABLE[model_type]):
            probe_routing(model, tokenizer, texts)
        return
    stats = probe_routing(model, tokenizer, texts)
    assert stats.layers == sorted(open_donor(a_dir).anatomy.experts_per_layer)
    assert stats.tokens == sum(len(t) for t in texts)
    assert np.allclose(stats.frequency.sum(axis=1), stats.top_k)  # each token picks exactly k experts


# Doge routes by product keys over its expert tables: no per-token logits over experts to read.
# Inkling 2 Loop runs its looped layers (and their routers) several times per token.
ROUTING_UNREADABLE = {"doge": "no per-token logits", "inkling2_loop_text": "more than once per token"}


# ---------------------------------------------------------------- quantized storage
@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    from tiny_models import fp8_donor

    root = tmp_path_factory.mktemp("fp8")
    return fp8_donor(root / "a", "deepseek_v3", 0), fp8_donor(root / "b", "deepseek_v3", 1)


def test_fp8_weights_move_with_their_scales_and_load(fp8_pair, tmp_path):
    """DeepSeek-V3-style FP8: each block scale is part of its weight's component, the export keeps
    bytes and quantization_config as they were, transformers loads it, and a hot-swapped hybrid on
    the CPU (dequantized the way from_pretrained dequantizes) gives the export's logits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.features.verify import run_verify
    from surgeon.live.hybrid import Hybrid

    a_dir, b_dir = fp8_pair
    donors = {"A": open_donor(a_dir), "B": open_donor(b_dir)}
    anatomy = donors["A"].anatomy
    assert anatomy.unclassified == []
    scales = [n for n in donors["A"].tensors if n.endswith("_scale_inv")]
    assert scales and all(anatomy.parts[n] == anatomy.parts[n.removesuffix("_scale_inv")] for n in scales)

    plan = Plan("A", [Assignment("attention", "B", (0,)), Assignment("expert", "B", None, (1,))])
    out = tmp_path / "out"
    run_export(ExportRequest(plan, donors, out))
    assert run_verify(out, donors=True).problem is None
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((a_dir / "config.json").read_text())["quantization_config"]
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = _logits(exported.eval(), 64)
    assert not torch.equal(expected, _logits(AutoModelForCausalLM.from_pretrained(a_dir).eval(), 64))

    swapped = Hybrid.materialize(Plan("A"), donors, device="cpu")
    swapped.apply(plan)
    assert torch.equal(_logits(swapped.model, 64), expected)
    fresh = Hybrid.materialize(plan, donors, device="cpu")
    assert torch.equal(_logits(fresh.model, 64), expected)


def test_donors_stored_differently_are_refused(fp8_pair, pairs):
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan
    from surgeon.core.resolve import resolve
    from surgeon.errors import SurgeonError

    donors = {"A": open_donor(fp8_pair[0]), "B": open_donor(pairs("deepseek_v3")[1])}
    with pytest.raises(SurgeonError, match=r"stored unquantized, base .* fp8 in 128x128 blocks"):
        resolve(Plan("A", [Assignment("attention", "B", (0,))]), donors)


@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    from tiny_models import mxfp4_donor

    root = tmp_path_factory.mktemp("mxfp4")
    return mxfp4_donor(root / "a", 0), mxfp4_donor(root / "b", 1)


def test_mxfp4_experts_transfer_one_by_one_and_swap_through_transformers(mxfp4_pair, tmp_path):
    """gpt-oss stores its experts in MXFP4, fused: one expert is a byte range of the blocks and of the
    scales alike, the export loads with transformers, and a CPU hybrid swapped to it (blocks and scales
    dequantized by transformers' own MXFP4 loader) gives the export's logits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.live.hybrid import Hybrid

    a_dir, b_dir = mxfp4_pair
    donors = {"A": open_donor(a_dir), "B": open_donor(b_dir)}
    anatomy = donors["A"].anatomy
    assert anatomy.unclassified == [] and set(anatomy.experts_per_layer.values()) == {4}
    name = "model.layers.1.mlp.experts.gate_up_proj"
    for suffix in ("_blocks", "_scales", "_bias"):
        assert anatomy.parts[name + suffix].fused

    plan = Plan("A", [Assignment("expert", "B", (1,), (2,))])
    out = tmp_path / "out"
    run_export(ExportRequest(plan, donors, out))
    manifest = json.loads((out / "moe-surgeon-manifest.json").read_text())
    for suffix in ("_blocks", "_scales", "_bias"):
        assert [r["donor"] for r in manifest["tensors"][name + suffix]["source"]["experts"]] == ["A", "B", "A"]
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _logits(exported, 64)
    assert not torch.equal(expected, _logits(AutoModelForCausalLM.from_pretrained(a_dir).eval(), 64))

    swapped = Hybrid.materialize(Plan("A"), donors, device="cpu")
    swapped.apply(plan)
    assert torch.equal(_logits(swapped.model, 64), expected)


def test_expert_similarity_reads_one_expert_of_a_fused_tensor(pairs, tmp_path):
    """Per-expert similarity indexes fused tensors by their expert axis: a donor whose expert 2 is
    another donor's expert 2 has similarity 1 there, and less for every other expert."""
    import numpy as np

    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.features.routing.probe import expert_similarity

    a_dir, b_dir = pairs("gpt_oss")
    donors = {"A": open_donor(a_dir), "B": open_donor(b_dir)}
    run_export(ExportRequest(Plan("A", [Assignment("expert", "B", None, (2,))]), donors, tmp_path / "h"))
    sim = expert_similarity(open_donor(tmp_path / "h"), donors["B"])
    for layer, m in sim.items():
        assert np.isclose(m[2, 2], 1.0) and all(m[e, e] < 0.99 for e in (0, 1, 3)), layer


def test_distances_compare_dequantized_values(fp8_pair, mxfp4_pair):
    """The distance of a quantized weight is the distance of the values it stands for: the same
    figure as the same weights dequantized by transformers' own routines."""
    import torch
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from surgeon.core.donor import open_donor
    from surgeon.features.distance import relative, squared_norms

    def rel(a, b):
        return float((b.double() - a.double()).norm() / a.double().norm())

    a, b = (open_donor(d) for d in fp8_pair)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    raw = [load_file(d / "model.safetensors") for d in fp8_pair]
    want = rel(*(Fp8Dequantize(None)._dequantize_one(r[name], r[name + "_scale_inv"], torch.float32) for r in raw))
    assert relative(*squared_norms(a, b, name)) == pytest.approx(want, rel=1e-6)

    a, b = (open_donor(d) for d in mxfp4_pair)
    name = "model.layers.0.mlp.experts.down_proj"
    raw = [load_file(d / "model.safetensors") for d in mxfp4_pair]
    want = rel(*(convert_moe_packed_tensors(r[name + "_blocks"], r[name + "_scales"], dtype=torch.float32) for r in raw))
    assert relative(*squared_norms(a, b, name + "_blocks")) == pytest.approx(want, rel=1e-6)


def test_a_bf16_release_and_its_fp8_one_compare_by_their_values(tmp_path, run_cli):
    """Experts of 256 rows: two FP8 block rows against one bf16 run of values, cut at other places."""
    import torch
    from safetensors.torch import load_file
    from tiny_models import fp8_donor
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from surgeon.core.donor import open_donor
    from surgeon.features.distance import relative, squared_norms

    fp8 = fp8_donor(tmp_path / "fp8", "deepseek_v3", 0, moe_intermediate_size=256)
    plain = tmp_path / "fp8-bf16"
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    q, p = load_file(fp8 / "model.safetensors"), load_file(plain / "model.safetensors")
    assert q[name].shape[0] == 256 and q[name].dtype == torch.float8_e4m3fn
    values = Fp8Dequantize(None)._dequantize_one(q[name], q[name + "_scale_inv"], torch.float32).double()
    want = float((values - p[name].double()).norm() / p[name].double().norm())
    a, b = open_donor(plain), open_donor(fp8)
    assert relative(*squared_norms(a, b, name)) == pytest.approx(want, rel=1e-6)
    assert relative(*squared_norms(a, b, name, every=16)) == pytest.approx(want, rel=1e-6)  # whole, not sampled
    assert run_cli("distance", str(plain), str(fp8)).returncode == 0


def test_inspect_says_how_a_donor_is_stored_and_mixed(mxfp4_pair, pairs, run_cli):
    out = run_cli("inspect", str(mxfp4_pair[0])).stdout
    assert "stored mxfp4" in out and "(fused:" in out and " as stored in " in out
    out = run_cli("inspect", str(pairs("qwen3_next")[0])).stdout
    assert "linear attention on layers 0, full attention elsewhere" in out and "parameters" in out


def test_a_multi_token_prediction_layer_is_a_layer_of_the_grid(tmp_path):
    """DeepSeek-V3 keeps a multi-token-prediction layer after its decoder layers: every tensor of it is
    classified (its own as `mtp`), the grid shows it as a row, a SPEC names it, the export keeps it,
    and a swap that takes it changes nothing transformers runs (it does not load that layer)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan, parse_spec
    from surgeon.core.workbench import Workbench, surgery_sheet
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.features.verify import run_verify
    from surgeon.live.hybrid import Hybrid
    from tiny_models import mtp_donor

    donors = {"A": open_donor(mtp_donor(tmp_path / "a", 0)), "B": open_donor(mtp_donor(tmp_path / "b", 1))}
    anatomy = donors["A"].anatomy
    assert anatomy.unclassified == [] and anatomy.num_layers == 3 and anatomy.extra_layers == (2,)
    assert {n for n, p in anatomy.parts.items() if p.kind == "mtp"} == {
        f"model.layers.2.{k}.weight" for k in ("enorm", "hnorm", "eh_proj", "embed_tokens", "shared_head.norm",
                                                 "shared_head.head")}
    wb = Workbench(donors, "A")
    assert surgery_sheet(wb).labels[:3] == ["0", "1", "2 mtp"] and "mtp" in wb.columns

    plan = Plan("A", [parse_spec("mtp@2", "B"), Assignment("attention", "B")])
    run_export(ExportRequest(plan, donors, tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "moe-surgeon-manifest.json").read_text())
    assert manifest["tensors"]["model.layers.2.eh_proj.weight"]["source"] == {"donor": "B",
                                                                             "name": "model.layers.2.eh_proj.weight"}
    assert run_verify(tmp_path / "out", donors=True).problem is None  # byte for byte from B
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    swapped = Hybrid.materialize(Plan("A"), donors, device="cpu")
    swapped.apply(plan)
    assert torch.equal(_logits(swapped.model, 64), _logits(exported, 64))

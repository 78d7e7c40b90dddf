"""Anatomy tables classify every tensor transformers writes, by whole dotted segments."""

import json

import pytest
from tiny_models import CONFIGS

from surgeon.core.anatomy import Part, build_anatomy, classify
from surgeon.core.architectures import ARCHITECTURES, FALLBACK
from surgeon.core.donor import open_donor


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_tensor_of_every_architecture_is_classified(model_type, donors_of):
    donor = open_donor(donors_of(model_type, 1)[0])
    anatomy = donor.anatomy
    assert anatomy.known and anatomy.unclassified == []
    kinds = {p.kind for p in anatomy.parts.values()}
    assert {"attention", "norms", "embedding", "final_norm", "lm_head"} <= kinds
    if ARCHITECTURES[model_type].moe:
        assert {"router", "expert"} <= kinds
        assert anatomy.num_experts == 4
    else:
        assert kinds & {"router", "expert"} == set() and "mlp" in kinds


def test_deepseek_specifics(donors_of):
    a = open_donor(donors_of("deepseek_v3", 1)[0]).anatomy
    assert a.parts["model.layers.1.mlp.gate.e_score_correction_bias"] == Part("router", 1)
    assert a.parts["model.layers.0.mlp.gate_proj.weight"] == Part("mlp", 0)  # first_k_dense_replace
    assert a.parts["model.layers.1.mlp.shared_experts.up_proj.weight"] == Part("shared_expert", 1)
    assert a.parts["model.layers.1.self_attn.kv_a_layernorm.weight"] == Part("attention", 1)
    assert a.experts_per_layer == {1: 4, 2: 4}


def test_qwen2_moe_gate_and_shared_expert(donors_of):
    a = open_donor(donors_of("qwen2_moe", 1)[0]).anatomy
    assert a.parts["model.layers.0.mlp.shared_expert_gate.weight"] == Part("gate", 0)
    assert a.parts["model.layers.0.mlp.shared_expert.down_proj.weight"] == Part("shared_expert", 0)


def test_whole_segment_matching():
    arch = ARCHITECTURES["olmoe"]
    assert classify("model.layers.3.mlp.experts.10.up_proj.weight", arch) == Part("expert", 3, 10)
    assert classify("model.layers.3.mlp.experts.1.up_proj.weight", arch) == Part("expert", 3, 1)
    assert classify("model.layers.3.mlp.gate.weight", arch) == Part("router", 3)
    assert classify("model.layers.3.mlp.gate_proj.weight", arch) is None  # not a router
    assert classify("model.layers.3.self_attn.q_norm.weight", arch) == Part("attention", 3)
    deepseek = ARCHITECTURES["deepseek_v3"]
    assert classify("model.layers.5.mlp.shared_experts.up_proj.weight", deepseek) == Part("shared_expert", 5)
    # FP8 scales travel with their weight
    assert classify("model.layers.5.mlp.experts.7.up_proj.weight_scale_inv", deepseek) == Part("expert", 5, 7)


def test_the_batch_classifier_agrees_with_classify_name_by_name():
    """build_anatomy decides each rest of a name once and shares parts between names; on awkward
    names it must still give what `classify` gives each name alone, one Part object per part."""
    arch = ARCHITECTURES["qwen3_next"]
    names = [
        "model.layers.x.mlp.gate.weight",  # a rest first met under no layer number: not a layer tensor
        "model.layers.0.mlp.gate.weight",
        "model.layers.05.mlp.gate.weight",  # layer 5 spelled `05`: the same part as `5`
        "model.layers.5.mlp.gate.weight",
        "model.layers.5.mlp.experts.3.up_proj.weight",
        "model.layers.5.mlp.experts.3.down_proj.weight",
        "model.layers.\u00b2.mlp.gate.weight".encode().decode("unicode_escape"),  # a digit int() refuses
        "model.layers.0.linear_attn.in_proj_qkvz.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.mystery.weight",
        "model.layers.4.mystery.weight",
        "model.layers.7",
        "model.norm.weight",
        "lm_head.weight",
    ]
    a = build_anatomy("qwen3_next", names, {"num_hidden_layers": 8})
    for name in names:
        assert a.parts.get(name) == classify(name, arch), name
    assert sorted(a.unclassified) == sorted(n for n in names if classify(n, arch) is None)
    assert a.parts["model.layers.05.mlp.gate.weight"] is a.parts["model.layers.5.mlp.gate.weight"]
    experts = [a.parts[n] for n in names if ".experts." in n]
    assert experts[0] is experts[1] and experts[0] == Part("expert", 5, 3)
    assert a.mixers == {0: "linear"}
    assert a.experts_per_layer == {5: 1}


def test_unknown_model_type_falls_back_and_lists_leftovers():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.mlp.experts.2.w1.weight", "model.layers.0.mlp.gate.weight",
             "model.layers.0.mystery.weight", "vision_tower.patch.weight"]
    a = build_anatomy("brand_new_moe", names, {"num_hidden_layers": 1})
    assert a.architecture is FALLBACK and not a.known
    assert a.parts["model.layers.0.mlp.experts.2.w1.weight"] == Part("expert", 0, 2)
    assert a.unclassified == ["model.layers.0.mystery.weight", "vision_tower.patch.weight"]


def test_inspect_warns_on_unknown_model_type_and_lists_unclassified(donors_of, tmp_path, cli):
    import shutil

    d = tmp_path / "renamed"
    shutil.copytree(donors_of("olmoe", 1)[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "olmoe_next"
    (d / "config.json").write_text(json.dumps(cfg))
    r = cli("inspect", d, "--json")
    assert r.returncode == 0
    assert "warning" in r.stderr and "olmoe_next" in r.stderr
    s = json.loads(r.stdout)
    assert s["architecture_known"] is False and s["experts"] == 4 and s["unclassified"] == []

"""mergekit recipes both ways: `recipe export` writes a session's plan as a mergekit 0.1.x config,
`recipe import` reads one back; import(export(s)) is the same plan for what mergekit can express."""

import importlib.util
import json

import pytest
import yaml

from surgeon.core.donor import open_donor
from surgeon.core.plan import Assignment, Plan
from surgeon.core.resolve import resolve
from surgeon.core.session import load_session, make_session, save_session
from surgeon.errors import SurgeonError
from surgeon.features.recipe import export_recipe, import_recipe


def demo_donors():
    return {"A": open_donor("demo:base"), "B": open_donor("demo:arith"), "C": open_donor("demo:reverse")}


# in canonical order (component order, globals last), which is the order import writes
EXPRESSIBLE = [Assignment("attention", "B", (1,)), Assignment("router", "C"), Assignment("experts", "B"),
               Assignment("norms", "C"), Assignment("lm_head", "B")]


def write_session(tmp_path, plan, donors):
    path = tmp_path / "s.json"
    save_session(make_session(plan, donors, path), path)
    return path


def check_documented_shape(config):
    """mergekit's MergeConfiguration (mergekit/config.py), the parts a models-form linear config uses."""
    assert set(config) <= {"merge_method", "base_model", "models", "parameters", "dtype", "slices", "tokenizer_source"}
    assert config["merge_method"] == "linear" and isinstance(config["base_model"], str)
    for m in config["models"]:
        assert set(m) == {"model", "parameters"} and isinstance(m["model"], str)
        conds = m["parameters"]["weight"]
        assert isinstance(conds, list) and conds[-1].keys() == {"value"}
        for c in conds[:-1]:
            assert set(c) == {"filter", "value"} and isinstance(c["filter"], str) and c["value"] in (0, 1)


@pytest.mark.parametrize("assignments", [EXPRESSIBLE, EXPRESSIBLE[:1], []])
def test_round_trip_demo_donors_gives_the_same_plan(tmp_path, assignments):
    donors = demo_donors()
    plan = Plan("A", list(assignments))
    out = export_recipe(make_session(plan, donors), donors)
    (tmp_path / "r.yml").write_text(out.text)
    back = import_recipe(tmp_path / "r.yml")
    assert back.plan == plan
    assert [d.fingerprint for d in back.donors] == [donors[n].fingerprint for n in ["A", "B", "C"][:len(back.donors)]]


def test_round_trip_mixtral_is_fully_expressible_and_resolves_to_the_same_tensors(tmp_path, donors_of, run_cli):
    dirs = donors_of("mixtral", 3)
    donors = {n: open_donor(d) for n, d in zip("ABC", dirs)}
    # not in canonical order, with an overlap that later wins: import gives an equivalent plan
    plan = Plan("A", [Assignment("experts", "B"), Assignment("attention", "C"), Assignment("experts", "C", (1,)),
                      Assignment("router", "B", (0,)), Assignment("final_norm", "C")])
    session = write_session(tmp_path, plan, donors)
    r = run_cli("recipe", "export", session, "-o", tmp_path / "r.yml", "--strict")
    assert r.returncode == 0, r.stderr
    assert "NOT EXPRESSIBLE" not in (tmp_path / "r.yml").read_text()
    r = run_cli("recipe", "import", tmp_path / "r.yml", "-o", tmp_path / "back.json")
    assert r.returncode == 0, r.stderr
    back = load_session(tmp_path / "back.json")
    want = {n: (s.donor, s.tensor) for n, s in resolve(plan, donors).sources.items()}
    got = {n: (s.donor, s.tensor) for n, s in resolve(back.plan, donors).sources.items()}
    assert got == want and set(v[0] for v in got.values()) == {"A", "B", "C"}
    assert [a.spec for a in back.plan.assignments] == ["attention", "router@0", "experts@0", "experts@1",
                                                       "final_norm"]


def test_exported_yaml_has_mergekit_config_shape(tmp_path):
    donors = demo_donors()
    out = export_recipe(make_session(Plan("A", EXPRESSIBLE), donors), donors)
    config = yaml.safe_load(out.text)
    check_documented_shape(config)
    assert config["base_model"] == str(donors["A"].path.resolve())  # the session's donors, on disk
    assert [m["model"] for m in config["models"]] == [str(donors[n].path.resolve()) for n in "ABC"]


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None,
                    reason="mergekit is not installed (optional test dependency: moe-surgeon[peers]); the "
                           "documented shape is checked by test_exported_yaml_has_mergekit_config_shape")
def test_exported_yaml_validates_against_mergekits_own_model():
    from mergekit.config import MergeConfiguration

    donors = demo_donors()
    out = export_recipe(make_session(Plan("A", EXPRESSIBLE), donors), donors)
    MergeConfiguration.model_validate(yaml.safe_load(out.text))


needs_mergekit = pytest.mark.skipif(importlib.util.find_spec("mergekit") is None,
                                    reason="mergekit is not installed (optional test dependency: moe-surgeon[peers])")


@needs_mergekit
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "llama"])
def test_mergekit_running_the_exported_recipe_builds_the_tensors_our_export_writes(tmp_path, donors_of, run_cli,
                                                                                   model_type):
    """The peer itself: mergekit-yaml on `recipe export`'s YAML gives, tensor for tensor, the model
    `replay --export` writes. mergekit names MoE tensors as transformers holds them (fused experts,
    Mixtral's `mlp.gate`), so this fails if the filters speak disk names."""
    import os
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    dirs = donors_of(model_type, 3)
    donors = {n: open_donor(d) for n, d in zip("ABC", dirs)}
    moe = model_type != "llama"
    plan = Plan("A", [Assignment("attention", "C"), Assignment("norms", "B", (1,)), Assignment("lm_head", "C")]
                + ([Assignment("experts", "B"), Assignment("router", "B", (0,))] if moe else []))
    session = write_session(tmp_path, plan, donors)
    assert run_cli("recipe", "export", session, "-o", tmp_path / "r.yml", "--strict").returncode == 0
    assert run_cli("replay", session, "--export", tmp_path / "ours").returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()",
                        str(tmp_path / "r.yml"), str(tmp_path / "theirs"), "--no-copy-tokenizer"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    def state(d):
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()

    ours, theirs, base = state(tmp_path / "ours"), state(tmp_path / "theirs"), state(dirs[0])
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    moved = [k for k in ours if not torch.equal(ours[k], base[k])]  # not a copy of the base twice over
    assert any(".self_attn." in k for k in moved) and (not moe or any(".experts." in k for k in moved))


def test_inexpressible_parts_are_commented_and_strict_fails(tmp_path, run_cli):
    donors = demo_donors()
    plan = Plan("A", [Assignment("experts", "B"), Assignment("expert", "C", (0,), (2, 3))])
    session = write_session(tmp_path, plan, donors)
    r = run_cli("recipe", "export", session, "-o", tmp_path / "r.yml")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r.yml").read_text()
    assert "# NOT EXPRESSIBLE in mergekit: expert:2-3@0: mergekit fuses" in text
    assert "# NOT EXPRESSIBLE in mergekit: architecture olmoe" in text
    assert import_recipe(tmp_path / "r.yml").plan == Plan("A", [Assignment("experts", "B")])
    r = run_cli("recipe", "export", session, "-o", tmp_path / "strict.yml", "--strict")
    assert r.returncode == 2 and "nothing written (--strict)" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "strict.yml").exists()


def test_import_passthrough_slices_and_task_arithmetic(tmp_path):
    base, arith = (str(open_donor(f"demo:{n}").path) for n in ("base", "arith"))
    slices = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}]},
        {"sources": [{"model": arith, "layer_range": [2, 4]}]}]}
    (tmp_path / "p.yml").write_text(yaml.safe_dump(slices))
    plan = import_recipe(tmp_path / "p.yml").plan
    assert plan.base == "A" and {a.spec for a in plan.assignments} >= {"attention@2-3", "experts@2-3", "norms@2-3"}
    ta = {"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": arith, "parameters": {"weight": [{"filter": "self_attn", "value": 1}, {"value": 0}]}}]}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(ta))
    assert import_recipe(tmp_path / "t.yml").plan == Plan("A", [Assignment("attention", "B")])


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "ties", "models": [{"model": "demo:base"}]}, "real weight averaging is out of scope"),
    ({"merge_method": "linear", "models": [{"model": "demo:base", "parameters": {"weight": 0.5}},
                                           {"model": "demo:arith", "parameters": {"weight": 0.5}}]},
     "real weight averaging is out of scope"),
    ({"merge_method": "linear", "models": [{"model": "demo:base", "parameters": {"weight": 1}},
                                           {"model": "demo:arith", "parameters": {"weight": 1}}]},
     "real weight averaging is out of scope"),
    ({"merge_method": "linear", "models": [
        {"model": "demo:base", "parameters": {"weight": [{"filter": "q_proj", "value": 0}, {"value": 1}]}},
        {"model": "demo:arith", "parameters": {"weight": [{"filter": "q_proj", "value": 1}, {"value": 0}]}}]},
     "splits layer 0 attention"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "demo:base", "layer_range": [0, 2]}]},
                                                {"sources": [{"model": "demo:base", "layer_range": [0, 2]}]}]},
     "not a component transfer"),
    ({"merge_method": "passthrough", "models": [{"model": "demo:base"}], "dtype": "float8"},
     "dtype 'float8' is not a dtype moe-surgeon writes"),
    ({"merge_method": "passthrough", "models": [{"model": "demo:base"}], "out_dtype": 16},
     "out_dtype 16 is not a dtype"),
    ({"merge_method": "passthrough", "models": [{"model": "demo:base"}], "tokenizer_source": "union"},
     "tokenizer_source 'union'"),
    ({"merge_method": "passthrough", "models": [{"model": "demo:base"}],
      "tokenizer": {"source": "base", "tokens": {"<x>": {"source": "demo:base"}}}}, "tokenizer: tokens builds"),
    ({"merge_method": "passthrough", "models": [{"model": "demo:base"}], "chat_template": "chatml"},
     "chat_template"),
])
def test_import_refuses_what_is_not_a_component_transfer_in_one_line(tmp_path, run_cli, config, message):
    (tmp_path / "r.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(SurgeonError, match=message):
        import_recipe(tmp_path / "r.yml")
    r = run_cli("recipe", "import", tmp_path / "r.yml", "-o", tmp_path / "s.json")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert not (tmp_path / "s.json").exists()


def test_import_keeps_the_recipes_output_dtype_for_the_sessions_exports(tmp_path, run_cli):
    """mergekit writes `out_dtype` (else `dtype`): the imported session's replay --export writes that
    too unless --dtype says otherwise; a tokenizer_source of base is what an export does anyway."""
    from safetensors import safe_open

    config = {"merge_method": "passthrough", "models": [{"model": "demo:base"}], "dtype": "bfloat16",
              "out_dtype": "float32", "tokenizer_source": "base"}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(config))
    r = run_cli("recipe", "import", tmp_path / "r.yml", "-o", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["extensions"]["recipe"]["dtype"] == "float32"
    r = run_cli("replay", tmp_path / "s.json", "--export", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "writing float32, as the mergekit recipe" in r.stderr
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(n).get_dtype()) for n in f.keys()} == {"F32"}
    r = run_cli("replay", tmp_path / "s.json", "--export", tmp_path / "kept", "--dtype", "keep")
    assert r.returncode == 0, r.stderr
    with safe_open(tmp_path / "kept" / "model.safetensors", "pt") as f:
        assert "BF16" in {str(f.get_slice(n).get_dtype()) for n in f.keys()}

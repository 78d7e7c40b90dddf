"""Mixing dense donors into an MoE (Lee, Wynter and Ganti 2024): the export is what the routing formula says.

The oracles: a dense model mixed with copies of itself under the gate-less router gives the dense
model's logits; a mix of different donors gives the logits of a reference MoE built here from the
donors' own transformers modules (routing written out by hand). Both load the export with plain
`AutoModelForCausalLM.from_pretrained`.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_donor, save_char_tokenizer
from transformers import AutoModelForCausalLM

from surgeon.core.donor import DEMO_ROOT, open_donor
from surgeon.core.plan import parse_spec
from surgeon.core.session import load_session
from surgeon.errors import SurgeonError
from surgeon.features.mix.build import MixSettings, build_mix
from surgeon.features.mix.live import materialize_mix
from surgeon.features.mix.plan import (
    MixPlan,
    RouterSpec,
    initial_routers,
    parse_prompts,
    parse_router,
    resolve_mix,
)
from surgeon.features.mix.router_train import TrainSpec

IDS = torch.tensor([[5, 9, 12, 3, 30, 7, 21, 8, 4], [11, 11, 6, 25, 40, 2, 19, 33, 10]])
PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
DEMO_MIX = DEMO_ROOT.parent / "mix"


def logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return model(IDS).logits, model


def build(tmp_path, donors, plan, name="mix", **settings):
    return build_mix(plan, donors, tmp_path / name, MixSettings(**settings))


# ---------------------------------------------------------------- oracle 1: a model mixed with itself
@pytest.mark.parametrize("model_type,expected", [("llama", "MixtralForCausalLM"), ("mistral", "MixtralForCausalLM"),
                                                 ("qwen2", "Qwen2MoeForCausalLM")])
def test_gate_less_mix_of_a_model_with_copies_of_itself_gives_its_logits(tmp_path, donors_of, model_type, expected):
    a = donors_of(model_type, 1)[0]
    built = build(tmp_path, {"A": open_donor(a)}, MixPlan("A", ["A", "A", "A"], RouterSpec("uniform")))
    got, model = logits(built.export.path)
    want, _ = logits(a)
    assert type(model).__name__ == expected
    assert model.config.num_experts_per_tok == 3
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


# ---------------------------------------------------------------- oracle 2: different donors
class ReferenceMoE(torch.nn.Module):
    """softmax over the routed experts, keep the top k, renormalise; plus the always-on MLP."""

    def __init__(self, experts, router, top_k, always=None):
        super().__init__()
        self.experts, self.router, self.top_k, self.always = experts, router, top_k, always

    def forward(self, x):
        p = torch.softmax((x @ self.router.T).float(), dim=-1)
        top, idx = p.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w = (top * (idx == e)).sum(-1, keepdim=True)
            out = out + w * expert(x)
        return out + (self.always(x) if self.always is not None else 0)


def reference_logits(donor_paths, experts, always, attention_layer_from, routers, top_k):
    """The base with layer 1's attention from another donor and every MLP replaced by ReferenceMoE."""
    models = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in donor_paths.items()}
    ref = models["A"]
    layer, donor = attention_layer_from
    ref.model.layers[layer].self_attn.load_state_dict(models[donor].model.layers[layer].self_attn.state_dict())
    for l, block in enumerate(ref.model.layers):
        block.mlp = ReferenceMoE([models[e].model.layers[l].mlp for e in experts], routers[l], top_k,
                                 models[always].model.layers[l].mlp if always else None)
    with torch.no_grad():
        return ref(IDS).logits


@pytest.mark.parametrize("model_type,arch", [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("llama", "qwen2_moe")])
def test_mix_of_different_donors_equals_an_independent_reference(tmp_path, donors_of, model_type, arch):
    paths = dict(zip("ABC", donors_of(model_type, 3)))
    donors = {n: open_donor(p) for n, p in paths.items()}
    plan = MixPlan("A", ["B", "C", "A"], parse_router("random:2"), always_on="C",
                   assignments=[parse_spec("attention@1", "B")], arch=arch, seed=3)
    built = build(tmp_path, donors, plan)
    got, model = logits(built.export.path)
    assert model.config.model_type == arch
    saved = load_file(built.export.path / "model.safetensors")
    routers = [saved[name] for name in built.layout.routers]
    want = reference_logits(paths, ["B", "C", "A"], "C", (1, "B"), routers, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # The mix is not its base: the oracle would catch a mix that silently copied the base.
    assert (got - logits(paths["A"])[0]).abs().max() > 1e-2


# ---------------------------------------------------------------- what is written, byte for byte
@pytest.fixture(scope="module")
def bf16_donors(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {n: open_donor(save_char_tokenizer(make_donor(root / n, "llama", seed=i, dtype=torch.bfloat16)))
            for i, n in enumerate("ABC")}


def test_mixtral_experts_are_the_donors_mlp_bytes_w1_gate_w3_up_w2_down(tmp_path, bf16_donors):
    built = build(tmp_path, bf16_donors, MixPlan("A", ["B", "C"], RouterSpec("uniform")))
    saved = load_file(built.export.path / "model.safetensors")
    src = {n: load_file(d.path / "model.safetensors") for n, d in bf16_donors.items()}
    for l in range(2):
        for e, donor in enumerate("BC"):
            for proj, w in PROJ.items():
                got = saved[f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"]
                assert got.dtype == torch.bfloat16
                assert torch.equal(got, src[donor][f"model.layers.{l}.mlp.{proj}.weight"])
        router = saved[f"model.layers.{l}.block_sparse_moe.gate.weight"]
        assert router.shape == (2, 32) and router.dtype == torch.bfloat16 and not router.any()
        assert torch.equal(saved[f"model.layers.{l}.self_attn.q_proj.weight"], src["A"][f"model.layers.{l}.self_attn.q_proj.weight"])
    assert not any(".mlp." in n for n in saved)
    config = json.loads((built.export.path / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 2
    assert (built.export.path / "tokenizer.json").exists()
    card = (built.export.path / "README.md").read_text()
    assert "gate-less" in card and str(bf16_donors["B"].path) in card


def test_always_on_is_folded_into_mixtral_experts_and_is_qwen2_moe_shared_expert(tmp_path, bf16_donors):
    src = {n: load_file(d.path / "model.safetensors") for n, d in bf16_donors.items()}
    built = build(tmp_path, bf16_donors, MixPlan("A", ["B", "C"], parse_router("noisy:1"), always_on="A"))
    saved = load_file(built.export.path / "model.safetensors")
    mlp = lambda d, p: src[d][f"model.layers.0.mlp.{p}.weight"]  # noqa: E731
    e1 = "model.layers.0.block_sparse_moe.experts.1."
    assert torch.equal(saved[e1 + "w1.weight"], torch.cat([mlp("A", "gate_proj"), mlp("C", "gate_proj")], 0))
    assert torch.equal(saved[e1 + "w3.weight"], torch.cat([mlp("A", "up_proj"), mlp("C", "up_proj")], 0))
    assert torch.equal(saved[e1 + "w2.weight"], torch.cat([mlp("A", "down_proj"), mlp("C", "down_proj")], 1))

    built = build(tmp_path, bf16_donors, MixPlan("A", ["B", "C"], parse_router("noisy:1"), always_on="A",
                                                 arch="qwen2_moe"), name="qwen")
    saved = load_file(built.export.path / "model.safetensors")
    shared = "model.layers.0.mlp.shared_expert."
    assert torch.equal(saved[shared + "gate_proj.weight"], mlp("A", "gate_proj"))
    assert torch.equal(saved[shared + "down_proj.weight"], mlp("A", "down_proj") * 2)
    assert not saved["model.layers.0.mlp.shared_expert_gate.weight"].any()

    built = build(tmp_path, bf16_donors, MixPlan("A", ["B", "C"], arch="qwen2_moe"), name="none")
    saved = load_file(built.export.path / "model.safetensors")
    assert saved[shared + "down_proj.weight"].shape == (32, 0)  # no always-on expert: it adds exactly 0


def test_dtype_casts_every_tensor_the_folded_experts_too(tmp_path, bf16_donors):
    built = build(tmp_path, bf16_donors, MixPlan("A", ["B", "C"], parse_router("noisy:1"), always_on="A"),
                  dtype="float32")
    saved = load_file(built.export.path / "model.safetensors")
    src = {n: load_file(d.path / "model.safetensors") for n, d in bf16_donors.items()}
    assert {t.dtype for t in saved.values()} == {torch.float32}
    down = torch.cat([src["A"]["model.layers.1.mlp.down_proj.weight"], src["B"]["model.layers.1.mlp.down_proj.weight"]], 1)
    assert torch.equal(saved["model.layers.1.block_sparse_moe.experts.0.w2.weight"], down.float())
    assert json.loads((built.export.path / "config.json").read_text())["dtype"] == "float32"


def test_live_mix_gives_the_export_logits(tmp_path, donors_of):
    paths = donors_of("llama", 3)
    donors = {n: open_donor(p) for n, p in zip("ABC", paths)}
    plan = MixPlan("A", ["B", "C"], parse_router("noisy:1"), always_on="A", seed=1)
    built = build(tmp_path, donors, plan)
    live = materialize_mix(built.layout, donors, built.outcome.routers, dtype="keep")
    with torch.no_grad():
        got = live.model(IDS).logits
    torch.testing.assert_close(got, logits(built.export.path)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- routers
def test_noisy_and_random_routers_are_seeded_white_noise(donors_of):
    donors = {"A": open_donor(donors_of("llama", 1)[0])}
    layout = lambda spec, seed: resolve_mix(MixPlan("A", ["A"] * 4, parse_router(spec), seed=seed), donors)  # noqa
    first, again, other = (initial_routers(layout("noisy:2", s)) for s in (0, 0, 1))
    name = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])
    assert 0.01 < float(first[name].std()) < 0.03
    assert 0.7 < float(initial_routers(layout("random:2", 0))[name].std()) < 1.3
    assert initial_routers(layout("uniform", 0)) is None
    assert layout("uniform", 0).top_k == 4 and layout("noisy:1", 0).top_k == 1


def test_hidden_router_rows_are_the_normalised_post_attention_norm_means(tmp_path, donors_of):
    paths = donors_of("llama", 3)
    donors = {n: open_donor(p) for n, p in zip("ABC", paths)}
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"0": ["abc", "hello"], "C": {"positive": ["12+3="], "negative": ["zz"]}}))
    plan = MixPlan("A", ["B", "C"], parse_router("hidden:1"), prompts=parse_prompts(prompts, ["B", "C"], donors))
    built = build(tmp_path, donors, plan)
    _, model = logits(built.export.path)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(paths[0])
    saved = load_file(built.export.path / "model.safetensors")
    for layer, name in enumerate(built.layout.routers):
        seen = []
        hook = model.model.layers[layer].post_attention_layernorm.register_forward_hook(
            lambda m, i, o: seen.append(o[0].mean(0)))

        def mean(texts):
            seen.clear()
            with torch.no_grad():
                for t in texts:
                    model(torch.tensor([tok(t, add_special_tokens=False).input_ids]))
            return torch.stack(seen).mean(0)

        rows = [mean(["abc", "hello"]), mean(["12+3="]) - mean(["zz"])]
        hook.remove()
        want = torch.stack([r / r.norm() for r in rows])
        torch.testing.assert_close(saved[name], want, rtol=0, atol=1e-5)


def test_prompts_file_must_cover_every_expert(tmp_path, donors_of):
    donors = {"A": open_donor(donors_of("llama", 1)[0])}
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"0": ["x"]}))
    with pytest.raises(SurgeonError, match="no prompts for expert 1"):
        parse_prompts(f, ["A", "A"], donors)
    f.write_text(json.dumps({"7": ["x"]}))
    with pytest.raises(SurgeonError, match="'7' names no expert"):
        parse_prompts(f, ["A", "A"], donors)


# ---------------------------------------------------------------- router training
def write_train_file(path: Path) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((1, 2), (30, 4), (7, 7), (12, 20))]
    rows += [{"prompt": f"rev:{w}=", "answer": w[::-1]} for w in ("abc", "hello", "xyz")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_router_training_moves_only_the_routers_and_is_deterministic(tmp_path, donors_of):
    donors = {n: open_donor(p) for n, p in zip("ABC", donors_of("llama", 3))}
    plan = lambda: MixPlan("A", ["B", "C"], RouterSpec("uniform"))  # noqa: E731
    spec = TrainSpec(str(write_train_file(tmp_path / "train.jsonl")), steps=4, lr=0.05, batch_size=3, seed=0)
    runs = [build(tmp_path, donors, plan(), f"t{i}", train=spec) for i in range(2)]
    plain = load_file(build(tmp_path, donors, plan(), "plain").export.path / "model.safetensors")
    a, b = (load_file(r.export.path / "model.safetensors") for r in runs)
    routers = set(runs[0].layout.routers)
    for name, t in a.items():
        assert torch.equal(t, b[name]), name  # bit for bit, trained routers included
        assert torch.equal(t, plain[name]) == (name not in routers), name
    losses = runs[0].outcome.losses
    assert len(losses) == 4 and losses == runs[1].outcome.losses
    csv = (runs[0].export.path / "router-training.csv").read_text().splitlines()
    assert csv[0] == "step,loss" and len(csv) == 5
    assert "Router training" in (runs[0].export.path / "README.md").read_text()


def test_top_1_router_training_is_refused(tmp_path, donors_of):
    donors = {"A": open_donor(donors_of("llama", 1)[0])}
    spec = TrainSpec(str(write_train_file(tmp_path / "train.jsonl")), steps=2)
    with pytest.raises(SurgeonError, match="no gradient"):
        build(tmp_path, donors, MixPlan("A", ["A", "A"], parse_router("noisy:1")), train=spec)
    assert not (tmp_path / "mix").exists()


# ---------------------------------------------------------------- the command line and replay
def test_cli_mix_of_the_demo_donors_replays_bit_for_bit(tmp_path, cli):
    session = tmp_path / "mix-session.json"
    r = cli("mix", tmp_path / "mix", "--base", "demo:dense-base", "--expert", "demo:dense-arith",
            "--expert", "demo:dense-reverse", "--router", "uniform", "--train", DEMO_MIX / "train.jsonl",
            "--steps", "3", "--lr", "0.01", "--device", "cpu", "--session", session, "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["arch"] == "mixtral" and record["top_k"] == 2 and len(record["losses"]) == 3
    s = load_session(session)
    ext = s.extensions["mix"]
    assert ext["experts"] == ["B", "C"] and ext["train"]["steps"] == 3
    assert [d.path for d in s.donors] == ["demo:dense-base", "demo:dense-arith", "demo:dense-reverse"]
    assert all(d.fingerprint.startswith("sha256:") for d in s.donors)

    r = cli("replay", session, "--export", tmp_path / "again", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["routers_match_recording"] is True
    first, again = (load_file(tmp_path / d / "model.safetensors") for d in ("mix", "again"))
    assert first.keys() == again.keys()
    assert all(torch.equal(t, again[n]) for n, t in first.items())
    assert any(first[n].any() for n in first if n.endswith("block_sparse_moe.gate.weight"))  # trained
    # Its plan alone is not the mix: commands that work on a session's plan refuse it.
    for args, verb in ((["probe", session, "--probe", "em:arith"], "probe"),
                       (["sweep", session, "--group", "attention"], "sweep a session made with --base"),
                       (["routing", session], "analyse"),
                       (["gates", "add", tmp_path / "gated", "--base", session, "--type", "scalar", "--layers", "all"], "add gates to")):
        r = cli(*args)
        assert r.returncode == 2 and f"a mix session; {verb} the mix's export directory" in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("args,message", [
    (["--router", "noisy:3"], "K must be between 1 and the number of experts (2)"),
    (["--router", "sparse"], "one of uniform, noisy:K"),
    (["--router", "hidden"], "--prompts FILE"),
    (["--take", "mlp@0=demo:dense-arith"], "a mix's MLPs are its experts"),
    (["--expert", "demo:arith"], "is olmoe"),
])
def test_cli_mix_refuses_bad_input_in_one_line(tmp_path, cli, args, message):
    r = cli("mix", tmp_path / "out", "--base", "demo:dense-base", "--expert", "demo:dense-arith",
            "--expert", "demo:dense-reverse", *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_demo_dense_donors_differ_only_in_their_mlps():
    base = load_file(DEMO_ROOT / "dense-base" / "model.safetensors")
    for name in ("dense-arith", "dense-reverse"):
        donor = load_file(DEMO_ROOT / name / "model.safetensors")
        assert open_donor(f"demo:{name}").model_type == "llama"
        for t, v in donor.items():
            assert torch.equal(v, base[t]) != (".mlp." in t), t


# ---------------------------------------------------------------- progress and cancellation (surgeon.jobs)
def test_a_mix_build_reports_steps_training_then_bytes(tmp_path, donors_of):
    donors = {n: open_donor(p) for n, p in zip("ABC", donors_of("llama", 3))}
    spec = TrainSpec(str(write_train_file(tmp_path / "train.jsonl")), steps=3, lr=0.05, batch_size=2)
    steps = []
    built = build_mix(MixPlan("A", ["B", "C"]), donors, tmp_path / "mix", MixSettings(train=spec),
                      progress=steps.append)
    training = [s for s in steps if s.unit == "steps"]
    written = [s for s in steps if s.unit == "bytes"]
    assert [s.done for s in training] == [1, 2, 3] and training[-1].series == tuple(built.outcome.losses)
    assert steps.index(training[-1]) < steps.index(written[0])  # routers first, then the export
    assert written[-1].done == written[-1].total == built.export.bytes


@pytest.mark.parametrize("unit", ["steps", "bytes"])
def test_cancelling_a_mix_build_leaves_nothing_behind(tmp_path, donors_of, unit):
    from surgeon.jobs import Cancelled, CancelToken

    donors = {n: open_donor(p) for n, p in zip("ABC", donors_of("llama", 3))}
    spec = TrainSpec(str(write_train_file(tmp_path / "train.jsonl")), steps=50, batch_size=2)
    token, seen = CancelToken(), []

    def progress(step):
        seen.append(step)
        if step.unit == unit:
            token.cancel()

    with pytest.raises(Cancelled):
        build_mix(MixPlan("A", ["B", "C"]), donors, tmp_path / "out", MixSettings(train=spec),
                  progress=progress, cancel=token)
    assert len([s for s in seen if s.unit == unit]) == 1  # stopped at the next step or tensor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
    assert torch.are_deterministic_algorithms_enabled() is False

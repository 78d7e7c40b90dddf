"""Our own llama forward (surgeon/live/native_model.py) gives transformers' logits bit for bit, through
every call the scorer makes, and a probe on it never imports transformers.

The comparisons run both models under `probe_forwards` (oneDNN linears, grouped-head attention),
as every probe does, on tiny llamas made by transformers and saved with save_pretrained."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import make_donor, save_char_tokenizer

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.live.hybrid import Hybrid
from surgeon.live.loader import load_model
from surgeon.live.native_config import native_config, read_native_config
from surgeon.probes.run import forward_of
from surgeon.probes.scoring import _fork, loglikelihoods, load_tokenizer, probe_forwards

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "grouped": {},  # 4 query heads on 2 key/value heads
    "tied, biased, all heads": dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "wide heads": dict(head_dim=16, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "mistral, no window": dict(model_type="mistral", sliding_window=None),
    "qwen2 (q, k, v biases)": dict(model_type="qwen2", tie_word_embeddings=True),
    "olmoe (routed experts, q/k norms)": dict(model_type="olmoe"),
    "olmoe, top-k renormalised": dict(model_type="olmoe", norm_topk_prob=True, attention_bias=True),
    "mixtral": dict(model_type="mixtral"),
    "qwen3-moe, a dense layer, per-head q/k norms": dict(model_type="qwen3_moe", mlp_only_layers=[1],
                                                         norm_topk_prob=True),
    "qwen2-moe, a gated shared expert": dict(model_type="qwen2_moe"),
}
MIN = torch.finfo(torch.float32).min


def _pair(tmp_path, overrides, dtype="float32", seed=0):
    overrides = dict(overrides)
    model_type = overrides.pop("model_type", "llama")
    path = make_donor(tmp_path / "llama", model_type, seed, **overrides)
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    save_char_tokenizer(path)
    theirs = load_model(path, device="cpu", dtype=dtype)
    hybrid = Hybrid.materialize(Plan("llama"), {"llama": open_donor(path)}, device="cpu", dtype=dtype, native=True)
    assert forward_of(hybrid.model) == "native" and forward_of(theirs) == "transformers"
    return path, theirs, hybrid


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_call_the_scorer_makes_gives_transformers_logits_bit_for_bit(tmp_path, variant):
    _, theirs, hybrid = _pair(tmp_path, VARIANTS[variant])
    mine = hybrid.model
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (3, 17))
    cpu = torch.device("cpu")
    with probe_forwards(theirs, cpu), probe_forwards(mine, cpu):
        # a plain causal forward, every position's logits
        assert torch.equal(theirs(input_ids=ids).logits, mine(input_ids=ids).logits)
        # the shared prefix's cache, the last position's logits
        a = theirs(input_ids=ids[:1, :9], use_cache=True, logits_to_keep=1)
        b = mine(input_ids=ids[:1, :9], use_cache=True, logits_to_keep=1)
        assert torch.equal(a.logits, b.logits)
        # forks of that cache under an additive tree mask with explicit positions, kept logits by mask
        mask = torch.zeros(3, 1, 8, 17)
        mask[:, :, :, 12:] = MIN
        mask[1, :, :, 10] = MIN
        positions = torch.arange(9, 17)[None].expand(3, -1)
        keep = torch.zeros(3, 8, dtype=torch.bool)
        keep[:, 2:5] = True
        rows = torch.zeros(3, dtype=torch.long)
        out_a = theirs(input_ids=ids[:, 9:], attention_mask=mask, position_ids=positions, cache=_fork(a.cache, rows),
                       use_cache=True, logits_to_keep=keep).logits
        out_b = mine(input_ids=ids[:, 9:], attention_mask=mask, position_ids=positions, cache=_fork(b.cache, rows),
                     use_cache=True, logits_to_keep=keep).logits
        assert out_a.shape == (9, 64) and torch.equal(out_a, out_b)
        # the fork left the prefix's cache as it was: a second fork scores the same
        again = mine(input_ids=ids[:, 9:], attention_mask=mask, position_ids=positions, cache=_fork(b.cache, rows),
                     use_cache=True, logits_to_keep=keep).logits
        assert torch.equal(again, out_b)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_padded_batch_skips_its_padding_and_gives_transformers_logits_bit_for_bit(tmp_path, variant):
    _, theirs, hybrid = _pair(tmp_path, VARIANTS[variant])
    mine = hybrid.model
    ids = torch.randint(3, 64, (3, 15), generator=torch.Generator().manual_seed(3))
    real = torch.zeros(3, 15, dtype=torch.bool)
    for r, n in enumerate((15, 6, 11)):  # each row's padding after its tokens, as the scorer packs them
        real[r, :n] = True
    keep = real.clone()
    keep[:, :2] = False
    seen = []
    hook = mine.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    cpu = torch.device("cpu")
    with probe_forwards(theirs, cpu), probe_forwards(mine, cpu):
        # causal rows, no mask given
        assert torch.equal(theirs(input_ids=ids, logits_to_keep=keep).logits,
                           mine(input_ids=ids, logits_to_keep=keep, real=real).logits)
        # after a shared prefix's cache, under an additive mask in which the padding is seen by nobody
        a = theirs(input_ids=ids[:1, :5], use_cache=True, logits_to_keep=1)
        b = mine(input_ids=ids[:1, :5], use_cache=True, logits_to_keep=1)
        mask = torch.zeros(3, 1, 15, 20)
        mask[:, :, :, 5:] = torch.where(torch.ones(15, 15, dtype=torch.bool).tril() & real[:, None, :], 0.0, MIN)[:, None]
        positions = torch.arange(5, 20)[None].expand(3, -1)
        rows = torch.zeros(3, dtype=torch.long)
        out_a = theirs(input_ids=ids, attention_mask=mask, position_ids=positions, cache=_fork(a.cache, rows),
                       use_cache=True, logits_to_keep=keep).logits
        out_b = mine(input_ids=ids, attention_mask=mask, position_ids=positions, cache=_fork(b.cache, rows),
                     use_cache=True, logits_to_keep=keep, real=real).logits
        assert out_a.shape == (int(keep.sum()), 64) and torch.equal(out_a, out_b)
    hook.remove()
    # The linears saw the tokens, not the padding (and the prefix's 5); routed experts run it.
    moe = bool(mine.config.num_experts)
    tokens = (3, 15, 32) if moe else (int(real.sum()), 32)
    assert seen == [tokens, (1, 5, 32), tokens] and mine.skips_padding is not moe
    if not moe:
        with pytest.raises(ValueError, match="bool mask"):
            mine(input_ids=ids, logits_to_keep=1, real=real)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_padded_batch_in_half_precision_skips_its_padding_to_the_same_bits(tmp_path, dtype):
    _, theirs, hybrid = _pair(tmp_path, {}, dtype=dtype)
    ids = torch.randint(3, 64, (4, 40), generator=torch.Generator().manual_seed(4))
    real = torch.zeros(4, 40, dtype=torch.bool)
    for r, n in enumerate((40, 33, 20, 7)):
        real[r, :n] = True
    cpu = torch.device("cpu")
    with probe_forwards(theirs, cpu), probe_forwards(hybrid.model, cpu):
        assert torch.equal(theirs(input_ids=ids, logits_to_keep=real).logits,
                           hybrid.model(input_ids=ids, logits_to_keep=real, real=real).logits)


@pytest.mark.parametrize("family", ["llama", "olmoe", "mixtral", "qwen3_moe", "qwen2_moe"])
def test_bfloat16_weights_give_transformers_logits_bit_for_bit(tmp_path, family):
    _, theirs, hybrid = _pair(tmp_path, {"model_type": family}, dtype="bfloat16")
    assert next(hybrid.model.parameters()).dtype == torch.bfloat16
    assert hybrid.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it
    ids = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    with probe_forwards(theirs, cpu), probe_forwards(hybrid.model, cpu):
        assert torch.equal(theirs(input_ids=ids).logits, hybrid.model(input_ids=ids).logits)


def test_loglikelihoods_on_our_forward_and_tokenizer_are_transformers_to_the_bit(tmp_path):
    path, theirs, hybrid = _pair(tmp_path, VARIANTS["grouped"])
    lean, full = load_tokenizer(path, lean=True), load_tokenizer(path)
    assert type(lean).__name__ == "LeanTokenizer"
    shared = "question 12 + 30 = : answer "  # a long common prefix: the scorer runs it once, then forks
    requests = [(shared + ctx, cont) for ctx in ("a b", "a bc", "zz", "a b") for cont in (" 4", " 42", "x")]
    requests += [("", "abc"), ("q:", " 1 2 3")]
    a = loglikelihoods(theirs, full, requests, batch_size=3)
    b = loglikelihoods(hybrid.model, lean, requests, batch_size=3)
    assert a == b


def test_a_swap_to_another_donor_moves_our_forward_to_its_weights(tmp_path):
    one = make_donor(tmp_path / "one", "llama", 0)
    two = make_donor(tmp_path / "two", "llama", 1)
    donors = {"one": open_donor(one), "two": open_donor(two)}
    hybrid = Hybrid.materialize(Plan("one", [parse_spec("attention", "two")]), donors, device="cpu",
                                dtype="float32", native=True)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    hybrid.apply(Plan("two"), dtype="float32")
    with torch.no_grad():
        assert torch.equal(hybrid.model(input_ids=ids).logits, load_model(two, device="cpu", dtype="float32")(ids).logits)


def test_layer_gates_hook_our_decoder_layers_as_they_hook_transformers(tmp_path):
    from surgeon.live.layer_gates import add_zero_gates, gate_modules

    _, theirs, hybrid = _pair(tmp_path, {})
    for model in (theirs, hybrid.model):
        add_zero_gates(model, "vector", [1])
        with torch.no_grad():
            gate_modules(model)[1].weight.copy_(torch.linspace(-1, 1, 32))
    ids = torch.tensor([[3, 9, 4, 20, 7, 7]])
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits, hybrid.model(input_ids=ids).logits
        assert torch.equal(a, b)
        gate_modules(hybrid.model)[1].weight.zero_()
        assert not torch.equal(hybrid.model(input_ids=ids).logits, b)  # the gate did act


BASE = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("change", [
    {"model_type": "mixtral"},
    {"model_type": "mistral"},  # MistralConfig's sliding window defaults to 4096 where the key is absent
    {"model_type": "mistral", "sliding_window": 4096},
    {"model_type": "mistral", "sliding_window": None, "attention_bias": True},  # a key Mistral does not read
    {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32},
    {"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}},
    {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"hidden_act": "gelu"},
    {"pretraining_tp": 2},
    {"sliding_window": 16},
    {"_attn_implementation": "eager"},
    {"a_key_a_newer_transformers_adds": 1},
    {"num_key_value_heads": 3},
    {"max_position_embeddings": None},  # each family's class has its own default: the scorer truncates by it
])
def test_a_config_the_forward_does_not_implement_goes_to_transformers(change):
    assert native_config(BASE) is not None
    changed = {**BASE, **change}
    if change.get("model_type") != "mistral":  # there a null window is what says "no window"
        changed = {k: v for k, v in changed.items() if v is not None}
    assert native_config(changed) is None


def test_each_family_takes_its_biases_from_its_own_description():
    mistral = native_config({**BASE, "model_type": "mistral", "sliding_window": None})
    qwen2 = native_config({**BASE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096,
                           "max_window_layers": 28, "layer_types": ["full_attention"] * 2})
    llama = native_config({**BASE, "attention_bias": True})
    assert (mistral.qkv_bias, mistral.o_bias, mistral.mlp_bias) == (False, False, False)
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.mlp_bias) == (True, False, False)
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias) == (True, True, False)


def test_a_probe_falls_back_to_transformers_where_asked_or_where_the_forward_does_not_reach(tmp_path, monkeypatch):
    from surgeon.features.probe import FORWARD_ENV, native_forward
    from surgeon.probes.registry import parse_probe

    mc, em = parse_probe("mc:arith_mc,limit=2"), parse_probe("em:arith,limit=2")
    assert native_forward([mc]) and not native_forward([mc, em])  # generation runs on transformers' classes
    monkeypatch.setenv(FORWARD_ENV, "transformers")
    assert not native_forward([mc])
    other = open_donor(make_donor(tmp_path / "deepseek_v3", "deepseek_v3", 0))  # not ours (yet)
    assert read_native_config(other.path) is None
    hybrid = Hybrid.materialize(Plan("m"), {"m": other}, device="cpu", dtype="float32", native=True)
    assert forward_of(hybrid.model) == "transformers"


def test_the_probe_command_on_a_llama_never_imports_transformers_and_records_its_forward(tmp_path):
    path = make_donor(tmp_path / "llama", "llama", 0)
    save_char_tokenizer(path)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": f"{a}+{a}=", "choices": [str(2 * a), str(a)], "answer": 0}) + "\n"
                             for a in range(6)))
    code = ("import sys\nfrom surgeon.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print('TRANSFORMERS', 'transformers' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code, "probe", str(path), "--probe", f"mc:{items}", "--device", "cpu",
                        "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out, last = r.stdout.rsplit("\n", 2)[0], r.stdout.strip().splitlines()[-1]
    assert last == "TRANSFORMERS False 0", r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads(out)["results"]
    assert [row["forward"] for row in results] == ["native"] and results[0]["n"] == 6


def test_weights_read_while_torch_imports_become_the_parameters_in_place(tmp_path):
    from surgeon.live.preload import start_preload

    one = make_donor(tmp_path / "one", "llama", 0)
    two = make_donor(tmp_path / "two", "llama", 1)
    donors = {"one": open_donor(one), "two": open_donor(two)}
    plan = Plan("one", [parse_spec("attention@1", "two")])
    preload = start_preload(plan, donors, "float32")
    assert preload is not None and {s[0] for s in preload.sources.values()} == {
        str(donors["one"].tensors["lm_head.weight"].file), str(donors["two"].tensors["lm_head.weight"].file)}
    hybrid = Hybrid.materialize(plan, donors, device="cpu", dtype="float32", native=True, preload=preload)
    plain = Hybrid.materialize(plan, donors, device="cpu", dtype="float32", native=True)
    model = hybrid.model
    assert model.preloaded == {n for n, _ in model.named_parameters()}  # every weight, none copied again
    memory = preload.memory
    base = torch.frombuffer(memory, dtype=torch.uint8).data_ptr()
    assert all(base <= p.data_ptr() < base + len(memory) for p in model.parameters())
    for (name, a), (_, b) in zip(model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[3, 9, 4, 20, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
        hybrid.apply(Plan("two"), dtype="float32")  # a swap writes into the preloaded memory
        assert torch.equal(model(input_ids=ids).logits, load_model(two, device="cpu", dtype="float32")(ids).logits)


def test_nothing_is_preloaded_where_the_load_casts(tmp_path):
    from surgeon.live.preload import start_preload

    path = make_donor(tmp_path / "one", "llama", 0)
    assert start_preload(Plan("one"), {"one": open_donor(path)}, "bfloat16") is None


def test_a_preload_that_cannot_read_gives_nothing_and_the_load_reads_as_before(tmp_path):
    from surgeon.live.preload import Preload

    path = make_donor(tmp_path / "one", "llama", 0)
    shard = next(path.glob("*.safetensors"))
    size = shard.stat().st_size
    broken = Preload({"lm_head.weight": (str(shard), size - 40, 64 * 32 * 4, "F32", (64, 32))}).start()
    assert broken.tensors() == {} and "shorter" in broken.error
    hybrid = Hybrid.materialize(Plan("one"), {"one": open_donor(path)}, device="cpu", dtype="float32", native=True,
                                preload=broken)
    assert hybrid.model.preloaded == frozenset()
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(hybrid.model(input_ids=ids).logits, load_model(path, device="cpu", dtype="float32")(ids).logits)

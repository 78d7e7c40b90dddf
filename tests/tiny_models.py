"""Tiny real checkpoints made through transformers' own classes and save_pretrained.

Every architecture moe-surgeon has a table for, at a size that builds in milliseconds. Donors of
one architecture differ only in their seed, as post-trained siblings of one base would differ
only in their weights.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "olmoe": dict(intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=16, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_hidden_layers=2, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4,
                      num_experts_per_tok=2, head_dim=8),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                        n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8),
    "llama": dict(intermediate_size=16, num_hidden_layers=2),
    "mistral": dict(intermediate_size=16, num_hidden_layers=2),
    "qwen2": dict(intermediate_size=16, num_hidden_layers=2),
}
MOE_TYPES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
EXPERTS_PREFIX = {"mixtral": "block_sparse_moe.experts"}  # others: mlp.experts


def make_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = {**_COMMON, **CONFIGS[model_type], **overrides}
    kw.setdefault("tie_word_embeddings", False)
    return AutoConfig.for_model(model_type, **kw)


def make_donor(path: Path, model_type: str, seed: int, dtype=None, max_shard_size=None, **overrides) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type, **overrides))
    with torch.no_grad():
        # Give every tensor a seed-specific value, biases and norms included, so that a wrong source
        # shows up in a comparison (zero or one initialisations are equal across seeds).
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789+=: ")


def save_char_tokenizer(path: Path) -> Path:
    """A character-level tokenizer (ids 0-2 special, then CHARS), saved beside a tiny donor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(path)
    return path


def flip_byte(path, offset: int, mask: int = 0x01) -> None:
    """Change one byte of a file in place, as a bit flip on disk or a careless edit would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@contextmanager
def fed(model):
    """The shape of input_ids of every forward the model runs."""
    shapes = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


# ---------------------------------------------------------------- the oracle of a pruned model (test_prune*.py)
def routers(model) -> dict:
    """layer -> the router module of each MoE layer, as the routing analysis finds it."""
    from surgeon.features.routing.probe import moe_layers

    return {m.layer: m.gate for m in moe_layers(model)}


# Per-expert values a router adds to the scores it takes its top-k over, wherever the family keeps them
# (on the router, on the MoE block, in ERNIE's moe_statics): -inf there removes an expert from the choice.
_CHOICE_BIASES = ("e_score_correction_bias", "expert_bias", "balancing_biases")


@contextmanager
def pruned_experts_unreachable(model, pruned: dict[int, list[int]]):
    """The oracle: `model` whose routers cannot choose the `pruned` experts (layer -> original indices).
    Their router logits are -inf as they leave the router's last projection, and so is every choice
    bias of theirs: a softmax over all logits then equals a softmax over the kept ones, a sigmoid
    scores them 0, and no bias can lift them back into the top-k."""
    import torch

    from surgeon.features.routing.probe import moe_layers

    undo = []
    for moe in moe_layers(model):
        router, gone = moe.gate, torch.tensor(pruned[moe.layer], dtype=torch.long)
        seen = set()
        for module in (router, moe.mlp):
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                if name.rsplit(".", 1)[-1] in _CHOICE_BIASES and id(t) not in seen:
                    seen.add(id(t))
                    saved = t.detach().clone()
                    with torch.no_grad():
                        t[..., gone] = float("-inf")
                    undo.append(lambda b=t, s=saved: b.data.copy_(s))

        def mask(out, gone=gone):
            out = out.clone()
            out[..., gone] = float("-inf")
            return out

        # A router with projections of its own (Zaya's MLP router) scores experts with the last one;
        # elsewhere the logits come from F.linear on the router's weight: mask them as they leave it.
        heads = [m for m in router.modules() if isinstance(m, torch.nn.Linear) and m is not router]
        if heads:
            handle = heads[-1].register_forward_hook(lambda _m, _a, out, f=mask: f(out))
            undo.append(handle.remove)
            continue
        linear = torch.nn.functional.linear

        def masked(*args, f=mask, **kwargs):
            return f(linear(*args, **kwargs))

        pre = router.register_forward_pre_hook(lambda *_a, m=masked: setattr(torch.nn.functional, "linear", m))
        post = router.register_forward_hook(lambda *_a: setattr(torch.nn.functional, "linear", linear))
        undo += [pre.remove, post.remove]
    try:
        yield model
    finally:
        for u in reversed(undo):
            u()


# ---------------------------------------------------------------- every text MoE family (test_conformance.py)
def text_moe_types() -> list[str]:
    """The model types transformers registers for causal LM whose config speaks of experts, routers or
    MoE: enumerated from its own auto mapping, so a family added upstream is seen here."""
    import dataclasses
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        cls = CONFIG_MAPPING[model_type]
        try:
            names = [f.name for f in dataclasses.fields(cls)]
        except TypeError:
            names = list(inspect.signature(cls.__init__).parameters)
        if any(w in n for n in names for w in ("expert", "moe", "router")):
            found.append(model_type)
    return found


@dataclass(frozen=True)
class Tiny:
    """A family's tiny config: `overrides` on top of _TINY_COMMON, and the routed experts per MoE layer."""

    overrides: dict
    experts: int = 4


_TINY_COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    tie_word_embeddings=False)
# One entry per family, found by building each with its own config class: sizes shrunk, MoE switched on
# where the default is dense, and one layer of each kind the family mixes (dense, linear attention, Mamba).
_CONFIGS = Path(__file__).parent / "data" / "tiny_moe_configs.json"
CONFORMANCE: dict[str, Tiny] = {
    t: Tiny(c["overrides"], c.get("experts", 4)) for t, c in json.loads(_CONFIGS.read_text()).items()
}


def conformance_donor(path: Path, model_type: str, seed: int, **overrides) -> Path:
    """A tiny random checkpoint of `model_type` (every tensor seed-specific), saved with save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_TINY_COMMON, **CONFORMANCE[model_type].overrides, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                buf.copy_(torch.randn_like(buf))
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing: distinct experts per token id
                experts = int(buf.max()) + 1 if buf.numel() and int(buf.max()) > 0 else CONFORMANCE[model_type].experts
                buf.copy_(torch.stack([torch.randperm(experts)[: buf.shape[1]] for _ in range(buf.shape[0])]))
    model.save_pretrained(path)
    return path



FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def fp8_donor(path: Path, model_type: str, seed: int, **overrides) -> Path:
    """A tiny checkpoint stored as DeepSeek-V3's and Kimi-K2's releases are: every linear weight of the
    decoder layers in float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block, the rest as
    it was, and `quantization_config` in config.json."""
    import torch
    from safetensors.torch import load_file

    plain = conformance_donor(path.with_name(path.name + "-bf16"), model_type, seed, **overrides)
    tensors = {}
    for name, t in load_file(plain / "model.safetensors").items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight") and t.dim() == 2):
            tensors[name] = t
            continue
        rows, cols = -(-t.shape[0] // 128), -(-t.shape[1] // 128)
        scale = torch.empty(rows, cols)
        q = torch.empty(t.shape, dtype=torch.float8_e4m3fn)
        for r in range(rows):
            for c in range(cols):
                block = t[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
                scale[r, c] = block.abs().max().clamp(min=1e-12) / 448.0  # e4m3's largest value
                q[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = (block / scale[r, c]).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
    return _save_quantized(path, plain, tensors, FP8_CONFIG)


def _save_quantized(path: Path, plain: Path, tensors: dict, quantization_config: dict) -> Path:
    """`tensors` as the checkpoint at `path`, with `plain`'s config plus `quantization_config`."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def _mxfp4(w):
    """[..., rows, cols] -> (blocks [..., rows, cols/32, 16] uint8, scales [..., rows, cols/32] uint8): each run
    of 32 values as an E8M0 power of two (biased by 127) and 32 FP4 (e2m1) codes, two per byte, low nibble first."""
    import torch

    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -126) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # the nearest FP4 value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def mxfp4_donor(path: Path, seed: int) -> Path:
    """A tiny gpt-oss checkpoint stored as the gpt-oss releases are: experts in MXFP4 (`*_blocks` and
    `*_scales`, rows of the transposed projection), their biases and everything else in bfloat16, and
    `quantization_config` in config.json."""
    import torch
    from safetensors.torch import load_file

    plain = conformance_donor(path.with_name(path.name + "-bf16"), "gpt_oss", seed, intermediate_size=32)
    tensors = {}
    for name, t in load_file(plain / "model.safetensors").items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = _mxfp4(t.transpose(1, 2))
        else:
            tensors[name] = t.to(torch.bfloat16)
    return _save_quantized(path, plain, tensors, MXFP4_CONFIG)


def mtp_donor(path: Path, seed: int) -> Path:
    """A tiny DeepSeek-V3 checkpoint with a multi-token-prediction layer after its decoder layers, as
    the DeepSeek-V3 releases store one (`num_nextn_predict_layers`): a copy of the last layer's kind
    plus its own embedding, enorm/hnorm, eh_proj and shared_head. transformers does not load it."""
    import torch
    from safetensors.torch import load_file, save_file

    plain = conformance_donor(path.with_name(path.name + "-plain"), "deepseek_v3", seed)
    tensors = load_file(plain / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    last, hidden = config["num_hidden_layers"], config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    prefix = f"model.layers.{last - 1}."
    extra = {f"model.layers.{last}." + k[len(prefix):]: v + 0.01 * torch.randn(v.shape, generator=g)
             for k, v in tensors.items() if k.startswith(prefix)}
    mine = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
            "embed_tokens.weight": tensors["model.embed_tokens.weight"].shape,
            "shared_head.norm.weight": (hidden,), "shared_head.head.weight": tensors["lm_head.weight"].shape}
    extra.update({f"model.layers.{last}.{k}": torch.randn(shape, generator=g) for k, shape in mine.items()})
    path.mkdir(parents=True)
    save_file({**tensors, **extra}, str(path / "model.safetensors"), metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path

"""Which checkpoints our own forward pass (`native_model.py`) runs, read from config.json alone.

A probe on a model of transformers' classes spends about three seconds importing transformers'
model code before it reads a byte (docs/performance.md). For the architectures our forward covers,
a probe can skip that import: the forward does what transformers' does, operation for operation.
It covers a config only where every key that shapes the forward is one it implements; any other
key (another rotary scaling, an attention implementation named in the config, a sliding window, a
key a newer transformers adds) and the checkpoint goes to transformers as before. Keys that do not
touch the forward (token ids, the dropout a model in eval mode skips, provenance) are allowed.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.architectures import ARCHITECTURES

# Keys of a config.json that do not change what an eval-mode forward computes.
_INERT = frozenset({
    "architectures", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
    "attention_dropout", "model_type", "pretraining_tp", "max_position_embeddings",
})
# Keys the forward reads, in every family (each family adds its own: architectures.NativeForward).
_SHAPING = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
    "rope_scaling", "tie_word_embeddings",
})


@dataclass(frozen=True)
class NativeConfig:
    """What the forward needs, and the few lookups probes make on `model.config`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: str | None  # the checkpoint's own, as config.json names it
    qk_norm: str | None = None  # RMSNorm of the "whole" query and key projections, or per "head"
    num_experts: int = 0  # routed experts per layer; 0: a dense MLP
    expert_size: int = 0  # each expert's inner size
    moe_layers: tuple = ()  # per layer: routed experts (True) or a dense MLP
    shared_expert_size: int = 0  # a sigmoid-gated shared expert's inner size; 0: none
    top_k: int = 0
    norm_topk_prob: bool = False
    float_router_weights: bool = False  # the router's top-k weights stay float32 (else the model's dtype)
    sliding_window = None  # none of the families has one (scoring asks)


def _family_keys(arch, family) -> set[str]:
    keys = {b[0] if isinstance(b, tuple) else b for b in (family.qkv_bias, family.o_bias, family.mlp_bias)
            if isinstance(b, (str, tuple))}
    if family.experts:
        keys.update(k for k in (arch.experts_key, arch.top_k_key, family.expert_size_key, family.dense_layers_key,
                                family.sparse_step_key, family.experts_alias, family.shared_expert_key) if k)
        if isinstance(family.norm_topk, str):
            keys.add(family.norm_topk)
    keys.update(key for key, _, _ in family.fixed)
    keys.update(family.inert)
    if family.full_attention_key:
        keys.add(family.full_attention_key)
    return keys


def _bias(raw: dict, source) -> bool:
    """A yes/no the family fixes (a bias, renormalising), or the one its config key states (absent: no,
    or the default paired with the key)."""
    if isinstance(source, bool):
        return source
    key, default = source if isinstance(source, tuple) else (source, False)
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(key)
    return value


def _int(raw: dict, key: str, default=None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(key)
    return value


def _rope_theta(raw: dict) -> float | None:
    """The rotary base of plain (unscaled) RoPE, from transformers 5's `rope_parameters` or the
    older top-level `rope_theta` with no `rope_scaling`; None for anything else."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or set(params) - {"rope_theta", "rope_type"}:
            return None
        if params.get("rope_type", "default") != "default" or "rope_scaling" in raw and raw["rope_scaling"]:
            return None
        theta = params.get("rope_theta", raw.get("rope_theta"))
    else:
        if raw.get("rope_scaling"):
            return None
        theta = raw.get("rope_theta")
    return float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0 else None


def native_config(raw: dict) -> NativeConfig | None:
    """The forward's config for a checkpoint's parsed config.json, or None when the forward does not
    implement everything the config asks for (then transformers runs the model)."""
    arch = ARCHITECTURES.get(raw.get("model_type"))
    family = arch.native_forward if arch is not None else None
    if family is None or set(raw) - _INERT - _SHAPING - _family_keys(arch, family):
        return None
    if any(raw.get(key, default) != value for key, value, default in family.fixed):
        return None
    layers = raw.get(family.full_attention_key) if family.full_attention_key else None
    if layers is not None and (not isinstance(layers, list) or set(layers) != {"full_attention"}):
        return None
    if raw.get("hidden_act", "silu") != "silu" or raw.get("pretraining_tp", 1) != 1:
        return None
    theta = _rope_theta(raw)
    if theta is None:
        return None
    try:
        heads = _int(raw, "num_attention_heads")
        hidden = _int(raw, "hidden_size")
        kv_heads = _int(raw, "num_key_value_heads", heads)
        head_dim = raw.get("head_dim") or hidden // heads
        eps = raw["rms_norm_eps"]  # required: the families' defaults differ
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise ValueError("rms_norm_eps")
        moe = {}
        if family.experts:
            norm = _bias(raw, family.norm_topk)  # a key (absent: no) or the family's fixed answer
            layers = _int(raw, "num_hidden_layers")
            dense = raw.get(family.dense_layers_key) if family.dense_layers_key else None
            dense = [] if dense is None else dense
            step = _int(raw, family.sparse_step_key, 1) if family.sparse_step_key else 1
            if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
                raise ValueError(family.dense_layers_key)
            counts = {raw[k] for k in (arch.experts_key, family.experts_alias) if k and k in raw}
            if len(counts) != 1:
                raise ValueError(arch.experts_key)  # none, or two names that disagree
            moe = dict(num_experts=_int({"n": counts.pop()}, "n"), top_k=_int(raw, arch.top_k_key), norm_topk_prob=norm,
                       float_router_weights=family.float_weights, expert_size=_int(raw, family.expert_size_key),
                       moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
                       shared_expert_size=_int(raw, family.shared_expert_key) if family.shared_expert_key else 0)
        cfg = NativeConfig(
            model_type=raw["model_type"], vocab_size=_int(raw, "vocab_size"), hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"), num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=_int({"h": head_dim}, "h"),
            rms_norm_eps=float(eps), rope_theta=theta,
            qkv_bias=_bias(raw, family.qkv_bias), o_bias=_bias(raw, family.o_bias),
            mlp_bias=_bias(raw, family.mlp_bias),
            tie_word_embeddings=raw.get("tie_word_embeddings", False) is True,
            # required: each family's config class has its own default, and the scorer truncates by it
            max_position_embeddings=_int(raw, "max_position_embeddings"),
            dtype=raw.get("dtype") or raw.get("torch_dtype"), qk_norm=family.qk_norm, **moe,
        )
    except (ValueError, TypeError, KeyError):
        return None
    if heads % kv_heads or head_dim % 2 or hidden % heads or cfg.top_k > cfg.num_experts:
        return None
    return cfg


def read_native_config(directory: str | os.PathLike) -> NativeConfig | None:
    """`native_config` of a checkpoint directory's config.json; None where it is missing or unreadable
    (transformers' loader then says what is wrong)."""
    try:
        raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return native_config(raw) if isinstance(raw, dict) else None

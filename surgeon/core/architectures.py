"""Architectures as data: which tensor names make up which component.

Each architecture is a list of (pattern, kind) rules for the tensors under a decoder layer,
tried in order, first match wins. A pattern is a dotted prefix matched segment by segment, so
`mlp.experts.1` never matches `mlp.experts.10` and `mlp.experts` never matches
`mlp.shared_experts`. `{E}` matches an integer segment and is the expert index. Suffixes such
as `.weight`, `.bias`, FP8 `.weight_scale_inv` and DeepSeek's `.e_score_correction_bias` ride
along with their module because rules are prefixes.

Names are the on-disk names transformers writes (one tensor per expert), not the fused
tensors it holds in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_PREFIX = ("model", "layers")

# Component kinds, in the order the TUI shows them as columns. `layer_gate` is a Self-MoE gate
# between decoder layers (seed 003); it lives in a sidecar file, see surgeon/gates_file.py.
LAYER_KINDS = ("attention", "router", "expert", "shared_expert", "gate", "norms", "mlp", "layer_gate")
GLOBAL_KINDS = ("embedding", "final_norm", "lm_head")

GLOBAL_RULES = (
    ("model.embed_tokens", "embedding"),
    ("model.norm", "final_norm"),
    ("lm_head", "lm_head"),
)

# Rules every architecture shares, tried before its own: the Self-MoE layer gates moe-surgeon adds
# (`model.layers.L.layer_gate.weight`, from the layer_gates.safetensors sidecar).
COMMON_LAYER_RULES = (("layer_gate", "layer_gate"),)

_ATTENTION_AND_NORMS = (
    ("self_attn", "attention"),  # q/k/v/o, q_norm/k_norm, MLA's q_a/q_b/kv_a/kv_b and their norms
    ("input_layernorm", "norms"),
    ("post_attention_layernorm", "norms"),
)
_QWEN_STYLE_MOE = (
    ("mlp.gate", "router"),
    ("mlp.experts.{E}", "expert"),
)


# How transformers 5 holds routed experts in memory: fused per layer, `gate_up_proj` [E, 2I, H]
# with the gate half first, and `down_proj` [E, H, I]. Disk projection name -> (live tensor, half).
FUSED_QWEN_STYLE = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
FUSED_MIXTRAL = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layer_rules: tuple[tuple[str, str], ...]
    experts_key: str | None  # config key holding the routed-expert count
    moe: bool = True
    # Live (in-memory) layout, for hot-swapping into a materialised model.
    live_renames: tuple[tuple[str, str], ...] = ()  # disk segment prefix -> live, under a layer
    fused_experts: dict | None = None  # see FUSED_QWEN_STYLE


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("olmoe", _ATTENTION_AND_NORMS + _QWEN_STYLE_MOE, "num_experts", fused_experts=FUSED_QWEN_STYLE),
        Architecture(
            "mixtral",
            _ATTENTION_AND_NORMS
            + (("block_sparse_moe.gate", "router"), ("block_sparse_moe.experts.{E}", "expert")),
            "num_local_experts",
            live_renames=(("block_sparse_moe", "mlp"),),  # Mixtral's live module is `mlp`
            fused_experts=FUSED_MIXTRAL,
        ),
        Architecture(
            "qwen2_moe",
            _ATTENTION_AND_NORMS
            + _QWEN_STYLE_MOE
            + (
                ("mlp.shared_expert_gate", "gate"),
                ("mlp.shared_expert", "shared_expert"),
                ("mlp", "mlp"),  # layers listed in mlp_only_layers are dense
            ),
            "num_experts",
            fused_experts=FUSED_QWEN_STYLE,
        ),
        Architecture("qwen3_moe", _ATTENTION_AND_NORMS + _QWEN_STYLE_MOE + (("mlp", "mlp"),), "num_experts",
                     fused_experts=FUSED_QWEN_STYLE),
        Architecture(
            "deepseek_v3",
            _ATTENTION_AND_NORMS
            + _QWEN_STYLE_MOE
            + (("mlp.shared_experts", "shared_expert"), ("mlp", "mlp")),  # first_k_dense_replace layers
            "n_routed_experts",
            fused_experts=FUSED_QWEN_STYLE,
        ),
        Architecture("llama", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False),
        Architecture("mistral", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False),
        Architecture("qwen2", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False),
        Architecture("qwen3", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False),  # compress's qwen3_moe target
    )
}

# For a model_type we have no table for: the union of the rules above, ordered so that the
# specific names come before the catch-all `mlp`.
FALLBACK = Architecture(
    "unknown",
    _ATTENTION_AND_NORMS
    + _QWEN_STYLE_MOE
    + (
        ("block_sparse_moe.gate", "router"),
        ("block_sparse_moe.experts.{E}", "expert"),
        ("mlp.shared_expert_gate", "gate"),
        ("mlp.shared_experts", "shared_expert"),
        ("mlp.shared_expert", "shared_expert"),
        ("mlp", "mlp"),
    ),
    None,
    live_renames=(("block_sparse_moe", "mlp"),),
    fused_experts={**FUSED_QWEN_STYLE, **FUSED_MIXTRAL},
)


def architecture_for(model_type: str) -> tuple[Architecture, bool]:
    """The table for a model_type, and whether it is known (False means the fallback)."""
    arch = ARCHITECTURES.get(model_type)
    return (arch, True) if arch else (FALLBACK, False)


# ---------------------------------------------------------------- what the features make of them
# Mixing dense donors into an MoE (features/mix): which dense types can be mixed, into what by
# default, and what their config classes assume for keys config.json leaves out where the MoE
# class would assume something else (Mixtral: rms_norm_eps 1e-5, rope_theta 1e6, 8 kv heads).
@dataclass(frozen=True)
class MixSource:
    default_output: str  # a key of MIX_OUTPUTS
    config_defaults: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class MixOutput:
    """How an MoE a mix is written as names things on disk (what save_pretrained writes)."""

    model_type: str
    class_name: str
    block: str  # the MoE block under a layer
    expert_names: dict  # dense projection -> expert tensor name
    experts_key: str
    shared_expert: bool


_DENSE_DEFAULTS = (("rms_norm_eps", 1e-6), ("rope_theta", 10000.0))
MIX_SOURCES = {
    "llama": MixSource("mixtral", _DENSE_DEFAULTS + (("sliding_window", None),)),
    "mistral": MixSource("mixtral", _DENSE_DEFAULTS + (("sliding_window", 4096),)),
    "qwen2": MixSource("qwen2_moe", _DENSE_DEFAULTS),
}
_DENSE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIX_OUTPUTS = {
    "mixtral": MixOutput("mixtral", "MixtralForCausalLM", "block_sparse_moe",
                         {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}, "num_local_experts", False),
    "qwen2_moe": MixOutput("qwen2_moe", "Qwen2MoeForCausalLM", "mlp",
                           {p: p for p in _DENSE_PROJECTIONS}, "num_experts", True),
}
MIX_ARCH_CHOICES = ["auto", *MIX_OUTPUTS]  # `mix --arch` and the mix form's arch field


# Compressing an MoE's experts into one dense FFN (features/compress): the dense model written
# for each MoE type. See features/compress.py for why OLMoE becomes a one-expert OLMoE.
@dataclass(frozen=True)
class DenseTarget:
    model_type: str  # written to config.json
    architecture: str  # its CausalLM class
    ffn_prefix: str  # under model.layers.L: where gate_proj/up_proj/down_proj go
    router: str | None = None  # a one-expert MoE still has a router: a zero [1, H] weight here
    config: tuple[tuple[str, object], ...] = ()  # config keys set on top of the source's
    note: str = ""


DENSE_TARGETS = {
    "mixtral": DenseTarget("mistral", "MistralForCausalLM", "mlp"),
    "qwen2_moe": DenseTarget("qwen2", "Qwen2ForCausalLM", "mlp",
                             note="the shared expert and its gate are dropped (no dense equivalent of a "
                                  "per-token sigmoid gate)"),
    "qwen3_moe": DenseTarget("qwen3", "Qwen3ForCausalLM", "mlp"),
    "olmoe": DenseTarget("olmoe", "OlmoeForCausalLM", "mlp.experts.0", router="mlp.gate",
                         config=(("num_experts", 1), ("num_experts_per_tok", 1)),
                         note="transformers has no dense OLMoE (OLMo2/3 are post-norm), so the output is an "
                              "OLMoE with one always-selected expert (softmax over one expert = 1.0)"),
}


def dense_targets_text() -> str:
    """`mixtral -> mistral, ..., olmoe -> one-expert olmoe`, for help texts."""
    return ", ".join(f"{moe} -> {'one-expert ' if t.router else ''}{t.model_type}" for moe, t in DENSE_TARGETS.items())

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
from typing import NamedTuple

LAYER_PREFIX = ("model", "layers")

# Component kinds, in the order the TUI shows them as columns. `layer_gate` is a gate between decoder
# layers (Self-MoE); it lives in a sidecar file, see surgeon/core/gates_sidecar.py.
LAYER_KINDS = ("attention", "router", "expert", "shared_expert", "gate", "norms", "mlp", "mtp", "layer_gate")
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
    ("self_attn", "attention"),  # q/k/v/o, q_norm/k_norm, sinks, MLA's q_a/q_b/kv_a/kv_b, DSA's indexer
    ("input_layernorm", "norms"),
    ("post_attention_layernorm", "norms"),
)
# Norms around the feed-forward block under the names families give them (Gemma-style sandwich norms,
# Jamba's pre_ff_layernorm, DeepSeek-V4's attn_norm/ffn_norm, NemotronH's per-layer `norm`).
_MORE_NORMS = tuple((n, "norms") for n in (
    "pre_feedforward_layernorm", "post_feedforward_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm",
    "pre_ff_layernorm", "post_attn_norm", "post_ffn_norm", "attn_norm", "ffn_norm", "norm"))
_QWEN_STYLE_MOE = (
    ("mlp.gate", "router"),
    ("mlp.experts.{E}", "expert"),
)


def _moe_block(block: str) -> tuple[tuple[str, str], ...]:
    """The rules for an MoE block under `block` (mlp, block_sparse_moe, feed_forward, ffn, mixer), in
    every spelling transformers' families use; first match wins, so the specific names come first.
    A routed-expert rule without `{E}` matches tensors that hold every expert, expert axis first
    (gpt-oss and Llama 4 store experts fused: `experts.gate_up_proj` [E, ...])."""
    b = block
    return (
        # Router biases move with their router (e_score_correction_bias, expert_bias, ERNIE's moe_statics),
        # wherever the family keeps them: under the gate, beside it, or even under `experts` (Laguna).
        (f"{b}.experts.e_score_correction_bias", "router"),
        (f"{b}.e_score_correction_bias", "router"),
        (f"{b}.expert_bias", "router"),
        (f"{b}.moe_statics", "router"),
        (f"{b}.gate", "router"),
        (f"{b}.router", "router"),
        (f"{b}.shared_expert_gate", "gate"),
        (f"{b}.shared_experts", "shared_expert"),
        (f"{b}.shared_expert", "shared_expert"),
        (f"{b}.shared_mlp", "shared_expert"),
        (f"{b}.experts.{{E}}", "expert"),
        (f"{b}.experts", "expert"),  # fused: [E, ...]
        (f"{b}.input_linear", "expert"),  # Granite/JetMoE: fused [E, 2I, H]
        (f"{b}.output_linear", "expert"),  # fused [E, H, I]
        (b, "mlp"),  # a dense layer (first_k_dense_replace, mlp_only_layers, MoE every other layer)
    )


# A multi-token-prediction layer after the decoder layers (DeepSeek-V3, GLM-4.5: num_nextn_predict_layers)
# is a decoder layer plus these, its own: transformers does not load them, an export keeps them.
_MTP = tuple((n, "mtp") for n in ("eh_proj", "enorm", "hnorm", "embed_tokens", "shared_head"))

_STANDARD = _ATTENTION_AND_NORMS + _MORE_NORMS + _MTP + _moe_block("mlp")


# How transformers 5 holds routed experts in memory: fused per layer, `gate_up_proj` [E, 2I, H]
# with the gate half first, and `down_proj` [E, H, I]. Disk projection name -> (live tensor, half).
FUSED_QWEN_STYLE = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
FUSED_MIXTRAL = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}


@dataclass(frozen=True)
class NativeForward:
    """What our own forward (live/native_model.py, a llama-style decoder) needs of a family's
    config.json beyond llama's keys (live/native_config.py reads it): where the attention's and the
    MLP's biases come from, and the keys that must say every layer attends to every earlier token."""

    # Each bias: a config key (absent: no bias), (a key, its default), or the family's fixed answer.
    qkv_bias: str | tuple | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = "mlp_bias"
    # (key, the value it must hold, the family's default when the key is absent)
    fixed: tuple[tuple[str, object, object], ...] = ()
    full_attention_key: str | None = None  # a per-layer list that must be "full_attention" throughout
    inert: tuple[str, ...] = ()  # the family's keys that change nothing once the above hold
    # RMSNorm of queries and keys: "whole" projections before the heads split (OLMoE), or per "head"
    # (Qwen3-MoE); None: none.
    qk_norm: str | None = None
    # Routed experts in every layer, as transformers 5 holds them (gate_up_proj [E, 2I, H], down_proj
    # [E, H, I]) and runs them (its grouped_mm experts): the count and top-k come from the
    # family's experts_key and top_k_key; whether the top-k weights are renormalised from this key
    # (absent: no) or always (True); `float_weights`: the router hands its weights on in float32
    # rather than cast back to the model's dtype (Mixtral).
    experts: bool = False
    norm_topk: str | bool = False
    float_weights: bool = False
    expert_size_key: str = "intermediate_size"  # each expert's inner size
    experts_alias: str | None = None  # the other name transformers' config class gives the expert count
    # Layers with a dense MLP of intermediate_size instead of experts: those this key lists, and
    # those not on the sparse step this key gives (layer i has experts where (i + 1) % step == 0).
    dense_layers_key: str | None = None
    sparse_step_key: str | None = None
    # A shared expert beside the routed ones, scaled by the sigmoid of a one-output gate (Qwen2-MoE):
    # the key holding its inner size.
    shared_expert_key: str | None = None


@dataclass(frozen=True)
class Architecture:
    """One family's layout on disk and in memory: its tensor rules, config keys and what our tools do with it."""

    model_type: str
    layer_rules: tuple[tuple[str, str], ...]
    experts_key: str | None  # config key holding the routed-expert count
    moe: bool = True
    # Live (in-memory) layout, for hot-swapping into a materialised model. Families not described here
    # take transformers' own conversion mapping (live/layout.py), which is what from_pretrained applies.
    live_renames: tuple[tuple[str, str], ...] = ()  # disk segment prefix -> live, under a layer
    fused_experts: dict | None = None  # see FUSED_QWEN_STYLE
    top_k_key: str | None = "num_experts_per_tok"  # config key holding how many experts a token takes
    layer_prefix: tuple[str, ...] = LAYER_PREFIX  # where the decoder layers live (NemotronH: backbone.layers)
    global_rules: tuple[tuple[str, str], ...] = GLOBAL_RULES
    # Which sequence mixer a layer has, by the tensor prefix that shows it; a layer with none of these
    # has full attention. Shown per layer in the grid; every mixer is the `attention` component.
    mixers: tuple[tuple[str, str], ...] = ()
    covers: str = ""  # the releases a user knows this family by (docs/families.md)
    mergekit: bool = False  # mergekit 0.1.x defines it (mergekit/_data/architectures): recipes use its names
    # Config keys whose values add experts the checkpoint stores beside `experts_key`'s (LongCat-Flash's
    # zero-computation experts are stored and routed like the others).
    added_experts_keys: tuple[str, ...] = ()
    # Pruning (features/prune): why this family cannot be pruned ("" where it can), said in one line.
    prune_refused: str = ""
    # Router rows after the experts' that score something else (Zaya's skip class, Inkling's shared
    # experts): a count, or the config key holding it. A pruning keeps them, after the kept experts' rows.
    router_extra_rows: int | str = 0
    # Router tensors with no expert axis (a scale over the hidden size, a scalar, the hidden layers of an
    # MLP router), by a run of their name's segments: a pruning copies them whole.
    router_whole: tuple[str, ...] = ()
    # Our own forward pass (live/native_model.py) runs it for probes that only score text, for the
    # configs live/native_config.py accepts; a family without one runs on transformers' classes.
    native_forward: NativeForward | None = None

    def expert_count(self, config: dict) -> int | None:
        """How many experts a MoE layer stores, from the family's config keys (None: not stated)."""
        if self.experts_key is None or config.get(self.experts_key) is None:
            return None
        return config[self.experts_key] + sum(config.get(k) or 0 for k in self.added_experts_keys)


_LINEAR_ATTN = (("linear_attn", "attention"),)  # rules: every sequence mixer is the attention component
_MAMBA = (("mamba", "attention"),)
_LINEAR_MIXER = (("linear_attn", "linear"),)  # how the grid labels such a layer
_MAMBA_MIXER = (("mamba", "mamba"),)


def _family(model_type: str, experts_key: str | None, *, rules=_STANDARD, extra=(), **kw) -> Architecture:
    """A family whose layers follow `rules` (the shared spellings), with its own rules `extra` tried first."""
    return Architecture(model_type, tuple(extra) + tuple(rules), experts_key, **kw)


_WORD_EMBEDDINGS = GLOBAL_RULES + (("model.word_embeddings", "embedding"),)

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("olmoe", _ATTENTION_AND_NORMS + _QWEN_STYLE_MOE, "num_experts", fused_experts=FUSED_QWEN_STYLE,
                     native_forward=NativeForward(mlp_bias=False, fixed=(("clip_qkv", None, None),), qk_norm="whole",
                                                  experts=True, norm_topk="norm_topk_prob",
                                                  experts_alias="num_local_experts",
                                                  inert=("output_router_logits", "router_aux_loss_coef")),
                     covers="OLMoE-1B-7B"),
        Architecture(
            "mixtral",
            _ATTENTION_AND_NORMS
            + (("block_sparse_moe.gate", "router"), ("block_sparse_moe.experts.{E}", "expert")),
            "num_local_experts",
            live_renames=(("block_sparse_moe", "mlp"),),  # Mixtral's live module is `mlp`
            fused_experts=FUSED_MIXTRAL,
            mergekit=True,
            native_forward=NativeForward(False, False, False, fixed=(("sliding_window", None, None),), experts=True,
                                         norm_topk=True, float_weights=True, experts_alias="num_experts",
                                         inert=("output_router_logits", "router_aux_loss_coef", "router_jitter_noise")),
            covers="Mixtral-8x7B, Mixtral-8x22B",
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
            covers="Qwen1.5-MoE, Qwen2-57B-A14B",
            native_forward=NativeForward(("qkv_bias", True), False, False, fixed=(("use_sliding_window", False, False),),
                                         full_attention_key="layer_types", experts=True, norm_topk="norm_topk_prob",
                                         expert_size_key="moe_intermediate_size", dense_layers_key="mlp_only_layers",
                                         sparse_step_key="decoder_sparse_step",
                                         shared_expert_key="shared_expert_intermediate_size",
                                         inert=("sliding_window", "max_window_layers", "output_router_logits",
                                                "router_aux_loss_coef")),
        ),
        Architecture("qwen3_moe", _ATTENTION_AND_NORMS + _QWEN_STYLE_MOE + (("mlp", "mlp"),), "num_experts",
                     fused_experts=FUSED_QWEN_STYLE, mergekit=True, covers="Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder",
                     native_forward=NativeForward(mlp_bias=False, fixed=(("use_sliding_window", False, False),),
                                                  qk_norm="head", experts=True, norm_topk="norm_topk_prob",
                                                  expert_size_key="moe_intermediate_size",
                                                  experts_alias="num_local_experts",
                                                  dense_layers_key="mlp_only_layers",
                                                  sparse_step_key="decoder_sparse_step",
                                                  inert=("sliding_window", "output_router_logits",
                                                         "router_aux_loss_coef"))),
        Architecture(
            "deepseek_v3",
            _ATTENTION_AND_NORMS
            + _QWEN_STYLE_MOE
            + (("mlp.shared_experts", "shared_expert"), ("mlp", "mlp"))  # first_k_dense_replace layers
            + _MTP,
            "n_routed_experts",
            fused_experts=FUSED_QWEN_STYLE,
            covers="DeepSeek-V3, DeepSeek-R1 (FP8 releases: weight_scale_inv moves with its weight)",
        ),
        # ---- every other text MoE family transformers knows, as data
        _family("deepseek_v2", "n_routed_experts", covers="DeepSeek-V2, DeepSeek-V2-Lite"),
        _family("deepseek_v32", "n_routed_experts", covers="DeepSeek-V3.2-Exp (its sparse-attention indexer is attention)"),
        _family("glm4_moe", "n_routed_experts", covers="GLM-4.5, GLM-4.5-Air, GLM-4.6"),
        _family("glm4_moe_lite", "n_routed_experts", covers="GLM MoE with MLA attention"),
        _family("glm_moe_dsa", "n_routed_experts", covers="GLM-5"),
        _family("dots1", "n_routed_experts", covers="dots.llm1"),
        _family("solar_open", "n_routed_experts", covers="Solar-Open-100B"),
        _family("sarvam_mla", "n_routed_experts", covers="Sarvam-105B"),
        _family("axk1", "n_routed_experts", covers="A.X-K1"),
        _family("axk2", "n_routed_experts", covers="A.X-K2",
                extra=(("input_layernorm", "norms"), ("post_attention_layernorm", "norms"))),
        _family("mimo_v2_flash", "n_routed_experts", covers="MiMo-V2-Flash"),
        _family("afmoe", "num_experts", covers="Arcee Trinity-Mini"),
        _family("cohere2_moe", "num_experts", covers="Command A Plus"),
        _family("exaone_moe", "num_experts", covers="K-EXAONE-236B-A23B"),
        _family("flex_olmo", "num_experts", covers="FlexOlmo-7x7B-1T (experts trained apart)"),
        _family("mellum", "num_local_experts", covers="Mellum2-12B-A2.5B"),
        _family("hunyuan_v1_moe", "num_experts", top_k_key="moe_topk", covers="Hunyuan-A13B"),
        _family("hy_v3", "num_experts", covers="Hy3-preview"),
        _family("kolibri1", "num_local_experts", covers="Kolibri-1",
                extra=(("moe.router", "router"),)),
        _family("laguna", "num_experts", covers="Laguna XS.2"),
        _family("ernie4_5_moe", "moe_num_experts", top_k_key="moe_k", covers="ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B"),
        _family("aria_text", "moe_num_experts", top_k_key="moe_topk", covers="Aria (its text model)"),
        _family("qwen3_next", "num_experts", mixers=_LINEAR_MIXER, extra=_LINEAR_ATTN,
                covers="Qwen3-Next-80B-A3B (linear-attention layers marked)"),
        _family("qwen3_5_moe_text", "num_experts", mixers=_LINEAR_MIXER, extra=_LINEAR_ATTN,
                covers="Qwen3.5-35B-A3B (its text model)"),
        _family("lara_mini", "num_experts", mixers=_LINEAR_MIXER, extra=_LINEAR_ATTN, covers="Lara-4-Mini"),
        _family("gpt_oss", "num_local_experts", covers="gpt-oss-20b, gpt-oss-120b (fused experts)"),
        _family("llama4_text", "num_local_experts", rules=_ATTENTION_AND_NORMS + _MORE_NORMS + _moe_block("feed_forward"),
                covers="Llama-4-Scout, Llama-4-Maverick (text model; fused experts, MoE on some layers)"),
        _family("minimax", "num_local_experts", rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                live_renames=(("block_sparse_moe", "mlp"),), fused_experts=FUSED_MIXTRAL,
                mixers=(("self_attn.slope_rate", "linear"),),  # lightning attention layers
                covers="MiniMax-Text-01 (linear-attention layers marked)"),
        _family("minimax_m2", "num_local_experts", rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                covers="MiniMax-M2"),
        _family("minimax_m3_vl_text", "num_local_experts", covers="MiniMax-M3 (its text model; fused experts)"),
        _family("phimoe", "num_local_experts", rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                covers="Phi-3.5-MoE"),
        _family("granitemoe", "num_local_experts", rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                covers="Granite 3 MoE (fused input/output linears)"),
        _family("granitemoeshared", "num_local_experts", extra=(("shared_mlp", "shared_expert"),),
                rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                covers="Granite MoE with a shared expert"),
        _family("granitemoe_swa", "num_local_experts", rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                covers="granite-swash-3b-a600m"),
        _family("granitemoehybrid", "num_local_experts", mixers=_MAMBA_MIXER,
                extra=(("shared_mlp", "shared_expert"),), rules=_ATTENTION_AND_NORMS + _MAMBA + _moe_block("block_sparse_moe"),
                covers="Granite 4.0 (Mamba layers marked)"),
        _family("jetmoe", "num_local_experts", prune_refused="num_local_experts also sets the experts of its mixture "
                "of attention heads, so a config with fewer MLP experts would have fewer attention experts too",
                extra=(("self_attention", "attention"), ("mlp.bias", "mlp")),  # attention has its own experts (MoA)
                covers="JetMoE-8B (its mixture of attention heads is attention)"),
        _family("jamba", "num_experts", mixers=_MAMBA_MIXER,
                rules=_ATTENTION_AND_NORMS + _MORE_NORMS + _MAMBA + _moe_block("feed_forward"),
                global_rules=GLOBAL_RULES + (("model.final_layernorm", "final_norm"),),
                covers="Jamba (Mamba layers marked; MoE every other layer)"),
        _family("kimi_linear", "num_experts", top_k_key="num_experts_per_token",
                rules=_ATTENTION_AND_NORMS + _moe_block("block_sparse_moe"),
                mixers=(("self_attn.A_log", "linear"),), covers="Kimi-Linear-48B-A3B (linear-attention layers marked)"),
        _family("bailing_hybrid", "num_experts", top_k_key="num_experts_per_token",
                extra=(("attention", "attention"),), global_rules=_WORD_EMBEDDINGS,
                mixers=(("attention.A_log", "linear"),), covers="Ling-3.0-Flash (linear-attention layers marked)"),
        _family("sarvam_moe", "n_routed_experts", extra=(("attention", "attention"),), global_rules=_WORD_EMBEDDINGS,
                covers="Sarvam-30B"),
        _family("nemotron_h", "n_routed_experts", layer_prefix=("backbone", "layers"),
                rules=(("norm", "norms"),) + _moe_block("mixer")[:-1] + tuple(
                    (f"mixer.{p}", "attention") for p in ("q_proj", "k_proj", "v_proj", "o_proj")) + (
                    ("mixer.up_proj", "mlp"), ("mixer.down_proj", "mlp"), ("mixer", "attention")),
                global_rules=(("backbone.embeddings", "embedding"), ("backbone.norm_f", "final_norm"),
                              ("lm_head", "lm_head")),
                mixers=(("mixer.A_log", "mamba"),), covers="NVIDIA Nemotron 3 Nano 30B-A3B (Mamba layers marked)"),
        _family("longcat_flash", "n_routed_experts", top_k_key="moe_topk", added_experts_keys=("zero_expert_num",),
                extra=(("self_attn", "attention"), ("mlps", "mlp"), ("input_layernorm", "norms"),
                       ("post_attention_layernorm", "norms")), covers="LongCat-Flash"),
        _family("lfm2_moe", "num_experts", extra=(("conv", "attention"), ("operator_norm", "norms"),
                                                  ("ffn_norm", "norms"), ("feed_forward.expert_bias", "router")),
                rules=_ATTENTION_AND_NORMS + _moe_block("feed_forward"), mixers=(("conv", "conv"),),
                global_rules=GLOBAL_RULES + (("model.embedding_norm", "final_norm"),), covers="LFM2-8B-A1B"),
        _family("deepseek_v4", "n_routed_experts", prune_refused="its hash-routed layers choose experts by token "
                "id from a fixed table (tid2eid) that names experts a pruning would remove",
                extra=(("attn", "attention"), ("hc_attn_base", "norms"), ("hc_attn_fn", "norms"),
                       ("hc_attn_scale", "norms"), ("hc_ffn_base", "norms"), ("hc_ffn_fn", "norms"),
                       ("hc_ffn_scale", "norms")),
                rules=_ATTENTION_AND_NORMS + _MORE_NORMS + _moe_block("ffn"),
                global_rules=GLOBAL_RULES + (("model.hc_head", "final_norm"), ("head", "lm_head")),
                covers="DeepSeek-V4-Flash"),
        _family("hy_v4", "n_routed_experts", extra=(("hc_pre", "norms"),),
                global_rules=GLOBAL_RULES + (("model.hc_pre", "final_norm"),), covers="Hy4-preview"),
        _family("inkling_text", "n_routed_experts", router_extra_rows="n_shared_experts",
                router_whole=("global_scale",), extra=(("attn_sconv", "attention"), ("mlp_sconv", "mlp")),
                covers="Inkling (its text model)"),
        _family("qwen4_exp_text", "num_experts", mixers=_LINEAR_MIXER,
                extra=_LINEAR_ATTN + (("attn_hyper_connection", "norms"), ("mlp_hyper_connection", "norms")),
                global_rules=GLOBAL_RULES + (("model.hyper_connection_mixer", "final_norm"),),
                covers="Qwen4-Exp (its text model)"),
        _family("beam", "num_experts", covers="Beam-1.0-501B-A23B"),
        _family("flint", "num_experts", covers="flint (attention sinks as softmax_offset)"),
        _family("dots3_note_text", "n_routed_experts", covers="dots3-note (its text model)"),
        _family("gemma4_text", "num_experts", top_k_key="top_k_experts", router_whole=("scale",),
                extra=(("experts", "expert"), ("router", "router"),  # experts beside a dense MLP, every layer
                       ("post_feedforward_layernorm_1", "norms"), ("post_feedforward_layernorm_2", "norms"),
                       ("pre_feedforward_layernorm_2", "norms"), ("post_per_layer_input_norm", "norms"),
                       ("layer_scalar", "norms"), ("per_layer_input_gate", "mlp"), ("per_layer_projection", "mlp")),
                global_rules=GLOBAL_RULES + (("model.embed_tokens_per_layer", "embedding"),
                                             ("model.per_layer_model_projection", "embedding"),
                                             ("model.per_layer_projection_norm", "embedding")),
                covers="Gemma 4 with its MoE block (text model)"),
        _family("doge", "num_experts", prune_refused="it routes by product keys: expert i*K+j is the pair of "
                "router keys i and j (K = sqrt(num_experts)), so removing experts cannot be written as fewer keys",
                # Doge's cross-domain MoE keeps its experts as rows of two embedding tables (product-key
                # retrieval): row e of up_embed and down_embed is expert e.
                extra=(("mlp.router_gate", "router"), ("mlp.up_embed", "expert"), ("mlp.down_embed", "expert"),
                       ("input_residual", "norms"), ("post_attention_residual", "norms")),
                covers="Doge with is_moe (experts as embedding rows)"),
        _family("inkling2_text", "n_routed_experts", layer_prefix=("model", "llm", "layers"),
                rules=(("attn", "attention"), ("attn_sconv", "attention"), ("mlp_sconv", "mlp"),
                       ("attn_norm", "norms"), ("mlp_norm", "norms"), ("q_input_norm", "norms"),
                       ("k_input_norm", "norms"), ("v_input_norm", "norms")) + _moe_block("mlp"),
                global_rules=(("model.llm.embed", "embedding"), ("model.llm.embed_norm", "embedding"),
                              ("model.llm.norm", "final_norm"), ("model.llm.attn_res", "final_norm"),
                              ("model.llm.unembed", "lm_head")),
                covers="Inkling-2-Small (its text model)"),
        _family("inkling2_loop_text", "n_routed_experts", layer_prefix=("model", "llm", "layers"),
                rules=(("controllers.mlp", "mlp"), ("controllers", "attention"),  # the loop layers' controllers
                       ("attn", "attention"), ("attn_sconv", "attention"), ("mlp_sconv", "mlp"),
                       ("attn_norm", "norms"), ("mlp_norm", "norms"), ("q_input_norm", "norms"),
                       ("k_input_norm", "norms"), ("v_input_norm", "norms")) + _moe_block("mlp"),
                global_rules=(("model.llm.embed", "embedding"), ("model.llm.embed_norm", "embedding"),
                              ("model.llm.norm", "final_norm"), ("model.llm.attn_res", "final_norm"),
                              ("model.llm.unembed", "lm_head"),
                              ("model.llm.middle_cycle_cross_pass_kv_queries", "final_norm"),
                              ("model.llm.middle_cycle_cross_pass_queries", "final_norm")),
                covers="Inkling-2-Mini (its text model)"),
        _family("zaya", "num_experts", router_extra_rows=1,
                router_whole=("down_proj", "router_states_scale", "router_mlp.norm", "router_mlp.fc1",
                              "router_mlp.fc2"), extra=(("post_attention_residual_scale", "norms"),
                                              ("post_mlp_residual_scale", "norms")),
                global_rules=GLOBAL_RULES + (("model.input_hidden_states_bias", "embedding"),
                                             ("model.input_hidden_states_scale", "embedding")),
                covers="ZAYA (MLP router; fused experts)"),
        # ---- dense donors, for mixing (features/mix) and as compress targets
        Architecture("llama", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False, mergekit=True,
                     native_forward=NativeForward()),
        Architecture("mistral", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False, mergekit=True,
                     # MistralConfig's window defaults to 4096: only an explicit null is no window
                     native_forward=NativeForward(False, False, False, fixed=(("sliding_window", None, 4096),))),
        Architecture("qwen2", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False, mergekit=True,
                     native_forward=NativeForward(True, False, False, fixed=(("use_sliding_window", False, False),),
                                                  full_attention_key="layer_types",
                                                  inert=("sliding_window", "max_window_layers"))),
        Architecture("qwen3", _ATTENTION_AND_NORMS + (("mlp", "mlp"),), None, moe=False, mergekit=True),  # compress's qwen3_moe target
    )
}

# Text MoE types transformers registers that moe-surgeon does not describe, and why (docs/families.md lists them;
# tests/test_conformance.py knows every registered type is either described above or listed here).
UNSUPPORTED: dict[str, str] = {
    "dbrx": "experts are flattened to [E x I, H] per layer and the count sits in the nested ffn_config, so "
            "single experts are not yet addressable",
}

# For a model_type we have no table for: the union of the rules above, ordered so that the
# specific names come before the catch-all `mlp`.
FALLBACK = Architecture(
    "unknown",
    _ATTENTION_AND_NORMS + _MORE_NORMS + _LINEAR_ATTN + _MAMBA + _moe_block("mlp") + _moe_block("block_sparse_moe")
    + _moe_block("feed_forward"),
    None,
    live_renames=(("block_sparse_moe", "mlp"),),
    fused_experts={**FUSED_QWEN_STYLE, **FUSED_MIXTRAL},
)

# The config keys of group-limited routing's group count (DeepSeek's n_group; Ling's num_expert_group).
GROUP_COUNT_KEYS = ("n_group", "num_expert_group")

# Every config key some family keeps its routed-expert count under: how an unknown family is read.
EXPERT_COUNT_KEYS = tuple(dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                                         *(a.experts_key for a in ARCHITECTURES.values() if a.experts_key)]))


def architecture_for(model_type: str) -> tuple[Architecture, bool]:
    """The table for a model_type, and whether it is known (False means the fallback)."""
    arch = ARCHITECTURES.get(model_type)
    return (arch, True) if arch else (FALLBACK, False)


# ---------------------------------------------------------------- what the features make of them
# Mixing dense donors into an MoE (features/mix): which dense types can be mixed, into what by
# default, and what their config classes assume for keys config.json leaves out where the MoE
# class would assume something else (Mixtral: rms_norm_eps 1e-5, rope_theta 1e6, 8 kv heads).
class MixSource(NamedTuple):
    """A dense family a mix takes MLPs from: the MoE it writes by default and the config it fills in."""

    default_output: str  # a key of MIX_OUTPUTS
    config_defaults: tuple[tuple[str, object], ...] = ()
    window_on_every_layer: bool = False  # a set sliding_window applies to every layer (Mistral)


class MixOutput(NamedTuple):
    """How an MoE a mix is written as names things on disk (what save_pretrained writes)."""

    model_type: str
    class_name: str
    block: str  # the MoE block under a layer
    expert_names: dict  # dense projection -> expert tensor name
    experts_key: str
    shared_expert: bool  # False: the always-on expert is folded into every expert's width (Mixtral)
    attention_biases: tuple[str, ...] = ()  # the attention projections that may carry a bias
    window_on_every_layer: bool = False  # can express a sliding window on every layer


_DENSE_DEFAULTS = (("rms_norm_eps", 1e-6), ("rope_theta", 10000.0))
MIX_SOURCES = {
    "llama": MixSource("mixtral", _DENSE_DEFAULTS + (("sliding_window", None),)),
    "mistral": MixSource("mixtral", _DENSE_DEFAULTS + (("sliding_window", 4096),), window_on_every_layer=True),
    "qwen2": MixSource("qwen2_moe", _DENSE_DEFAULTS),
}
_DENSE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIX_OUTPUTS = {
    "mixtral": MixOutput("mixtral", "MixtralForCausalLM", "block_sparse_moe",
                         {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}, "num_local_experts", False,
                         window_on_every_layer=True),
    "qwen2_moe": MixOutput("qwen2_moe", "Qwen2MoeForCausalLM", "mlp",
                           {p: p for p in _DENSE_PROJECTIONS}, "num_experts", True,
                           attention_biases=("q_proj", "k_proj", "v_proj")),
}
MIX_ARCH_CHOICES = ["auto", *MIX_OUTPUTS]  # `mix --arch` and the mix form's arch field


# Compressing an MoE's experts into one dense FFN (features/compress): the dense model written
# for each MoE type. See features/compress.py for why OLMoE becomes a one-expert OLMoE.
class DenseTarget(NamedTuple):
    """What `compress` (features/compress.py) writes an MoE family as: the dense family whose one FFN,
    at `ffn_prefix`, takes the place of the routers and experts."""

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


# ---------------------------------------------------------------- the list users read
def architecture_list_markdown() -> str:
    """The list of families in docs/families.md, made from the descriptions above (tests check it is current;
    `python scripts/architecture_list.py --write` rewrites it)."""
    lines = ["| model_type | what it covers | expert count | top-k | mixers marked |", "|---|---|---|---|---|"]
    for a in sorted(ARCHITECTURES.values(), key=lambda a: a.model_type):
        if not a.moe:
            continue
        mixers = ", ".join(sorted({m for _, m in a.mixers})) or "-"
        lines.append(f"| `{a.model_type}` | {a.covers} | `{a.experts_key}` | `{a.top_k_key}` | {mixers} |")
    dense = ", ".join(f"`{a.model_type}`" for a in ARCHITECTURES.values() if not a.moe)
    lines += ["", f"Dense donors (for mixing, and as compress targets): {dense}.", ""]
    native = ", ".join(f"`{a.model_type}`" for a in sorted(ARCHITECTURES.values(), key=lambda a: a.model_type)
                       if a.native_forward is not None)
    lines += [f"Probes that only score text run on moe-surgeon's own forward pass (transformers' logits bit for "
              f"bit, see [Probes](probes.md#our-own-forward-pass)) for: {native}.", ""]
    if UNSUPPORTED:
        lines += ["Not supported yet:", ""]
        lines += [f"- `{t}`: {why}" for t, why in sorted(UNSUPPORTED.items())]
    return "\n".join(lines) + "\n"

"""Mix dense donors into a Mixture of Experts (Lee, Wynter and Ganti 2024: moetify): the plan, its layout, its routers.

Layer l's experts are the dense donors' MLPs at layer l; attention, norms and embeddings come from
the base or, per component and layer, from any donor (ordinary component transfer). The result is
written as a Mixtral (llama/mistral donors) or a Qwen2-MoE (qwen2 donors; llama too, on request),
which plain `transformers` loads with no custom code.

Routing, exactly as `transformers` 5 computes it for both outputs: p = softmax(W x) over the
routed experts, where x is the output of post_attention_layernorm; the top K are kept and
renormalised to sum to 1 (Mixtral always does; Qwen2-MoE with norm_topk_prob, which a mix sets).

Router modes (how W starts):
  uniform   W = 0 and K = N: every expert gets weight exactly 1/N, moetify's gate-less MoE.
  noisy:K   W ~ N(0, 0.02^2), seeded (moetify's Noisy MoE; 0.02 is its initializer_range).
  random:K  W ~ N(0, 1), seeded (mergekit-moe's "random").
  hidden:K  row e of W at layer l = the mean post_attention_layernorm output at layer l over
            expert e's positive prompts (minus that of its negative prompts), normalised to unit
            length (mergekit-moe's "hidden" mode, but read where the router reads, and layer by
            layer on the mix itself, so each layer sees the routing of the layers before it).

The always-on expert A (moetify's AlwaysOnMoe): the MLP output is
    A(x) + sum over the top K routed experts e of w_e E_e(x),   with sum w_e = 1.
  Qwen2-MoE realises it as its shared expert: the block adds sigmoid(g . x) * S(x) and g is
    written as zeros, so sigmoid gives exactly 0.5; S's down_proj is A's times 2 (exact in
    binary floating point), so the shared expert adds exactly A(x). Without an always-on expert
    the shared expert has intermediate size 0 and adds exactly 0.
  Mixtral has no shared expert and no router bias, so no expert can be forced on. Instead A is
    folded into every routed expert: expert e becomes the MLP whose intermediate neurons are
    A's followed by E_e's (gate and up rows concatenated, down columns concatenated), which
    computes A(x) + E_e(x). As the kept weights sum to 1, the block computes the formula above.
    Cost: every expert is wider by A's intermediate size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from surgeon.core.anatomy import Part, natural_key
from surgeon.core.architectures import MIX_OUTPUTS, MIX_SOURCES
from surgeon.core.architectures import MixOutput as OutputArch
from surgeon.core.donor import Donor
from surgeon.core.plan import Assignment, Plan
from surgeon.core.resolve import Resolution, Source, resolve, source_from
from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, CancelToken, Meter, Progress

DENSE_TYPES = tuple(MIX_SOURCES)
ROUTER_MODES = ("uniform", "noisy", "hidden", "random")
NOISY_STD = 0.02
RANDOM_STD = 1.0
DEFAULT_TOP_K = 2
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# The architectures a mix is made from and written as are data in core/architectures.py.
OUTPUTS = MIX_OUTPUTS
DEFAULT_OUTPUT = {dense: source.default_output for dense, source in MIX_SOURCES.items()}
SOURCE_DEFAULTS = {dense: dict(source.config_defaults) for dense, source in MIX_SOURCES.items()}
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
DROP_KEYS = ("architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp", "auto_map",
             "transformers_version", "_name_or_path")


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RouterSpec:
    mode: str
    top_k: int | None = None  # None: every expert (uniform), else DEFAULT_TOP_K capped by N

    def k(self, num_experts: int) -> int:
        if self.mode == "uniform" or self.top_k is None:
            return num_experts if self.mode == "uniform" else min(DEFAULT_TOP_K, num_experts)
        return self.top_k

    @property
    def label(self) -> str:
        return self.mode if self.top_k is None else f"{self.mode}:{self.top_k}"


def parse_router(text: str) -> RouterSpec:
    mode, sep, k = text.strip().partition(":")
    if mode not in ROUTER_MODES:
        raise SurgeonError(f"--router {text!r}: one of uniform, noisy:K, hidden[:K], random[:K]")
    if not sep:
        return RouterSpec(mode)
    if mode == "uniform":
        raise SurgeonError(f"--router {text!r}: uniform routes to every expert and takes no K")
    try:
        top_k = int(k)
    except ValueError:
        raise SurgeonError(f"--router {text!r}: K must be a whole number") from None
    if top_k < 1:
        raise SurgeonError(f"--router {text!r}: K must be at least 1")
    return RouterSpec(mode, top_k)


@dataclass(frozen=True)
class ExpertPrompts:
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass
class MixPlan:
    """What to mix. Donor names refer to an opened-donors dict; experts may repeat a donor.

    `assignments` are ordinary component transfers for the non-MLP parts (attention, norms,
    embedding, final_norm, lm_head); the MLPs are the experts.
    """

    base: str
    experts: list[str]
    router: RouterSpec = field(default_factory=lambda: RouterSpec("uniform"))
    always_on: str | None = None
    assignments: list[Assignment] = field(default_factory=list)
    arch: str = "auto"
    seed: int = 0
    prompts: list[ExpertPrompts] | None = None  # one per expert, for router mode hidden

    @property
    def dense_plan(self) -> Plan:
        return Plan(self.base, list(self.assignments))

    def donor_names(self) -> list[str]:
        names = [self.base, *self.experts] + ([self.always_on] if self.always_on else [])
        names += [a.donor for a in self.assignments]
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------- the layout
@dataclass(frozen=True)
class MixTensor:
    """One tensor of the mix and how to make it.

    kind: copy (parts[0] as is), concat (parts joined along `axis`), double (parts[0] times 2,
    exact), router (the router of `layer`, synthesised), zeros.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    parts: tuple[Source, ...] = ()
    axis: int = 0
    layer: int | None = None


@dataclass
class MixLayout:
    plan: MixPlan
    output: OutputArch
    config: dict
    tensors: dict[str, MixTensor]  # in write order
    routers: list[str]  # router tensor name per layer
    dtype: str  # dtype the synthesised tensors are written in
    num_layers: int
    hidden_size: int
    top_k: int
    dense: Resolution
    warnings: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.plan.experts)

    def parameters_by_donor(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            for s in t.parts:
                counts[s.donor] = counts.get(s.donor, 0) + math.prod(s.shape)
        return counts

    def synthesised_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values() if not t.parts)


def _label(name: str, donor: Donor) -> str:
    return f"{name} ({donor.path})"


def output_arch(arch: str, base: Donor, base_name: str) -> OutputArch:
    if base.model_type not in DENSE_TYPES:
        raise SurgeonError(
            f"base {_label(base_name, base)} is {base.model_type}; a mix is made from dense "
            f"{', '.join(DENSE_TYPES)} donors"
        )
    name = DEFAULT_OUTPUT[base.model_type] if arch == "auto" else arch
    if name not in OUTPUTS:
        raise SurgeonError(f"--arch {arch!r}: one of auto, {', '.join(OUTPUTS)}")
    attn_bias = {n.rsplit(".", 2)[-2] for n in base.tensors
                 if ".self_attn." in n and n.endswith(".bias")}
    out = OUTPUTS[name]
    refused = sorted(attn_bias - set(out.attention_biases))
    if refused:
        other = next((o for o in OUTPUTS.values() if attn_bias <= set(o.attention_biases)), None)
        raise SurgeonError(
            f"base {_label(base_name, base)} has attention biases ({', '.join(sorted(attn_bias))}); "
            f"{out.class_name}'s attention has " + (", ".join(out.attention_biases) + " biases only"
                                                    if out.attention_biases else "none")
            + (f"; use --arch {other.model_type}" if other is not None else "")
        )
    if (MIX_SOURCES[base.model_type].window_on_every_layer and base.config.get("sliding_window") is not None
            and not out.window_on_every_layer):
        other = next(o for o in OUTPUTS.values() if o.window_on_every_layer)
        raise SurgeonError(
            f"base {_label(base_name, base)} uses a sliding window on every layer, which {out.class_name} "
            f"expresses differently; use --arch {other.model_type}"
        )
    return out


def _config(base: Donor, out: OutputArch, n_experts: int, top_k: int, expert_inter: int, always_inter: int,
            qkv_bias: bool) -> dict:
    cfg = dict(base.config)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise SurgeonError(f"{base.path / 'config.json'}: field {missing[0]} is missing")
    for key, value in SOURCE_DEFAULTS[base.model_type].items():
        if key == "rope_theta" and ("rope_parameters" in cfg or "rope_scaling" in cfg):
            continue
        cfg.setdefault(key, value)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    for k in DROP_KEYS:
        cfg.pop(k, None)
    cfg.update(architectures=[out.class_name], model_type=out.model_type, num_experts_per_tok=top_k,
               output_router_logits=False)
    cfg[out.experts_key] = n_experts
    if not out.shared_expert:  # the always-on expert is folded into each expert's width (see module doc)
        cfg.update(intermediate_size=always_inter + expert_inter, router_jitter_noise=0.0)
    else:
        cfg.update(moe_intermediate_size=expert_inter, shared_expert_intermediate_size=always_inter,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=qkv_bias)
    return cfg


def _mlp_names(layer: int) -> dict[str, str]:
    return {p: f"model.layers.{layer}.mlp.{p}.weight" for p in PROJECTIONS}


def resolve_mix(plan: MixPlan, donors: dict[str, Donor], *, dtype: str = "keep") -> MixLayout:
    """Check the plan against the donors and say where every tensor of the mix comes from."""
    for name in plan.donor_names():
        if name not in donors:
            raise SurgeonError(f"mix: donor {name!r} is not open")
    if not plan.experts:
        raise SurgeonError("mix: no experts; name at least one --expert")
    for a in plan.assignments:
        if a.component == "mlp":
            raise SurgeonError(f"SPEC {a.spec!r}: a mix's MLPs are its experts; list that donor with --expert")
    base = donors[plan.base]
    out = output_arch(plan.arch, base, plan.base)
    n = len(plan.experts)
    top_k = plan.router.k(n)
    if not 1 <= top_k <= n:
        raise SurgeonError(f"--router {plan.router.label}: K must be between 1 and the number of experts ({n})")
    if plan.router.mode == "hidden":
        if not plan.prompts or len(plan.prompts) != n:
            raise SurgeonError("--router hidden: needs positive prompts for every expert (--prompts FILE)")

    dense = resolve(plan.dense_plan, donors, dtype=dtype)
    layers = base.anatomy.num_layers
    for role, name in [("expert", e) for e in plan.experts] + ([("always-on", plan.always_on)] if plan.always_on else []):
        d = donors[name]
        if d.model_type != base.model_type:
            raise SurgeonError(
                f"{role} donor {_label(name, d)} is {d.model_type}, base {_label(plan.base, base)} is "
                f"{base.model_type}: experts come from checkpoints of one architecture"
            )
        if d.anatomy.num_layers != layers:
            raise SurgeonError(
                f"{role} donor {_label(name, d)} has {d.anatomy.num_layers} layers but base "
                f"{_label(plan.base, base)} has {layers}"
            )
    for layer in range(layers):
        have = sorted(n_ for n_, p in base.anatomy.parts.items() if p.kind == "mlp" and p.layer == layer)
        if have != sorted(_mlp_names(layer).values()):
            raise SurgeonError(
                f"base {_label(plan.base, base)}: layer {layer}'s MLP is {', '.join(have) or 'missing'}; "
                "a mix needs exactly gate_proj, up_proj and down_proj weights (no biases)"
            )

    def source(name: str, donor_name: str) -> Source:
        part = Part("mlp", int(name.split(".")[2]))
        return source_from(name, part, base, plan.base, donors[donor_name], donor_name, dtype)

    tensors: dict[str, MixTensor] = {}
    for name, src in dense.sources.items():
        part = dense.parts.get(name)
        if part is not None and part.kind not in ("attention", "norms", "mlp", "embedding", "final_norm", "lm_head"):
            raise SurgeonError(f"tensor {name}: a mix carries no {part.kind} tensors (from donor {src.donor})")
        if part is None or part.kind != "mlp":
            tensors[name] = MixTensor(name, src.dtype, src.shape, "copy", (src,))
    synth_dtype = dense.sources[_mlp_names(0)["gate_proj"]].dtype
    inter = base.tensors[_mlp_names(0)["gate_proj"]].shape[0]
    hidden = base.tensors[_mlp_names(0)["gate_proj"]].shape[1]
    always_inter = inter if plan.always_on else 0
    routers = []
    block = lambda layer: f"model.layers.{layer}.{out.block}"  # noqa: E731
    for layer in range(layers):
        mlp = _mlp_names(layer)
        always = {p: source(mlp[p], plan.always_on) for p in PROJECTIONS} if plan.always_on else None
        for e, donor_name in enumerate(plan.experts):
            for p in PROJECTIONS:
                src = source(mlp[p], donor_name)
                name = f"{block(layer)}.experts.{e}.{out.expert_names[p]}.weight"
                if always is not None and not out.shared_expert:  # Mixtral: fold A into every expert
                    axis = 1 if p == "down_proj" else 0
                    shape = list(src.shape)
                    shape[axis] += always[p].shape[axis]
                    tensors[name] = MixTensor(name, src.dtype, tuple(shape), "concat", (always[p], src), axis)
                else:
                    tensors[name] = MixTensor(name, src.dtype, src.shape, "copy", (src,))
        router = f"{block(layer)}.gate.weight"
        tensors[router] = MixTensor(router, synth_dtype, (n, hidden), "router", layer=layer)
        routers.append(router)
        if out.shared_expert:
            for p in PROJECTIONS:
                name = f"{block(layer)}.shared_expert.{p}.weight"
                if always is not None:
                    src = always[p]
                    kind = "double" if p == "down_proj" else "copy"
                    tensors[name] = MixTensor(name, src.dtype, src.shape, kind, (src,))
                else:
                    shape = (hidden, 0) if p == "down_proj" else (0, hidden)
                    tensors[name] = MixTensor(name, synth_dtype, shape, "zeros")
            name = f"{block(layer)}.shared_expert_gate.weight"
            tensors[name] = MixTensor(name, synth_dtype, (1, hidden), "zeros")

    qkv_bias = any(n_.endswith("self_attn.q_proj.bias") for n_ in base.tensors)
    config = _config(base, out, n, top_k, inter, always_inter, qkv_bias)
    if dtype != "keep":
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    ordered = {k: tensors[k] for k in sorted(tensors, key=natural_key)}
    warnings = list(dense.warnings)
    distinct = {donors[e].path.resolve() for e in plan.experts}
    if len(distinct) < n:
        warnings.append(f"{n - len(distinct)} expert(s) repeat a donor already listed")
    return MixLayout(plan, out, config, ordered, routers, synth_dtype, layers, hidden, top_k, dense, warnings)


# ---------------------------------------------------------------- routers
def initial_routers(layout: MixLayout) -> dict | None:
    """Router weights for the modes that need no model: None (all zeros) for uniform, seeded
    white noise for noisy and random. Float32 [experts, hidden] per router tensor name."""
    mode = layout.plan.router.mode
    if mode == "uniform":
        return None
    import torch

    std = RANDOM_STD if mode == "random" else NOISY_STD
    gen = torch.Generator().manual_seed(layout.plan.seed)
    shape = (layout.num_layers, layout.num_experts, layout.hidden_size)
    if mode == "hidden":  # the hidden-state means replace these layer by layer
        weights = torch.zeros(shape)
    else:
        weights = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    return {name: weights[i].clone() for i, name in enumerate(layout.routers)}


class _Stop(Exception):
    """Raised from a hook once the layer we need has been seen: the rest of the forward is waste."""


def hidden_routers(layout: MixLayout, model, tokenizer, live, *, progress: Progress | None = None,
                   cancel: CancelToken = NEVER) -> dict:
    """mergekit's "hidden" init, measured on the live mix `model` where its routers read.

    For each layer in order: run every expert's prompts up to that layer's post_attention_layernorm,
    average its output over tokens (then prompts), subtract the negative prompts' average, normalise,
    and write the row into the live router before moving on, so later layers see this routing.
    `live(name)` gives the live view of a disk tensor name (see features/mix/live.py). Reports a
    Step per layer; `cancel` (a jobs.CancelToken) stops it between layers.
    """
    import torch

    from surgeon.probes.scoring import encode

    meter = Meter(progress, len(layout.routers), "layers", "hidden routers")

    prompts = layout.plan.prompts or []
    layers = model.model.layers
    device = next(model.parameters()).device

    def mean_at(layer: int, texts: tuple[str, ...]) -> torch.Tensor:
        got: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            got.append(output[0].float().mean(0))
            raise _Stop

        handle = layers[layer].post_attention_layernorm.register_forward_hook(hook)
        try:
            for text in texts:
                ids = encode(tokenizer, text) or [tokenizer.bos_token_id]
                try:
                    model(torch.tensor([ids], device=device))
                except _Stop:
                    pass
        finally:
            handle.remove()
        return torch.stack(got).mean(0)

    out = {}
    with torch.no_grad():
        for layer, name in enumerate(layout.routers):
            cancel.check()
            rows = []
            for p in prompts:
                v = mean_at(layer, p.positive)
                if p.negative:
                    v = v - mean_at(layer, p.negative)
                rows.append(v / v.norm().clamp(min=1e-8))
            weights = torch.stack(rows).cpu()
            live(name).copy_(weights)
            out[name] = weights
            meter(layer + 1)
    return out


def router_bytes(weights, dtype: str) -> bytes:
    """The bytes a router is written as (weights: float32 tensor, or None for zeros)."""
    import torch

    from surgeon.live.dtypes import TORCH_DTYPES

    return weights.to(TORCH_DTYPES[dtype]).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def routers_digest(layout: MixLayout, routers: dict | None) -> str:
    """sha256 of every router exactly as written: what a replay must reproduce."""
    digest = hashlib.sha256()
    for name in layout.routers:
        t = layout.tensors[name]
        if routers is None:
            digest.update(bytes(math.prod(t.shape) * _size(t.dtype)))
        else:
            digest.update(router_bytes(routers[name], t.dtype))
    return "sha256:" + digest.hexdigest()


def _size(dtype: str) -> int:
    from surgeon.io.dtypes import DTYPE_SIZES

    return DTYPE_SIZES[dtype]


# ---------------------------------------------------------------- prompts for hidden-state init
def parse_prompts(path, experts: list[str], donors: dict[str, Donor]) -> list[ExpertPrompts]:
    """Read a prompts file: a JSON object whose keys name experts and whose values are lists of
    positive prompts, or {"positive": [...], "negative": [...]}.

    A key is an expert's 0-based position in --expert order, its donor name (A, B, ...) or the
    donor's directory (relative paths are relative to the prompts file); a key naming a donor
    that appears as several experts gives all of them those prompts.
    """
    import json
    from pathlib import Path

    from surgeon.core.donor import resolve_path

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SurgeonError(f"{path}: no such prompts file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SurgeonError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise SurgeonError(f"{path}: expected a JSON object mapping experts to prompts")
    found: dict[int, ExpertPrompts] = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = {"positive": value}
        if not isinstance(value, dict) or not isinstance(value.get("positive", []), list) \
                or not isinstance(value.get("negative", []), list):
            raise SurgeonError(f"{path}: field {key!r}: expected a list of prompts or {{positive, negative}} lists")
        pos, neg = value.get("positive", []), value.get("negative", [])
        if not pos or not all(isinstance(p, str) and p for p in pos + neg):
            raise SurgeonError(f"{path}: field {key!r}: needs at least one positive prompt, all non-empty strings")
        if key.isdigit():
            targets = [int(key)] if int(key) < len(experts) else []
        elif key in donors:
            targets = [e for e, name in enumerate(experts) if name == key]
        else:
            where = resolve_path(key, path.parent).resolve()
            targets = [e for e, name in enumerate(experts) if donors[name].path.resolve() == where]
        if not targets:
            raise SurgeonError(f"{path}: field {key!r} names no expert (use 0-{len(experts) - 1}, a donor name or path)")
        for e in targets:
            found[e] = ExpertPrompts(tuple(pos), tuple(neg))
    missing = [e for e in range(len(experts)) if e not in found]
    if missing:
        raise SurgeonError(f"{path}: no prompts for expert {missing[0]} (donor {experts[missing[0]]})")
    return [found[e] for e in range(len(experts))]

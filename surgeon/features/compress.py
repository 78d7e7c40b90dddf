"""Tucker (HOSVD) compression of chosen experts into a compact dense FFN (XPERT, arXiv 2605.08842).

XPERT stacks the matrices of a layer's chosen ("common", cross-domain) experts into a
third-order tensor, X(:, :, i) = X_i, one tensor per parameter matrix, refines each with a
Tucker decomposition (G, U), and initialises the FFN of a dense model from the result (its
target models keep the source's hidden size and the expert's intermediate size). The paper says
no more than that; the choices made here, and why:

1. Stacking. Per MoE layer and projection p in (gate, up, down), the chosen experts' weights
   form X_p of shape [n, I, H] (down_proj [H, I] is transposed so that every tensor has the
   modes (expert, intermediate, hidden); the mode order does not change a Tucker decomposition).
2. Decomposition: truncated HOSVD. Each mode's factor is the leading eigenvectors of that mode's
   Gram matrix (the left singular vectors of its unfolding); the core is
   G = X x_e U_e^T x_i U_i^T x_h U_h^T, with ranks (R, r_h, r_e) in the (intermediate, hidden,
   expert) modes. Computed in float64 on the chosen device, the three projections of a layer
   batched. At full ranks each factor is an orthogonal matrix, so X^ = X to float64 rounding.
   Truncated factors are nested, so a lower rank never has a smaller error.
3. Error, per layer and projection: ||X - X^||_F / ||X||_F ("all" pools the three projections).
4. One FFN from n experts: the expert mode is collapsed with uniform weights,
   W_p = mean_i X^_p[i] = G x_e (mean of U_e's rows) x_i U_i x_h U_h. At full rank that is the
   average of the chosen experts' weights, and a single chosen expert comes back exactly.
   Averaging assumes neuron j means the same thing in every expert: true for experts upcycled
   from one FFN, not in general (OLMoE trained its experts from scratch). As in XPERT the result
   is an initialisation to train, not a drop-in replacement for the MoE layer.
5. Intermediate size R (--rank, also the intermediate-mode Tucker rank). The dense FFN keeps R
   neurons S of the reconstruction: W_p[S], i.e. the factor U_i with only the rows S kept (the
   row-truncation by which XPERT-style "parameter-scale adaptation" sizes a factor to a target).
   S is the R neurons with the largest leverage, sum over p of ||U_i,p[j, :R]||^2 (how much of
   neuron j the rank-R intermediate subspaces hold), kept in their original order; at R = I
   every neuron is kept. Not the rotated Tucker basis (gate' = U_i^T W): SwiGLU activates and
   multiplies neuron by neuron, so a rotated intermediate space computes a different function
   even at full rank, while a kept neuron computes what it computed in the reconstruction.

Output architecture (DENSE_TARGETS, data): attention, norms, embedding, final norm and lm_head
are copied unchanged; routers and experts are replaced by the one FFN.
  mixtral   -> mistral   (same attention and pre-norm layer; block_sparse_moe -> mlp)
  qwen2_moe -> qwen2     (the shared expert and its sigmoid gate are dropped: a per-token
                          sigmoid gate has no dense equivalent; q/k/v biases are zero-filled
                          when the source has qkv_bias=false, which changes nothing)
  qwen3_moe -> qwen3     (same attention with per-head q_norm/k_norm)
  olmoe     -> olmoe with num_experts=1, num_experts_per_tok=1. transformers has no dense OLMoE:
               OLMo2/OLMo3 norm after attention and after the FFN (post-norm) and OLMo has no
               q_norm/k_norm, while OLMoE is pre-norm with full-width q_norm/k_norm. A softmax
               over one expert is 1.0, so a one-expert OLMoE is exactly a dense FFN (the router is
               a zero [1, H] matrix that changes nothing).
Sources with dense layers (mlp_only_layers, first_k_dense_replace) and architectures without an
entry (deepseek_v3) are refused with a message.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.core.architectures import DENSE_TARGETS, DenseTarget
from surgeon.core.donor import Donor
from surgeon.core.plan import format_ranges, parse_ranges
from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, Meter

ROLES = ("gate", "up", "down")
# The disk names' projection -> role, from the architectures' fused-expert tables (half 0 = gate).
_HALF_ROLE = {0: "gate", 1: "up", None: "down"}
COPIED_KINDS = ("attention", "norms", "embedding", "final_norm", "lm_head")
DROPPED_KINDS = ("router", "expert", "shared_expert", "gate")
REPORT_FILE = "moe-surgeon-compress.json"


# ---------------------------------------------------------------- which experts
def expert_names(donor: Donor, layer: int, expert: int) -> dict[str, str]:
    """role -> disk tensor name of one expert's projection weights."""
    fused = donor.anatomy.architecture.fused_experts or {}
    out = {}
    for name in donor.anatomy.tensors_of("expert", layer, expert):
        segs = name.split(".")
        if segs[-1] == "weight" and segs[-2] in fused:
            out[_HALF_ROLE[fused[segs[-2]][1]]] = name
    if set(out) != set(ROLES):
        raise SurgeonError(f"{donor.path}: layer {layer} expert {expert} lacks gate/up/down weights "
                           f"(found {', '.join(sorted(out)) or 'none'})")
    return out


def check_source(donor: Donor) -> DenseTarget:
    """The dense target of a compressible source, or a one-line refusal."""
    anatomy = donor.anatomy
    if not anatomy.experts_per_layer:
        raise SurgeonError(f"{donor.path}: {donor.model_type} has no routed experts; compress needs an MoE checkpoint")
    target = DENSE_TARGETS.get(donor.model_type)
    if target is None:
        raise SurgeonError(f"{donor.path}: no dense counterpart for {donor.model_type} "
                           f"(compress supports {', '.join(DENSE_TARGETS)})")
    dense = [l for l in range(anatomy.num_layers) if l not in anatomy.experts_per_layer]
    if dense:
        raise SurgeonError(f"{donor.path}: layer {dense[0]} is dense; compress needs every decoder layer to "
                           "route (one intermediate size for the whole dense model)")
    if anatomy.unclassified:
        raise SurgeonError(f"{donor.path}: tensor {anatomy.unclassified[0]} is not part of any known component; "
                           "cannot tell whether the dense model needs it")
    return target


def parse_expert_choice(texts: list[str], donor: Donor) -> dict[int, tuple[int, ...]]:
    """`--experts` values, later ones winning: `EXPERTS` for every layer or `LAYERS:EXPERTS`,
    each a list or range (`0-3:1,5,7`) or `all`. Default: every expert of every layer."""
    per_layer = {l: n for l, n in donor.anatomy.experts_per_layer.items()}
    chosen = {l: tuple(range(n)) for l, n in per_layer.items()}
    for text in texts:
        layer_text, sep, expert_text = text.rpartition(":")
        where = f"--experts {text}"
        layers = sorted(per_layer) if not sep or layer_text.strip() == "all" else parse_ranges(layer_text, "layer", where)
        for l in layers:
            if l not in per_layer:
                raise SurgeonError(f"{where}: layer {l} out of range ({donor.path} has MoE layers "
                                   f"{format_ranges(per_layer)})")
            if expert_text.strip() == "all":
                chosen[l] = tuple(range(per_layer[l]))
                continue
            experts = parse_ranges(expert_text, "expert", where)
            bad = [e for e in experts if e >= per_layer[l]]
            if bad:
                raise SurgeonError(f"{where}: expert {bad[0]} out of range (layer {l} has {per_layer[l]} "
                                   f"experts: 0-{per_layer[l] - 1})")
            chosen[l] = experts
    return chosen


# ---------------------------------------------------------------- HOSVD
@dataclass
class Tucker:
    """A batch of Tucker decompositions of [B, n, I, H] tensors: core [B, r_e, r_i, r_h] and the
    factors U_e [B, n, r_e], U_i [B, I, r_i], U_h [B, H, r_h] (orthonormal columns)."""

    core: object
    expert: object
    inter: object
    hidden: object

    def reconstruct(self):
        import torch

        t = torch.einsum("bacd,bhd->bach", self.core, self.hidden)
        t = torch.einsum("bach,bic->baih", t, self.inter)
        return torch.einsum("baih,bna->bnih", t, self.expert)


def _leading(gram, r: int):
    """The r leading eigenvectors of symmetric Gram matrices [B, d, d], largest first."""
    import torch

    _, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1)[..., :r].contiguous()


def hosvd(x, ranks: tuple[int, int, int]) -> Tucker:
    """Truncated HOSVD of x [B, n, I, H] with ranks (intermediate, hidden, expert)."""
    import torch

    r_i, r_h, r_e = ranks
    u_e = _leading(torch.einsum("bnih,bmih->bnm", x, x), r_e)
    u_i = _leading(torch.einsum("bnih,bnjh->bij", x, x), r_i)
    u_h = _leading(torch.einsum("bnih,bnig->bhg", x, x), r_h)
    t = torch.einsum("bnih,bhd->bnid", x, u_h)
    t = torch.einsum("bnid,bic->bncd", t, u_i)
    core = torch.einsum("bncd,bna->bacd", t, u_e)
    return Tucker(core, u_e, u_i, u_h)


def relative_error(x, x_hat):
    """||x - x_hat|| / ||x|| per batch element, and pooled over the batch."""
    diff = (x - x_hat).flatten(1).norm(dim=1)
    norm = x.flatten(1).norm(dim=1)
    per = (diff / norm.clamp_min(1e-300)).tolist()
    pooled = float(diff.square().sum().sqrt() / norm.square().sum().sqrt().clamp_min(1e-300))
    return per, pooled


def keep_neurons(inter, rank: int):
    """The `rank` neurons with the largest leverage in the rank-`rank` intermediate subspaces of
    the three projections (U_i [B, I, >=rank]), in their original order."""
    import torch

    size = inter.shape[1]
    if rank >= size:
        return torch.arange(size, device=inter.device)
    leverage = inter[..., :rank].square().sum(-1).sum(0)
    return leverage.topk(rank).indices.sort().values


@dataclass
class LayerResult:
    layer: int
    experts: tuple[int, ...]
    ranks: dict  # the ranks used in this layer (expert rank clamped to the experts chosen)
    errors: dict  # role -> relative error, plus "all"
    ffn: dict = field(repr=False)  # role -> compact weight on CPU, float64, in disk orientation
    neurons: list[int] = field(default_factory=list)  # kept neurons of the reconstruction


def compress_layer(x, layer: int, experts: tuple[int, ...], rank: int, hidden_rank: int,
                   expert_rank: int) -> LayerResult:
    """HOSVD of one layer's stacked projections x [3, n, I, H] and its compact FFN."""
    n = x.shape[1]
    ranks = (rank, hidden_rank, min(expert_rank, n))
    tucker = hosvd(x, ranks)
    x_hat = tucker.reconstruct()
    per, pooled = relative_error(x, x_hat)
    mean = x_hat.mean(1)  # [3, I, H]: the expert mode collapsed with uniform weights
    keep = keep_neurons(tucker.inter, rank)
    kept = mean[:, keep].cpu()
    ffn = {"gate": kept[0], "up": kept[1], "down": kept[2].T.contiguous()}
    return LayerResult(layer, experts, {"intermediate": ranks[0], "hidden": ranks[1], "expert": ranks[2]},
                       {**dict(zip(ROLES, per)), "all": pooled}, ffn, keep.cpu().tolist())


def stacked_experts(reader, donor: Donor, layer: int, experts: tuple[int, ...]):
    """[3, n, I, H] in the source dtype on CPU: gate, up and down (transposed) of each expert."""
    import torch

    mats = {r: [] for r in ROLES}
    for e in experts:
        names = expert_names(donor, layer, e)
        for r in ROLES:
            t = reader.read("source", names[r])
            mats[r].append(t.T if r == "down" else t)
    shapes = {tuple(m.shape) for ms in mats.values() for m in ms}
    if len(shapes) != 1:
        raise SurgeonError(f"{donor.path}: layer {layer}: expert projections disagree in shape "
                           f"({', '.join(map(str, sorted(shapes)))})")
    return torch.stack([torch.stack(mats[r]) for r in ROLES])


def full_sizes(donor: Donor) -> tuple[int, int]:
    """(intermediate, hidden) of the source's experts, from the first expert's gate weight."""
    layer = min(donor.anatomy.experts_per_layer)
    shape = donor.tensors[expert_names(donor, layer, 0)["gate"]].shape
    return int(shape[0]), int(shape[1])


def check_ranks(donor: Donor, rank: int | None, hidden_rank: int | None, expert_rank: int | None):
    """The (intermediate, hidden, expert) ranks with defaults filled in, or a one-line refusal."""
    inter, hidden = full_sizes(donor)
    rank = inter if rank is None else rank
    hidden_rank = hidden if hidden_rank is None else hidden_rank
    for flag, value, full in (("--rank", rank, inter), ("--hidden-rank", hidden_rank, hidden)):
        if not 1 <= value <= full:
            raise SurgeonError(f"{flag} {value}: out of range (1-{full}; the experts of {donor.path} are "
                               f"{inter} x {hidden})")
    if expert_rank is not None and expert_rank < 1:
        raise SurgeonError(f"--expert-rank {expert_rank}: must be at least 1")
    return rank, hidden_rank, expert_rank


def compress(donor: Donor, chosen: dict[int, tuple[int, ...]], *, rank: int | None = None,
             hidden_rank: int | None = None, expert_rank: int | None = None, device: str = "cpu",
             progress=None, cancel=NEVER) -> list[LayerResult]:
    """Tucker-compress the chosen experts of every MoE layer (see the module docstring).

    `expert_rank` None (or more than a layer's chosen experts) keeps the full expert mode. A job
    (surgeon.jobs): Steps in layers, `cancel` checked before each."""
    import torch

    from surgeon.live.hybrid import TensorReader

    check_source(donor)
    rank, hidden_rank, expert_rank = check_ranks(donor, rank, hidden_rank, expert_rank)
    dev = torch.device(device)
    compute = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
    reader = TensorReader({"source": donor})
    results = []
    layers = sorted(chosen)
    meter = Meter(progress, len(layers), "layers", "decomposing")
    with torch.no_grad():
        for i, layer in enumerate(layers):
            cancel.check()
            experts = chosen[layer]
            if not experts:
                raise SurgeonError(f"layer {layer}: no experts chosen")
            x = stacked_experts(reader, donor, layer, experts).to(dev, compute)
            results.append(compress_layer(x, layer, experts, rank, hidden_rank, expert_rank or len(experts)))
            del x
            meter(i + 1, detail=f"layer {layer}")
    return results


# ---------------------------------------------------------------- the compact checkpoint
def dense_config(donor: Donor, target: DenseTarget, intermediate: int, dtype_name: str):
    """The target's transformers config: every key of the source the target's config class knows."""
    from transformers import AutoConfig

    known = set(AutoConfig.for_model(target.model_type).to_dict())
    skip = {"model_type", "architectures", "transformers_version", "intermediate_size", "dtype", "torch_dtype"}
    kw = {k: v for k, v in donor.config.items() if k in known and k not in skip}
    kw.update(dict(target.config))
    config = AutoConfig.for_model(target.model_type, intermediate_size=intermediate, **kw)
    config.architectures = [target.architecture]
    config.dtype = dtype_name
    return config


def compact_state_dict(donor: Donor, results: list[LayerResult], config, target: DenseTarget, out_dtype):
    """Every tensor of the dense model: the source's attention/norms/globals, the new FFNs; checked
    name by name and shape by shape against the model transformers builds from `config`."""
    import torch

    from surgeon.live.hybrid import TensorReader

    reader = TensorReader({"source": donor})
    state = {}
    for name in donor.ordered_names:
        part = donor.anatomy.parts[name]
        if part.kind in COPIED_KINDS:
            t = reader.read("source", name)
            state[name] = (t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t).clone()
        elif part.kind not in DROPPED_KINDS:
            raise SurgeonError(f"tensor {name}: a {part.kind} tensor has no place in the dense {target.model_type} model")
    ffn_dtype = out_dtype or reader.read("source", expert_names(donor, results[0].layer, 0)["gate"]).dtype
    for r in results:
        prefix = f"model.layers.{r.layer}.{target.ffn_prefix}"
        for role in ROLES:
            state[f"{prefix}.{role}_proj.weight"] = r.ffn[role].to(ffn_dtype).contiguous()
        if target.router:
            state[f"model.layers.{r.layer}.{target.router}.weight"] = torch.zeros(1, config.hidden_size, dtype=ffn_dtype)
    _check_against_model(state, config, target, ffn_dtype, donor)
    return state


def _check_against_model(state: dict, config, target: DenseTarget, bias_dtype, donor: Donor) -> None:
    """Every tensor must land on a tensor of the model transformers builds from `config` (fused
    expert tensors included, through the architectures' disk -> live tables), with its shape; a
    bias the model has and the source does without is added as zeros, which changes nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from surgeon.core.anatomy import classify
    from surgeon.core.architectures import architecture_for
    from surgeon.live.hybrid import live_target

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    live = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        live.pop("lm_head.weight", None)
    arch = architecture_for(target.model_type)[0]
    covered = set()
    for name, t in state.items():
        part = classify(name, arch)
        where = live_target(name, arch, set(live), part.expert if part else None)
        shape = live[where.name][1:] if where.expert is not None else live[where.name]
        if where.half is not None:
            shape = (shape[0] // 2,) + tuple(shape[1:])
        if tuple(t.shape) != tuple(shape):
            raise SurgeonError(f"tensor {name}: shape {list(t.shape)} does not fit the dense "
                               f"{target.model_type} model's {list(shape)}")
        covered.add(where.name)
    for name in sorted(set(live) - covered):
        if not name.endswith(".bias"):
            raise SurgeonError(f"tensor {name}: the dense {target.model_type} model needs it and "
                               f"{donor.path} has no counterpart")
        state[name] = torch.zeros(live[name], dtype=bias_dtype)


def _shards(state: dict, max_shard_size: int) -> list[list[str]]:
    from surgeon.io.shards import split_into_shards

    return split_into_shards(((n, t.numel() * t.element_size()) for n, t in state.items()), max_shard_size)


def write_compact(donor: Donor, results: list[LayerResult], out, *, dtype: str = "keep", force: bool = False,
                  max_shard_size: int = 5 * 10**9, report: dict | None = None, cancel=NEVER) -> dict:
    """Write the compact dense checkpoint to `out` atomically (hidden sibling + rename, as export
    does); `cancel` is checked before each shard, and a cancelled write leaves nothing. Returns what
    was written."""
    from safetensors.torch import save_file

    from surgeon.core.anatomy import natural_key
    from surgeon.io.shards import shard_file_names, write_index
    from surgeon.io.staged import check_target, staged_directory
    from surgeon.live.dtypes import TORCH_DTYPE_NAMES, TORCH_DTYPES
    from surgeon.live.dtypes import dtype_name as _dtype_name

    target = check_source(donor)
    out = Path(out).absolute()
    check_target(out, {"source": donor}, force)
    out_dtype = None if dtype == "keep" else TORCH_DTYPE_NAMES[dtype]
    intermediate = int(results[0].ffn["gate"].shape[0])
    probe = expert_names(donor, results[0].layer, 0)["gate"]
    config = dense_config(donor, target, intermediate,
                          _dtype_name(out_dtype or TORCH_DTYPES[donor.tensors[probe].dtype]))
    state = compact_state_dict(donor, results, config, target, out_dtype)
    names = sorted(state, key=natural_key)
    shards = _shards({n: state[n] for n in names}, max_shard_size)
    files = shard_file_names(len(shards))
    with staged_directory(out) as tmp:
        weight_map = {}
        for fname, members in zip(files, shards):
            cancel.check()
            save_file({n: state[n] for n in members}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in members})
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_index(tmp, files, weight_map, total)
        config.save_pretrained(tmp)
        for f in donor.side_files():
            if f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)
        written = {"path": str(out), "files": files, "bytes": total, "tensors": len(state),
                   "parameters": sum(t.numel() for t in state.values()), "model_type": target.model_type,
                   "architecture": target.architecture, "intermediate_size": intermediate,
                   "dtype": config.dtype if isinstance(config.dtype, str) else _dtype_name(config.dtype)}
        full = {**(report or {}), "written": written}
        (tmp / REPORT_FILE).write_text(json.dumps(full, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(donor, results, target, full))
    return written


def ffn_parameters(donor: Donor, results: list[LayerResult]) -> tuple[int, int]:
    """(parameters of every routed expert in the source, parameters of the compact FFNs)."""
    before = sum(donor.tensors[n].numel for n, p in donor.anatomy.parts.items() if p.kind == "expert")
    after = sum(t.numel() for r in results for t in r.ffn.values())
    return before, after


def error_rows(results: list[LayerResult]) -> list[dict]:
    return [{"layer": r.layer, "experts": list(r.experts), "ranks": r.ranks,
             "error": {k: float(f"{v:.6g}") for k, v in r.errors.items()}} for r in results]


def model_card(donor: Donor, results: list[LayerResult], target: DenseTarget, report: dict) -> str:
    from surgeon.io.model_card import built_by, model_card, table

    w = report["written"]
    ranks = report.get("ranks", {})
    summary = [
        f"{built_by()} with `moe-surgeon compress`:",
        "per MoE layer, the chosen experts' gate, up and down matrices were stacked into one tensor per",
        "projection ([experts, intermediate, hidden]) and decomposed by a truncated HOSVD (Tucker); the",
        "reconstruction, averaged over the experts and cut to the highest-leverage neurons, is each layer's",
        "FFN. Attention, norms, embeddings and lm_head are the source's, unchanged.",
        "",
        f"- source: `{donor.path}` ({donor.model_type}), fingerprint `{donor.fingerprint}`",
        f"- this model: {w['model_type']} ({w['architecture']}), intermediate size {w['intermediate_size']}, "
        f"{w['parameters']:,} parameters, {w['dtype']}",
        f"- Tucker ranks: intermediate {ranks.get('intermediate')}, hidden {ranks.get('hidden')}, "
        f"expert {ranks.get('expert') or 'full'}",
        f"- experts chosen by: {report.get('chosen_by', 'all')}",
    ]
    if target.note:
        summary.append(f"- note: {target.note}")
    errors = table(["layer", "experts", "gate", "up", "down", "all"],
                   ([str(r.layer), format_ranges(r.experts), *(f"{r.errors[k]:.3e}" for k in ("gate", "up", "down", "all"))]
                    for r in results))
    return model_card("Compact dense checkpoint made by moe-surgeon", ["moe-surgeon", "tucker", "xpert"], summary, [
        ("Relative reconstruction error ||X - X^|| / ||X|| per layer", errors),
        (None, ["", f"Everything `moe-surgeon compress` reported is in `{REPORT_FILE}`."]),
    ])


# ---------------------------------------------------------------- the use case
@dataclass(frozen=True)
class CompressRequest:
    """What `moe-surgeon compress` was asked; the flags' names and defaults."""

    out: str
    source: str  # an MoE checkpoint directory or demo:NAME
    rank: int | None = None
    hidden_rank: int | None = None
    expert_rank: int | None = None
    experts: tuple[str, ...] = ()  # [LAYERS:]EXPERTS
    common: tuple[str, ...] | None = None  # corpora; () means the default ones, None: not --common
    q: float = 25.0
    max_tokens: int | None = None
    device: str | None = None
    dtype: str = "keep"
    batch_size: int = 32
    max_shard_size: str = "5GB"
    force: bool = False
    check: bool = False
    allow_pickle: bool = False


@dataclass
class CompressResult:
    report: dict  # plain JSON: what --json prints, and (less `check`) what the checkpoint's report file holds
    donor: Donor


def run_compress(request: CompressRequest, progress=None, cancel=NEVER) -> CompressResult:
    """Choose the experts, decompose them, write the compact checkpoint (and, with `check`, load it)."""
    from surgeon.core.donor import open_donor
    from surgeon.io.sizes import parse_size
    from surgeon.io.staged import check_target

    r = request
    # Every check that needs no weights runs before torch is imported or anything slow starts.
    if r.experts and r.common is not None:
        raise SurgeonError("--experts and --common both choose the experts; give one")
    if r.common is not None and not 0 < r.q <= 100:
        raise SurgeonError(f"--q {r.q}: expected a percentage in (0, 100]")
    max_shard = parse_size(r.max_shard_size)
    donor = open_donor(r.source, allow_pickle=r.allow_pickle)
    target = check_source(donor)
    ranks = check_ranks(donor, r.rank, r.hidden_rank, r.expert_rank)
    chosen = parse_expert_choice(list(r.experts), donor)
    check_target(Path(r.out).absolute(), {"source": donor}, r.force)

    import torch

    from surgeon.live.devices import check_device, default_device

    device = str(check_device(r.device or default_device()))
    report: dict = {"source": r.source, "path": str(donor.path), "model_type": donor.model_type,
                    "fingerprint": donor.fingerprint, "device": device}
    if r.common is not None:
        chosen, report["common"] = common_choice(r, donor, device, progress, cancel)
        report["chosen_by"] = f"--common {' '.join(report['common']['corpora'])} --q {r.q:g}"
    else:
        report["chosen_by"] = " ".join(f"--experts {e}" for e in r.experts) or "all experts"
    try:
        results = compress(donor, chosen, rank=ranks[0], hidden_rank=ranks[1], expert_rank=ranks[2], device=device,
                           progress=progress, cancel=cancel)
    except torch.cuda.OutOfMemoryError:
        raise SurgeonError(f"out of GPU memory on {device}; try --device cpu") from None
    inter, hidden = full_sizes(donor)
    before, after = ffn_parameters(donor, results)
    report.update(
        expert_shape={"intermediate": inter, "hidden": hidden},
        ranks={"intermediate": ranks[0], "hidden": ranks[1], "expert": ranks[2]},
        layers=error_rows(results),
        mean_error={k: float(f"{sum(x.errors[k] for x in results) / len(results):.6g}")
                    for k in ("gate", "up", "down", "all")},
        ffn_parameters={"experts_before": before, "after": after},
        target_note=target.note or None,
    )
    written = write_compact(donor, results, r.out, dtype=r.dtype, force=r.force, max_shard_size=max_shard,
                            report=report, cancel=cancel)
    report["written"] = written
    report["model_parameters"] = {"before": donor.num_parameters, "after": written["parameters"]}
    if r.check:
        report["check"] = check_load(written["path"])
    return CompressResult(report, donor)


def common_choice(r: CompressRequest, donor: Donor, device: str, progress=None, cancel=NEVER) -> tuple[dict, dict]:
    """Per MoE layer, the experts common to every corpus (routing's common_experts)."""
    from surgeon.features.routing.corpora import read_corpora
    from surgeon.features.routing.probe import common_experts, probe_domains
    from surgeon.features.routing.run import load_model
    from surgeon.probes.scoring import load_tokenizer

    corpora = read_corpora(r.common, "--common")
    from transformers.utils import logging

    logging.disable_progress_bar()  # a loading bar between the lines of a report is noise
    tokenizer = load_tokenizer(donor.path)
    cancel.check()
    model = load_model(donor, device, "keep")
    stats = probe_domains(model, tokenizer, corpora, batch_size=r.batch_size, max_tokens=r.max_tokens,
                          progress=progress, cancel=cancel)
    del model
    first = next(iter(stats.values()))
    common = common_experts({n: s.frequency for n, s in stats.items()}, r.q / 100)
    chosen = {}
    for layer, experts in zip(first.layers, common):
        if not experts:
            raise SurgeonError(f"--common: layer {layer} has no expert in the top {r.q:g}% of every corpus "
                               f"({', '.join(corpora)}); raise --q or choose with --experts")
        chosen[layer] = tuple(experts)
    info = {"corpora": list(corpora), "q": r.q, "tokens": {n: s.tokens for n, s in stats.items()}}
    return chosen, info


def check_load(path) -> dict:
    """Load the written checkpoint with transformers and run it on a few tokens."""
    import torch
    from transformers.utils import logging

    from surgeon.live.loader import load_model

    logging.disable_progress_bar()  # a bar for loading a few tensors is noise in a report
    model, info = load_model(path, device="cpu", gates=False, loading_info=True)
    problems = [f"{k} {v[0]}" for k, v in info.items() if v]
    if problems:
        raise SurgeonError(f"{path}: transformers loads it with {problems[0]}")
    ids = torch.arange(1, min(9, model.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise SurgeonError(f"{path}: the written model gives non-finite logits")
    return {"class": type(model).__name__, "tokens": int(ids.shape[1]), "logits_finite": True}

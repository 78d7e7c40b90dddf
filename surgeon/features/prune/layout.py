"""What a pruned checkpoint holds: which bytes of the original each tensor is, and its config.

A kept expert keeps its bytes and gets the next free index: per-expert tensors are renamed
(`experts.5.` -> `experts.2.`), a fused expert tensor ([E, ...], gpt-oss and Llama 4) becomes the
runs of its kept rows, and so does every router tensor, whose first axis is the expert axis
(the router's weight rows, its bias, `e_score_correction_bias`). A pruned model is then the original
with the pruned experts' router scores removed: for a router that takes the top k of a softmax
(or of sigmoid scores) the kept experts compete exactly as they did, minus the pruned ones.

Families where that does not hold are refused before anything is read, with the reason.
"""

from __future__ import annotations

from surgeon.core.anatomy import Part, layer_of
from surgeon.core.architectures import EXPERT_COUNT_KEYS
from surgeon.core.donor import Donor
from surgeon.core.plan import Plan, format_ranges
from surgeon.core.resolve import Resolution, Source
from surgeon.errors import SurgeonError


def moe_shape(donor: Donor) -> tuple[list[int], int]:
    """(the MoE layers, experts per layer) of a donor pruning can handle; one line saying why not otherwise."""
    a = donor.anatomy
    where = f"{donor.path}: {donor.model_type}"
    if not a.experts_per_layer:
        raise SurgeonError(f"{where} has no routed experts to prune")
    if not a.known or a.architecture.experts_key is None:
        raise SurgeonError(f"{where}: no architecture description says which config key holds the expert "
                           "count, so a pruned config cannot be written")
    arch = a.architecture
    if any(donor.config.get(k) for k in arch.added_experts_keys):
        raise SurgeonError(f"{where}: its router also scores {', '.join(arch.added_experts_keys)} experts that "
                           "hold no weights; pruning does not handle them")
    counts = set(a.experts_per_layer.values())
    if len(counts) > 1:
        per = {n: [layer for layer, c in a.experts_per_layer.items() if c == n] for n in sorted(counts)}
        raise SurgeonError(f"{where}: MoE layers hold different numbers of experts ("
                           + "; ".join(f"{n} in layers {format_ranges(ls)}" for n, ls in per.items())
                           + "); one config key cannot describe a per-layer pruning of them")
    if a.extra_layers:
        raise SurgeonError(f"{where}: has multi-token-prediction layer(s) {format_ranges(a.extra_layers)} that "
                           "transformers does not load, so a pruning of them could not be checked")
    groups = donor.config.get("n_group")
    if isinstance(groups, int) and groups > 1:
        raise SurgeonError(f"{where}: n_group is {groups}: group-limited routing picks groups of consecutive "
                           "experts, and renumbering the kept experts would regroup them")
    layers = sorted(a.experts_per_layer)
    stray = [n for n in a.unclassified if (found := layer_of(n, arch)) is not None and found[0] in layers]
    if stray:
        raise SurgeonError(f"{where}: tensor {stray[0]} is not classified, so pruning cannot tell whether it "
                           "has an expert axis")
    return layers, counts.pop()


def check_top_k(donor: Donor, keep: int) -> int | None:
    """The model's top-k; refused when it exceeds what remains."""
    arch = donor.anatomy.architecture
    k = donor.config.get(arch.top_k_key) if arch.top_k_key else None
    if isinstance(k, int) and k > keep:
        raise SurgeonError(f"{donor.path}: {arch.top_k_key} is {k}: every token takes {k} experts, more than the "
                           f"{keep} a pruning to {keep} per layer leaves")
    return k if isinstance(k, int) else None


def renamed(name: str, donor: Donor, part: Part, new: int) -> str:
    prefix = len(donor.anatomy.architecture.layer_prefix) + 1  # past the layer number
    segs = name.split(".")
    at = next(i for i in range(prefix, len(segs)) if segs[i] == str(part.expert))
    return ".".join(segs[:at] + [str(new)] + segs[at + 1:])


def _runs(kept: tuple[int, ...]) -> tuple[tuple[int, int, str], ...]:
    """Consecutive kept rows as (first, end, donor) runs: each is one byte range of the original."""
    runs: list[list[int]] = []
    for e in kept:
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    return tuple((lo, hi, "A") for lo, hi in runs)


def pruned_resolution(donor: Donor, kept: dict[int, tuple[int, ...]], num_experts: int) -> Resolution:
    """The source map of the pruned checkpoint (donor "A" is the original), in the export's write order."""
    sources: dict[str, Source] = {}
    parts: dict[str, Part] = {}
    for name in donor.ordered_names:
        info = donor.tensors[name]
        part = donor.anatomy.parts.get(name)
        keep = kept.get(part.layer) if part is not None else None
        src = Source("A", name, info.dtype, info.shape, info.dtype)
        if keep is None or part.kind not in ("expert", "router"):
            sources[name], parts[name] = src, part
            continue
        if part.kind == "expert" and part.expert is not None:
            if part.expert in keep:
                new = keep.index(part.expert)
                out = renamed(name, donor, part, new)
                sources[out], parts[out] = src, Part("expert", part.layer, new)
            continue
        if not info.shape or info.shape[0] != num_experts:
            raise SurgeonError(f"tensor {name} ({donor.path}): shape {list(info.shape)}, not {num_experts} experts "
                               f"along its first axis, so its kept experts cannot be sliced out")
        sources[name] = Source("A", name, info.dtype, (len(keep), *info.shape[1:]), info.dtype, runs=_runs(keep))
        parts[name] = part
    return Resolution(Plan("A"), sources, {n: p for n, p in parts.items() if p is not None})


def count_keys(donor: Donor, num_experts: int) -> list[str]:
    """The config keys stating the expert count. The family's key first; transformers 5 saves some
    families under another name (Qwen3-MoE writes `num_local_experts` where the releases say
    `num_experts`), and a config left saying the old count would not load."""
    keys = [k for k in dict.fromkeys((donor.anatomy.architecture.experts_key, *EXPERT_COUNT_KEYS))
            if donor.config.get(k) == num_experts]
    if not keys:
        raise SurgeonError(f"{donor.path}/config.json: no key states the {num_experts} experts per layer "
                           f"({', '.join(EXPERT_COUNT_KEYS)}), so a pruned config cannot say how many remain")
    return keys


def pruned_config(donor: Donor, num_experts: int, keep: int) -> dict:
    config = dict(donor.config)
    for key in count_keys(donor, num_experts):
        config[key] = keep
    return config

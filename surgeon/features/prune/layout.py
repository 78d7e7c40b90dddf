"""What a pruned checkpoint holds: which bytes of the original each tensor is, and its config.

A kept expert keeps its bytes and gets the next free index: per-expert tensors are renamed
(`experts.5.` -> `experts.2.`), a fused expert tensor ([E, ...], gpt-oss and Llama 4) becomes the
runs of its kept rows, and so does every router tensor, whose first axis is the expert axis
(the router's weight rows, its bias, `e_score_correction_bias`). A pruned model is then the original
with the pruned experts' router scores removed: for a router that takes the top k of a softmax
(or of sigmoid scores) the kept experts compete exactly as they did, minus the pruned ones.

Families where that does not hold are refused before anything is read, with the reason.

A global pruning (`--global`) may keep different numbers of experts per layer, but every family's
config states one expert count for all layers. Where the router of every layer that keeps fewer has a
per-expert bias that the choice adds (gpt-oss's router bias, DeepSeek-V3's and GLM-4.5's
`e_score_correction_bias`, `expert_bias`), those layers are padded up to the largest count with
unreachable experts: zero weights, zero router rows and a bias of -inf, so no token is ever routed
to them and the model computes what the global choice computes. Elsewhere an uneven choice is
refused in one line: a router with no bias has no way to make a padding expert unreachable.
"""

from __future__ import annotations

from surgeon.core.anatomy import Part, layer_of
from surgeon.core.architectures import EXPERT_COUNT_KEYS, GROUP_COUNT_KEYS
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
    if arch.prune_refused:
        raise SurgeonError(f"{where}: cannot be pruned: {arch.prune_refused}")
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
    for key in GROUP_COUNT_KEYS:
        groups = donor.config.get(key)
        if isinstance(groups, int) and groups > 1:
            raise SurgeonError(f"{where}: {key} is {groups}: group-limited routing picks groups of consecutive "
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


CHOICE_BIASES = ("e_score_correction_bias", "expert_bias", "bias")  # added to the router's choice scores


def is_choice_bias(name: str, info) -> bool:
    """A router tensor that adds one value per expert to the scores its top-k is taken over."""
    return len(info.shape) == 1 and name.rsplit(".", 1)[-1] in CHOICE_BIASES


def check_padding(donor: Donor, kept: dict[int, tuple[int, ...]], num_experts: int, what: str = "prune --global"
                  ) -> int:
    """The expert count every layer is written with: the largest kept. When layers keep different
    numbers, the router of every layer that keeps fewer must have a choice bias in a float dtype
    (padding experts are made unreachable through it); one line saying why not otherwise."""
    counts = {layer: len(k) for layer, k in kept.items()}
    size = max(counts.values())
    if len(set(counts.values())) == 1:
        return size
    short = {layer for layer, n in counts.items() if n < size}  # the layers to pad
    biased = {p.layer for n, p in donor.anatomy.parts.items()
              if p.kind == "router" and p.layer in short and is_choice_bias(n, donor.tensors[n])
              and donor.tensors[n].shape[0] == num_experts}
    where = f"{donor.path}: {donor.model_type}"
    keys = " / ".join(k for k in dict.fromkeys((donor.anatomy.architecture.experts_key, *EXPERT_COUNT_KEYS))
                      if k in donor.config)
    listed = ", ".join(f"{n} in layer {layer}" for layer, n in counts.items())
    if biased != short:
        missing = format_ranges(sorted(short - biased))
        raise SurgeonError(f"{what}: the choice keeps {listed}, but {where}'s config states one expert count for "
                           f"every layer (`{keys}`) and its router has no per-expert bias (layers {missing}) that "
                           "could make padding experts unreachable, so transformers could not load it as chosen; "
                           "prune per layer (drop --global)")
    for n, p in donor.anatomy.parts.items():
        if p.kind == "router" and p.layer in short and is_choice_bias(n, donor.tensors[n]) \
                and donor.tensors[n].dtype not in ("F32", "F16", "BF16", "F64"):
            raise SurgeonError(f"{what}: tensor {n} ({donor.path}) is {donor.tensors[n].dtype}, which cannot hold "
                               "the -inf that makes a padding expert unreachable")
    return size


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
    """The source map of a pruned checkpoint whose layers keep equally many experts (donor "A" is the
    original), in the export's write order."""
    resolution, _computed, close = pruned_layout(donor, kept, num_experts)
    close()
    if len({len(k) for k in kept.values()}) > 1:
        raise SurgeonError("pruned_resolution: the layers keep different numbers of experts; use pruned_layout")
    return resolution


def pruned_layout(donor: Donor, kept: dict[int, tuple[int, ...]], num_experts: int
                  ) -> tuple[Resolution, dict, object]:
    """The source map of the pruned checkpoint, in the export's write order; for a global pruning's
    padded layers, the functions writing their new bytes (export_hybrid's `computed`: padding experts
    of zeros; router and fused tensors as their kept rows, then zero rows, -inf in a choice bias);
    and the callable that closes the files those read."""
    from surgeon.features.prune.reader import Reader

    size = check_padding(donor, kept, num_experts)
    sources: dict[str, Source] = {}
    parts: dict[str, Part] = {}
    computed: dict = {}
    reader = Reader(donor)
    arch = donor.anatomy.architecture
    extra_rows = arch.router_extra_rows
    if isinstance(extra_rows, str):
        extra_rows = donor.config.get(extra_rows) or 0
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
            if part.expert == keep[0]:  # the padding experts take the first kept expert's tensor layout
                for new in range(len(keep), size):
                    out = renamed(name, donor, part, new)
                    sources[out], parts[out] = src, Part("expert", part.layer, new)
                    computed[out] = _zeros(info.nbytes)
            continue
        if part.kind == "router" and any(f".{w}." in f".{name}." for w in arch.router_whole):
            sources[name], parts[name] = src, part
            continue
        extra = tuple(range(num_experts, num_experts + extra_rows)) if part.kind == "router" else ()
        lead = expert_axis(info.shape, num_experts + len(extra))
        if lead is None and extra:  # a router tensor over the experts alone (Inkling's choice bias)
            extra, lead = (), expert_axis(info.shape, num_experts)
        if lead is None:
            raise SurgeonError(f"tensor {name} ({donor.path}): shape {list(info.shape)}, not {num_experts} experts "
                               f"along its first axis, so its kept experts cannot be sliced out")
        parts[name] = part
        shape = (*info.shape[:lead], size + len(extra), *info.shape[lead + 1:])
        if len(keep) == size and lead == 0:  # byte ranges of the original
            sources[name] = Source("A", name, info.dtype, shape, info.dtype, runs=_runs(keep + extra))
            continue
        sources[name] = Source("A", name, info.dtype, shape, info.dtype)
        fill = float("-inf") if part.kind == "router" and is_choice_bias(name, info) else 0.0
        computed[name] = _padded_rows(reader, name, keep, size - len(keep), info, fill, extra, lead)
    resolution = Resolution(Plan("A"), sources, {n: p for n, p in parts.items() if p is not None})
    return resolution, computed, reader.close


def _zeros(nbytes: int, piece: int = 1 << 20):
    def make():
        for lo in range(0, nbytes, piece):
            yield bytes(min(piece, nbytes - lo))

    return make


def expert_axis(shape, rows: int) -> int | None:
    """Where a router or fused tensor's expert axis is: first, or after axes of size 1 (ERNIE 4.5 keeps its
    choice bias as [1, E]); None when no such axis has `rows` entries."""
    lead = 0
    while lead < len(shape) and shape[lead] == 1 and rows != 1:
        lead += 1
    return lead if lead < len(shape) and shape[lead] == rows else None


def _padded_rows(reader, name: str, keep: tuple[int, ...], pad: int, info, fill: float, extra: tuple[int, ...] = (),
                 lead: int = 0):
    """A tensor's kept rows' bytes along its expert axis (after `lead` axes of size 1), then `pad` rows of
    `fill`, then the `extra` rows (router rows that score something other than an expert)."""
    def make():
        import torch

        from surgeon.live.dtypes import TORCH_DTYPES

        def row_bytes(e):
            t = reader.read(name, e) if lead == 0 else whole[e]
            return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())

        whole = None if lead == 0 else reader.read(name).reshape(info.shape[lead:])
        for e in keep:
            yield row_bytes(e)
        rest = info.shape[lead + 1:]
        if pad and fill == 0.0:
            n = 1
            for d in rest:
                n *= d
            yield from _zeros(pad * n * torch.empty((), dtype=TORCH_DTYPES[info.dtype]).element_size())()
        elif pad:
            t = torch.full((pad, *rest), fill, dtype=TORCH_DTYPES[info.dtype])
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy())
        for e in extra:
            yield row_bytes(e)

    return make


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

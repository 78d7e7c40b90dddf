"""Resolve a plan against opened donors into a source map.

The source map names, for every tensor of the hybrid, the donor and tensor it is copied from and
the dtype it is written in. Resolution is where every compatibility check happens, so export and
materialisation can trust what they are given.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from surgeon.core import collector
from surgeon.core.anatomy import Part
from surgeon.core.donor import Donor
from surgeon.core.gates_sidecar import GATE_KIND, gate_layer_of, gate_type_of, hidden_size_of
from surgeon.core.plan import Plan, check_assignment
from surgeon.errors import SurgeonError
from surgeon.io.dtypes import CASTS, FLOATS
from surgeon.io.safetensors_file import TensorInfo

DTYPES = {"keep": None, **CASTS}
CONVERTIBLE = FLOATS
# Tensors whose precision matters more than their size: they keep their dtype under --dtype.
# Layer gates are tiny next to their layer and were trained in float32.
# FP8 block scales (`weight_scale_inv`) are what the 8-bit weights mean: a cast would change them.
KEEP_PRECISION = ("e_score_correction_bias", f"{GATE_KIND}.weight", "weight_scale_inv")



class Source(NamedTuple):
    donor: str  # donor name in the plan
    tensor: str  # tensor name in that donor
    dtype: str  # dtype written to the hybrid
    shape: tuple[int, ...]
    src_dtype: str
    # A fused expert tensor ([E, ...], expert axis first) spliced from several donors: (first expert,
    # end, donor) runs covering 0..E, each a contiguous byte range of that donor's tensor. Empty: the
    # whole tensor comes from `donor`.
    runs: tuple[tuple[int, int, str], ...] = ()

    @property
    def converts(self) -> bool:
        return self.dtype != self.src_dtype

    @property
    def origin(self) -> tuple:
        """What the bytes are: equal origins mean equal contents (a swap can skip the tensor)."""
        return (self.donor, self.tensor, self.runs)

    def donors_by_numel(self) -> dict[str, int]:
        n = 1
        for d in self.shape:
            n *= d
        if not self.runs:
            return {self.donor: n}
        per_expert = n // self.shape[0]
        out: dict[str, int] = {}
        for lo, hi, donor in self.runs:
            out[donor] = out.get(donor, 0) + (hi - lo) * per_expert
        return out


@dataclass
class Resolution:
    """A plan resolved against its donors: where every tensor of the hybrid comes from."""

    plan: Plan
    sources: dict[str, Source]  # hybrid tensor name -> source, in the order to write them
    parts: dict[str, Part]  # hybrid tensor name -> part; unclassified names are absent (from base)
    warnings: list[str] = field(default_factory=list)
    # Names whose part is a layer gate, when known ahead (resolve: from the base's tables, once);
    # gate_names then only checks them, not every name (a swap asks for it each time).
    gate_candidates: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    # Where a swap between two resolutions needs to look (set by resolve, absent after gate plans):
    # `taken` names, in write order, every tensor whose source is not the base's own, and every other
    # tensor's source is the very object in `base_sources`, which resolutions of one base and dtype share.
    taken: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    base_sources: dict | None = field(default=None, repr=False, compare=False)

    def parameters_by_donor(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for s in self.sources.values():
            counts.update(s.donors_by_numel())
        return dict(counts)

    def changed(self) -> list[str]:
        return [n for n, s in self.sources.items() if s.donor != self.plan.base or s.runs]

    def gate_names(self) -> list[str]:
        """The hybrid's layer-gate tensors: they go to the gates sidecar, not the model's shards."""
        names = self.sources if self.gate_candidates is None else self.gate_candidates
        return [n for n in names
                if n in self.sources and (p := self.parts.get(n)) is not None and p.kind == GATE_KIND]

    @property
    def converts(self) -> bool:
        return any(s.converts for s in self.sources.values())


def changed_between(old: Resolution, new: Resolution) -> list[str]:
    """The tensors of `new` whose bytes are not `old`'s (another origin, or new to it): what a swap
    from `old` to `new` copies. Two resolutions of one base and dtype differ only where one of them
    took a tensor elsewhere, so only those are looked at (96 names of 3,219 for all attention)."""
    if (new.taken is not None and old.taken is not None and new.base_sources is not None
            and new.base_sources is old.base_sources):
        names: dict[str, None] = dict.fromkeys(new.taken)
        names.update(dict.fromkeys(old.taken))
    else:
        names = dict.fromkeys(new.sources)
    before, after = old.sources, new.sources
    return [n for n in names if n in after and (n not in before or (after[n] is not before[n]
                                                                    and after[n].origin != before[n].origin))]


class LayerGate(NamedTuple):
    """One Self-MoE layer gate of a hybrid."""

    layer: int
    gate_type: str  # scalar | vector | matrix
    parameters: int
    donor: str  # the donor the hybrid takes this gate from


def layer_gates(resolution: Resolution, donors: dict[str, Donor]) -> dict[int, LayerGate]:
    """The hybrid's layer gates by layer, in layer order, as resolving its plan gives them: what an
    export writes to the gates sidecar and the workbench's Gates screen lists."""
    base = donors[resolution.plan.base]
    hidden = hidden_size_of(base.config, str(base.path))
    out = {}
    for name in resolution.gate_names():
        src = resolution.sources[name]
        layer = gate_layer_of(name)
        out[layer] = LayerGate(layer, gate_type_of(src.shape, hidden, name), math.prod(src.shape), src.donor)
    return dict(sorted(out.items()))


def out_dtype(name: str, src_dtype: str, dtype: str) -> str:
    want = DTYPES[dtype]
    if want is None or src_dtype not in CONVERTIBLE or name.endswith(KEEP_PRECISION):
        return src_dtype
    return want


def _label(name: str, donor: Donor) -> str:
    return f"{name} ({donor.path})"


def resolve(plan: Plan, donors: dict[str, Donor], *, dtype: str = "keep") -> Resolution:
    with collector.paused():  # a Source per tensor: 92,000 of them for DeepSeek-V3
        return _resolve(plan, donors, dtype, build=True, in_write_order=True)


def check_plan(plan: Plan, donors: dict[str, Donor], *, dtype: str = "keep") -> None:
    """Raise what `resolve` would raise for this plan, without making its sources: the workbench asks
    this of every donor it opens ("could it give the base everything?"), and for DeepSeek-V3 the
    92,000 Source objects were most of the answer's cost."""
    build = any(a.component == GATE_KIND for a in plan.assignments)
    with collector.paused():
        try:
            _resolve(plan, donors, dtype, build=build, in_write_order=build)
        except SurgeonError:
            # Checked in the files' order, which needs no sort; the problem named is the first in
            # write order, as `resolve` names it.
            _resolve(plan, donors, dtype, build=build, in_write_order=True)
            raise


def _resolve(plan: Plan, donors: dict[str, Donor], dtype: str, *, build: bool,
             in_write_order: bool) -> Resolution | None:
    if dtype not in DTYPES:
        raise SurgeonError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if plan.base not in donors:
        raise SurgeonError(f"plan: base donor {plan.base!r} is not among the donors")
    base = donors[plan.base]
    anatomy = base.anatomy
    warnings = []
    if not anatomy.known:
        warnings.append(
            f"{base.path}: model_type {base.model_type!r} has no architecture table; "
            "components were inferred from tensor names"
        )
    if anatomy.unclassified:
        shown = ", ".join(anatomy.unclassified[:5]) + (" ..." if len(anatomy.unclassified) > 5 else "")
        warnings.append(
            f"{len(anatomy.unclassified)} tensor(s) belong to no component and always come from the base: {shown}"
        )
    for a in plan.assignments:
        if a.donor not in donors:
            raise SurgeonError(f"plan: SPEC {a.spec!r} names donor {a.donor!r}, which is not open")
        if a.component == "lm_head" and base.tied_embeddings:
            raise SurgeonError(
                f"SPEC {a.spec!r}: base {_label(plan.base, base)} ties lm_head to the embedding "
                "(tie_word_embeddings); take embedding instead"
            )
        check_assignment(a, anatomy, _label(plan.base, base))
        _check_donor(a, base, donors[a.donor], plan.base)

    base_sources = _base_sources(base, plan.base, dtype) if build else {}
    sources = dict(base_sources)
    taken: list[str] = []
    kinds = plan.kinds()  # a swap resolves every plan it moves to: skip parts no assignment can cover
    fits: dict[str, bool] = {}  # donor name -> _same_layout
    for part, names in (base.part_groups if in_write_order else base.part_groups_as_stored).items():
        if part.kind not in kinds:
            continue
        if part.fused:
            for name in names:
                spliced = fused_source(name, part, plan, base, donors, dtype)
                if spliced is not None:
                    sources[name] = spliced
                    taken.append(name)
            continue
        donor_name = plan.donor_for(part)
        if donor_name == plan.base or part.kind == GATE_KIND:
            continue
        donor = donors[donor_name]
        if not build:
            if donor_name not in fits:
                fits[donor_name] = _same_layout(base, donor)
            if not fits[donor_name]:
                for name in names:
                    _source_tensor(name, part, base, plan.base, donor, donor_name, dtype)
            continue
        for name in names:
            sources[name] = source_from(name, part, base, plan.base, donor, donor_name, dtype)
        taken += names
    if not build:
        return None
    parts = anatomy.parts
    if any(a.component == GATE_KIND for a in plan.assignments):
        parts = gate_sources(plan, donors, sources, dtype)
        return Resolution(plan, sources, parts, warnings)
    key = ("gate_names",)
    if key not in base.memo:
        base.memo[key] = tuple(n for n in base.ordered_names
                               if (p := parts.get(n)) is not None and p.kind == GATE_KIND)
    return Resolution(plan, sources, parts, warnings, gate_candidates=base.memo[key], taken=tuple(taken),
                      base_sources=base_sources)


def gate_sources(plan: Plan, donors: dict[str, Donor], sources: dict[str, Source], dtype: str) -> dict[str, Part]:
    """Apply the plan's layer_gate assignments to `sources`; return the hybrid's parts.

    A layer gate is optional: the donor a layer's gate is taken from decides whether the hybrid
    has one there, so a gated donor adds gates to a base without any, and a donor without a gate
    in that layer removes the base's. Each gate carries its type in its shape, so only the
    hidden size has to agree, not the shape of a base gate it replaces.
    """
    base = donors[plan.base]
    parts = dict(base.anatomy.parts)
    hidden = hidden_size_of(base.config, str(base.path))
    gates = {n: _gates_by_layer(d) for n, d in donors.items()}
    for a in plan.assignments:
        if a.component != GATE_KIND or a.donor == plan.base:
            continue
        layers = range(base.anatomy.num_layers) if a.layers is None else a.layers
        if not any(layer in gates[n] for n in (a.donor, plan.base) for layer in layers):
            raise SurgeonError(
                f"SPEC {a.spec!r}: neither donor {_label(a.donor, donors[a.donor])} nor base "
                f"{_label(plan.base, base)} has layer gates in those layers (add some with moe-surgeon gates add)"
            )
    for layer in range(base.anatomy.num_layers):
        part = Part(GATE_KIND, layer)
        donor_name = plan.donor_for(part)
        if donor_name == plan.base:
            continue
        for name in gates[plan.base].get(layer, ()):
            del sources[name]
            del parts[name]
        donor = donors[donor_name]
        for name in gates[donor_name].get(layer, ()):
            info = donor.tensors[name]
            gate_type_of(info.shape, hidden, f"tensor {name} of donor {_label(donor_name, donor)} "
                         f"(base {_label(plan.base, base)})")
            sources[name] = Source(donor_name, name, out_dtype(name, info.dtype, dtype), info.shape, info.dtype)
            parts[name] = part
    return parts


def fused_source(name: str, part: Part, plan: Plan, base: Donor, donors: dict[str, Donor], dtype: str) -> Source | None:
    """The source of a fused expert tensor: each expert's slice from the donor the plan takes that
    expert from, as runs of consecutive experts. None when every expert stays with the base."""
    count = base.tensors[name].shape[0] if base.tensors[name].shape else 0
    runs: list[list] = []
    for e in range(count):
        d = plan.donor_for(Part("expert", part.layer, e))
        if runs and runs[-1][2] == d:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1, d])
    if not runs or (len(runs) == 1 and runs[0][2] == plan.base):
        return None
    checked = {d: source_from(name, part, base, plan.base, donors[d], d, dtype) for d in {r[2] for r in runs}}
    if len(runs) == 1:
        return checked[runs[0][2]]
    first = checked[runs[0][2]]
    return Source(plan.base, name, first.dtype, first.shape, first.src_dtype,
                  runs=tuple((lo, hi, d) for lo, hi, d in runs))


def _gates_by_layer(donor: Donor) -> dict[int, list[str]]:
    return {p.layer: names for p, names in donor.part_groups.items() if p.kind == GATE_KIND}


def _base_sources(base: Donor, base_name: str, dtype: str) -> dict[str, Source]:
    """Every tensor from the base, in write order; computed once per base and dtype and shared
    by every resolution, which then only replaces what the plan takes elsewhere."""
    key = ("base_sources", base_name, dtype)
    if key not in base.memo:
        base.memo[key] = {
            n: Source(base_name, n, out_dtype(n, base.tensors[n].dtype, dtype), base.tensors[n].shape,
                      base.tensors[n].dtype)
            for n in base.ordered_names
        }
    return base.memo[key]


def source_from(name: str, part: Part, base: Donor, base_name: str, donor: Donor, donor_name: str,
                 dtype: str) -> Source:
    src_name, src = _source_tensor(name, part, base, base_name, donor, donor_name, dtype)
    return Source(donor_name, src_name, out_dtype(name, src.dtype, dtype), src.shape, src.dtype)


def _same_layout(base: Donor, donor: Donor) -> bool:
    """Whether `donor` has every tensor of the base under its name, shape and dtype, and no other:
    then `_source_tensor` passes for every tensor, and checking a plan needs no loop over them
    (fine-tunes of one model, the workbench's usual donors, compare as one dict in C, or as their
    headers' bytes: equal headers name the same tensors with the same dtypes and shapes)."""
    if donor is base:
        return True
    headers = _headers(base)
    if headers is not None and headers == _headers(donor):
        return True
    return donor.layout == base.layout


def _headers(donor: Donor) -> list[bytes] | None:
    """The donor's safetensors headers, or None where they do not describe every tensor (a pickle's)."""
    if sum(len(h.tensors) for h in donor.shards.values()) != len(donor.tensors):
        return None
    return sorted(h.raw for h in donor.shards.values())


def _source_tensor(name: str, part: Part, base: Donor, base_name: str, donor: Donor, donor_name: str,
                   dtype: str) -> tuple[str, TensorInfo]:
    """The donor's tensor that base tensor `name` takes, checked to fit: (its name, its header entry)."""
    info = base.tensors[name]
    src_name = name
    if name not in donor.tensors and name == "lm_head.weight" and donor.tied_embeddings:
        src_name = "model.embed_tokens.weight"  # a tied donor's lm_head is its embedding
    src = donor.tensors.get(src_name)
    if src is None:
        raise SurgeonError(
            f"tensor {name}: donor {_label(donor_name, donor)} has no such tensor "
            f"(the plan takes its {part.label()})"
        )
    if src.shape != info.shape:
        raise SurgeonError(
            f"tensor {name}: shape {list(src.shape)} in donor {_label(donor_name, donor)} "
            f"but {list(info.shape)} in base {_label(base_name, base)}"
        )
    if dtype == "keep" and src.dtype != info.dtype:
        raise SurgeonError(
            f"tensor {name}: dtype {src.dtype} in donor {_label(donor_name, donor)} but {info.dtype} "
            f"in base {_label(base_name, base)}; pass --dtype to write one dtype"
        )
    return src_name, src


def storage(donor: Donor) -> str:
    """How a donor stores its weights: `quant_method` and block size of its quantization_config
    (FP8 with 128x128 blocks, MXFP4), or "unquantized"."""
    q = donor.config.get("quantization_config")
    if not isinstance(q, dict) or not q.get("quant_method"):
        return "unquantized"
    block = q.get("weight_block_size")
    return str(q["quant_method"]) + (f" in {'x'.join(map(str, block))} blocks" if isinstance(block, list) else "")


def _check_donor(a, base: Donor, donor: Donor, base_name: str) -> None:
    if donor is base:
        return
    if donor.model_type != base.model_type:
        raise SurgeonError(
            f"donor {_label(a.donor, donor)} is {donor.model_type}, base {_label(base_name, base)} "
            f"is {base.model_type}: components move only between checkpoints of one architecture"
        )
    if storage(donor) != storage(base):  # an FP8 weight means nothing without its scales' convention
        raise SurgeonError(
            f"donor {_label(a.donor, donor)} is stored {storage(donor)}, base {_label(base_name, base)} "
            f"{storage(base)}: components move only between checkpoints stored the same way"
        )
    if a.component in ("experts", "expert", "router"):
        nb, nd = base.anatomy.num_experts, donor.anatomy.num_experts
        if nb != nd:
            raise SurgeonError(
                f"SPEC {a.spec!r}: donor {_label(a.donor, donor)} has {nd} experts per layer "
                f"but base {_label(base_name, base)} has {nb}"
            )
    if donor.anatomy.num_layers != base.anatomy.num_layers and a.layers is None:
        raise SurgeonError(
            f"SPEC {a.spec!r}: donor {_label(a.donor, donor)} has {donor.anatomy.num_layers} layers "
            f"but base {_label(base_name, base)} has {base.anatomy.num_layers}; name the layers to take"
        )

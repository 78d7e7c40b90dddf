"""What each tensor of a checkpoint is: (layer, component kind, expert index).

The rules come from `architectures.py`; this module only applies them. Every tensor either gets
a part or lands in `unclassified`, which callers must show: nothing is silently dropped.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from surgeon.core.architectures import (
    COMMON_LAYER_RULES,
    Architecture,
    architecture_for,
)


@dataclass(frozen=True)
class Part:
    """The component a tensor belongs to. `layer` is None for the globals."""

    kind: str
    layer: int | None = None
    expert: int | None = None
    # A routed-expert tensor holding every expert of its layer, expert axis first (gpt-oss, Llama 4):
    # expert is None and a plan may take each expert's slice from another donor (resolve.py).
    fused: bool = False

    def label(self) -> str:
        where = "" if self.layer is None else f"layer {self.layer} "
        if self.fused:
            return where + "experts (fused)"
        return where + (f"expert {self.expert}" if self.expert is not None else self.kind)


@dataclass
class Anatomy:
    architecture: Architecture
    known: bool  # False: the model_type had no table and names were matched by the fallback
    parts: dict[str, Part]  # tensor name -> part
    unclassified: list[str]
    num_layers: int
    experts_per_layer: dict[int, int] = field(default_factory=dict)
    mixers: dict[int, str] = field(default_factory=dict)  # layer -> its sequence mixer where not full attention

    @property
    def num_experts(self) -> int:
        return max(self.experts_per_layer.values(), default=0)

    def layer_kinds(self, layer: int) -> list[str]:
        return sorted({p.kind for p in self.parts.values() if p.layer == layer})

    def tensors_of(self, kind: str, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [
            n for n, p in self.parts.items()
            if p.kind == kind and (layer is None or p.layer == layer) and (expert is None or p.expert == expert)
        ]


def _match(segments: list[str], pattern: str) -> tuple[bool, int | None]:
    pat = pattern.split(".")
    if len(segments) < len(pat):
        return False, None
    expert = None
    for seg, want in zip(segments, pat):
        if want == "{E}":
            if not (seg.isascii() and seg.isdigit()):  # not '²', which int() refuses
                return False, None
            expert = int(seg)
        elif seg != want:
            return False, None
    return True, expert


def layer_of(name: str, arch: Architecture) -> tuple[int, list[str]] | None:
    """(layer, the segments after it) for a decoder layer's tensor under the family's layer prefix."""
    segments = name.split(".")
    n = len(arch.layer_prefix)
    if (tuple(segments[:n]) != arch.layer_prefix or len(segments) <= n + 1
            or not (segments[n].isascii() and segments[n].isdigit())):
        return None
    return int(segments[n]), segments[n + 1:]


def classify(name: str, arch: Architecture) -> Part | None:
    segments = name.split(".")
    for pattern, kind in arch.global_rules:
        if _match(segments, pattern)[0]:
            return Part(kind)
    found = layer_of(name, arch)
    if found is None:
        return None
    layer, rest = found
    for pattern, kind in COMMON_LAYER_RULES + arch.layer_rules:
        ok, expert = _match(rest, pattern)
        if ok:
            return Part(kind, layer, expert, fused=kind == "expert" and expert is None)
    return None


def build_anatomy(model_type: str, tensor_names: list[str], config: dict,
                  shapes: dict[str, tuple] | None = None) -> Anatomy:
    """`shapes` (tensor name -> shape) counts the experts a fused tensor holds (its first axis)."""
    arch, known = architecture_for(model_type)
    parts: dict[str, Part] = {}
    unclassified = []
    mixers: dict[int, str] = {}
    for name in tensor_names:
        part = classify(name, arch)
        if part is None:
            unclassified.append(name)
            continue
        parts[name] = part
        if part.kind == "attention" and arch.mixers:
            rest = layer_of(name, arch)[1]
            for pattern, mixer in arch.mixers:
                if _match(rest, pattern)[0]:
                    mixers[part.layer] = mixer
    experts: dict[int, set[int]] = defaultdict(set)
    for name, p in parts.items():
        if p.expert is not None:
            experts[p.layer].add(p.expert)
        elif p.fused and shapes and shapes.get(name):
            experts[p.layer].update(range(shapes[name][0]))
    layers_seen = {p.layer for p in parts.values() if p.layer is not None}
    num_layers = int(config.get("num_hidden_layers") or (max(layers_seen) + 1 if layers_seen else 0))
    return Anatomy(
        architecture=arch,
        known=known,
        parts=parts,
        unclassified=sorted(unclassified),
        num_layers=num_layers,
        experts_per_layer={layer: len(e) for layer, e in sorted(experts.items())},
        mixers=dict(sorted(mixers.items())),
    )


def parameters_by_kind(anatomy: Anatomy, numel: dict[str, int]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, part in anatomy.parts.items():
        counts[part.kind] += numel[name]
    return dict(counts)


_LAYER_NUM = re.compile(r"\.(\d+)\.")


def natural_key(name: str):
    """Sort key that puts layer 2 before layer 10 and globals around the layers."""
    m = _LAYER_NUM.search(name)
    layer = int(m.group(1)) if m else (-1 if "embed" in name else 1 << 30)
    return (layer, [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", name)])

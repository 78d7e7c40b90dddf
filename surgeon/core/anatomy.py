"""What each tensor of a checkpoint is: (layer, component kind, expert index).

The rules come from `architectures.py`; this module only applies them. Every tensor either gets
a part or lands in `unclassified`, which callers must show: nothing is silently dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from surgeon.core.architectures import (
    COMMON_LAYER_RULES,
    Architecture,
    architecture_for,
)


class Part(NamedTuple):
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
    """A checkpoint's tensors sorted into parts by its family's rules, with its layer and expert counts."""

    architecture: Architecture
    known: bool  # False: the model_type had no table and names were matched by the fallback
    parts: dict[str, Part] = field(repr=False)  # tensor name -> part (tens of thousands)
    unclassified: list[str] = field(repr=False)
    num_layers: int
    experts_per_layer: dict[int, int] = field(default_factory=dict)
    mixers: dict[int, str] = field(default_factory=dict)  # layer -> its sequence mixer where not full attention
    extra_layers: tuple[int, ...] = ()  # layers past num_hidden_layers (multi-token prediction)

    @property
    def num_experts(self) -> int:
        return max(self.experts_per_layer.values(), default=0)

    @property
    def distinct_parts(self) -> list[Part]:
        """Each part once. Tensors of one part share one Part object, so they are told apart by
        identity first, and only the distinct parts are hashed (DeepSeek-V3 has 92,000 tensors)."""
        found = self.__dict__.get("_distinct")
        if found is None:
            found = self.__dict__["_distinct"] = list(set({id(p): p for p in self.parts.values()}.values()))
        return found

    def layer_kinds(self, layer: int) -> list[str]:
        return sorted({p.kind for p in self.parts.values() if p.layer == layer})

    def expert_slices(self, layer: int, expert: int) -> list[tuple[str, int | None]]:
        """The tensors holding one routed expert, in name order: (name, None) for a tensor of its own,
        (name, expert) for a fused tensor whose row `expert` it is (gpt-oss, Llama 4)."""
        index = self.__dict__.get("_experts")
        if index is None:
            index = self.__dict__["_experts"] = {}
            for name, p in self.parts.items():
                if p.kind == "expert":
                    index.setdefault((p.layer, "fused" if p.fused else p.expert), []).append(name)
        own = [(n, None) for n in index.get((layer, expert), ())]
        return sorted(own + [(n, expert) for n in index.get((layer, "fused"), ())])

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


class _Classifier:
    """`classify` for many names at once. Layer rules look only at what follows the layer number,
    so the outcome for that rest of the name is decided once and shared by every layer: DeepSeek-V3's
    92,000 tensors have a few thousand such rests (one per expert and projection)."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self._prefix = ".".join(arch.layer_prefix) + "."
        # The name after `prefix.N.` -> (its kind and expert's parts by N as names write it, the mixer
        # its name shows, kind, expert, the same parts by layer), or None when it belongs to no part.
        # Rests of one kind and expert share both tables.
        self._rests: dict[str, tuple | None] = {}
        self._by_outcome: dict[tuple, tuple[dict[str, Part], dict[int, Part]]] = {}  # (kind, expert) -> tables
        self.made: list[Part] = []  # each part once, as it was first met

    def classify_all(self, names: list[str]) -> tuple[dict[str, Part], list[str], dict[int, str]]:
        """(name -> part, the names of no part, layer -> the mixer its attention tensors' names show).
        One loop over all names, not a call per name, and a name whose rest and layer number were
        met before costs two dict lookups: DeepSeek-V3 has 92,000 of them."""
        prefix, rests, skip = self._prefix, self._rests, len(self._prefix)
        parts: dict[str, Part] = {}
        unclassified: list[str] = []
        mixers: dict[int, str] = {}
        for name in names:
            if name.startswith(prefix):
                number, _, rest = name[skip:].partition(".")
                entry = rests.get(rest, False)
                if entry:
                    part = entry[0].get(number)
                    if part is not None:  # `number` was checked to be a layer number when this part was made
                        parts[name] = part
                        if entry[1] is not None:
                            mixers[part.layer] = entry[1]
                        continue
                if rest and number.isascii() and number.isdigit():
                    if entry is False:
                        entry = rests[rest] = self._decide(name)
                    if entry is None:
                        unclassified.append(name)
                        continue
                    part = self._part(entry, number)
                    parts[name] = part
                    if entry[1] is not None:
                        mixers[part.layer] = entry[1]
                    continue
            part = classify(name, self.arch)
            if part is None:
                unclassified.append(name)
            else:
                parts[name] = part
                self.made.append(part)  # a global: one Part per name, equal ones being one part
        return parts, unclassified, mixers

    def _part(self, entry: tuple, number: str) -> Part:
        """The part in layer `number` of a rest's kind and expert (`entry`), made the first time."""
        by_number, _, kind, expert, by_layer = entry
        layer = int(number)
        part = by_layer.get(layer)  # another rest of this kind and expert, or `05` for 5, may have made it
        if part is None:
            part = by_layer[layer] = Part(kind, layer, expert, fused=kind == "expert" and expert is None)
            self.made.append(part)
        by_number[number] = part
        return part

    def _decide(self, name: str) -> tuple | None:
        """What a layer tensor's name after its layer number makes it (its layer number plays no part)."""
        part = classify(name, self.arch)
        if part is None:
            return None
        mixer = None
        if part.kind == "attention":
            rest = layer_of(name, self.arch)[1]
            mixer = next((m for pattern, m in self.arch.mixers if _match(rest, pattern)[0]), None)
        by_number, by_layer = self._by_outcome.setdefault((part.kind, part.expert), ({}, {}))
        return by_number, mixer, part.kind, part.expert, by_layer


def build_anatomy(model_type: str, tensor_names: list[str], config: dict,
                  shapes: dict[str, tuple] | None = None) -> Anatomy:
    """`shapes` (tensor name -> shape) counts the experts a fused tensor holds (its first axis)."""
    # Donors of one family often have the same names and shapes (a pair in the workbench): the
    # second is classified once, here, by what decides the outcome.
    key = (model_type, config.get("num_hidden_layers"), tuple(tensor_names),
           tuple(map(shapes.get, tensor_names)) if shapes else None)  # whole shapes: made in C, stricter
    cached = _ANATOMIES.get(key)
    if cached is not None:
        return cached
    anatomy = _build_anatomy(model_type, tensor_names, config, shapes)
    if len(_ANATOMIES) >= 8:
        _ANATOMIES.clear()
    _ANATOMIES[key] = anatomy
    return anatomy


_ANATOMIES: dict[tuple, Anatomy] = {}


def _build_anatomy(model_type: str, tensor_names: list[str], config: dict,
                   shapes: dict[str, tuple] | None = None) -> Anatomy:
    arch, known = architecture_for(model_type)
    classifier = _Classifier(arch)
    parts, unclassified, mixers = classifier.classify_all(tensor_names)
    fused_counts: dict[int, int] = {}
    if shapes and any(p.fused for p in classifier.made):
        for name, part in parts.items():
            if part.fused and shapes.get(name):
                fused_counts[part.layer] = max(fused_counts.get(part.layer, 0), shapes[name][0])
    distinct = classifier.made
    experts: dict[int, set[int]] = defaultdict(set)
    for p in distinct:
        if p.expert is not None:
            experts[p.layer].add(p.expert)
    for layer, count in fused_counts.items():
        experts[layer].update(range(count))
    layers_seen = {p.layer for p in distinct if p.layer is not None}
    decoder = int(config.get("num_hidden_layers") or (max(layers_seen) + 1 if layers_seen else 0))
    # Layers after the decoder's (DeepSeek-V3's and GLM-4.5's multi-token prediction) are layers all
    # the same: shown, addressed by SPECs and transferred like the others.
    num_layers = max(decoder, max(layers_seen) + 1 if layers_seen else 0)
    return Anatomy(
        architecture=arch,
        known=known,
        parts=parts,
        unclassified=sorted(unclassified),
        num_layers=num_layers,
        experts_per_layer={layer: len(e) for layer, e in sorted(experts.items())},
        mixers=dict(sorted(mixers.items())),
        extra_layers=tuple(range(decoder, num_layers)),
    )


def parameters_by_kind(anatomy: Anatomy, numel: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, part in anatomy.parts.items():
        counts[part.kind] = counts.get(part.kind, 0) + numel[name]
    return counts


_LAYER_NUM = re.compile(r"\.(\d+)\.")


def natural_key(name: str):
    """Sort key that puts layer 2 before layer 10 and globals around the layers."""
    m = _LAYER_NUM.search(name)
    layer = int(m.group(1)) if m else (-1 if "embed" in name else 1 << 30)
    pieces = _DIGIT_RUNS.split(name)
    pieces[1::2] = map(int, pieces[1::2])  # split on a captured group: every odd piece is a digit run
    return (layer, pieces)


_DIGIT_RUNS = re.compile(r"(\d+)")

"""A surgery plan: a base donor and ordered assignments of components to donors; later wins.

SPEC syntax (command line and session): `component[@layers]`, where component is one of
COMPONENTS or `expert:E` with E a list or range (`3,5-9`), and layers is `all`, `N`, `A-B`
or a comma list of those. `layer_gate` is a Self-MoE gate between decoder layers (Self-MoE),
the one component a base may lack and still take from a donor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from surgeon.core.anatomy import Anatomy, Part
from surgeon.errors import SurgeonError

# Donors are named by letter everywhere: the grid's columns, plans, sessions and the command line.
DONOR_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def next_donor_name(taken) -> str:
    for letter in DONOR_LETTERS:
        if letter not in taken:
            return letter
    raise SurgeonError(f"at most {len(DONOR_LETTERS)} donors can be open at once")

LAYER_COMPONENTS = ("attention", "router", "experts", "shared_expert", "gate", "norms", "mlp", "mtp", "layer_gate")
# Components a layer may lack in the base and take from a donor all the same (the donor decides
# whether the layer has one): the Self-MoE layer gates, see resolve.gate_sources.
OPTIONAL_COMPONENTS = ("layer_gate",)
GLOBAL_COMPONENTS = ("embedding", "final_norm", "lm_head")
COMPONENTS = LAYER_COMPONENTS + GLOBAL_COMPONENTS + ("expert:E",)


class Assignment(NamedTuple):
    """Take `component` (in `layers`, for `experts`) from donor `donor`.

    component is a part kind, `experts` (every routed expert) or `expert` (those in `experts`).
    `layers` None means every layer.
    """

    component: str
    donor: str
    layers: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None

    def covers(self, part: Part) -> bool:
        if self.layers is not None and part.layer not in self.layers:
            return False
        if self.component == "experts":
            return part.kind == "expert"
        if self.component == "expert":
            return part.kind == "expert" and part.expert in (self.experts or ())
        return part.kind == self.component

    @property
    def spec(self) -> str:
        comp = f"expert:{format_ranges(self.experts or ())}" if self.component == "expert" else self.component
        return comp if self.layers is None else f"{comp}@{format_ranges(self.layers)}"


@dataclass
class Plan:
    """The base and the assignments on top of it; the last assignment covering a part decides its donor."""

    base: str
    assignments: list[Assignment] = field(default_factory=list)

    def donor_for(self, part: Part) -> str:
        for a in reversed(self.assignments):
            if a.covers(part):
                return a.donor
        return self.base

    def kinds(self) -> set[str]:
        """The part kinds an assignment may cover: a part of any other kind comes from the base."""
        return {"expert" if a.component in ("experts", "expert") else a.component for a in self.assignments}


# More layers or experts than any model has; a range this long is a typo, not a plan.
MAX_RANGE = 1 << 16


def parse_ranges(text: str, what: str, spec: str) -> tuple[int, ...]:
    out: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece:
                lo, hi = (int(x) for x in piece.split("-", 1))
                if hi < lo:
                    raise ValueError
                if hi - lo >= MAX_RANGE:  # `0-99999999999` would fill memory before any check
                    raise SurgeonError(f"SPEC {spec!r}: {what} range {piece!r} spans {hi - lo + 1} values "
                                       f"(at most {MAX_RANGE})")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(piece))
        except ValueError:
            raise SurgeonError(f"SPEC {spec!r}: bad {what} {piece!r} (expected N, A-B or a comma list)") from None
    return tuple(sorted(set(out)))


def parse_layers(text: str | None, num_layers: int | None = None, flag: str = "--layers") -> tuple[int, ...] | None:
    """A layer SPEC: N, A-B, a comma list, or `all`. None (or `all` without `num_layers`) means every
    layer; with `num_layers`, `all` is 0..num_layers-1 and a layer past the end is refused."""
    if text is None or (text.strip() == "all" and num_layers is None):
        return None
    if text.strip() == "all":
        return tuple(range(num_layers))
    layers = parse_ranges(text, "layer", f"{flag} {text}")
    bad = [l for l in layers if num_layers is not None and l >= num_layers]
    if bad:
        raise SurgeonError(f"{flag} {text}: layer {bad[0]} out of range (the model has {num_layers} layers: "
                           f"0-{num_layers - 1})")
    return layers


def format_ranges(values) -> str:
    values = sorted(values)
    runs: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        runs.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(runs)


def parse_spec(spec: str, donor: str) -> Assignment:
    comp, _, layer_text = spec.partition("@")
    comp = comp.strip()
    experts = None
    if comp.startswith("expert:"):
        experts = parse_ranges(comp[len("expert:"):], "expert", spec)
        comp = "expert"
    elif comp not in LAYER_COMPONENTS + GLOBAL_COMPONENTS:
        raise SurgeonError(f"SPEC {spec!r}: unknown component {comp!r} (one of: {', '.join(COMPONENTS)})")
    layers = None
    if layer_text and layer_text.strip() != "all":
        if comp in GLOBAL_COMPONENTS:
            raise SurgeonError(f"SPEC {spec!r}: {comp} is global and takes no @layers")
        layers = parse_ranges(layer_text, "layer", spec)
    return Assignment(comp, donor, layers, experts)


def check_assignment(a: Assignment, anatomy: Anatomy, base_label: str) -> None:
    """Refuse layers or experts the base does not have, and components it lacks entirely."""
    if a.layers is not None:
        bad = [l for l in a.layers if l >= anatomy.num_layers]
        if bad:
            raise SurgeonError(
                f"SPEC {a.spec!r}: layer {bad[0]} out of range "
                f"(base {base_label} has {anatomy.num_layers} layers: 0-{anatomy.num_layers - 1})"
            )
    if a.component == "expert":
        n = anatomy.num_experts
        bad = [e for e in a.experts or () if e >= n]
        if bad:
            raise SurgeonError(
                f"SPEC {a.spec!r}: expert {bad[0]} out of range (base {base_label} has "
                + (f"{n} experts per layer: 0-{n - 1})" if n else "no experts)")
            )
    if a.component in OPTIONAL_COMPONENTS:
        return  # resolve checks these against the donor, which may bring what the base lacks
    if not any(a.covers(p) or _covers_fused(a, p) for p in anatomy.distinct_parts):
        raise SurgeonError(
            f"SPEC {a.spec!r}: base {base_label} ({anatomy.architecture.model_type}) has no "
            f"{a.component} tensors" + ("" if a.layers is None else " in those layers")
        )


def _covers_fused(a: Assignment, part: Part) -> bool:
    """Whether `a` takes some experts of a fused expert tensor (resolve splices them)."""
    return (a.component == "expert" and part.fused
            and (a.layers is None or part.layer in a.layers))


def parse_take(take: str, donor_for) -> Assignment:
    """`--take SPEC=DIR`: the assignment, with DIR named by `donor_for(DIR)`."""
    spec, sep, path = take.rpartition("=")
    if not sep or not spec or not path:
        raise SurgeonError(f"--take {take!r}: expected SPEC=DIR, e.g. experts@0-7=/path/to/donor")
    return parse_spec(spec, donor_for(path))

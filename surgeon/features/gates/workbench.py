"""Layer gates on the workbench: which gates the hybrid of a workbench has, and dropping some as one
undoable change. No UI here (the Gates screen and the tests call it).

A layer gate is a plan component like any other (the grid's `layer gate` column), so dropping the
gate of a layer gives that cell to a donor without a gate there; the donors' files are never touched.
"""

from __future__ import annotations

from surgeon.core.anatomy import Part
from surgeon.core.gates_sidecar import GATE_KIND
from surgeon.core.plan import format_ranges
from surgeon.core.resolve import LayerGate, layer_gates, resolve
from surgeon.core.workbench import Workbench
from surgeon.errors import SurgeonError


def hybrid_gates(wb: Workbench) -> dict[int, LayerGate]:
    """The layer gates of the workbench's hybrid, by layer, as resolving its plan gives them."""
    return layer_gates(resolve(wb.plan(), wb.donors), wb.donors)


def gated_donors(wb: Workbench) -> dict[str, tuple[int, ...]]:
    """The open donors that have layer gates, and their gated layers."""
    out = {}
    for name, donor in wb.donors.items():
        layers = sorted({p.layer for p in donor.part_groups if p.kind == GATE_KIND})
        if layers:
            out[name] = tuple(layers)
    return out


def drop_candidates(wb: Workbench, layers) -> list[str]:
    """Donors that have no gate in any of `layers`: the base first when it is one of them."""
    gated = gated_donors(wb)
    order = [wb.base] + [n for n in wb.donors if n != wb.base]
    return [n for n in order if not set(gated.get(n, ())) & set(layers)]


def drop_gates(wb: Workbench, layers) -> str:
    """Give the `layer gate` cells of `layers` to a donor without gates there, as one change.

    Returns that donor; SurgeonError when no open donor can (every gateless one refused).
    """
    layers = sorted(layers)
    parts = [Part(GATE_KIND, layer) for layer in layers]
    errors = []
    for name in drop_candidates(wb, layers):
        try:
            if wb.set_parts(parts, name):
                return name
        except SurgeonError as e:
            errors.append(str(e))
    if errors:
        raise SurgeonError(f"no donor without gates in layer(s) {format_ranges(layers)} can give them: {errors[0]}")
    raise SurgeonError(f"every open donor has a gate in layer(s) {format_ranges(layers)}, the base included: "
                       "open a donor without gates there (d on the grid) to drop them")

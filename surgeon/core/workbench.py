"""The surgery grid's model: which donor every part of the base takes, with undo and redo.

The workbench keeps one donor per *unit* (a Part of the base's anatomy: a layer's attention, its
router, one expert, ...) and turns that state into a short canonical Plan on demand: one
assignment per component and donor, per-expert assignments only for layers whose experts are
mixed. A saved session therefore reads like the result, not like the keystrokes that made it.

Resolving a plan of a real checkpoint (3,000+ tensors) takes tens of milliseconds, too slow for
every key press, so the status figures (share of parameters per donor, changed tensors) come
from per-unit tallies computed once per base; `tests/test_tui_engine.py` proves they equal what
`resolve()` says. `resolve()` stays the authority on compatibility: a donor that does not
resolve cleanly against the base has every mark checked by it (`check_plan`: the same checks without
making the sources), and its message is the refusal.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from surgeon.core.anatomy import Part
from surgeon.core.architectures import GLOBAL_KINDS, LAYER_KINDS
from surgeon.core.donor import Donor
from surgeon.core.gates_sidecar import GATE_KIND
from surgeon.core.plan import Assignment, Plan, next_donor_name
from surgeon.core.resolve import check_plan
from surgeon.errors import SurgeonError

# Column headers: the part kind `expert` is shown as the whole `experts` column.
COLUMN_TITLES = {
    "attention": "attention", "router": "router", "expert": "experts", "shared_expert": "shared",
    "gate": "gate", "norms": "norms", "mlp": "mlp", "mtp": "mtp", "layer_gate": "layer gate",
    "embedding": "embedding", "final_norm": "final norm", "lm_head": "lm_head",
}


class Cell(NamedTuple):
    """One cell of the grid: a component kind in a layer, or a global (layer None)."""

    layer: int | None
    kind: str

    def label(self) -> str:
        title = COLUMN_TITLES.get(self.kind, self.kind)
        return title if self.layer is None else f"layer {self.layer} {title}"


class Tally(NamedTuple):
    params: dict[str, int]  # donor name -> parameters it gives the hybrid
    changed_tensors: int
    total_tensors: int

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def share(self, donor: str) -> float:
        return self.params.get(donor, 0) / max(1, self.total_params)


class BaseIndex:
    """Everything about the base that the grid asks often, computed once per base.

    `gate_layers`: layers where some open donor has a Self-MoE layer gate. A layer gate is the one
    component a base may lack and still take (see resolve.gate_sources), so those layers get a
    `layer_gate` unit even where the base has no gate; such a unit owns no base tensor.
    """

    def __init__(self, base: Donor, gate_layers=()):
        anatomy = base.anatomy
        self.num_layers = anatomy.num_layers
        self.tensors_of: dict[Part, list[str]] = {}
        share: dict[str, int] = {}  # fused expert tensor -> how many experts it holds
        for name, part in anatomy.parts.items():
            if part.fused and base.tensors[name].shape:
                # One unit per expert, as for experts stored apart: each owns a slice of the tensor.
                share[name] = base.tensors[name].shape[0]
                for e in range(share[name]):
                    self.tensors_of.setdefault(Part("expert", part.layer, e), []).append(name)
                continue
            self.tensors_of.setdefault(part, []).append(name)
        for layer in gate_layers:
            if layer < self.num_layers:
                self.tensors_of.setdefault(Part(GATE_KIND, layer), [])
        self.units: list[Part] = sorted(self.tensors_of, key=_unit_key)
        numel = base.numel  # counted once per donor
        if share:  # each expert's unit counts its slice of a fused tensor
            numel = {**numel, **{n: numel[n] // k for n, k in share.items()}}
        self.params_of = {p: sum(map(numel.__getitem__, names)) for p, names in self.tensors_of.items()}
        # Tensors each unit counts as its own: a fused tensor is counted once per layer, not per expert
        # (Workbench._recount adds it, changed when any of its experts is).
        self.own_tensors = {p: sum(n not in share for n in names) if share else len(names)
                            for p, names in self.tensors_of.items()}
        self.fused_count: dict[int, int] = {}
        for name in share:
            layer = anatomy.parts[name].layer
            self.fused_count[layer] = self.fused_count.get(layer, 0) + 1
        # Shown beside the layer number: linear / mamba / ... and `mtp` for a layer past the decoder's.
        self.layer_notes = {**anatomy.mixers, **dict.fromkeys(anatomy.extra_layers, "mtp")}
        self.unclassified_params = sum(map(numel.__getitem__, anatomy.unclassified))
        self.unclassified_tensors = len(anatomy.unclassified)
        self.cells: dict[Cell, list[Part]] = {}
        for p in self.units:
            self.cells.setdefault(Cell(p.layer, p.kind), []).append(p)
        kinds = {p.kind for p in self.units}
        self.columns = [k for k in LAYER_KINDS if k in kinds]
        self.globals = [k for k in GLOBAL_KINDS if k in kinds]
        self.layers_with: dict[str, tuple[int, ...]] = {
            k: tuple(sorted({p.layer for p in self.units if p.kind == k and p.layer is not None}))
            for k in self.columns
        }
        self.experts_of: dict[int, list[Part]] = {}
        for p in self.units:
            if p.kind == "expert":
                self.experts_of.setdefault(p.layer, []).append(p)


def _gate_layers(donors: dict[str, Donor]) -> set[int]:
    """Layers where any of `donors` has a layer gate."""
    # The anatomy's distinct parts, not part_groups: that sorts every tensor name (0.8 s at 92,000).
    return {p.layer for d in donors.values() for p in d.anatomy.distinct_parts if p.kind == GATE_KIND}


def _unit_key(p: Part):
    return (-1 if p.layer is None else p.layer, p.kind, -1 if p.expert is None else p.expert)


class Snapshot(NamedTuple):
    """The marks at one step of the undo history: each unit's donor as an index into `names`, one
    byte a unit, in the order of `units` (the index's list when it was taken, which is the state's
    order). A copy of the state dict per step made DeepSeek-V3's history (15,353 units) grow by
    590 KB a mark, and every full collection walked every copy; this is 15 KB the collector skips."""

    base: str
    units: list[Part]
    names: tuple[str, ...]
    codes: bytes | array


class Workbench:
    """Donors by name, a base, the donor each unit takes, and the history of changes."""

    def __init__(self, donors: dict[str, Donor], base: str, plan: Plan | None = None, *, history_limit: int = 1000):
        if base not in donors:
            raise SurgeonError(f"base donor {base!r} is not among the donors ({', '.join(donors) or 'none'})")
        self.donors: dict[str, Donor] = dict(donors)
        self.base = base
        self.index = BaseIndex(donors[base], _gate_layers(self.donors))
        self.state: dict[Part, str] = {p: base for p in self.index.units}
        self.history_limit = history_limit
        self.undo_stack: list[Snapshot] = []
        self.redo_stack: list[Snapshot] = []
        self.version = 0  # bumped on every change; views cache on it
        self._problems: dict[tuple[str, str], str | None] = {}
        self._tally: tuple[int, Tally] | None = None
        self._params: Counter[str] | None = None  # kept up to date by set_parts; None: recount
        self._changed_tensors = 0
        self._tensors = 0  # tensors of the hybrid, maintained with _params
        self._cell_donors: dict[object, list[tuple[str, int]]] = {}
        if plan is not None:
            if plan.base != base:
                raise SurgeonError(f"plan: base {plan.base!r} but the workbench's base is {base!r}")
            self.load_plan(plan, record=False)

    # ------------------------------------------------------------ donors
    def next_name(self) -> str:
        return next_donor_name(self.donors)

    def add_donor(self, donor: Donor, name: str | None = None) -> str:
        for n, d in self.donors.items():
            if d.path.resolve() == donor.path.resolve():
                raise SurgeonError(f"{donor.path}: already open as donor {n}")
        name = name or self.next_name()
        self.donors[name] = donor
        self.version += 1
        if not _gate_layers({name: donor}) <= {p.layer for p in self.index.units if p.kind == GATE_KIND}:
            # The donor brings layer gates to layers the grid has no gate cell for yet.
            self.index = BaseIndex(self.donors[self.base], _gate_layers(self.donors))
            self.state = {p: self.state.get(p, self.base) for p in self.index.units}
            self._changed()
        return name

    def remove_donor(self, name: str) -> None:
        if name == self.base:
            raise SurgeonError(f"donor {name} is the base; choose another base before removing it")
        if name not in self.donors:
            raise SurgeonError(f"no donor named {name!r}")
        del self.donors[name]
        for p, d in self.state.items():
            if d == name:
                self.state[p] = self.base
        # Older states may name the removed donor: history cannot be replayed past this point.
        self.undo_stack.clear()
        self.redo_stack.clear()
        self._changed()

    def set_base(self, name: str) -> None:
        """Make `name` the base, keeping the marks: cells that followed the old base follow the new one."""
        if name == self.base:
            return
        if name not in self.donors:
            raise SurgeonError(f"no donor named {name!r}")
        plan = Plan(name, self.plan().assignments)
        check_plan(plan, self.donors)  # refuses a base that cannot take the marks, with the reason
        self._remember()
        self._rebase(name)
        self.state = {p: plan.donor_for(p) for p in self.index.units}
        self._changed()

    def _rebase(self, name: str) -> None:
        self.base = name
        self.index = BaseIndex(self.donors[name], _gate_layers(self.donors))
        self._problems.clear()

    def problem(self, name: str) -> str | None:
        """Why donor `name` cannot give every component to the base, or None when it can."""
        key = (self.base, name)
        if key not in self._problems:
            self._problems[key] = None if name == self.base else _whole_donor_problem(self, name)
        return self._problems[key]

    # ------------------------------------------------------------ reading
    @property
    def columns(self) -> list[str]:
        return self.index.columns

    @property
    def globals(self) -> list[str]:
        return self.index.globals

    def parts(self, item) -> list[Part]:
        """The units of a grid item: a Cell, or a tuple of Parts (one expert, a range of them)."""
        if isinstance(item, Cell):
            return self.index.cells.get(item, [])
        return [p for p in item if p in self.state]

    def cell_donors(self, cell) -> list[tuple[str, int]]:
        """(donor, units) for a cell, most units first; one entry unless experts are mixed."""
        hit = self._cell_donors.get(cell)
        if hit is None:
            counts = Counter(self.state[p] for p in self.parts(cell))
            order = list(self.donors)
            hit = sorted(counts.items(), key=lambda kv: (-kv[1], order.index(kv[0]) if kv[0] in order else 99))
            self._cell_donors[cell] = hit
        return hit

    def cell_text(self, cell) -> str:
        """`A` for a cell from one donor; `A×60 B×4` for a layer's experts."""
        donors = self.cell_donors(cell)
        if not donors:
            return ""
        if isinstance(cell, Cell) and cell.kind == "expert" and len(self.parts(cell)) > 1:
            return " ".join(f"{d}×{n}" for d, n in donors)
        return donors[0][0]

    def tensor_origin(self, name: str) -> tuple[str, str]:
        """(text, the donor to colour it by) for one of the base's tensors under the current marks: the
        donor it comes from, or for a fused expert tensor the donors of its experts' rows (`A×3 B×1`)."""
        part = self.donors[self.base].anatomy.parts[name]
        if part.fused:
            donors = self.cell_donors(Cell(part.layer, "expert"))
            text = " ".join(f"{d}×{n}" for d, n in donors) if len(donors) > 1 else donors[0][0]
            return text, donors[0][0]
        return self.state[part], self.state[part]

    def donor_of(self, cell) -> str | None:
        donors = self.cell_donors(cell)
        return donors[0][0] if donors else None

    def plan(self) -> Plan:
        return canonical_plan(self)

    def tally(self) -> Tally:
        if self._tally is None or self._tally[0] != self.version:
            if self._params is None:
                self._recount()
            params = Counter(self._params)
            params[self.base] += self.index.unclassified_params
            total = self._tensors + self.index.unclassified_tensors
            self._tally = (self.version, Tally({k: v for k, v in params.items() if v}, self._changed_tensors, total))
        return self._tally[1]

    def _size(self, p: Part, donor: str) -> tuple[int, int]:
        """(parameters, tensors) that `donor` gives the hybrid for unit p. The base's figures, except
        for a layer gate, which the donor brings itself (a base may have none there)."""
        if p.kind != GATE_KIND or donor == self.base:
            return self.index.params_of[p], self.index.own_tensors[p]
        d = self.donors[donor]
        names = d.part_groups.get(p, ())
        return sum(d.tensors[n].numel for n in names), len(names)

    def _recount(self) -> None:
        params: Counter[str] = Counter()
        changed = tensors = 0
        for p, d in self.state.items():
            n, t = self._size(p, d)
            params[d] += n
            tensors += t
            if d != self.base:
                changed += t
        for layer, count in self.index.fused_count.items():
            tensors += count
            if any(self.state[p] != self.base for p in self.index.experts_of.get(layer, ())):
                changed += count
        self._params, self._changed_tensors, self._tensors = params, changed, tensors

    @property
    def marks(self) -> int:
        return sum(1 for d in self.state.values() if d != self.base)

    # ------------------------------------------------------------ editing
    def set_parts(self, parts, donor: str) -> bool:
        """Give `parts` to `donor`. False when nothing changed; SurgeonError when refused."""
        if donor not in self.donors:
            raise SurgeonError(f"no donor named {donor!r}")
        parts = [p for p in parts if self.state.get(p) not in (None, donor)]
        if not parts:
            return False
        for p in parts:
            # Back to the base is always allowed: where the base has no gate, it means "no gate here".
            if (p.kind == GATE_KIND and donor != self.base and not self.index.tensors_of[p]
                    and p.layer not in _gate_layers({donor: self.donors[donor]})):
                raise SurgeonError(f"layer {p.layer} layer gate: neither donor {donor} nor the base has one")
        if self.problem(donor) is not None:
            trial = dict(self.state)
            trial.update({p: donor for p in parts})
            check_plan(_plan_from(self, trial), self.donors)  # raises with the tensor and the shapes at fault
        self._remember()
        self._move(parts, donor)
        return True

    def _move(self, parts: list[Part], donor: str) -> None:
        """Give `parts` (each held by another donor now) to `donor`, keeping the tallies current."""
        if self._params is None:
            self._recount()
        # A reset or a paint-all moves every part (a thousand and more): this loop is what a key costs.
        state, params, base = self.state, self._params, self.base
        params_of, own_tensors = self.index.params_of, self.index.own_tensors
        many = len(parts) > 64
        for p in parts:
            old = state[p]
            if p.kind != GATE_KIND:  # the base's figures whichever donor gives it
                n_old = n = params_of[p]
                t_old = t = own_tensors[p]
            else:
                (n_old, t_old), (n, t) = self._size(p, old), self._size(p, donor)
            params[old] -= n_old
            params[donor] += n
            self._changed_tensors += (donor != base) * t - (old != base) * t_old
            self._tensors += t - t_old
            state[p] = donor
            if not many:
                self._cell_donors.pop(Cell(p.layer, p.kind), None)
                self._cell_donors.pop((p,), None)
        if many:
            self._cell_donors.clear()
        if any(p.kind == "expert" and p.layer in self.index.fused_count for p in parts):
            self._params = None  # a fused tensor changes with any of its experts: counted afresh
        self.version += 1

    def set_cells(self, cells, donor: str) -> bool:
        """Give every unit of `cells` (Cells or tuples of Parts) to `donor`."""
        return self.set_parts([p for c in cells for p in self.parts(c)], donor)

    def cycle(self, cells: list) -> str | None:
        """Give the cells the donor after the first cell's current one, skipping refusals."""
        cells = [c for c in cells if self.parts(c)]
        if not cells:
            return None
        order = list(self.donors)
        current = self.donor_of(cells[0])
        start = order.index(current) if current in order else -1
        error = None
        for step in range(1, len(order)):
            candidate = order[(start + step) % len(order)]
            try:
                self.set_cells(cells, candidate)
                return candidate
            except SurgeonError as e:
                error = error or e
        if error is not None:
            raise error
        return None

    def row_cells(self, layer: int | None) -> list[Cell]:
        kinds = self.globals if layer is None else self.columns
        return [c for c in (Cell(layer, k) for k in kinds) if self.parts(c)]

    def column_cells(self, kind: str) -> list[Cell]:
        if kind in self.globals:
            return [Cell(None, kind)]
        return [Cell(layer, kind) for layer in self.index.layers_with.get(kind, ())]

    def all_cells(self) -> list[Cell]:
        return list(self.index.cells)

    def reset(self) -> bool:
        return self.set_parts(list(self.state), self.base)

    def load_plan(self, plan: Plan, *, record: bool = True) -> None:
        if plan.base != self.base:
            if plan.base not in self.donors:
                raise SurgeonError(f"plan: base donor {plan.base!r} is not open")
        check_plan(plan, self.donors)
        if record:
            self._remember()
        if plan.base != self.base:
            self._rebase(plan.base)
        self.state = {p: plan.donor_for(p) for p in self.index.units}
        self._changed()

    def undo(self) -> bool:
        if not self.undo_stack:
            return False
        self.redo_stack.append(self._snapshot())
        self._restore(self.undo_stack.pop())
        return True

    def redo(self) -> bool:
        if not self.redo_stack:
            return False
        self.undo_stack.append(self._snapshot())
        self._restore(self.redo_stack.pop())
        return True

    def _snapshot(self) -> Snapshot:
        names = tuple(self.donors)  # every donor the state names: remove_donor rewrites its units
        code = {n: i for i, n in enumerate(names)}
        donors = map(code.__getitem__, self.state.values())
        return Snapshot(self.base, self.index.units, names, bytes(donors) if len(names) <= 256 else array("H", donors))

    def _restore(self, snapshot: Snapshot) -> None:
        base = snapshot.base
        wanted = zip(snapshot.units, map(snapshot.names.__getitem__, snapshot.codes))
        if base != self.base or snapshot.units is not self.index.units:
            if base != self.base:
                self._rebase(base)
            # Units added since the snapshot (layer gates a later donor brought) follow the base.
            state = dict(wanted)
            self.state = {p: state.get(p, self.base) for p in self.index.units}
            self._changed()
            return
        # Most undos take back one mark: move only what differs, as the mark moved it, so the
        # tallies and the grid's cached cells stay valid for everything else.
        moved: dict[str, list[Part]] = {}
        current = self.state
        for p, want in wanted:
            if current[p] != want:
                moved.setdefault(want, []).append(p)
        for donor, parts in moved.items():
            self._move(parts, donor)

    def _remember(self) -> None:
        self.undo_stack.append(self._snapshot())
        del self.undo_stack[: -self.history_limit]
        self.redo_stack.clear()

    def _changed(self) -> None:
        """A change too wide to track part by part: recount lazily."""
        self.version += 1
        self._params = None
        self._cell_donors.clear()


def _whole_donor_problem(wb: Workbench, name: str) -> str | None:
    """Resolve "everything from `name`": the first error is why it cannot be marked freely."""
    idx = wb.index
    gated = _gate_layers({name: wb.donors[name], wb.base: wb.donors[wb.base]})
    # Layer gates neither side has are no incompatibility: they are simply not there to take.
    assignments = [Assignment(k, name, idx.layers_with[k]) for k in idx.columns
                   if k != "expert" and (k != GATE_KIND or gated)]
    if "expert" in idx.columns:
        assignments.append(Assignment("experts", name, idx.layers_with["expert"]))
    assignments += [Assignment(k, name) for k in idx.globals]
    try:
        check_plan(Plan(wb.base, assignments), {wb.base: wb.donors[wb.base], name: wb.donors[name]})
    except SurgeonError as e:
        return str(e)
    return None


def canonical_plan(wb: Workbench) -> Plan:
    return _plan_from(wb, wb.state)


def _plan_from(wb: Workbench, state: dict[Part, str]) -> Plan:
    """The shortest plain plan for a state: assignments never overlap, so their order is free."""
    idx = wb.index
    base = wb.base
    out: list[Assignment] = []
    order = {n: i for i, n in enumerate(wb.donors)}

    def layers_arg(kind: str, donor: str, layers: list[int]):
        same_depth = wb.donors[donor].anatomy.num_layers == idx.num_layers
        # Gate columns are sparse (layers some donor has a gate in): name their layers.
        whole = same_depth and kind != GATE_KIND and tuple(layers) == idx.layers_with.get(kind)
        return None if whole else tuple(layers)

    for kind in idx.globals:
        d = state[idx.cells[Cell(None, kind)][0]]
        if d != base:
            out.append(Assignment(kind, d))
    for kind in idx.columns:
        if kind == "expert":
            continue
        by_donor: dict[str, list[int]] = {}
        for layer in idx.layers_with[kind]:
            d = state[idx.cells[Cell(layer, kind)][0]]
            if d != base:
                by_donor.setdefault(d, []).append(layer)
        for d in sorted(by_donor, key=order.get):
            out.append(Assignment(kind, d, layers_arg(kind, d, by_donor[d])))
    whole: dict[str, list[int]] = {}
    mixed: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for layer, experts in sorted(idx.experts_of.items()):
        donors = {state[p] for p in experts}
        if len(donors) == 1:
            (d,) = donors
            if d != base:
                whole.setdefault(d, []).append(layer)
            continue
        for d in sorted(donors - {base}, key=order.get):
            chosen = tuple(p.expert for p in experts if state[p] == d)
            mixed.setdefault((d, chosen), []).append(layer)
    for d in sorted(whole, key=order.get):
        out.append(Assignment("experts", d, layers_arg("expert", d, whole[d])))
    for (d, chosen), layers in sorted(mixed.items(), key=lambda kv: (order.get(kv[0][0]), kv[1], kv[0][1])):
        out.append(Assignment("expert", d, tuple(layers), chosen))
    return Plan(base, out)


@dataclass
class Sheet:
    """A grid laid out for display: column titles, and rows of items (a Cell or a Part tuple)."""

    titles: list[str]
    labels: list[str]
    items: list[list[object | None]]  # [row][column]
    gaps: frozenset[int] = frozenset()  # rows drawn after a blank separator line
    corner: str = "layer"  # the header above the row labels

    def item(self, row: int, col: int):
        if 0 <= row < len(self.items) and 0 <= col < len(self.items[row]):
            return self.items[row][col]
        return None


def surgery_sheet(wb: Workbench) -> Sheet:
    """Rows are layers, columns the base's component kinds; the globals make a last row."""
    idx = wb.index
    items = [[Cell(layer, k) if Cell(layer, k) in idx.cells else None for k in idx.columns]
             for layer in range(idx.num_layers)]
    # A layer whose sequence mixer is not full attention says which it is (Qwen3-Next's linear attention,
    # Jamba's Mamba), so a transfer of `attention` there is read as what it moves.
    labels = [f"{layer} {idx.layer_notes[layer]}" if layer in idx.layer_notes else str(layer)
              for layer in range(idx.num_layers)]
    titles = [COLUMN_TITLES[k] for k in idx.columns]
    gaps = frozenset()
    if idx.globals:
        gaps = frozenset({len(items)})
        items.append([Cell(None, k) for k in idx.globals])
        labels.append("global")
    return Sheet(titles, labels, items, gaps)


def layer_sheet(wb: Workbench, layer: int) -> Sheet:
    """One layer: its non-expert components, then every expert as a row of its own."""
    idx = wb.index
    items: list[list[object | None]] = []
    labels = []
    for k in idx.columns:
        cell = Cell(layer, k)
        if k != "expert" and cell in idx.cells:
            items.append([cell])
            labels.append(COLUMN_TITLES[k])
    gaps = frozenset({len(items)}) if items else frozenset()
    for p in idx.experts_of.get(layer, []):
        items.append([(p,)])
        labels.append(f"expert {p.expert}")
    return Sheet(["donor"], labels, items, gaps, corner="part")


def global_label(kind: str) -> str:
    return {"embedding": "emb", "final_norm": "norm", "lm_head": "head"}.get(kind, kind)

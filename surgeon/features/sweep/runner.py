"""The component-transfer sweep (Tiwari 2026): every subset of k component groups, from one donor.

Start from a base, transfer each subset of k groups (router, attention, experts by default) from
one donor, probe every configuration, and measure both donors as ceilings. Configurations are
visited in Gray-code order, so each step hot-swaps exactly one group into the live hybrid: the
sweep costs probe time, not reload time.

The sweep's state is one JSON-ready dict (the *record*) that lives in the session under
`extensions["sweeps"]`. The runner hands it to a `save` callback after every configuration, so a
killed sweep resumes where it stopped and never recomputes a finished configuration. Statistics
and rendering live in `report.py`; nothing here prints.

The empty configuration is the base itself, weight for weight, so its scores are the base's
ceiling (from the donor score cache) rather than a second measurement of the same model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from surgeon.core.donor import Donor
from surgeon.core.plan import Assignment, Plan, check_assignment, parse_spec
from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, CancelToken, Meter
from surgeon.probes import KINDS, ProbeSpec, single_model_kinds, spec_from_json

MAX_GROUPS = 6
DEFAULT_GROUPS = ("router", "attention", "experts")
EXTENSION_KEY = "sweeps"  # session.extensions[EXTENSION_KEY]: list of sweep records
RECORD_VERSION = 1


# ---------------------------------------------------------------- groups
@dataclass(frozen=True)
class Group:
    """One switchable unit of a sweep: one or more SPECs that move together."""

    name: str
    specs: tuple[str, ...]  # canonical SPECs (Assignment.spec), e.g. ("experts@0-7",)

    def assignments(self, donor: str) -> list[Assignment]:
        return [parse_spec(s, donor) for s in self.specs]

    def to_json(self) -> dict:
        return {"name": self.name, "specs": list(self.specs)}

    @classmethod
    def from_json(cls, data: dict) -> Group:
        return cls(data["name"], tuple(data["specs"]))


def parse_group(text: str) -> Group:
    """`[NAME=]SPEC[+SPEC...]`, e.g. `experts@0-7`, `expert:1,3@2`, `early=router@0-3+attention@0-3`."""
    raw = text.strip()
    name, sep, body = raw.partition("=")
    if not sep:
        name, body = "", raw
    name = name.strip()
    pieces = [p.strip() for p in body.split("+")]
    if (sep and not name) or not body.strip() or any(not p for p in pieces):
        raise SurgeonError(f"--group {text!r}: expected [NAME=]SPEC[+SPEC...], e.g. experts@0-7 or "
                           "early=router@0-3+attention@0-3")
    specs: list[str] = []
    for piece in pieces:
        try:
            canonical = parse_spec(piece, "_").spec
        except SurgeonError as e:
            raise SurgeonError(f"--group {text!r}: {e}") from None
        if canonical not in specs:
            specs.append(canonical)
    return Group(name or "+".join(specs), tuple(specs))


def default_groups() -> list[Group]:
    return [parse_group(g) for g in DEFAULT_GROUPS]


def check_groups(groups: list[Group], donors: dict[str, Donor], base: str, donor: str) -> list[str]:
    """Refuse groups the sweep cannot run; return warnings (overlapping groups)."""
    from surgeon.core.resolve import resolve

    if not groups:
        raise SurgeonError("--group: a sweep needs at least one group")
    if len(groups) > MAX_GROUPS:
        raise SurgeonError(f"--group: {len(groups)} groups given; a sweep takes at most {MAX_GROUPS} "
                           f"(2^{MAX_GROUPS} = {2 ** MAX_GROUPS} configurations)")
    seen_names: set[str] = set()
    seen_specs: dict[frozenset, str] = {}
    for g in groups:
        if g.name in seen_names:
            raise SurgeonError(f"--group {g.name!r}: two groups have this name")
        seen_names.add(g.name)
        key = frozenset(g.specs)
        if key in seen_specs:
            raise SurgeonError(f"--group {g.name!r}: the same SPECs as group {seen_specs[key]!r}")
        seen_specs[key] = g.name
    anatomy = donors[base].anatomy
    label = f"{base} ({donors[base].path})"
    covered: dict[str, set[str]] = {}
    for g in groups:
        names: set[str] = set()
        for a in g.assignments(donor):
            try:
                check_assignment(a, anatomy, label)
            except SurgeonError as e:
                raise SurgeonError(f"--group {g.name!r}: {e}") from None
            names.update(n for n, p in anatomy.parts.items() if a.covers(p))
        covered[g.name] = names
    # Every group from the donor at once: shapes, dtypes and architectures are checked here,
    # before any weights load.
    resolve(Plan(base, [a for g in groups for a in g.assignments(donor)]), donors)
    warnings = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            shared = covered[a.name] & covered[b.name]
            if shared:
                warnings.append(f"groups {a.name!r} and {b.name!r} share {len(shared)} tensor(s); "
                                "their effects are not separable")
    return warnings


# ---------------------------------------------------------------- configurations
def gray_order(k: int) -> list[int]:
    """The 2^k masks in reflected Gray-code order: consecutive masks differ in exactly one bit."""
    return [i ^ (i >> 1) for i in range(1 << k)]


def mask_groups(groups: list[Group], mask: int) -> list[Group]:
    return [g for j, g in enumerate(groups) if mask >> j & 1]


def configuration_name(groups: list[Group], mask: int) -> str:
    chosen = mask_groups(groups, mask)
    return " + ".join(g.name for g in chosen) if chosen else "none"


def configuration_plan(base: str, donor: str, groups: list[Group], mask: int) -> Plan:
    """The plan of one configuration: the base with the masked groups taken from the donor."""
    return Plan(base, [a for g in mask_groups(groups, mask) for a in g.assignments(donor)])


def plan_for(record: dict, mask: int) -> Plan:
    """A stored configuration as a plan (to open it as the session's current plan)."""
    return configuration_plan(record["base"], record["donor"], record_groups(record), mask)


def record_groups(record: dict) -> list[Group]:
    return [Group.from_json(g) for g in record["groups"]]


@dataclass
class SweepSpec:
    """What to sweep: base and donor (names among the donors), groups, probes, how to run them."""

    base: str
    donor: str
    groups: list[Group] = field(default_factory=default_groups)
    probes: list[ProbeSpec] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "keep"
    batch_size: int = 16

    @property
    def size(self) -> int:
        return 1 << len(self.groups)

    def order(self) -> list[int]:
        return gray_order(len(self.groups))

    def plan(self, mask: int) -> Plan:
        return configuration_plan(self.base, self.donor, self.groups, mask)

    def name(self, mask: int) -> str:
        return configuration_name(self.groups, mask)

    def key(self, donors: dict[str, Donor]) -> str:
        """Identity of a sweep for resuming. Probes are not part of it: a probe added later is
        measured on the stored configurations without re-measuring the others."""
        payload = json.dumps([self.base, self.donor, donors[self.base].fingerprint, donors[self.donor].fingerprint,
                              [list(g.specs) for g in self.groups], self.device.split(":")[0], self.dtype,
                              self.batch_size], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_donor(donor_names: list[str], base: str) -> str:
    """The donor a sweep takes groups from when none is named: the one donor besides the base."""
    others = [n for n in donor_names if n != base]
    if not others:
        raise SurgeonError(f"the session has only the base donor {base!r}; a sweep needs a second")
    if len(others) > 1:
        raise SurgeonError(f"donors {', '.join(others)} besides the base {base!r}; choose one with --donor")
    return others[0]


def default_probes(recorded: list[dict] | None = None) -> list[ProbeSpec]:
    """The session's recorded probes (those a sweep can run), else every built-in probe set (each
    of the kind its items need)."""
    from surgeon.probes.run import builtin_probes

    specs = [s for s in map(spec_from_json, recorded or []) if why_not_sweepable(s.kind) is None]
    return specs or builtin_probes()


def offered_probes(recorded: list, limit: int) -> list[str]:
    """The probes the workbench's sweep form starts with, as --probe labels: the session's recorded
    probes a sweep can run, else every built-in set cut to `limit` items (a sweep probes every
    configuration). A recorded probe that no longer reads offers the built-in sets instead."""
    usable = [p for p in recorded if isinstance(p, dict) and why_not_sweepable(p.get("kind")) is None]
    try:
        specs = default_probes(usable) if usable else []
    except (SurgeonError, KeyError, TypeError):
        specs = []
    if specs:
        return [s.label for s in specs]
    return [f"{s.label},limit={limit}" for s in default_probes([])]


def why_not_sweepable(kind: str) -> str | None:
    """Why a sweep cannot measure probes of `kind` on its configurations, or None when it can: a
    per-donor kind compares a model with each donor, which the donor ceilings already are."""
    if kind not in KINDS or not KINDS[kind].per_donor:
        return None
    usable = single_model_kinds()
    return (f"{kind} compares one model with each donor; probe the configurations with "
            f"{', '.join(usable[:-1])} or {usable[-1]}")


def check_probes(specs: list[ProbeSpec]) -> None:
    if not specs:
        raise SurgeonError("--probe: a sweep needs at least one probe")
    for s in specs:
        reason = why_not_sweepable(s.kind)
        if reason is not None:
            raise SurgeonError(f"--probe {s.label!r}: {reason}")
    labels = [s.label for s in specs]
    for lab in labels:
        if labels.count(lab) > 1:
            raise SurgeonError(f"--probe {lab!r}: given twice")


# ---------------------------------------------------------------- the record (lives in the session)
def new_record(spec: SweepSpec, donors: dict[str, Donor]) -> dict:
    now = _now()
    return {
        "version": RECORD_VERSION,
        "id": spec.key(donors),
        "base": spec.base,
        "donor": spec.donor,
        "labels": {n: donors[n].path.name for n in (spec.base, spec.donor)},
        "fingerprints": {n: donors[n].fingerprint for n in (spec.base, spec.donor)},
        "groups": [g.to_json() for g in spec.groups],
        "device": spec.device.split(":")[0],
        "dtype": spec.dtype,
        "batch_size": spec.batch_size,
        "probes": [],
        "ceilings": {spec.base: {}, spec.donor: {}},
        "configurations": [],
        "runs": [],
        "created": now,
        "updated": now,
    }


def sweeps_of(session) -> list[dict]:
    """The sweep records stored in a session (a list the session owns; may be empty)."""
    return session.extensions.setdefault(EXTENSION_KEY, [])


def find_sweep(session, key: str) -> dict | None:
    for r in sweeps_of(session):
        if r.get("id") == key:
            return r
    return None


def store_sweep(session, record: dict) -> None:
    """Put `record` into the session, replacing the stored sweep with the same id."""
    records = sweeps_of(session)
    for i, r in enumerate(records):
        if r.get("id") == record["id"]:
            records[i] = record
            return
    records.append(record)


def configuration_entry(record: dict, mask: int) -> dict | None:
    for c in record["configurations"]:
        if c["mask"] == mask:
            return c
    return None


def record_probes(record: dict) -> list[ProbeSpec]:
    return [spec_from_json(p) for p in record["probes"]]


def missing(record: dict, labels: list[str]) -> tuple[dict[str, list[str]], dict[int, list[str]]]:
    """(ceilings, configurations) still to measure: donor name / mask -> probe labels."""
    ceilings = {n: [lab for lab in labels if lab not in record["ceilings"].get(n, {})]
                for n in (record["base"], record["donor"])}
    configs = {}
    for mask in gray_order(len(record["groups"])):
        entry = configuration_entry(record, mask)
        todo = [lab for lab in labels if entry is None or lab not in entry["results"]]
        if todo:
            configs[mask] = todo
    return {n: t for n, t in ceilings.items() if t}, configs


def is_complete(record: dict, labels: list[str] | None = None) -> bool:
    labels = labels if labels is not None else [spec_from_json(p).label for p in record["probes"]]
    ceilings, configs = missing(record, labels)
    return not ceilings and not configs


# ---------------------------------------------------------------- running
@dataclass(frozen=True)
class SweepEvent:
    """What the runner is doing, for progress displays. `done`/`total` count configurations.

    kind: "start" (resumed = configurations already stored), "ceiling" (a donor's probe result,
    cached or measured), "swap" (the hybrid moved to configuration `mask`), "probe" (items done
    within one probe), "configuration" (one configuration finished and saved: `entry`), "done";
    distributed sweeps add "worker" (worker `worker` is ready on host `name`; `items`: the units of
    work in its segment: configurations and donor ceilings).
    """

    kind: str
    done: int
    total: int
    mask: int | None = None
    name: str = ""
    probe: str = ""
    items_done: int = 0
    items: int = 0
    swap: object = None  # hybrid.SwapReport for "swap" and "ceiling" swaps
    entry: dict | None = None  # a copy of the finished configuration's entry
    record: dict | None = None  # the live record ("ceiling", "configuration", "done"): read it on the
    #                             runner's thread (e.g. analyze(record) there) or copy it
    cached: bool = False
    seconds: float = 0.0
    resumed: int = 0
    worker: int | None = None  # the distributed worker (1-based) that measured it; None when serial


def new_run_stats() -> dict:
    """The counters one run of a sweep adds to its record's "runs"."""
    return {"started": _now(), "seconds": 0.0, "materialize_seconds": 0.0, "surgery_seconds": 0.0,
            "swaps": 0, "tensors_swapped": 0, "bytes_swapped": 0, "probe_seconds": 0.0,
            "configurations_measured": 0, "ceilings_measured": 0}


class Walker:
    """One live hybrid moved through a sweep's configurations and probed on each.

    The serial runner and every distributed worker measure through this class (and
    `measure_configuration` / `measure_ceiling`), so a configuration is measured one way only.
    The base is materialised on first use; `run` collects the counters of `new_run_stats`.
    """

    def __init__(self, spec: SweepSpec, donors: dict[str, Donor], datas: dict, run: dict, hybrid=None):
        self.spec, self.donors, self.datas, self.run = spec, donors, datas, run
        self.hybrid = hybrid
        self.tokenizer = None

    def live(self):
        if self.hybrid is None:
            from surgeon.live.hybrid import Hybrid

            t0 = time.perf_counter()
            self.hybrid = Hybrid.materialize(Plan(self.spec.base), self.donors, device=self.spec.device,
                                             dtype=self.spec.dtype)
            self.run["materialize_seconds"] += time.perf_counter() - t0
        if self.tokenizer is None:
            from surgeon.probes.scoring import load_tokenizer

            self.tokenizer = load_tokenizer(self.donors[self.spec.base].path)
        return self.hybrid

    def move(self, plan: Plan):
        from surgeon.live.hybrid import SwapReport

        h = self.live()
        if h.resolution.plan == plan:
            return SwapReport(0, 0, 0.0)
        report = h.apply(plan, dtype=self.spec.dtype)
        self.run["surgery_seconds"] += report.seconds
        self.run["swaps"] += 1
        self.run["tensors_swapped"] += report.tensors
        self.run["bytes_swapped"] += report.bytes
        return report

    def probe(self, label: str, model_label: str, extra: dict, progress=None) -> dict:
        """The probe `label` on the hybrid as it stands: a result record (with its seconds)."""
        from surgeon.probes.run import evaluate, make_record

        h = self.live()
        s = next(p for p in self.spec.probes if p.label == label)
        spec = self.spec
        t0 = time.perf_counter()
        out = evaluate(h.model, self.tokenizer, s, self.datas[label], batch_size=spec.batch_size, progress=progress)
        seconds = time.perf_counter() - t0
        self.run["probe_seconds"] += seconds
        rec = make_record(s, model_label, out, device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size,
                          extra_fields=extra)
        rec["seconds"] = seconds
        return rec


# probe(label, model_label, extra) -> record: Walker.probe with the caller's progress and cancel
ProbeFn = Callable[[str, str, dict], dict]


def measure_configuration(walker: Walker, mask: int, labels: list[str], probe: ProbeFn,
                          on_swap: Callable[[object], None] | None = None) -> tuple[object, dict]:
    """Move the hybrid to configuration `mask` (mask != 0) and probe it: (SwapReport, label -> record)."""
    spec = walker.spec
    report = walker.move(spec.plan(mask))
    if on_swap is not None:
        on_swap(report)
    name = spec.name(mask)
    plan_json = [{"spec": a.spec, "donor": a.donor} for a in spec.plan(mask).assignments]
    return report, {label: probe(label, f"sweep:{name}", {"plan": plan_json}) for label in labels}


def measure_ceiling(walker: Walker, name: str, label: str, probe: ProbeFn):
    """Probe the donor `name` whole: (SwapReport or None when it is the base, record). The base is
    measured where the hybrid starts; the donor by swapping the whole model over."""
    swap = walker.move(Plan(name))
    if name == walker.spec.base:
        swap = None
    return swap, probe(label, f"donor:{name}", {"fingerprint": walker.donors[name].fingerprint})


def swap_json(report) -> dict:
    return {"tensors": report.tensors, "bytes": report.bytes, "seconds": report.seconds}


def configuration_slot(record: dict, groups: list[Group], mask: int) -> dict:
    """The record's entry of configuration `mask`, added (in Gray-code order) when missing, so a
    record filled out of order (by parallel workers) reads like one filled serially."""
    entry = configuration_entry(record, mask)
    if entry is None:
        entry = {"mask": mask, "groups": [g.name for g in mask_groups(groups, mask)], "results": {},
                 "swap": None, "seconds": 0.0}
        rank = {m: i for i, m in enumerate(gray_order(len(groups)))}
        at = next((i for i, c in enumerate(record["configurations"]) if rank.get(c["mask"], -1) > rank[mask]),
                  len(record["configurations"]))
        record["configurations"].insert(at, entry)
    return entry


def base_configuration_results(record: dict, labels: list[str]) -> dict:
    """The empty configuration is the base, weight for weight: its ceiling is its score."""
    base = record["base"]
    return {label: {**record["ceilings"][base][label], "model": "sweep:none", "same_as": f"donor:{base}"}
            for label in labels}


def open_record(spec: SweepSpec, donors: dict[str, Donor], record: dict | None) -> dict:
    """Check `spec` and return the record to fill: `record` when it is this sweep's, else a new one;
    the spec's groups' names and probes join it."""
    check_probes(spec.probes)
    for n in (spec.base, spec.donor):
        if n not in donors:
            raise SurgeonError(f"sweep: no donor named {n!r} (donors: {', '.join(donors)})")
    if spec.base == spec.donor:
        raise SurgeonError(f"sweep: the donor {spec.donor!r} is the base; choose another donor")
    if record is None or record.get("id") != spec.key(donors):
        record = new_record(spec, donors)
    record["groups"] = [g.to_json() for g in spec.groups]  # names may change; specs are in the key
    for s in spec.probes:
        if s.to_json() not in record["probes"]:
            record["probes"].append(s.to_json())
    return record


def run_sweep(spec: SweepSpec, donors: dict[str, Donor], *, record: dict | None = None, hybrid=None,
              save: Callable[[dict], None] | None = None, on_event: Callable[[SweepEvent], None] | None = None,
              progress=None, cancel: CancelToken = NEVER) -> dict:
    """Measure every configuration of `spec` not yet in `record`; return the (updated) record.

    record: a stored record to resume (ignored unless its id is this spec's key).
    hybrid: a live Hybrid whose donors include base and donor; it is moved through the sweep and
        put back on its own plan at the end. Without one, the base is materialised on spec.device
        (only if anything is left to measure).
    save(record): called after the ceilings and after every configuration; raise to abort.
    on_event(SweepEvent): what happens, for displays; an exception from it aborts the sweep (what was
        saved stays).
    progress: jobs.Steps in items still to measure in this run (cached ceilings cost none).
    cancel: checked between batches and configurations; Cancelled ends the run, and what `save` was
        given stays (a later run resumes from it).
    """
    from surgeon.probes.run import ScoreCache, load_probe_data

    record = open_record(spec, donors, record)
    labels = [s.label for s in spec.probes]
    by_label = {s.label: s for s in spec.probes}
    emit = on_event or (lambda e: None)
    total = spec.size
    run = new_run_stats()
    started = time.perf_counter()

    def done_count() -> int:
        return total - len(missing(record, labels)[1])

    datas = {lab: load_probe_data(by_label[lab]) for lab in labels}  # bad probe data fails before any model
    need_ceilings, need_configs = missing(record, labels)
    emit(SweepEvent("start", done_count(), total, resumed=len(record["configurations"])))
    if not need_ceilings and not need_configs:
        emit(SweepEvent("done", total, total, record=record))
        return record
    scores = ScoreCache(donors[spec.base].path, spec.device, spec.dtype, spec.batch_size)
    cached_ceilings = {(name, label): scores.get(donors[name], by_label[label], datas[label])
                       for name, todo in need_ceilings.items() for label in todo}
    items = {label: len(data.items) for label, data in datas.items()}
    meter = Meter(progress, sum(items[label] for (_, label), rec in cached_ceilings.items() if rec is None)
                  + sum(items[label] for mask, todo in need_configs.items() if mask != 0 for label in todo))
    measured = [0]  # items of the probes finished in this run

    restore = hybrid.resolution.plan if hybrid is not None else None
    walker = Walker(spec, donors, datas, run, hybrid)

    def measure(label: str, model_label: str, mask: int | None, name: str, extra: dict) -> dict:
        n = items[label]
        where = f"ceiling {name} {label}" if mask is None else f"[{done_count() + 1}/{total}] {name}: {label}"
        cancel.check()

        def report(done, of):
            cancel.check()  # between batches; the configuration being measured is not saved
            emit(SweepEvent("probe", done_count(), total, mask, name, label, done, of))
            meter(measured[0] + (round(n * done / of) if of else n), detail=where)

        meter(measured[0], detail=where)
        rec = walker.probe(label, model_label, extra, progress=report)
        measured[0] += n
        meter(measured[0], detail=where)
        return rec

    def checkpoint():
        record["updated"] = _now()
        run["seconds"] = time.perf_counter() - started
        if save is not None:
            save(record)

    record["runs"].append(run)
    try:
        # Ceilings: the donor score cache first; measure (and cache) the rest. The base is measured
        # where the hybrid starts; the donor by swapping the whole model over and back.
        for name in (spec.base, spec.donor):
            for label in need_ceilings.get(name, []):
                rec = cached_ceilings[name, label]
                cached = rec is not None
                swap = None
                if not cached:
                    swap, rec = measure_ceiling(walker, name, label, lambda lab, model, extra, name=name:
                                                measure(lab, model, None, name, extra))
                    scores.put(donors[name], by_label[label], datas[label], rec)
                    run["ceilings_measured"] += 1
                record["ceilings"].setdefault(name, {})[label] = {**rec, "model": f"donor:{name}", "cached": cached}
                emit(SweepEvent("ceiling", done_count(), total, None, name, label, swap=swap, cached=cached,
                                seconds=rec.get("seconds", 0.0) if not cached else 0.0, record=record))
        if need_ceilings:
            checkpoint()
        if walker.hybrid is not None:
            walker.move(Plan(spec.base))  # the walk starts from the empty configuration: one group per step

        for mask in spec.order():
            todo = need_configs.get(mask)
            if not todo:
                continue
            cancel.check()
            name = spec.name(mask)
            entry = configuration_slot(record, spec.groups, mask)
            t0 = time.perf_counter()
            if mask == 0:
                entry["results"].update(base_configuration_results(record, todo))
            else:
                def on_swap(report, mask=mask, name=name):
                    emit(SweepEvent("swap", done_count(), total, mask, name, swap=report))

                report, results = measure_configuration(
                    walker, mask, todo, lambda lab, model, extra, mask=mask, name=name:
                    measure(lab, model, mask, name, extra), on_swap)
                entry["swap"] = swap_json(report)
                entry["results"].update(results)
            entry["seconds"] += time.perf_counter() - t0
            run["configurations_measured"] += 1
            checkpoint()
            emit(SweepEvent("configuration", done_count(), total, mask, name, entry=copy.deepcopy(entry),
                            record=record, seconds=time.perf_counter() - t0))
        emit(SweepEvent("done", done_count(), total, record=record))
    finally:
        run["seconds"] = time.perf_counter() - started
        if restore is not None and walker.hybrid is not None:
            walker.hybrid.apply(restore, dtype=spec.dtype)
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

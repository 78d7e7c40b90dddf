"""Run probes on a hybrid and its donors, keep per-item outcomes, compare with statistics.

Donors are measured by hot-swapping the live hybrid to each donor in turn (no second model in
memory), and their scores are cached by fingerprint, probe spec, device type and dtype, so a
donor is measured once however many hybrids are compared with it. A donor whose tensors are not
the base's (the dense donors beside the MoE mixed from them, any incompatible donor) cannot be
swapped in, so it gets a model of its own for the time it is measured.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from surgeon import __version__
from surgeon.core.plan import Plan
from surgeon.errors import SurgeonError
from surgeon.io.atomic import write_atomic
from surgeon.io.cache import cache_root
from surgeon.jobs import NEVER, CancelToken, Meter
from surgeon.probes import KINDS, Metric, ProbeSpec, metric_of, probe_module
from surgeon.probes.data import PROBES_ROOT, load_items, load_text, resolve_set, subset
from surgeon.probes.prompts import split_shots, template_for
from surgeon.probes.stats import bootstrap_ci, compare


@dataclass
class ProbeData:
    items: list
    shots: list
    template: str


def load_probe_data(spec: ProbeSpec) -> ProbeData:
    path = resolve_set(spec.data)
    builtin = path.parent.resolve() == PROBES_ROOT.resolve()
    # Text probes read plain text files, and any jsonl set as text (prompt and gold answer together).
    pool = load_text(path) if path.suffix != ".jsonl" else load_items(path, spec.fmt)
    kind = KINDS[spec.kind]
    if kind.items is not None and any(i.kind != kind.items for i in pool):
        raise SurgeonError(f"{path}: probe {kind.name} needs {kind.needs}")
    items = subset(pool, spec.limit, spec.seed)
    return ProbeData(items, split_shots(items, pool, spec.shots, spec.seed), template_for(spec, builtin))


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {"moe-surgeon": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _aggregate(metric: Metric, outcomes: list[float], seed: int) -> tuple[float, list[float]]:
    mean, lo, hi = bootstrap_ci(outcomes, seed=seed)
    return metric.score(mean), [metric.score(lo), metric.score(hi)]


def make_record(spec: ProbeSpec, model_label: str, outcome, *, device: str, dtype: str, batch_size: int,
                extra_fields: dict | None = None) -> dict:
    metric = metric_of(outcome.metric)
    score, ci = _aggregate(metric, outcome.outcomes, spec.seed)
    record = {
        "probe": spec.to_json(), "label": spec.label, "model": model_label, "metric": outcome.metric,
        "n": len(outcome.outcomes), "score": score, "ci": ci,
        "ids": outcome.ids, "outcomes": outcome.outcomes,
        "device": device, "dtype": dtype, "batch_size": batch_size, "seed": spec.seed,
        "versions": library_versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if outcome.outputs:
        record["outputs"] = outcome.outputs
    for name, values in outcome.extra.items():
        s, c = _aggregate(metric, values, spec.seed)
        record.setdefault("extra", {})[name] = {"score": s, "ci": c, "outcomes": values}
    record.update(extra_fields or {})
    return record


# ---------------------------------------------------------------- donor score cache
def cache_dir() -> Path:
    return cache_root() / "scores"


def cache_key(fingerprint: str, spec: ProbeSpec, device: str, dtype: str, batch_size: int) -> str:
    payload = json.dumps([fingerprint, spec.to_json(), device.split(":")[0], dtype, batch_size, __version__],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cached_donor_record(key: str) -> dict | None:
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store_donor_record(key: str, record: dict) -> None:
    write_atomic(cache_dir() / f"{key}.json", json.dumps(record).encode())


# ---------------------------------------------------------------- running
def evaluate(model, tokenizer, spec: ProbeSpec, data: ProbeData, *, batch_size: int = 16, progress=None):
    return probe_module(spec.kind).run(model, tokenizer, spec, data.items, data.shots, data.template,
                                       batch_size=batch_size, progress=progress)


def run_probes(hybrid, plan: Plan, specs: list[ProbeSpec], *, device: str, dtype: str = "keep",
               batch_size: int = 16, compare_donors: bool = True, progress=None,
               cancel: CancelToken = NEVER) -> list[dict]:
    """Probe the hybrid of `plan`, then every donor (cached). Returns result records; the hybrid is
    left at `plan`, also when cancelled.

    progress: jobs.Steps in items over the whole run (cached donors cost none), the stage as detail.
    cancel: checked between batches and between stages; a cancelled run returns nothing and caches
    only the donor scores it had finished.
    """
    from surgeon.probes.scoring import load_tokenizer

    donors = hybrid.donors
    tokenizer = load_tokenizer(donors[plan.base].path)
    datas = [load_probe_data(s) for s in specs]
    plan_json = [{"spec": a.spec, "donor": a.donor} for a in plan.assignments]
    # What runs, in order: (stage label, items), and the donor scores the cache already has.
    stages: list[tuple[str, int]] = []
    cached: dict[tuple[str, str], dict | None] = {}
    for spec, data in zip(specs, datas):
        stages.append((f"hybrid {spec.label}", len(data.items)))
        if KINDS[spec.kind].per_donor:
            stages += [(f"donor {name} {spec.label}", len(data.items)) for name in donors]
    if compare_donors:
        for name, donor in donors.items():
            for spec, data in zip(specs, datas):
                if not KINDS[spec.kind].per_donor:
                    record = cached_donor_record(cache_key(donor.fingerprint, spec, device, dtype, batch_size))
                    cached[name, spec.label] = record
                    if record is None:
                        stages.append((f"donor {name} {spec.label}", len(data.items)))
    meter = Meter(progress, sum(n for _, n in stages))
    finished = [0]  # items of the stages done

    def stage(label: str):
        cancel.check()
        items = dict(stages)[label]
        meter(finished[0], detail=label)

        def report(done: int, total: int) -> None:
            cancel.check()  # between batches: never inside a swap
            meter(finished[0] + (round(items * done / total) if total else items), detail=label)

        def end() -> None:
            finished[0] += items
            meter(finished[0], detail=label)

        return report, end

    def measure(model, spec, data, label):
        report, end = stage(label)
        out = evaluate(model, tokenizer, spec, data, batch_size=batch_size, progress=report)
        end()
        return out

    records: list[dict] = []
    try:
        for spec, data in zip(specs, datas):
            if KINDS[spec.kind].per_donor:
                records.extend(_per_donor(hybrid, plan, tokenizer, spec, data, device, dtype, batch_size, measure))
                continue
            out = measure(hybrid.model, spec, data, f"hybrid {spec.label}")
            records.append(make_record(spec, "hybrid", out, device=device, dtype=dtype, batch_size=batch_size,
                                       extra_fields={"plan": plan_json}))
        if compare_donors:
            for name, donor in donors.items():
                model = None
                for spec, data in zip(specs, datas):
                    if KINDS[spec.kind].per_donor:
                        continue
                    record = cached[name, spec.label]
                    if record is None:
                        if model is None:
                            cancel.check()
                            model = _donor_model(hybrid, plan, name, device, dtype)
                        out = measure(model, spec, data, f"donor {name} {spec.label}")
                        record = make_record(spec, f"donor:{name}", out, device=device, dtype=dtype,
                                             batch_size=batch_size, extra_fields={"fingerprint": donor.fingerprint})
                        store_donor_record(cache_key(donor.fingerprint, spec, device, dtype, batch_size), record)
                    records.append({**record, "model": f"donor:{name}", "cached": cached[name, spec.label] is not None})
    finally:
        if hybrid.resolution.plan != plan:
            hybrid.apply(plan, dtype=dtype)
    run = uuid.uuid4().hex[:12]  # groups the records of one run, for histories and replays
    for r in records:
        r["run"] = run
        if r["model"] == "hybrid":
            r.update(base=plan.base, plan=plan_json)
    return records


def record_probe_results(session, specs: list[ProbeSpec], records: list[dict]) -> None:
    """Add one run to a session (anything with `probes` and `results` lists): the specs it does not
    list yet, then every record. The one way the CLI and the workbench record probes, so the file
    reads the same whichever ran them and `replay --probes` re-runs either."""
    for s in specs:
        if s.to_json() not in session.probes:
            session.probes.append(s.to_json())
    session.results.extend(records)


def _swappable(base, donor) -> bool:
    """The donor has the base's tensors (names and shapes; layer gates aside, which hot-swaps fit)."""
    from surgeon.core.gates_sidecar import gate_layer_of

    def tensors(d):
        return {n: t.shape for n, t in d.tensors.items() if gate_layer_of(n) is None}

    return base.model_type == donor.model_type and tensors(base) == tensors(donor)


def _donor_model(hybrid, plan: Plan, name: str, device: str, dtype: str):
    """The live hybrid swapped to donor `name`, or, when it cannot be swapped in, its own model."""
    if _swappable(hybrid.donors[plan.base], hybrid.donors[name]):
        hybrid.apply(Plan(name), dtype=dtype)
        return hybrid.model
    from surgeon.live.hybrid import Hybrid

    return Hybrid.materialize(Plan(name), hybrid.donors, device=device, dtype=dtype).model


def _per_donor(hybrid, plan, tokenizer, spec, data, device, dtype, batch_size, measure) -> list[dict]:
    """A per-donor kind: the hybrid's measurement against each donor's, one record per donor."""
    kind = probe_module(spec.kind)
    mine = measure(hybrid.model, spec, data, f"hybrid {spec.label}")
    records = []
    for name in hybrid.donors:
        theirs = measure(_donor_model(hybrid, plan, name, device, dtype), spec, data, f"donor {name} {spec.label}")
        records.append(make_record(spec, "hybrid", kind.versus(mine, theirs, data.items), device=device, dtype=dtype,
                                   batch_size=batch_size, extra_fields={"vs": f"donor:{name}"}))
    hybrid.apply(plan, dtype=dtype)
    return records


# ---------------------------------------------------------------- summaries
def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, probe) with deltas and p-values against every donor on the same items."""
    rows = []
    by_label: dict[str, dict[str, dict]] = {}
    for r in records:
        if "vs" not in r:
            by_label.setdefault(r["label"], {})[r["model"]] = r
    for r in records:
        row = {"model": r["model"] if "vs" not in r else f"{r['model']} vs {r['vs']}", "probe": r["label"],
               "metric": r["metric"], "n": r["n"], "score": r["score"], "ci": r["ci"], "vs": {}}
        if "extra" in r:
            row["extra"] = {k: {"score": v["score"], "ci": v["ci"]} for k, v in r["extra"].items()}
        if metric_of(r["metric"]).proportion and "vs" not in r:
            for other_name, other in by_label.get(r["label"], {}).items():
                if other_name == r["model"] or not other_name.startswith("donor:"):
                    continue
                if other["ids"] != r["ids"]:
                    continue
                c = compare(r["outcomes"], other["outcomes"])
                row["vs"][other_name] = {"delta": c["delta"], "mcnemar_p": c["mcnemar_p"], "z_p": c["z_p"]}
        rows.append(row)
    return rows

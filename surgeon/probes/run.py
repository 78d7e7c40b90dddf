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
import os
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from surgeon import __version__
from surgeon.core.plan import Plan
from surgeon.errors import SurgeonError
from surgeon.io.atomic import write_atomic
from surgeon.probes import ProbeSpec, probe_module
from surgeon.probes.data import PROBES_ROOT, load_items, load_text, resolve_set, subset
from surgeon.probes.prompts import split_shots, template_for
from surgeon.probes.stats import bootstrap_ci, compare

TEXT_PROBES = ("ppl", "kl")


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
    if spec.kind == "mc" and any(i.kind != "mc" for i in pool):
        raise SurgeonError(f"{path}: probe mc needs multiple-choice items (choices and an answer index)")
    if spec.kind == "em" and any(i.kind != "exact" for i in pool):
        raise SurgeonError(f"{path}: probe em needs items with a gold answer string")
    items = subset(pool, spec.limit, spec.seed)
    return ProbeData(items, split_shots(items, pool, spec.shots, spec.seed), template_for(spec, builtin))


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {"moe-surgeon": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _aggregate(metric: str, outcomes: list[float], seed: int) -> tuple[float, list[float]]:
    mean, lo, hi = bootstrap_ci(outcomes, seed=seed)
    if metric == "nll":  # report perplexity; exp is monotone, so the interval maps through
        import math

        return math.exp(mean), [math.exp(lo), math.exp(hi)]
    return mean, [lo, hi]


def make_record(spec: ProbeSpec, model_label: str, outcome, *, device: str, dtype: str, batch_size: int,
                extra_fields: dict | None = None) -> dict:
    score, ci = _aggregate(outcome.metric, outcome.outcomes, spec.seed)
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
        s, c = _aggregate(outcome.metric, values, spec.seed)
        record.setdefault("extra", {})[name] = {"score": s, "ci": c, "outcomes": values}
    record.update(extra_fields or {})
    return record


# ---------------------------------------------------------------- donor score cache
def cache_dir() -> Path:
    return Path(os.environ.get("MOE_SURGEON_CACHE", Path.home() / ".cache" / "moe-surgeon")) / "scores"


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
               batch_size: int = 16, compare_donors: bool = True, progress=None) -> list[dict]:
    """Probe the hybrid of `plan`, then every donor (cached). Returns result records; the hybrid is
    left at `plan`."""
    from surgeon.probes.scoring import load_tokenizer

    donors = hybrid.donors
    tokenizer = load_tokenizer(donors[plan.base].path)
    datas = [load_probe_data(s) for s in specs]
    records: list[dict] = []
    plan_json = [{"spec": a.spec, "donor": a.donor} for a in plan.assignments]

    def report(label):
        return None if progress is None else (lambda done, total: progress(label, done, total))

    for spec, data in zip(specs, datas):
        if spec.kind == "kl":
            records.extend(_divergence(hybrid, plan, tokenizer, spec, data, device, dtype, batch_size))
            continue
        out = evaluate(hybrid.model, tokenizer, spec, data, batch_size=batch_size, progress=report(f"hybrid {spec.label}"))
        records.append(make_record(spec, "hybrid", out, device=device, dtype=dtype, batch_size=batch_size,
                                   extra_fields={"plan": plan_json}))
    if compare_donors:
        for name, donor in donors.items():
            model = None
            for spec, data in zip(specs, datas):
                if spec.kind == "kl":
                    continue
                key = cache_key(donor.fingerprint, spec, device, dtype, batch_size)
                record = cached_donor_record(key)
                cached = record is not None
                if not cached:
                    if model is None:
                        model = _donor_model(hybrid, plan, name, device, dtype)
                    out = evaluate(model, tokenizer, spec, data, batch_size=batch_size,
                                   progress=report(f"donor {name} {spec.label}"))
                    record = make_record(spec, f"donor:{name}", out, device=device, dtype=dtype,
                                         batch_size=batch_size, extra_fields={"fingerprint": donor.fingerprint})
                    store_donor_record(key, record)
                record = {**record, "model": f"donor:{name}", "cached": cached}
                records.append(record)
        hybrid.apply(plan, dtype=dtype)
    run = uuid.uuid4().hex[:12]  # groups the records of one run, for histories and replays
    for r in records:
        r["run"] = run
        if r["model"] == "hybrid":
            r.update(base=plan.base, plan=plan_json)
    return records


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


def _divergence(hybrid, plan, tokenizer, spec, data, device, dtype, batch_size) -> list[dict]:
    from surgeon.probes import ProbeOutcome
    from surgeon.probes.divergence import kl_per_item, log_probs

    mine = log_probs(hybrid.model, tokenizer, data.items)
    records = []
    for name in hybrid.donors:
        theirs = log_probs(_donor_model(hybrid, plan, name, device, dtype), tokenizer, data.items)
        out = ProbeOutcome([i.id for i in data.items], kl_per_item(mine, theirs), metric="kl")
        records.append(make_record(spec, "hybrid", out, device=device, dtype=dtype, batch_size=batch_size,
                                   extra_fields={"vs": f"donor:{name}"}))
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
        if r["metric"] == "accuracy" and "vs" not in r:
            for other_name, other in by_label.get(r["label"], {}).items():
                if other_name == r["model"] or not other_name.startswith("donor:"):
                    continue
                if other["ids"] != r["ids"]:
                    continue
                c = compare(r["outcomes"], other["outcomes"])
                row["vs"][other_name] = {"delta": c["delta"], "mcnemar_p": c["mcnemar_p"], "z_p": c["z_p"]}
        rows.append(row)
    return rows

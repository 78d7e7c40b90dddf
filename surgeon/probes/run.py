"""Run probes on a hybrid and its donors, keep per-item outcomes, compare with statistics.

Donors are measured by hot-swapping the live hybrid to each donor in turn (no second model in
memory), and their scores are cached by content (ScoreCache: the donor's every byte, the tokenizer,
what the probe evaluates) and by how they were measured, so a donor is measured once however many
hybrids are compared with it, and again whenever any of that changed. A donor whose tensors are not
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
from surgeon.io.cache import cache_root
from surgeon.io.fs import fs_errors
from surgeon.jobs import NEVER, CancelToken, Meter
from surgeon.probes.registry import KINDS, metric_of, probe_module, shown_metric
from surgeon.probes.types import Metric, ProbeSpec
from surgeon.probes.data import (
    PROBES_ROOT,
    ProbeFile,
    load_text,
    read_probe_file,
    resolve_set,
    subset,
)
from surgeon.probes.prompts import (
    Template,
    context,
    fixed_shots,
    lmeval_shots,
    template_for,
)
from surgeon.probes.stats import bootstrap_ci, compare


@dataclass
class ProbeData:
    """A probe's items in evaluation order, each one's exemplars, and how they are written."""

    items: list
    shots: list  # per item (parallel to items): its k-shot exemplars, a list of Items
    template: Template
    kind: str | None = None  # set for a kind that loads its own task (ProbeKind's load_task)
    positions: list[int] | None = None  # each item's 0-based place in its file (lm-eval's doc_id)

    @property
    def digest(self) -> str:
        """A hash of what is evaluated: the items, their exemplars and how they are written (a kind
        that loads its own task says what that is: `content_digest`). Fields of a file no item
        reads do not change it; anything scored does."""
        if self.kind is not None:
            return probe_module(self.kind).content_digest(self.items)
        return hashlib.sha256(repr((self.items, self.shots, self.template)).encode()).hexdigest()

    def contexts(self, cot: bool = False) -> list[str]:
        """Each item's whole prompt: its exemplars, then its own prompt."""
        return [context(item, shots, self.template, cot) for item, shots in zip(self.items, self.shots)]


def builtin_probes() -> list[ProbeSpec]:
    """A probe of every built-in probe set, of the kind the registry gives its items."""
    from surgeon.probes.data import builtin_sets, load_items
    from surgeon.probes.registry import kind_for_items

    specs = []
    for name, path in builtin_sets().items():
        items = load_items(path)
        kind = kind_for_items(items[0].kind) if items else None
        if kind is not None:
            specs.append(ProbeSpec(kind, name))
    return specs


def load_probe_data(spec: ProbeSpec) -> ProbeData:
    if (problem := spec.problem()) is not None:
        raise SurgeonError(f"--probe {spec.label!r}: {problem}")
    module = probe_module(spec.kind)
    if hasattr(module, "load_task"):  # a kind that builds its own requests from its own task files
        return ProbeData(module.load_task(spec), [], None, spec.kind)
    path = resolve_set(spec.data)
    builtin = path.parent.resolve() == PROBES_ROOT.resolve()
    kind = KINDS[spec.kind]
    # Text probes read plain text files, and any jsonl set as text (prompt and gold answer together).
    if path.suffix == ".jsonl":
        probe_file = read_probe_file(path, spec.fmt, spec.fields)
    else:
        probe_file = ProbeFile("text", load_text(path), [])
    _check_kind(kind, path, probe_file.items)
    pool = probe_file.items
    items = pool[:spec.first] if spec.first is not None else subset(pool, spec.limit, spec.seed)
    shots = _exemplars(spec, kind, path, probe_file, items)
    place = {id(item): i for i, item in enumerate(pool)}
    return ProbeData(items, shots, template_for(spec, builtin, probe_file.fmt),
                     positions=[place[id(item)] for item in items])


def _check_kind(kind, path, items) -> None:
    if kind.items is not None and any(i.kind != kind.items for i in items):
        raise SurgeonError(f"{path}: probe {kind.name} needs {kind.needs}")


def _exemplars(spec: ProbeSpec, kind, path: Path, probe_file: ProbeFile, items: list) -> list[list]:
    """Each item's exemplars: from the probe's own file, or from fewshot=FILE read the same way."""
    if not spec.shots:
        return [[] for _ in items]
    if kind.items is None:
        raise SurgeonError(f"--probe {spec.label!r}: shots= applies to items with answers; {kind.name} reads text")
    source, pool_file = path, probe_file
    if spec.fewshot is not None:
        source = resolve_set(spec.fewshot)
        if source.resolve() != path.resolve():
            pool_file = read_probe_file(source, probe_file.fmt, spec.fields)
            _check_kind(kind, source, pool_file.items)
    same_file = pool_file is probe_file
    if spec.fewshot_order == "fixed":
        return fixed_shots(items, pool_file.items, spec.shots, spec.seed, same_file=same_file, source=str(source))
    return lmeval_shots(items, pool_file.items, spec.shots, same_file=same_file,
                        docs=dict(zip(pool_file.items, pool_file.docs)), source=str(source))


def library_versions() -> dict[str, str]:
    import numpy
    import torch

    from surgeon.io.versions import installed_versions

    # transformers' version from its package metadata: a probe on our own forward never imports it.
    return {"moe-surgeon": __version__, "torch": torch.__version__, **installed_versions(["transformers"]),
            "numpy": numpy.__version__, "python": platform.python_version()}


def _aggregate(metric: Metric, outcomes: list[float], seed: int) -> tuple[float, list[float]]:
    mean, lo, hi = bootstrap_ci(outcomes, seed=seed)
    return metric.score(mean), [metric.score(lo), metric.score(hi)]


# A record's per-item samples (lm-eval's --log_samples fields), present only when run_probes is asked
# for them: kept out of sessions and score records, which they would swell.
SAMPLES = "samples"


def cpu_linears(device) -> str | None:
    # Imported here: it imports torch, which this module leaves to the probes that run.
    from surgeon.probes.linear_kernels import cpu_linears as kernel

    return kernel(device)


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
    kernel = cpu_linears(device)
    if kernel:
        record["cpu_linears"] = kernel
    if outcome.outputs:
        record["outputs"] = outcome.outputs
    for name, values in outcome.extra.items():
        s, c = _aggregate(metric, values, spec.seed)
        record.setdefault("extra", {})[name] = {"score": s, "ci": c, "outcomes": values}
    record.update(extra_fields or {})
    return record


# ---------------------------------------------------------------- donor score cache
# Bump when a change to scoring changes what a stored score means, so no score of the old code is served.
SCORING_VERSION = 2
# The files a tokenizer (and generation's defaults) are read from, beside the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def cache_dir() -> Path:
    return cache_root() / "scores"


def cache_key(content: str, spec: ProbeSpec, device: str, dtype: str, batch_size: int) -> str:
    """The key of a donor's score: `content` says what was measured (see ScoreCache.content); the
    rest, how."""
    payload = json.dumps([content, spec.to_json(), device.split(":")[0], dtype, batch_size, __version__,
                          SCORING_VERSION, cpu_linears(device)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class ScoreCache:
    """Donor scores keyed by content: every byte of the donor (its shards' full hashes and its
    config), every file the tokenizer is read from, and what the probe evaluates (ProbeData.digest),
    besides device, dtype, batch size and the scoring code's version. A donor edited in place, a
    probe file edited, a new tokenizer: each is a new key, so nothing stale is served.

    A lookup costs a stat per shard (the hashes come from io/content_hash.py's cache while the
    files are unchanged); a donor not hashed yet is a miss, and is hashed when its score is stored,
    right after measuring read its bytes, so hashing finds them in the page cache instead of on disk.
    """

    def __init__(self, tokenizer_dir: str | Path, device: str, dtype: str, batch_size: int):
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.tokenizer = _files_digest(Path(tokenizer_dir), TOKENIZER_FILES)
        self._before: dict[tuple[str, str], tuple] = {}  # (donor path, probe label) -> shard identities

    def key(self, donor, spec: ProbeSpec, data: ProbeData, hashes: dict[str, str]) -> str:
        content = hashlib.sha256(donor.config_bytes)
        for name, h in sorted(hashes.items()):
            content.update(f"{name}:{h};".encode())
        content.update(f"tokenizer:{self.tokenizer};probe:{data.digest}".encode())
        return cache_key(content.hexdigest(), spec, self.device, self.dtype, self.batch_size)

    def get(self, donor, spec: ProbeSpec, data: ProbeData) -> dict | None:
        """The stored record, or None; remembers the donor's files as they are now for `put`."""
        self._before[str(donor.path), spec.label] = _identities(donor)
        hashes = _cached_hashes(donor)
        return None if hashes is None else cached_donor_record(self.key(donor, spec, data, hashes))

    def samples(self, donor, spec: ProbeSpec, data: ProbeData) -> list[dict] | None:
        hashes = _cached_hashes(donor)
        return None if hashes is None else cached_donor_samples(self.key(donor, spec, data, hashes))

    def put(self, donor, spec: ProbeSpec, data: ProbeData, record: dict, samples: list[dict] | None = None) -> bool:
        """Store a score just measured, unless a shard changed since `get` (the score may be of
        either content then): False when not stored."""
        before = self._before.get((str(donor.path), spec.label))
        try:
            hashes = donor.full_hashes()
        except SurgeonError:  # gone or unreadable since it was measured: the score stands, uncached
            return False
        if before is None or _identities(donor) != before:
            return False
        store_donor_record(self.key(donor, spec, data, hashes), record, samples)
        return True


def _cached_hashes(donor) -> dict[str, str] | None:
    """The donor's full hashes if known for its files as they are now; None where they are not
    (or a file is gone: measuring it will say so, in the words of whatever reads it)."""
    try:
        return donor.cached_full_hashes()
    except SurgeonError:
        return None


def _identities(donor) -> tuple:
    from surgeon.io.content_hash import identity

    out = []
    for name in sorted(donor.shards):
        try:
            out.append((name, identity(os.stat(donor.path / name))))
        except OSError:
            out.append((name, None))
    return tuple(out)


def _files_digest(folder: Path, names) -> str:
    """A hash of the named small files in `folder` that exist (a missing one counts as missing)."""
    digest = hashlib.sha256()
    for name in names:
        try:
            data = (folder / name).read_bytes()
        except OSError:
            digest.update(f"{name}:-;".encode())
            continue
        digest.update(f"{name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def cached_donor_record(key: str) -> dict | None:
    path = cache_dir() / f"{key}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def store_donor_record(key: str, record: dict, samples: list[dict] | None = None) -> None:
    # The per-item samples go beside the record, so reading a score (the sweep's ceilings) never
    # parses them; written first, so a record in the cache has its samples when it had any.
    if samples:
        write_atomic(_samples_file(key), json.dumps(samples).encode(), fsync=False)
    write_atomic(cache_dir() / f"{key}.json", json.dumps(record).encode())


def cached_donor_samples(key: str) -> list[dict] | None:
    try:
        samples = json.loads(_samples_file(key).read_text())
    except (OSError, ValueError):
        return None
    return samples if isinstance(samples, list) else None


def _samples_file(key: str) -> Path:
    return cache_dir() / f"{key}.samples.json"


# ---------------------------------------------------------------- running
def evaluate(model, tokenizer, spec: ProbeSpec, data: ProbeData, *, batch_size: int = 16, progress=None):
    return probe_module(spec.kind).run(model, tokenizer, spec, data.items, data.shots, data.template,
                                       batch_size=batch_size, progress=progress)


def run_probes(hybrid, plan: Plan, specs: list[ProbeSpec], *, device: str, dtype: str = "keep",
               batch_size: int = 16, compare_donors: bool = True, keep_samples: bool = False, progress=None,
               cancel: CancelToken = NEVER, shown_as: str = "hybrid") -> list[dict]:
    """Probe the hybrid of `plan`, then every donor (cached). Returns result records; the hybrid is
    left at `plan`, also when cancelled.

    keep_samples: give every record its per-item samples under SAMPLES (see sample_lines); a cached
    donor's come from the cache, or are empty when it has none. record_probe_results drops them.

    progress: jobs.Steps in items over the whole run (cached donors cost none), the stage as detail,
    naming the hybrid `shown_as` (a checkpoint probed alone: its name; the records say "hybrid").
    cancel: checked between batches and between stages; a cancelled run returns nothing and caches
    only the donor scores it had finished.
    """
    from surgeon.probes.scoring import load_tokenizer

    donors = hybrid.donors
    native = forward_of(hybrid.model) == "native"
    tokenizer = load_tokenizer(donors[plan.base].path, lean=native)
    datas = [load_probe_data(s) for s in specs]
    plan_json = [{"spec": a.spec, "donor": a.donor} for a in plan.assignments]
    # What runs, in order: (stage label, items), and the donor scores the cache already has.
    stages: list[tuple[str, int]] = []
    cached: dict[tuple[str, str], dict | None] = {}
    for spec, data in zip(specs, datas):
        stages.append((f"{shown_as} {spec.label}", len(data.items)))
        if KINDS[spec.kind].per_donor:
            stages += [(f"donor {name} {spec.label}", len(data.items)) for name in donors]
    scores = ScoreCache(donors[plan.base].path, device, dtype, batch_size)
    if compare_donors:
        for name, donor in donors.items():
            for spec, data in zip(specs, datas):
                if not KINDS[spec.kind].per_donor:
                    record = scores.get(donor, spec, data)
                    cached[name, spec.label] = record
                    if record is None:
                        stages.append((f"donor {name} {spec.label}", len(data.items)))
    meter = Meter(progress, sum(n for _, n in stages))
    finished = [0]  # items of the stages done
    shown: list = [None]  # the last (done, stage) reported: a renderer prints a finished step every time

    def show(done: int, label: str) -> None:
        if shown[0] != (done, label):
            shown[0] = (done, label)
            meter(done, detail=label)

    def stage(label: str):
        cancel.check()
        items = dict(stages)[label]
        show(finished[0], label)  # at once, so a log has a line (and the stage) before the first batch

        def report(done: int, total: int) -> None:
            cancel.check()  # between batches: never inside a swap
            show(finished[0] + (round(items * done / total) if total else items), label)

        def end() -> None:
            finished[0] += items
            show(finished[0], label)

        return report, end

    def measure(model, spec, data, label):
        report, end = stage(label)
        out = evaluate(model, tokenizer, spec, data, batch_size=batch_size, progress=report)
        end()
        if data.positions is not None and hasattr(out, "samples"):  # per-donor kinds measure, not score
            if not out.samples:  # a kind that keeps no samples: which document, and the item's id
                out.samples = [{"doc_id": item.id} for item in data.items]
            for sample, place in zip(out.samples, data.positions):
                # lm-eval's doc_id is the document's 0-based place; the item's own id stays beside it
                sample["id"], sample["doc_id"] = sample.get("doc_id"), place
        return out

    def kept(samples: list[dict] | None) -> dict:
        return {SAMPLES: samples or []} if keep_samples else {}

    records: list[dict] = []
    try:
        for spec, data in zip(specs, datas):
            if KINDS[spec.kind].per_donor:
                records.extend({**r, **kept(None)} for r in
                               _per_donor(hybrid, plan, tokenizer, spec, data, device, dtype, batch_size, measure,
                                          shown_as))
                continue
            out = measure(hybrid.model, spec, data, f"{shown_as} {spec.label}")
            records.append(make_record(spec, "hybrid", out, device=device, dtype=dtype, batch_size=batch_size,
                                       extra_fields={"plan": plan_json, "forward": forward_of(hybrid.model),
                                                     **kept(out.samples)}))
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
                                             batch_size=batch_size, extra_fields={"fingerprint": donor.fingerprint,
                                                                                  "forward": forward_of(model)})
                        # Always with its samples: a later --samples run must not measure it again.
                        scores.put(donor, spec, data, record, out.samples)
                        samples = out.samples
                    else:
                        samples = scores.samples(donor, spec, data) if keep_samples else None
                    records.append({**record, "model": f"donor:{name}", "cached": cached[name, spec.label] is not None,
                                    **kept(samples)})
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
    session.results.extend({k: v for k, v in r.items() if k != SAMPLES} for r in records)  # samples can be large


def _swappable(base, donor) -> bool:
    """The donor has the base's tensors (names and shapes; layer gates aside, which hot-swaps fit)."""
    from surgeon.core.gates_sidecar import gate_layer_of

    def tensors(d):
        return {n: t.shape for n, t in d.tensors.items() if gate_layer_of(n) is None}

    return base.model_type == donor.model_type and tensors(base) == tensors(donor)


def forward_of(model) -> str:
    """Whose forward pass a model runs: "native" (surgeon/live/native_model.py) or "transformers"."""
    return "native" if getattr(model, "native", False) else "transformers"


def _donor_model(hybrid, plan: Plan, name: str, device: str, dtype: str):
    """The live hybrid swapped to donor `name`, or, when it cannot be swapped in, its own model (on
    our own forward where the hybrid runs on it and the donor's architecture allows)."""
    if _swappable(hybrid.donors[plan.base], hybrid.donors[name]):
        hybrid.apply(Plan(name), dtype=dtype)
        return hybrid.model
    from surgeon.live.hybrid import Hybrid

    return Hybrid.materialize(Plan(name), hybrid.donors, device=device, dtype=dtype,
                              native=forward_of(hybrid.model) == "native").model


def _per_donor(hybrid, plan, tokenizer, spec, data, device, dtype, batch_size, measure,
               shown_as: str) -> list[dict]:
    """A per-donor kind: the hybrid's measurement against each donor's, one record per donor."""
    kind = probe_module(spec.kind)
    mine = measure(hybrid.model, spec, data, f"{shown_as} {spec.label}")
    records = []
    for name in hybrid.donors:
        theirs = measure(_donor_model(hybrid, plan, name, device, dtype), spec, data, f"donor {name} {spec.label}")
        records.append(make_record(spec, "hybrid", kind.versus(mine, theirs, data.items), device=device, dtype=dtype,
                                   batch_size=batch_size,
                                   extra_fields={"vs": f"donor:{name}", "forward": forward_of(hybrid.model)}))
    hybrid.apply(plan, dtype=dtype)
    return records


# ---------------------------------------------------------------- per-item output
def sample_lines(record: dict) -> list[dict]:
    """One dict per item of a record: which model and probe, the item's sample as the kind gave it
    (lm-eval's --log_samples fields: doc_id, prompt, target, arguments, resps, filtered_resps and
    its metrics), and the record's own per-item `outcome` (and extra metrics the sample lacks). A
    kind without samples, or a cached donor whose cache has none, gives doc_id and outcomes only."""
    head = {"model": record["model"], "probe": record["label"]}
    if "vs" in record:
        head["vs"] = record["vs"]
    if record.get("cached"):
        head["cached"] = True
    ids = record["ids"]
    samples = record.get(SAMPLES) or [{"doc_id": i} for i in ids]
    if len(samples) != len(ids):
        raise ValueError(f"{record['label']}: {len(samples)} samples for {len(ids)} items")
    extra = {name: e["outcomes"] for name, e in record.get("extra", {}).items()}
    lines = []
    for i, sample in enumerate(samples):
        line = {**head, **sample, "outcome": record["outcomes"][i]}
        for name, values in extra.items():
            line.setdefault(name, values[i])
        lines.extend(_per_filter(line))
    return lines


def _per_filter(line: dict) -> list[dict]:
    """lm-eval's layout: one line per filter, naming it (`filter`), with that filter's responses as
    a list and its metrics under their plain names (`exact_match`, not `exact_match,strict-match`)."""
    filtered = line.get("filtered_resps")
    if not isinstance(filtered, dict):
        return [{**line, "filter": "none"}] if "filtered_resps" in line else [line]
    out = []
    for name, responses in filtered.items():
        one = {k: v for k, v in line.items() if "," not in k}
        one.update({k.split(",", 1)[0]: v for k, v in line.items() if k.endswith("," + name)})
        one["filtered_resps"] = responses if isinstance(responses, list) else [responses]
        one["filter"] = name
        out.append(one)
    return out


def write_samples(path: str | Path, records: list[dict]) -> int:
    """The records' sample lines as JSONL at `path`, atomically; returns the number of lines."""
    lines = [json.dumps(line) for r in records for line in sample_lines(r)]
    with fs_errors(path, "write the samples"):
        write_atomic(path, "".join(line + "\n" for line in lines).encode())
    return len(lines)


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
               "metric": shown_metric(r), "n": r["n"], "score": r["score"], "ci": r["ci"], "vs": {}}
        if "extra" in r:
            row["extra"] = {k: {"score": v["score"], "ci": v["ci"], "vs": {}} for k, v in r["extra"].items()}
        if metric_of(r["metric"]).proportion and "vs" not in r:
            for other_name, other in by_label.get(r["label"], {}).items():
                if other_name == r["model"] or not other_name.startswith("donor:"):
                    continue
                if other["ids"] != r["ids"]:
                    continue
                row["vs"][other_name] = _paired(r["outcomes"], other["outcomes"])
                for name, e in row.get("extra", {}).items():  # acc_norm against the donors' acc_norm
                    if name in other.get("extra", {}):
                        e["vs"][other_name] = _paired(r["extra"][name]["outcomes"], other["extra"][name]["outcomes"])
        rows.append(row)
    return rows


def _paired(mine: list[float], theirs: list[float]) -> dict:
    c = compare(mine, theirs)
    return {"delta": c["delta"], "mcnemar_p": c["mcnemar_p"], "z_p": c["z_p"]}

"""What a trial of a smaller model measured against the original: the per-probe comparison the
workbench's prune dialog shows, and the records the session of the pruning keeps.

The trial's probe run (trial.probe_trial) has the smaller model as its hybrid (donor TRIAL) and the
original as donor ORIGINAL; both are measured on the same items.
"""

from __future__ import annotations

TRIAL = "pruned"  # the smaller model's donor name in the probe run: its records read "hybrid"
ORIGINAL = "original"  # what it is compared with: records "donor:original"


def comparison(records: list[dict]) -> list[dict]:
    """Per probe: the smaller model's score and CI, the original's, and the paired comparison on the
    same items (delta, items lost and gained, McNemar p; surgeon.probes.stats)."""
    from surgeon.probes import metric_of
    from surgeon.probes.stats import compare

    mine = {r["label"]: r for r in records if r.get("model") == "hybrid" and "vs" not in r}
    theirs = {r["label"]: r for r in records if r.get("model") == f"donor:{ORIGINAL}"}
    rows = []
    for label, a in mine.items():
        b = theirs.get(label)
        row = {"probe": label, "metric": a["metric"], "n": a["n"], "score": a["score"], "ci": a["ci"],
               "original": None if b is None else b["score"], "original_ci": None if b is None else b["ci"]}
        if b is not None and b["ids"] == a["ids"] and metric_of(a["metric"]).proportion:
            c = compare(a["outcomes"], b["outcomes"])
            row.update(delta=c["delta"], lost=c["b01"], gained=c["b10"], mcnemar_p=c["mcnemar_p"])
        rows.append(row)
    return rows


def session_results(records: list[dict], operation: str) -> list[dict]:
    """A trial's probe records as the session of its pruning keeps them (extensions["prune_probes"]):
    the smaller model's as model `pruned` (or `merged`), the original's as `donor:A` (the session's
    donor A is the original); the trial's own donor record (the smaller model measured again as a
    donor) and the trial's plan left out. Never `hybrid`: that session's plan is the original."""
    out = []
    mine = f"{operation}d"
    for r in records:
        if r.get("model") == f"donor:{TRIAL}" or r.get("vs") == f"donor:{TRIAL}":
            continue
        r = {k: v for k, v in r.items() if k not in ("plan", "base", "fingerprint", "cached")}
        r["model"] = mine if r.get("model") == "hybrid" else r["model"].replace(f"donor:{ORIGINAL}", "donor:A")
        if "vs" in r:
            r["vs"] = r["vs"].replace(f"donor:{ORIGINAL}", "donor:A")
        out.append(r)
    return out

"""What a sweep shows: Table 2, Figure 1 and Table 3 of Tiwari (2026) from a sweep record, as data and text.

`analyze(record)` turns a (possibly unfinished) sweep record into plain data: one row per donor
ceiling and per configuration with accuracy, 95% CI and significance against each donor; the
single-group effects (points against the base); per probe the best configuration and whether
it significantly beats both donors; and a Table 3 style recommendation (which donor each group
should come from). The renderers only format that data: Markdown, CSV, JSON, and a text effect
chart. Significance is McNemar's paired test by default (both models answer the same items);
`test="z"` uses Tiwari's two-proportion z-test instead. Perplexity-like probes get scores
and CIs but no tests.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from surgeon.features.sweep.runner import configuration_name, gray_order, record_groups
from surgeon.probes import metric_of
from surgeon.probes.stats import compare, significance_stars

ALPHA = 0.05
TESTS = {"mcnemar": "mcnemar_p", "z": "z_p"}
TEST_NAMES = {"mcnemar": "McNemar's paired test", "z": "two-proportion z-test"}


@dataclass
class Cell:
    """One probe's result for one row. vs: donor name -> {delta, mcnemar_p, z_p, p, stars}."""

    metric: str
    n: int
    score: float
    ci: tuple[float, float]
    vs: dict[str, dict] = field(default_factory=dict)

    @property
    def accuracy(self) -> bool:
        """0/1 outcomes: a percentage, with paired tests against the donors."""
        return metric_of(self.metric).proportion


@dataclass
class Row:
    """A donor ceiling (kind "donor", mask None) or a configuration (kind "configuration")."""

    kind: str
    name: str  # donor name, or the configuration's name ("none", "router + experts")
    label: str  # for display
    mask: int | None
    groups: list[str]
    cells: dict[str, Cell]  # probe label -> cell; absent while not measured


@dataclass
class Effect:
    """A single-group transfer against the base, on one probe (Figure 1)."""

    group: str
    probe: str
    delta: float  # score difference (accuracy: fraction; x100 for points)
    p: float | None
    stars: str


@dataclass
class Best:
    probe: str
    mask: int
    name: str
    score: float
    vs: dict[str, dict]  # donor name -> {delta, p, stars}
    beats_both: bool
    verdict: str


@dataclass
class Recommendation:
    """Table 3: for each group, the donor it should come from for this probe, or "either" when
    flipping that group in the best configuration makes no significant difference."""

    probe: str
    choice: dict[str, str]  # group name -> donor name or "either"
    p: dict[str, float | None]  # group name -> p of flipping it in the best configuration


@dataclass
class SweepAnalysis:
    base: str
    donor: str
    labels: dict[str, str]  # donor name -> display label (checkpoint directory name)
    groups: list[str]
    probes: list[str]
    metrics: dict[str, str]  # probe -> metric
    test: str
    alpha: float
    rows: list[Row]  # ceilings (base, donor), then configurations by size, then group order
    effects: list[Effect]
    best: dict[str, Best]
    recommendations: dict[str, Recommendation]
    complete: bool
    record: dict

    def row(self, mask: int) -> Row | None:
        for r in self.rows:
            if r.kind == "configuration" and r.mask == mask:
                return r
        return None

    def delta(self, mask: int, probe: str, against: str | None = None) -> float | None:
        """Score of configuration `mask` minus the score of donor `against` (default: the base)
        on `probe`, or None while either is unmeasured: the cells of a configurations x probes heatmap."""
        r = self.row(mask)
        against = against or self.base
        ceiling = next((x for x in self.rows if x.kind == "donor" and x.name == against), None)
        if r is None or ceiling is None or probe not in r.cells or probe not in ceiling.cells:
            return None
        return r.cells[probe].score - ceiling.cells[probe].score

    def donor_label(self, name: str) -> str:
        lab = self.labels.get(name)
        return f"{name} ({lab})" if lab and lab != name else name


def _cell(rec: dict, against: dict[str, dict], test: str) -> Cell:
    cell = Cell(rec["metric"], rec["n"], rec["score"], tuple(rec["ci"]))
    if not cell.accuracy:
        return cell
    for name, other in against.items():
        if other is None or other.get("ids") != rec.get("ids"):
            continue
        c = compare(rec["outcomes"], other["outcomes"])
        p = c[TESTS[test]]
        cell.vs[name] = {"delta": c["delta"], "mcnemar_p": c["mcnemar_p"], "z_p": c["z_p"], "p": p,
                         "stars": significance_stars(p)}
    return cell


def analyze(record: dict, probes: list[str] | None = None, *, test: str = "mcnemar",
            alpha: float = ALPHA) -> SweepAnalysis:
    """The tables and verdicts of a sweep record; works on an unfinished one (cells missing)."""
    from surgeon.probes import spec_from_json

    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}")
    groups = record_groups(record)
    names = [g.name for g in groups]
    labels = probes if probes is not None else [spec_from_json(p).label for p in record["probes"]]
    base, donor = record["base"], record["donor"]
    ceilings = {n: record["ceilings"].get(n, {}) for n in (base, donor)}
    metrics: dict[str, str] = {}
    for source in [*ceilings.values(), *(c["results"] for c in record["configurations"])]:
        for lab, rec in source.items():
            metrics.setdefault(lab, rec["metric"])

    def cells(results: dict) -> dict[str, Cell]:
        return {lab: _cell(results[lab], {n: ceilings[n].get(lab) for n in (base, donor)}, test)
                for lab in labels if lab in results}

    rows = [Row("donor", n, f"{_display(record, n)} ({'base' if n == base else 'donor'})", None, [], cells(ceilings[n]))
            for n in (base, donor)]
    entries = {c["mask"]: c for c in record["configurations"]}
    # Tiwari's row order (Table 2): single groups, then pairs, ..., each in group order.
    masks = sorted(gray_order(len(groups)),
                   key=lambda m: (bin(m).count("1"), [j for j in range(len(groups)) if m >> j & 1]))
    for mask in masks:
        if mask == 0:
            continue  # the empty configuration is the base's row
        entry = entries.get(mask)
        rows.append(Row("configuration", configuration_name(groups, mask), configuration_name(groups, mask), mask,
                        [g for j, g in enumerate(names) if mask >> j & 1], cells(entry["results"]) if entry else {}))
    by_mask = {0: rows[0].cells, **{r.mask: r.cells for r in rows if r.kind == "configuration"}}

    effects = []
    for lab in labels:
        base_cell = by_mask[0].get(lab)
        for j, g in enumerate(names):
            cell = by_mask.get(1 << j, {}).get(lab)
            if cell is None or base_cell is None:
                continue
            vs = cell.vs.get(base)
            p = vs["p"] if vs else None
            stars = significance_stars(p) if p is not None else ""
            effects.append(Effect(g, lab, cell.score - base_cell.score, p, stars))

    def _outcomes(mask: int, lab: str) -> list[float]:
        return ceilings[base][lab]["outcomes"] if mask == 0 else entries[mask]["results"][lab]["outcomes"]

    best, recs = {}, {}
    for lab in labels:
        measured = {m: c[lab] for m, c in by_mask.items() if lab in c}
        if len(measured) < 1 << len(groups):
            continue  # best and recommendation need every configuration
        sign = 1 if _metric(metrics, lab).higher_is_better else -1
        mask = max(measured, key=lambda m: (sign * measured[m].score, -bin(m).count("1"), -m))
        cell = measured[mask]
        vs = {n: {"delta": v["delta"], "p": v["p"], "stars": v["stars"]} for n, v in cell.vs.items()}
        beats = cell.accuracy and len(vs) == 2 and all(v["delta"] > 0 and v["p"] < alpha for v in vs.values())
        best[lab] = Best(lab, mask, configuration_name(groups, mask), cell.score, vs, beats,
                         _verdict(record, mask, cell, vs, alpha))
        choice, pvals = {}, {}
        for j, g in enumerate(names):
            taken = donor if mask >> j & 1 else base
            other = measured[mask ^ (1 << j)]
            p = None
            if cell.accuracy and other.accuracy:
                p = compare(_outcomes(mask, lab), _outcomes(mask ^ (1 << j), lab))[TESTS[test]]
            pvals[g] = p
            choice[g] = "either" if p is not None and p >= alpha else taken
        recs[lab] = Recommendation(lab, choice, pvals)
    complete = all(len(c) == len(labels) for c in by_mask.values()) and \
        all(lab in ceilings[n] for n in (base, donor) for lab in labels)
    return SweepAnalysis(base, donor, dict(record.get("labels", {})), names, labels, metrics, test, alpha, rows,
                         effects, best, recs, complete, record)


def _display(record: dict, name: str) -> str:
    lab = record.get("labels", {}).get(name)
    return f"{name}: {lab}" if lab and lab != name else name


def _verdict(record, mask, cell, vs, alpha) -> str:
    base, donor = record["base"], record["donor"]
    if mask == 0:
        return "the base itself: no transfer helps"
    if not cell.accuracy or len(vs) < 2:
        return "no significance test for this metric"
    above = [n for n, v in vs.items() if v["delta"] > 0 and v["p"] < alpha]
    below = [n for n, v in vs.items() if v["delta"] < 0 and v["p"] < alpha]
    if len(above) == 2:
        return "significantly beats both donors"
    if below:
        return "significantly below " + " and ".join(_display(record, n) for n in below)
    if above:
        other = donor if above == [base] else base
        return (f"beats {_display(record, above[0])}; no significant difference from "
                f"{_display(record, other)} (p={vs[other]['p']:.2g})")
    return "no significant difference from either donor"


# ---------------------------------------------------------------- formatting
def _fmt_score(cell: Cell) -> str:
    if cell.accuracy:
        return f"{100 * cell.score:.1f} ± {100 * (cell.ci[1] - cell.ci[0]) / 2:.1f}"
    return f"{cell.score:.3f} [{cell.ci[0]:.3f}, {cell.ci[1]:.3f}]"


def _marks(cell: Cell, alpha: float) -> str:
    out = []
    for name, v in cell.vs.items():
        if v["p"] < alpha and v["delta"] != 0:
            out.append(f"{'+' if v['delta'] > 0 else '-'}{name}{v['stars']}")
    return " ".join(out)


def cell_text(cell: Cell | None, alpha: float = ALPHA) -> str:
    """`79.5 ± 5.6 +A*** -B*`: score ± CI half-width, then significant differences from each donor."""
    if cell is None:
        return "…"
    marks = _marks(cell, alpha)
    return _fmt_score(cell) + (f" {marks}" if marks else "")


def _metric(metrics: dict[str, str], probe: str):
    return metric_of(metrics.get(probe, "accuracy"))  # an unmeasured probe reads as accuracy, as it used to


def _points(delta: float, metric: str) -> str:
    return metric_of(metric).delta_text(delta)


def effect_chart(a: SweepAnalysis, width: int = 20) -> str:
    """Figure 1 as text: per probe, each single-group transfer's change against the base, as a bar
    left (worse) or right (better) of the axis, in points for accuracy probes."""
    if not a.effects:
        return "(no single-group transfers measured yet)"
    # Proportions (accuracy) share one axis in points (as in Tiwari's Figure 1); any other metric
    # (perplexity) is drawn on its own scale, printed beside its name.
    def shared(p) -> bool:
        return _metric(a.metrics, p).proportion

    scales: dict[str, float] = {}
    for e in a.effects:
        key = "accuracy" if shared(e.probe) else e.probe
        scales[key] = max(scales.get(key, 0.0), abs(e.delta))
    pw = max(len(p) + (0 if shared(p) else 12) for p in a.probes)
    gw = max(len(g) for g in a.groups)
    acc = scales.get("accuracy") or 1.0
    head = f"{'':{pw}}  {'':{gw}}  {_points(-acc, 'accuracy'):<{width}}0{_points(acc, 'accuracy'):>{width}}"
    lines = [head.rstrip()]
    for p in a.probes:
        first = True
        key = "accuracy" if shared(p) else p
        scale = scales.get(key) or 1.0
        title = p if shared(p) else f"{p} (±{scale:.3g})"
        for e in (x for x in a.effects if x.probe == p):
            n = round(width * abs(e.delta) / scale)
            better = _metric(a.metrics, p).better(e.delta)
            left = ("█" * n if not better else "").rjust(width)
            right = ("█" * n if better else "").ljust(width)
            value = _points(e.delta, a.metrics.get(p, "accuracy")) + (f" {e.stars}" if e.stars else "")
            lines.append(f"{title if first else '':{pw}}  {e.group:<{gw}}  {left}│{right} {value}")
            first = False
    test = TEST_NAMES[a.test]
    unit = "points" if all(shared(p) for p in a.probes) else "points (accuracy) or score"
    lines.append(f"change against {_display(a.record, a.base)} (the base) in {unit}; left = worse; "
                 f"* p<0.05, ** p<0.01, *** p<0.001 ({test} against the base)")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def table_markdown(a: SweepAnalysis) -> str:
    """Table 2: one row per donor and configuration, one column per probe."""
    rows = [[r.label] + [cell_text(r.cells.get(p), a.alpha) for p in a.probes] for r in a.rows]
    return _md_table(["configuration"] + a.probes, rows)


def best_markdown(a: SweepAnalysis) -> str:
    rows = []
    for p in a.probes:
        b = a.best.get(p)
        if b is None:
            rows.append([p, "…", "…", "…"])
            continue
        metric = a.metrics.get(p, "accuracy")
        score = f"{100 * b.score:.1f}" if metric_of(metric).proportion else f"{b.score:.3f}"
        vs = ", ".join(f"{_points(v['delta'], metric)} vs {n} (p={v['p']:.2g})" for n, v in b.vs.items())
        rows.append([p, b.name, score + (f" ({vs})" if vs else ""), b.verdict])
    return _md_table(["probe", "best configuration", "score", "verdict"], rows)


def recommendation_markdown(a: SweepAnalysis) -> str:
    """Table 3: per probe, which donor each group should come from."""
    rows = []
    for p in a.probes:
        r = a.recommendations.get(p)
        if r is None:
            rows.append([p] + ["…"] * len(a.groups))
            continue
        rows.append([p] + [r.choice[g] if r.choice[g] == "either" else a.labels.get(r.choice[g], r.choice[g])
                           for g in a.groups])
    return _md_table(["probe"] + [f"{g} from" for g in a.groups], rows)


def to_markdown(a: SweepAnalysis) -> str:
    rec = a.record
    parts = [
        f"### Component transfer from {a.donor_label(a.donor)} into {a.donor_label(a.base)}",
        "",
        f"{len(a.groups)} groups ({', '.join(a.groups)}), {1 << len(a.groups)} configurations, "
        f"{rec['device']}, dtype {rec['dtype']}, batch {rec['batch_size']}"
        + ("" if a.complete else " — unfinished: … marks what is not measured yet") + ".",
        "",
        table_markdown(a),
        "",
        f"Accuracy (%) ± half the 95% bootstrap CI (10,000 resamples). `+A**` / `-B*`: significantly above / below "
        f"that donor ({TEST_NAMES[a.test]}; * p<0.05, ** p<0.01, *** p<0.001). The empty configuration is the base.",
        "",
        "Single-group transfers (Figure 1):",
        "",
        "```",
        effect_chart(a),
        "```",
        "",
        "Best configuration per probe:",
        "",
        best_markdown(a),
        "",
        f"Which donor each group should come from (the best configuration; \"either\" where flipping that group "
        f"changes the probe by no significant amount, p ≥ {a.alpha}):",
        "",
        recommendation_markdown(a),
    ]
    return "\n".join(parts) + "\n"


def to_rows(a: SweepAnalysis) -> list[dict]:
    """One flat dict per (row, probe): the CSV's lines."""
    out = []
    for r in a.rows:
        for p in a.probes:
            c = r.cells.get(p)
            if c is None:
                continue
            line = {"kind": r.kind, "configuration": r.name, "mask": "" if r.mask is None else r.mask,
                    "groups": " + ".join(r.groups), "probe": p, "metric": c.metric, "n": c.n, "score": c.score,
                    "ci_lo": c.ci[0], "ci_hi": c.ci[1]}
            for n in (a.base, a.donor):
                v = c.vs.get(n, {})
                line[f"delta_vs_{n}"] = v.get("delta", "")
                line[f"mcnemar_p_vs_{n}"] = v.get("mcnemar_p", "")
                line[f"z_p_vs_{n}"] = v.get("z_p", "")
            out.append(line)
    return out


def to_csv(a: SweepAnalysis) -> str:
    fields = ["kind", "configuration", "mask", "groups", "probe", "metric", "n", "score", "ci_lo", "ci_hi"]
    for n in (a.base, a.donor):
        fields += [f"delta_vs_{n}", f"mcnemar_p_vs_{n}", f"z_p_vs_{n}"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(to_rows(a))
    return buf.getvalue()


def _cell_json(c: Cell) -> dict:
    return {"metric": c.metric, "n": c.n, "score": c.score, "ci": list(c.ci),
            "vs": {n: {k: v[k] for k in ("delta", "mcnemar_p", "z_p")} for n, v in c.vs.items()}}


def to_json(a: SweepAnalysis) -> dict:
    rec = a.record
    order = {m: i for i, m in enumerate(gray_order(len(a.groups)))}
    configs = []
    base_row = a.rows[0]
    none = Row("configuration", "none", "none", 0, [], base_row.cells)  # the empty configuration is the base
    for r in [none] + [x for x in a.rows if x.kind == "configuration"]:
        entry = next((c for c in rec["configurations"] if c["mask"] == r.mask), None)
        configs.append({"name": r.name, "mask": r.mask, "visit": order[r.mask], "groups": r.groups,
                        "results": {p: _cell_json(c) for p, c in r.cells.items()},
                        "swap": entry.get("swap") if entry else None})
    return {
        "sweep": {"id": rec["id"], "base": a.base, "donor": a.donor, "labels": a.labels,
                  "fingerprints": rec.get("fingerprints", {}), "groups": rec["groups"], "probes": a.probes,
                  "device": rec["device"], "dtype": rec["dtype"], "batch_size": rec["batch_size"],
                  "test": a.test, "alpha": a.alpha, "complete": a.complete},
        "ceilings": {r.name: {p: _cell_json(c) for p, c in r.cells.items()} for r in a.rows if r.kind == "donor"},
        "configurations": configs,
        "effects": [{"group": e.group, "probe": e.probe, "delta": e.delta, "p": e.p} for e in a.effects],
        "best": {p: {"configuration": b.name, "mask": b.mask, "score": b.score,
                     "vs": {n: {"delta": v["delta"], "p": v["p"]} for n, v in b.vs.items()},
                     "beats_both_donors": b.beats_both, "verdict": b.verdict} for p, b in a.best.items()},
        "recommendation": {p: {"from": r.choice, "p_flip": r.p} for p, r in a.recommendations.items()},
    }

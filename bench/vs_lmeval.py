"""`python bench/probe.py --vs-lmeval`: moe-surgeon's probes against lm-evaluation-harness.

Both tools run as whole processes (imports, model load, data, scoring) on the same float32
checkpoint of SmolLM2-135M, the same items, batch size 8, on the CPU with torch's default thread
count. Each case reports wall time and the child's peak RSS for both, the metrics each computed,
and how many items got a different per-item outcome, read from the two per-item sample files.

Goals: lm-eval's time over ours at least 3.5x on ARC 0-shot, 5x on ARC 5-shot and 4x on GSM8K
(`Case.goal`); BoolQ within 1.3x of the arithmetic bound of its contexts (bench/cpu_linears.py); our
peak RSS at most lm-eval's; no item differing.

The items are bench/lmeval_items.py's, seeded and shaped like the real ARC-Challenge, BoolQ and
GSM8K in SmolLM2 tokens (`python bench/lmeval_items.py --stats` prints how close they are).

Our side runs either through the native readers (`mc:`/`em:` over the generated jsonl files) or
through the lm-eval bridge (`lmeval:` over the same task YAMLs lm-eval reads): --ours native|lmeval.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from lmeval_items import make_items
from lmeval_peer import (
    TASKS,
    Run,
    first_text,
    lmeval_command,
    metric_name,
    numbers,
    offline_env,
    read_lmeval_samples,
    run_measured,
    write_tasks,
)
from smollm2 import GET_IT, ensure_checkpoint

WORK = HERE / "_work"
BATCH = 8
FULL = {"arc": 300, "boolq": 300, "gsm8k": 50}  # the item files always hold at least this many


@dataclass(frozen=True)
class Case:
    name: str
    task: str  # arc | boolq | gsm8k
    shots: int
    kind: str  # our probe kind for the native reader: mc | em
    small: int  # items in a --small run: a k-shot prompt costs lm-eval K+1 times the tokens per choice
    goal: str  # lm-eval's time over ours that the case must reach, or where its goal is measured


CASES = [
    Case("arc-0shot", "arc", 0, "mc", 40, ">= 3.5x"),
    # BoolQ's goal is against the arithmetic bound of its contexts: python bench/cpu_linears.py
    Case("boolq-0shot", "boolq", 0, "mc", 16, "bound"),
    Case("arc-5shot", "arc", 5, "mc", 12, ">= 5x"),
    Case("gsm8k-0shot", "gsm8k", 0, "em", 8, ">= 4x"),
]


@dataclass
class Side:
    seconds: float
    peak_rss_mib: float
    returncode: int
    log: str
    load: float
    metrics: dict[str, float] = field(default_factory=dict)  # mean per metric
    n: int = 0
    error: str = ""


@dataclass
class Result:
    case: str
    n: int
    lmeval: Side
    ours: Side
    differing: dict[str, int] = field(default_factory=dict)  # metric -> items whose value differs
    any_differing: int | None = None
    max_ll_delta: float | None = None  # largest |loglik difference| of one choice (mc)
    text_differing: int | None = None  # generations that differ (em)
    unmatched: int = 0  # items only one side reported


# ---------------------------------------------------------------- our side
def our_probe(case: Case, n: int, files, task_yaml: Path, mode: str) -> str:
    if mode == "lmeval":
        return f"lmeval:{task_yaml},first={n},shots={case.shots}"
    spec = f"{case.kind}:{files.native},first={n}"
    if case.shots:
        spec += f",shots={case.shots},fewshot={files.fewshot_native}"
    if case.kind == "em":
        spec += ",max_new_tokens=256"
    return spec


def our_command(model: Path, probe: str, samples: Path) -> list[str]:
    return [sys.executable, "-m", "surgeon.cli.main", "probe", str(model), "--probe", probe,
            "--dtype", "float32", "--batch-size", str(BATCH), "--device", "cpu",
            "--samples", str(samples), "--json"]


_NOT_METRICS = {"doc_id", "outcome", "model", "probe", "target", "prompt", "cached"}


def read_our_samples(path: Path, primary: str) -> dict[int, dict]:
    """doc_id -> {"metrics", "lls", "text"}. Our --samples lines are laid out as lm-eval's (0-based
    doc_id, one line per filter naming it), so the doc ids are lm-eval's. A line without metric
    values counts its "outcome" as the probe's `primary` metric."""
    docs: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        if "doc_id" not in s:
            continue
        doc = docs.setdefault(int(s["doc_id"]), {"metrics": {}, "lls": [], "text": None})
        metrics = doc["metrics"]
        for key, value in s.items():
            if key in _NOT_METRICS or isinstance(value, (list, dict, str)) or value is None:
                continue
            name, _, filt = key.partition(",")
            metrics[metric_name(name, filt or s.get("filter", "none"))] = float(value)
        if not metrics and "outcome" in s:
            metrics[primary] = float(s["outcome"])
        doc["lls"] = doc["lls"] or numbers(s.get("filtered_resps") or [])
        doc["text"] = doc["text"] or first_text(s.get("resps"))
    return docs


# ---------------------------------------------------------------- comparing
def means(docs: dict[int, dict]) -> dict[str, float]:
    names = sorted({m for d in docs.values() for m in d["metrics"]})
    out = {}
    for m in names:
        values = [d["metrics"][m] for d in docs.values() if m in d["metrics"]]
        out[m] = sum(values) / len(values)
    return out


def compare(result: Result, theirs: dict[int, dict], ours: dict[int, dict], kind: str) -> None:
    both = sorted(set(theirs) & set(ours))
    result.unmatched = len(set(theirs) ^ set(ours))
    names = [{m for d in side.values() for m in d["metrics"]} for side in (theirs, ours)]
    common = sorted(names[0] & names[1])
    differ_any = set()
    for m in common:
        bad = [i for i in both if theirs[i]["metrics"].get(m) != ours[i]["metrics"].get(m)]
        result.differing[m] = len(bad)
        differ_any.update(bad)
    result.any_differing = len(differ_any) if common else None
    if kind == "mc":
        deltas = [abs(a - b) for i in both if len(theirs[i]["lls"]) == len(ours[i]["lls"])
                  for a, b in zip(theirs[i]["lls"], ours[i]["lls"])]
        result.max_ll_delta = max(deltas) if deltas else None
    else:
        texts = [i for i in both if theirs[i]["text"] is not None and ours[i]["text"] is not None]
        result.text_differing = sum(theirs[i]["text"] != ours[i]["text"] for i in texts) if texts else None


def side(run: Run) -> Side:
    return Side(run.seconds, run.peak_rss_mib, run.returncode, str(run.log), run.load)


def run_case(case: Case, n: int, model: Path, files, tasks: dict[str, Path], mode: str, out: Path) -> Result:
    env = offline_env(WORK)
    folder = out / case.name
    shutil.rmtree(folder, ignore_errors=True)
    task_name = TASKS[case.task][0]
    print(f"[{case.name}] lm-eval, {n} items ...", file=sys.stderr, flush=True)
    lm_run = run_measured(lmeval_command(model, task_name, tasks[case.task].parent, case.shots, n, folder / "lmeval"),
                          folder / "lmeval.log", env, REPO)
    print(f"[{case.name}] moe-surgeon ({mode}), {n} items ...", file=sys.stderr, flush=True)
    samples = folder / "ours-samples.jsonl"
    our_run = run_measured(our_command(model, our_probe(case, n, files[case.task], tasks[case.task], mode), samples),
                           folder / "ours.log", env, REPO)
    result = Result(case.name, n, side(lm_run), side(our_run))
    primary = "acc" if case.kind == "mc" else "flexible-extract"
    theirs = ours = None
    try:
        theirs = read_lmeval_samples(folder / "lmeval") if lm_run.returncode == 0 else None
        if theirs is None:
            result.lmeval.error = f"exit {lm_run.returncode}: {_last_line(lm_run.log)}"
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        result.lmeval.error = f"unreadable samples: {e}"
    try:
        if our_run.returncode == 0:
            ours = read_our_samples(samples, primary)
        else:
            result.ours.error = f"exit {our_run.returncode}: {_last_line(our_run.log)}"
    except (OSError, ValueError, KeyError) as e:
        result.ours.error = f"unreadable samples: {e}"
    for docs, s in ((theirs, result.lmeval), (ours, result.ours)):
        if docs:
            s.metrics, s.n = means(docs), len(docs)
    if theirs and ours:
        compare(result, theirs, ours, case.kind)
    return result


def _last_line(log: Path) -> str:
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:160] if lines else "(empty log)"


# ---------------------------------------------------------------- the table
def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.1f}" for k, v in metrics.items()) or "-"


def print_table(results: list[Result], mode: str) -> None:
    print(f"\nmoe-surgeon ({mode}) vs lm-eval 0.4.13, SmolLM2-135M float32, batch {BATCH}, CPU, "
          f"{os.cpu_count()} cores, torch default threads")
    head = (f"{'case':<12} {'n':>4} {'lm-eval s':>10} {'ours s':>8} {'speedup':>8} {'goal':>8} {'lm-eval MiB':>12} "
            f"{'ours MiB':>9} {'RSS ours/lm':>12}  {'differing items':<44} {'max|dLL|':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        speed = r.lmeval.seconds / r.ours.seconds if r.ours.seconds else float("nan")
        rss = r.ours.peak_rss_mib / r.lmeval.peak_rss_mib if r.lmeval.peak_rss_mib else float("nan")
        if r.any_differing is None:
            differ = "n/a"
        else:
            differ = f"{r.any_differing} (" + ", ".join(f"{k} {v}" for k, v in r.differing.items()) + ")"
            if r.text_differing is not None:
                differ += f" text {r.text_differing}"
            if r.unmatched:
                differ += f" unmatched {r.unmatched}"
        ll = f"{r.max_ll_delta:.2e}" if r.max_ll_delta is not None else "-"
        goal = next((c.goal for c in CASES if c.name == r.case), "")
        print(f"{r.case:<12} {r.n:>4} {r.lmeval.seconds:>10.1f} {r.ours.seconds:>8.1f} {speed:>7.2f}x {goal:>8} "
              f"{r.lmeval.peak_rss_mib:>12.0f} {r.ours.peak_rss_mib:>9.0f} {rss:>11.2f}x  {differ:<44} {ll:>9}")
    print("\nmetrics (percent; lm-eval | moe-surgeon)")
    for r in results:
        print(f"  {r.case:<12} {_metrics_text(r.lmeval.metrics):<42} | {_metrics_text(r.ours.metrics)}"
              f"   (load avg at end: {r.lmeval.load:.1f} | {r.ours.load:.1f})")
        for who, s in (("lm-eval", r.lmeval), ("moe-surgeon", r.ours)):
            if s.error:
                print(f"  {'':<12} {who} failed: {s.error}  (log: {s.log})")
    print("goals: the speed-up in the goal column (BoolQ: within 1.3x of the arithmetic bound, which "
          "python bench/cpu_linears.py prints), RSS ours/lm <= 1.00x, 0 differing items")


# ---------------------------------------------------------------- entry
def items_for(case: Case, args) -> int:
    """A case's item count: --TASK N if given, else its full or --small count times --items-scale."""
    given = getattr(args, f"n_{case.task}")
    if given:
        return given
    return max(1, round((case.small if args.small else FULL[case.task]) * args.items_scale))


def main(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(f"lm-eval is not installed; get it with:\n    {GET_IT}", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    model = ensure_checkpoint(WORK / "smollm2-135m")
    counts = {c.name: items_for(c, args) for c in CASES}
    full = {t: max([FULL[t]] + [n for c, n in zip(CASES, counts.values()) if c.task == t]) for t in FULL}
    files = make_items(WORK, full)
    tasks = write_tasks(WORK / "tasks", files)
    _warm_page_cache(model)
    cases = [c for c in CASES if not args.case or c.name in args.case]
    out = WORK / "vs_lmeval" / ("small" if args.small else "full") / args.ours
    results = []
    for case in cases:
        results.append(run_case(case, counts[case.name], model, files, tasks, args.ours, out))
        if args.verbose:
            print_table(results, args.ours)
    print_table(results, args.ours)
    report = out / "results.json"
    report.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"per-run logs and samples under {out}; results in {report}")
    return 0


def _warm_page_cache(model: Path) -> None:
    """Read the weights once so that neither tool's first run pays the disk."""
    for f in model.glob("*.safetensors"):
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass


def add_arguments(ap) -> None:
    ap.add_argument("--vs-lmeval", action="store_true",
                    help="compare with lm-evaluation-harness (see bench/vs_lmeval.py)")
    ap.add_argument("--case", action="append", choices=[c.name for c in CASES], help="run only this case (repeatable)")
    ap.add_argument("--ours", choices=("native", "lmeval"), default="native",
                    help="our side through the native readers (mc:/em:) or the lmeval: bridge")
    ap.add_argument("--items-scale", type=float, default=1.0, help="multiply every case's item count")
    for task in FULL:
        ap.add_argument(f"--{task}", dest=f"n_{task}", type=int, metavar="N",
                        help=f"{task} items (the first N of the file)")
    ap.add_argument("--verbose", action="store_true", help="print the table after every case")

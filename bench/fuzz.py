"""Benchmark (not a test): the long fuzzing profile of tests/test_fuzz.py.

Runs every target there with Hypothesis for --cases generated inputs each (goal: 10,000 per
target, 0 failures) and prints, per target, the cases tried, the failures and the time; then the
first failures of each target. A failure is any exception other than SurgeonError with a message,
a changed input file, or a header we accept that the safetensors library refuses.
`session_deep` is the session target with JSON nested past Python's recursion limit. `recipe` feeds
mergekit YAML to `recipe import`; `manifest` runs `verify [--donors]` on a copy of a real export
with a fuzzed manifest, and a pass for a manifest whose claims are false is a failure too.

Run: python bench/fuzz.py [--cases 10000] [--targets header,config,...] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from test_fuzz import TARGETS, build_workspace, session_bytes, session_target  # noqa: E402

ALL = {**TARGETS, "session_deep": (lambda ws: session_bytes(ws, deep=True), session_target)}


def fuzz(ws, name: str, cases: int, rng_seed: int) -> tuple[int, list[tuple[str, str]], float]:
    strategy, target = ALL[name]
    tried, failures = 0, []

    def one(value):
        nonlocal tried
        tried += 1
        try:
            target(ws, value)
        except Exception as e:  # noqa: BLE001 - anything escaping a target is a finding
            failures.append((repr(value)[:160], f"{type(e).__name__}: {' '.join(str(e).split())}"[:240]))

    run = settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                   suppress_health_check=list(HealthCheck))(given(strategy(ws))(one))
    start = time.perf_counter()
    seed(rng_seed)(run)()
    return tried, failures, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--targets", default=",".join(ALL))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = args.targets.split(",")
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown target {unknown[0]} (known: {', '.join(ALL)})")
    with tempfile.TemporaryDirectory(prefix="moe-fuzz-") as tmp:
        os.environ["MOE_SURGEON_CACHE"] = str(Path(tmp) / "cache")  # verify records hashes: not in the user's cache
        ws = build_workspace(Path(tmp))
        results = {}
        print(f"{'target':<14}{'cases':>8}{'failures':>10}{'seconds':>10}")
        for name in names:
            results[name] = fuzz(ws, name, args.cases, args.seed)
            tried, failures, seconds = results[name]
            print(f"{name:<14}{tried:>8}{len(failures):>10}{seconds:>10.1f}", flush=True)
    for name, (_, failures, _) in results.items():
        kinds = {}
        for value, error in failures:
            kinds.setdefault(error.split(":")[0] + ": " + error.split(":", 1)[-1][:60], value)
        for error, value in list(kinds.items())[:5]:
            print(f"\n{name}: {error}\n  e.g. {value}")
    return 1 if any(f for _, f, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

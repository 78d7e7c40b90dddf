"""Benchmark: the demo probe on an idle machine and beside a competing busy process.

Runs `moe-surgeon probe demo:arith --probe em:arith` (200 items) as a whole process, with the
threads as the entry point now sets them ("now": OMP_WAIT_POLICY=PASSIVE, surgeon/live/threads.py)
and as torch left them before ("before": its own thread count and GNU OpenMP's default spin of
300,000 iterations, given as OMP_NUM_THREADS and GOMP_SPINCOUNT, which the entry point leaves alone
as a user's choice), and now with one thread (the other choice the entry point could make). Each
runs idle, beside a torch process doing small matmuls with torch's default
threads (what an lm-eval run on the same machine is), and beside one `while True: pass` per core.
Repeats are interleaved, so a busy spell of the machine hits every case alike.

Prints, per case, the probe's own time (model loaded to last item) and the whole process, best and
median, and the ratio of loaded to idle medians.              goal: <= 2.5x on 2 cores (fair share)
Run: python bench/load.py [--repeat 3] [--probe em:arith] [--target demo:arith] [--configs now]
The issue's ARC case: python bench/load.py --configs now --repeat 2 --target bench/_work/smollm2-135m \
    --probe mc:bench/_work/items/arc.jsonl,first=100   (python bench/vs_lmeval.py made both)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from startup import run_timed  # noqa: E402

SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TORCH_LOAD = """
import torch
a, b = torch.randn(64, 512), torch.randn(512, 512)
while True:
    a @ b
"""


def torch_default_threads(env: dict) -> int:
    return int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                              capture_output=True, text=True, check=True).stdout)


def start_load(kind: str, clean: dict) -> list[subprocess.Popen]:
    if kind == "idle":
        return []
    if kind == "torch":
        procs = [subprocess.Popen([sys.executable, "-c", TORCH_LOAD], env=clean)]
    else:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    time.sleep(2.0)  # the competitor past its own start-up
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--target", default="demo:arith")
    ap.add_argument("--probe", default="em:arith")
    ap.add_argument("--configs", default="before,now,one-thread",
                    help="which thread settings to run, comma-separated (before, now, one-thread); "
                         "e.g. `now` alone for a long probe such as the ARC case")
    args = ap.parse_args()
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    threads = torch_default_threads(clean)
    configs = {"before": {**clean, "OMP_NUM_THREADS": str(threads), "GOMP_SPINCOUNT": "300000"}, "now": clean,
               # the other choice the entry point could make: why it keeps torch's thread count
               "now, 1 thread": {**clean, "OMP_NUM_THREADS": "1"}}
    names = {"before": "before", "now": "now", "one-thread": "now, 1 thread"}
    wanted = [w.strip() for w in args.configs.split(",")]
    if not wanted or any(w not in names for w in wanted):
        raise SystemExit(f"--configs {args.configs!r}: a comma-separated list of {', '.join(names)}")
    configs = {names[w]: configs[names[w]] for w in wanted}
    loads = ("idle", "torch", "spin")
    runs = {(c, ld): [] for c in configs for ld in loads}
    argv = ["probe", args.target, "--probe", args.probe]
    for _ in range(args.repeat):
        for ld in loads:
            procs = start_load(ld, clean)
            try:
                for c, env in configs.items():
                    runs[c, ld].append(run_timed(argv, env))
            finally:
                stop(procs)
    print(f"moe-surgeon {' '.join(argv)}: {os.cpu_count()} cores, torch's default {threads} threads; "
          f"{args.repeat} interleaved runs each; seconds, best / median")
    print("  loads: idle; torch = one process of small matmuls on torch's default threads; "
          f"spin = {os.cpu_count()} x `while True: pass`")
    for part in ("probe", "whole"):
        print(f"  {part}:")
        for c in configs:
            idle = statistics.median(r[part] for r in runs[c, "idle"])
            cells = []
            for ld in loads:
                values = [r[part] for r in runs[c, ld]]
                med = statistics.median(values)
                ratio = "" if ld == "idle" else f" ({med / idle:.2f}x)"
                cells.append(f"{ld} {min(values):6.2f} / {med:6.2f}{ratio}")
            print(f"    {c:<14}" + "   ".join(cells))
    print("  (x): loaded median over idle median; goal <= 2.5x on 2 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: inspect and export of an OLMoE-shaped pair (16 layers x 64 experts, ~1.3 GB bf16).

Each figure is a whole process measured in this one run:
  (a) `moe-surgeon inspect` wall time                      goal < 0.3 s
  (b) export wall time as a ratio to `cp -r` of one donor   goal <= 2x
  (c) export peak RSS                                       goal <= 256 MB
  (d) the naive way (transformers loads both models, copies the state dict, save_pretrained)
      as a ratio to the export.
Run: python bench/export.py [--work DIR] [--small] [--skip-naive]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import dir_bytes  # noqa: E402

TRANSFER = ["--take", "experts=B", "--take", "attention@0-3=B"]

NAIVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
a, b, out = sys.argv[1:4]
ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)
mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16)
sa, sb = ma.state_dict(), mb.state_dict()
for k in sa:
    layer = int(k.split(".")[2]) if k.startswith("model.layers.") else -1
    if ".mlp.experts." in k or (".self_attn." in k and 0 <= layer <= 3):
        sa[k].copy_(sb[k])
ma.save_pretrained(out)
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    ap.add_argument("--small", action="store_true", help="a 4-layer model, for a quick check")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-surgeon-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        a, b = work / "A", work / "B"
        for seed, p in ((0, a), (1, b)):
            if not (p / "config.json").exists():
                # In a child process: a forked child's peak RSS starts from its parent's, so the
                # parent must stay small for the RSS figures below to mean anything.
                small = ["--small"] if args.small else []
                subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic.py"), str(p), str(seed), *small],
                               check=True)
        size = dir_bytes(a)
        exe = [sys.executable, "-m", "surgeon.cli"]
        print(f"donor: {size / 1e9:.2f} GB, {sum(1 for _ in open(a / 'model.safetensors.index.json'))} index lines")

        inspect = min(timed(exe + ["inspect", str(a)])[0] for _ in range(3))
        shutil.rmtree(work / "cp", ignore_errors=True)
        cp, _ = timed(["cp", "-r", str(a), str(work / "cp")])
        shutil.rmtree(work / "cp")
        shutil.rmtree(work / "out", ignore_errors=True)
        take = [t.replace("=B", f"={b}") for t in TRANSFER]
        export, rss = timed(exe + ["export", str(work / "out"), "--base", str(a), *take])
        shutil.rmtree(work / "out")
        durable, _ = timed(exe + ["export", str(work / "out"), "--base", str(a), *take, "--fsync"])
        print(f"(a) inspect wall time        {inspect:8.3f} s    goal < 0.3 s")
        print(f"(b) export / cp -r           {export / cp:8.2f} x    ({export:.2f} s vs {cp:.2f} s; goal <= 2x)")
        print(f"    with --fsync / cp -r     {durable / cp:8.2f} x    ({durable:.2f} s: waits for the disk, cp does not)")
        print(f"(c) export peak RSS          {rss:8.1f} MB   goal <= 256 MB")
        if not args.skip_naive:
            shutil.rmtree(work / "naive", ignore_errors=True)
            naive, naive_rss = timed([sys.executable, "-c", NAIVE, str(a), str(b), str(work / "naive")])
            print(f"(d) naive / export           {naive / export:8.1f} x    ({naive:.2f} s, {naive_rss:.0f} MB peak RSS)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

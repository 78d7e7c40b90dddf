"""Benchmark: inspect and export of an OLMoE-shaped pair (16 layers x 64 experts, ~1.3 GB bf16).

Each figure is a whole process measured in this one run:
  (a) `moe-surgeon inspect` wall time                      goal < 0.3 s
  (b) export wall time as a ratio to `cp -r` of one donor   goal <= 2x (the same bytes, hashed too)
  (c) export peak RSS                                       goal <= 64 MB at any size
  (d) the naive way (transformers loads both models, copies the state dict, save_pretrained)
      as a ratio to the export.
  (e) one donor shard from the page cache: the export's copy (read, hash for the manifest, write,
      through one buffer) as a ratio to copy_file_range, which copies without hashing.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    """Wall seconds and peak RSS (MB) of one child process.

    The peak comes from /usr/bin/time where there is one: a child forked from this Python process
    starts its peak RSS at this process's (numpy is imported here), which would hide a small one."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        time_cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name] if os.path.exists("/usr/bin/time") else []
        t0 = time.perf_counter()
        p = subprocess.Popen(time_cmd + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr.read().decode()}")
        kb = int(rss_file.read().split()[-1]) if time_cmd else usage.ru_maxrss
    return wall, kb / 1024


def copy_speeds(donor: Path, scratch: Path, rounds: int = 5) -> tuple[float, float, int]:
    """Seconds for copy_file_range and for the export's hashing copy of the donor's largest shard
    (best of `rounds` each, alternating, page cache warm, dirty pages written out before each), and
    its size. Run in this process after the timed children: it imports the engine."""
    from surgeon.io.manifest import tensor_hasher
    from surgeon.io.shards import COPY_BUFFER, HashingSink

    shard = max(donor.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    buffer = bytearray(COPY_BUFFER)
    src = os.open(shard, os.O_RDONLY)

    def copy(kernel: bool) -> float:
        scratch.unlink(missing_ok=True)
        os.sync()  # a copy must not pay for writing out the one before
        dst = os.open(scratch, os.O_WRONLY | os.O_CREAT, 0o644)
        t0 = time.perf_counter()
        try:
            if kernel:
                done = 0
                while done < size:
                    done += os.copy_file_range(src, dst, size - done, done)
            else:
                sink = HashingSink(dst, buffer)
                sink.tensor = tensor_hasher()
                sink.copy(src, 0, size, str(shard))
            return time.perf_counter() - t0
        finally:
            os.close(dst)

    try:
        subprocess.run(["cat", str(shard)], stdout=subprocess.DEVNULL, check=True)
        times = [(copy(True), copy(False)) for _ in range(rounds)]
    finally:
        os.close(src)
        scratch.unlink(missing_ok=True)
    return min(k for k, _ in times), min(h for _, h in times), size


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
        print(f"(c) export peak RSS          {rss:8.1f} MB   goal <= 64 MB")
        if not args.skip_naive:
            shutil.rmtree(work / "naive", ignore_errors=True)
            naive, naive_rss = timed([sys.executable, "-c", NAIVE, str(a), str(b), str(work / "naive")])
            print(f"(d) naive / export           {naive / export:8.1f} x    ({naive:.2f} s, {naive_rss:.0f} MB peak RSS)")
        kernel, hashing, shard = copy_speeds(a, work / "copy-scratch")
        print(f"(e) hashing copy / kernel    {hashing / kernel:8.2f} x    ({shard / hashing / 1e9:.2f} GB/s vs "
              f"{shard / kernel / 1e9:.2f} GB/s copy_file_range, one {shard / 1e9:.2f} GB shard in page cache)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: inspect and export of an OLMoE-shaped pair (16 layers x 64 experts, ~1.4 GB bf16).

Each figure is a whole process. The exports and `cp -r` run in pairs, --repeats times, the order
flipped every round and the dirty pages of earlier runs written out (sync) before every run, so
none pays for another's flush. A ratio is one round's export over that round's `cp -r`; each line
gives min / median / max over the rounds.
  (a) `moe-surgeon inspect` wall time                      goal < 0.3 s
  (b) export wall time as a ratio to `cp -r` of one donor   goal <= 1.2x (the same bytes, hashed too)
  (c) export peak RSS                                       goal <= 64 MB at any size
  (d) the naive way (transformers loads both models, copies the state dict, save_pretrained)
      as a ratio to the export.
  (e) one donor shard from the page cache into a new file, in this process: the export's copy
      (read, hash for the manifest, write, through page-aligned buffers, a thread writing each piece
      while the next is read) in 256 KiB and in 1 MiB pieces, and in 256 KiB pieces with each write
      before the next read, against copy_file_range, which copies without hashing: seconds and
      system time.
  (f) the kernel's copy of 256 MiB from the page cache into a buffer where each byte lands 0, 8 or
      16 bytes ahead of its offset within a page in the file (surgeon/io/aligned.py): system time.
  (g) the rounds of (b) again beside --beside N processes that each spin on a core: the export's
      median over its idle median (the goal for a busy machine: at most 2.5x on 2 cores).
--donors A B takes an existing pair (e.g. the 0.94 GB one `bench/scale.py --scale 0.25` makes).
Run: python bench/export.py [--work DIR] [--donors A B] [--repeats N] [--small] [--skip-naive] [--beside N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from copy_timing import as_installed, paired, ratios, read_back, spread  # noqa: E402
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


def system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def copy_speeds(donor: Path, scratch: Path, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(seconds, system seconds) of each way to copy the donor's largest shard into a new file, page
    cache warm, the ways interleaved, dirty pages written out before each. In this process after the
    timed children: it imports the engine."""
    from surgeon.io.manifest import tensor_hasher
    from surgeon.io.ordered_writes import copy_buffers
    from surgeon.io.shards import COPY_BUFFER, HashingSink

    shard = max(donor.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    src = os.open(shard, os.O_RDONLY)

    def kernel(dst: int) -> None:
        done = 0
        while done < size:
            done += os.copy_file_range(src, dst, size - done, done)

    def hashing(piece: int, cores: int):
        def run(dst: int) -> None:
            sink = HashingSink(dst, copy_buffers(piece, cores))
            try:
                sink.tensor = tensor_hasher()
                sink.copy(src, 0, size, str(shard))
                sink.finish()
            finally:
                sink.close()
        return run

    ways = {"copy_file_range": kernel,
            f"export's copy, {COPY_BUFFER >> 10} KiB": hashing(COPY_BUFFER, 2),
            "  the same, writes in turn": hashing(COPY_BUFFER, 1),
            "export's copy, 1 MiB": hashing(1 << 20, 2)}
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        subprocess.run(["cat", str(shard)], stdout=subprocess.DEVNULL, check=True)
        for _ in range(rounds):
            for name, way in ways.items():
                scratch.unlink(missing_ok=True)
                os.sync()
                dst = os.open(scratch, os.O_WRONLY | os.O_CREAT, 0o644)
                t0, s0 = time.perf_counter(), system_seconds()
                try:
                    way(dst)
                    out[name].append((time.perf_counter() - t0, system_seconds() - s0))
                finally:
                    os.close(dst)
    finally:
        os.close(src)
        scratch.unlink(missing_ok=True)
    return out


def page_offset_costs(donor: Path, rounds: int = 3) -> dict[int, float]:
    """System seconds (best of `rounds`) to read 256 MiB of the donor's largest shard from the page
    cache into a page-aligned buffer with every byte `ahead` bytes past its offset within a page in
    the file."""
    from surgeon.io.aligned import PAGE, aligned_buffer

    shard = max(donor.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    total = min(256 << 20, shard.stat().st_size // (1 << 20) * (1 << 20))
    piece = 1 << 20
    buf = aligned_buffer(piece + PAGE)
    fd = os.open(shard, os.O_RDONLY)
    out = {}
    try:
        for ahead in (0, 8, 16):
            best = float("inf")
            for _ in range(rounds):
                s0 = system_seconds()
                for at in range(0, total, piece):
                    os.preadv(fd, [buf[ahead:ahead + piece]], at)
                best = min(best, system_seconds() - s0)
            out[ahead] = best
    finally:
        os.close(fd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    ap.add_argument("--donors", nargs=2, metavar=("A", "B"), help="an existing pair (default: made in --work)")
    ap.add_argument("--repeats", type=int, default=3, help="paired rounds of cp -r and the exports (default 3)")
    ap.add_argument("--small", action="store_true", help="a 4-layer model, for a quick check")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--beside", type=int, default=1, metavar="N",
                    help="line (g): the rounds again beside N processes spinning on a core each (default 1; 0 skips)")
    args = ap.parse_args()
    as_installed()
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-surgeon-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.donors:
            a, b = (Path(p).resolve() for p in args.donors)
        else:
            a, b = work / "A", work / "B"
            for seed, p in ((0, a), (1, b)):
                if not (p / "config.json").exists():
                    # In a child process: a forked child's peak RSS starts from its parent's, so the
                    # parent must stay small for the RSS figures below to mean anything.
                    small = ["--small"] if args.small else []
                    subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic.py"), str(p), str(seed),
                                    *small], check=True)
        size = dir_bytes(a)
        read_back([a, b])  # in the page cache as a read leaves them, as a user's donors are
        exe = [sys.executable, "-m", "surgeon.cli"]
        print(f"donor: {size / 1e9:.2f} GB ({size / 2**20:.0f} MiB); {args.repeats} paired rounds, synced before each run")

        inspect = min(timed(exe + ["inspect", str(a)])[0] for _ in range(3))
        take = [t.replace("=B", f"={b}") for t in TRANSFER]
        peaks = []

        def run(cmd: list[str], out: Path, rss: list | None = None):
            def once() -> float:
                shutil.rmtree(out, ignore_errors=True)
                wall, peak = timed(cmd)
                if rss is not None:
                    rss.append(peak)
                shutil.rmtree(out)
                return wall
            return once

        copy = run(["cp", "-r", str(a), str(work / "cp")], work / "cp")
        export = run(exe + ["export", str(work / "out"), "--base", str(a), *take], work / "out", peaks)
        cp, exports = paired(copy, {
            "export": export,
            "fsync": run(exe + ["export", str(work / "out"), "--base", str(a), *take, "--fsync"], work / "out"),
        }, args.repeats)
        print(f"(a) inspect wall time        {inspect:8.3f} s    goal < 0.3 s")
        print(f"(b) export / cp -r           {spread(ratios(exports['export'], cp))} x   (export "
              f"{spread(exports['export'])} s, cp -r {spread(cp)} s; goal <= 1.2x median)")
        print(f"    with --fsync / cp -r     {spread(ratios(exports['fsync'], cp))} x   (waits for the disk, cp does not)")
        print(f"(c) export peak RSS          {max(peaks):8.1f} MB   goal <= 64 MB")
        if not args.skip_naive:
            shutil.rmtree(work / "naive", ignore_errors=True)
            os.sync()
            naive, naive_rss = timed([sys.executable, "-c", NAIVE, str(a), str(b), str(work / "naive")])
            shutil.rmtree(work / "naive")
            export = sorted(exports["export"])[len(exports["export"]) // 2]
            print(f"(d) naive / export           {naive / export:8.1f} x    ({naive:.2f} s, {naive_rss:.0f} MB peak RSS)")
        shard_bytes = max(p.stat().st_size for p in a.glob("*.safetensors"))
        print(f"(e) one {shard_bytes / 1e9:.2f} GB shard from the page cache into a new file, {max(3, args.repeats)} rounds:")
        for name, runs in copy_speeds(a, work / "copy-scratch", max(3, args.repeats)).items():
            print(f"    {name:28s} {spread([t for t, _ in runs], '{:.3f}')} s, system {spread([s for _, s in runs], '{:.3f}')} s")
        costs = page_offset_costs(a)
        print("(f) 256 MiB read into a buffer, each byte N bytes ahead of its offset in a page: "
              + ", ".join(f"N={n}: {s:.3f} s" for n, s in costs.items()) + " of system time (best of 3)")
        if args.beside:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.beside)]
            try:
                busy_cp, busy = paired(copy, {"export": export}, args.repeats)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
            slower = median(busy["export"]) / median(exports["export"])
            print(f"(g) beside {args.beside} spinning process(es): export {spread(busy['export'])} s, "
                  f"{slower:.2f}x its median above (goal <= 2.5x); over cp -r beside them "
                  f"{spread(ratios(busy['export'], busy_cp))} x")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

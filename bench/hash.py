"""Benchmark: full content hashes (surgeon/io/content_hash.py) against reading the same bytes.

For each size, on a warm page cache, in this one run:
  (a) `cat FILE > /dev/null` wall time (a whole process, best of 3)
  (b) hashing the file with the cache bypassed (best of 3), as a ratio to (a)   goal <= 1.5x
  (c) a cache hit: the file unchanged since it was hashed (mean of 200)         a stat, not a read
  (d) for reference, SHA-256 over the same bytes, as a ratio to (a)
Run: python bench/hash.py [--sizes 64MB,512MB,2GB] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from surgeon.io.content_hash import hash_file  # noqa: E402
from surgeon.io.sizes import human_bytes, parse_size  # noqa: E402


def best(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sha256(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64MB,512MB,2GB")
    ap.add_argument("--work", help="directory for the test files (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-surgeon-hash-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MOE_SURGEON_CACHE"] = str(work / "cache")
    print(f"{'size':>9} {'cat':>8} {'hash':>8} {'ratio':>6} {'GB/s':>6} {'cache hit':>10} {'sha256':>7}")
    worst = 0.0
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        path = work / f"file-{size}"
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        cat = best(lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True))
        full = best(lambda: hash_file(path, use_cache=False))
        hash_file(path)  # fill the cache
        t0 = time.perf_counter()
        for _ in range(200):
            hash_file(path)
        hit = (time.perf_counter() - t0) / 200
        sha = best(lambda: sha256(path), n=1)
        worst = max(worst, full / cat)
        print(f"{human_bytes(size):>9} {cat:7.3f}s {full:7.3f}s {full / cat:5.2f}x {size / full / 1e9:6.2f} "
              f"{hit * 1e3:8.3f}ms {sha / cat:6.2f}x")
        path.unlink()
    print(f"worst hash / read ratio: {worst:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

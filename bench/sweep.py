"""Benchmark: what a component-transfer sweep spends on surgery, against reloading per configuration.

Runs the 8-configuration sweep (router / attention / experts from the donor, both donors as
ceilings, a fresh score cache so the ceilings are measured too) and reports
  (a) the share of the sweep's wall time spent in surgery (every hot-swap,
      the two whole-model swaps for the donor ceiling included)                 goal <= 5%
  (b) a baseline that materialises a fresh hybrid (Hybrid.materialize) for each of the 9 models
      (8 configurations + the donor) and runs the same probes: wall-time ratio baseline / sweep,
      and reload time against hot-swap time. The baseline's per-item outcomes must equal the
      sweep's, so the comparison is between two ways of computing the same table.
With --workers N it measures the distributed sweep instead (surgeon/features/sweep/distributed.py):
  (c) the same sweep serially and on a local Ray cluster of N workers (each measuring its ceilings
      too, from an empty score cache): wall times, Ray's start-up (the cluster; the workers:
      process, torch import, donors, materialising), and the speed-up; per-item outcomes must agree
  (d) Ray's overhead per configuration: each worker's time from ready to its last result, less the
      time its own clock spent measuring (swaps and probes), over the units it measured: what
      shipping units and results and the driver's bookkeeping add
Donors: --donors demo (the built-in demo donors, 1 MB each) or --donors synthetic (OLMoE-shaped,
16 layers x 64 experts, the real tensor count, about 1 GB bf16 each, random weights, the demo
character tokenizer copied in; multiple-choice probes only, as random weights never stop generating).
Run: python bench/sweep.py [--donors demo|synthetic] [--device cuda] [--limit N] [--workers N]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prepare_donors(kind: str, work: Path) -> tuple[dict, list[str]]:
    from surgeon.core.donor import DEMO_ROOT, open_donor

    if kind == "demo":
        return {"A": open_donor("demo:arith"), "B": open_donor("demo:reverse")}, ["em:arith", "em:reverse", "mc:reverse_mc"]
    for seed, name in ((0, "A"), (1, "B")):
        subprocess.run([sys.executable, str(ROOT / "synthetic.py"), str(work / name), str(seed)], check=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO_ROOT / "base" / f, work / name / f)
    return {n: open_donor(work / n) for n in "AB"}, ["mc:arith_mc", "mc:reverse_mc"]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--donors", choices=["demo", "synthetic"], default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=100, help="items per probe (default 100)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, help="compare the serial sweep with N local Ray workers")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moe-surgeon-sweep-bench-"))
    os.environ["MOE_SURGEON_CACHE"] = str(work / "cache")  # measure the ceilings, do not read old scores
    try:
        (run_ray if args.workers else run)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    from surgeon.core.plan import Plan
    from surgeon.features.sweep.runner import SweepSpec, default_groups, run_sweep
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes import parse_probe
    from surgeon.probes.run import evaluate, load_probe_data
    from surgeon.probes.scoring import load_tokenizer

    donors, probes = prepare_donors(args.donors, work)
    specs = [parse_probe(f"{p},limit={args.limit}") for p in probes]
    spec = SweepSpec("A", "B", default_groups(), specs, device=args.device, batch_size=args.batch_size)
    size = sum(d.total_bytes for d in donors.values()) / 2
    print(f"sweep: {args.donors} donors ({size / 1e6:.0f} MB each), {len(spec.groups)} groups, {spec.size} "
          f"configurations + 2 ceilings, {len(specs)} probes x {args.limit} items, on {args.device}")

    # Warm the page cache and the kernels once, outside both measurements.
    warm = Hybrid.materialize(Plan("A"), donors, device=args.device)
    warm.apply(Plan("B"))
    del warm
    gc.collect()

    sync(args.device)
    t0 = time.perf_counter()
    record = run_sweep(spec, donors)
    sync(args.device)
    sweep_wall = time.perf_counter() - t0
    stats = record["runs"][-1]
    surgery = stats["surgery_seconds"]

    # Baseline: a fresh hybrid for every model, the same probes on each.
    tok = load_tokenizer(donors["A"].path)
    datas = [load_probe_data(s) for s in specs]
    plans = [("ceiling B", Plan("B"), None)] + [(spec.name(m), spec.plan(m), m) for m in spec.order()]
    reload_seconds = probe_seconds = 0.0
    sync(args.device)
    t0 = time.perf_counter()
    for name, plan, mask in plans:
        t1 = time.perf_counter()
        hybrid = Hybrid.materialize(plan, donors, device=args.device)
        sync(args.device)
        reload_seconds += time.perf_counter() - t1
        t1 = time.perf_counter()
        for s, data in zip(specs, datas):
            out = evaluate(hybrid.model, tok, s, data, batch_size=args.batch_size)
            want = (record["ceilings"]["B"][s.label] if mask is None else
                    next(c for c in record["configurations"] if c["mask"] == mask)["results"][s.label])
            assert out.outcomes == want["outcomes"], f"{name} {s.label}: reload and hot-swap disagree"
        probe_seconds += time.perf_counter() - t1
        del hybrid
        gc.collect()
    sync(args.device)
    baseline_wall = time.perf_counter() - t0

    other = sweep_wall - surgery - stats["probe_seconds"] - stats["materialize_seconds"]
    print(f"(a) sweep wall {sweep_wall:8.2f} s: materialise once {stats['materialize_seconds']:6.2f} s, "
          f"surgery {surgery:6.3f} s in {stats['swaps']} swaps ({stats['bytes_swapped'] / 1e6:.0f} MB), "
          f"probes {stats['probe_seconds']:7.2f} s, other {other:5.2f} s")
    print(f"    surgery share {100 * surgery / sweep_wall:6.2f}% of wall time   (goal <= 5%)")
    print(f"(b) reload per configuration: wall {baseline_wall:8.2f} s (reloads {reload_seconds:6.2f} s, "
          f"probes {probe_seconds:7.2f} s), same outcomes")
    print(f"    wall ratio baseline/sweep {baseline_wall / sweep_wall:5.2f}x   "
          f"reload/hot-swap {reload_seconds / max(surgery + stats['materialize_seconds'], 1e-9):6.1f}x "
          f"(9 loads vs 1 load + {stats['swaps']} swaps)")


def timed_ray_sweep(spec, donors, workers: int, cache: Path) -> dict:
    """One sweep on a fresh local cluster of `workers`: its record and where the time went."""
    from surgeon.features.sweep.distributed import ray_cluster, run_distributed_sweep

    os.environ["MOE_SURGEON_CACHE"] = str(cache)
    t0 = time.perf_counter()
    with ray_cluster(workers=workers) as cluster:
        up = time.perf_counter()
        ready, last, busy, units = {}, {}, {}, {}

        def on_event(e):
            now = time.perf_counter()
            if e.kind == "worker":
                ready[e.worker] = now
            elif e.kind in ("configuration", "ceiling") and e.worker is not None:
                last[e.worker] = now
                busy[e.worker] = busy.get(e.worker, 0.0) + e.seconds
                if e.kind == "configuration" or e.probe == spec.probes[0].label:
                    units[e.worker] = units.get(e.worker, 0) + 1

        record = run_distributed_sweep(spec, donors, cluster, on_event=on_event)
        done = time.perf_counter()
    idle = sum(last[w] - ready[w] - busy[w] for w in last)
    return {"record": record, "cluster": up - t0, "workers": max(ready.values()) - up,
            "measure": done - max(ready.values()), "sweep": done - up, "units": sum(units.values()),
            "overhead": idle / sum(units.values())}


def same_outcomes(a: dict, b: dict) -> None:
    for c in a["configurations"]:
        other = next(x for x in b["configurations"] if x["mask"] == c["mask"])
        for label, rec in c["results"].items():
            assert other["results"][label]["outcomes"] == rec["outcomes"], f"mask {c['mask']} {label}: differ"
    for name, ceilings in a["ceilings"].items():
        for label, rec in ceilings.items():
            assert b["ceilings"][name][label]["outcomes"] == rec["outcomes"], f"ceiling {name} {label}: differ"


def run_ray(args, work: Path) -> None:
    from surgeon.core.plan import Plan
    from surgeon.features.sweep.runner import SweepSpec, default_groups, run_sweep
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes import parse_probe

    donors, probes = prepare_donors(args.donors, work)
    specs = [parse_probe(f"{p},limit={args.limit}") for p in probes]
    spec = SweepSpec("A", "B", default_groups(), specs, device=args.device.split(":")[0], batch_size=args.batch_size)
    print(f"sweep: {args.donors} donors, {spec.size} configurations + 2 ceilings, {len(specs)} probes x "
          f"{args.limit} items, on {spec.device}; {os.cpu_count()} cores; serial vs {args.workers} Ray workers")
    warm = Hybrid.materialize(Plan("A"), donors, device=args.device)  # page cache and kernels, outside both
    warm.apply(Plan("B"))
    del warm
    gc.collect()

    import torch

    threads = torch.get_num_threads()
    os.environ["MOE_SURGEON_CACHE"] = str(work / "cache-serial")
    t0 = time.perf_counter()
    serial = run_sweep(spec, donors)
    serial_wall = time.perf_counter() - t0
    stats = serial["runs"][-1]
    serial_measure = serial_wall - stats["materialize_seconds"]  # the model load is start-up on both sides
    # One torch thread, as each Ray worker runs when the workers share the cores: on a loaded
    # machine a multi-threaded torch pool can be many times slower, which is not Ray's doing.
    torch.set_num_threads(1)
    os.environ["MOE_SURGEON_CACHE"] = str(work / "cache-serial1")
    t0 = time.perf_counter()
    same_outcomes(serial, run_sweep(spec, donors))
    serial1_wall = time.perf_counter() - t0
    torch.set_num_threads(threads)

    many = timed_ray_sweep(spec, donors, args.workers, work / "cache-ray")
    same_outcomes(serial, many["record"])

    start = many["cluster"] + many["workers"]
    print(f"(c) serial wall {serial_wall:7.2f} s with {threads} torch threads (materialise "
          f"{stats['materialize_seconds']:5.2f} s, probes {stats['probe_seconds']:6.2f} s); "
          f"{serial1_wall:7.2f} s with 1 thread")
    print(f"    {args.workers} Ray workers wall {many['cluster'] + many['sweep']:7.2f} s = cluster start "
          f"{many['cluster']:5.2f} s + workers ready {many['workers']:5.2f} s + measuring {many['measure']:6.2f} s; "
          "same outcomes")
    print(f"    speed-up serial/Ray {serial_wall / (many['cluster'] + many['sweep']):5.2f}x with start-up, "
          f"{serial_measure / many['measure']:5.2f}x measuring only (start-up {start:5.2f} s); against the "
          f"1-thread serial run {serial1_wall / (many['cluster'] + many['sweep']):5.2f}x with start-up")
    print(f"(d) Ray overhead {1000 * many['overhead']:6.1f} ms per configuration ({many['units']} units: "
          f"configurations and donor ceilings; start-up not included)")


if __name__ == "__main__":
    main()

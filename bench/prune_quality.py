"""Benchmark: what pruning half (or a quarter) of the experts costs on the arithmetic probe, by criterion.

The model is the demo donor fine-tuned on addition (`demo:arith`: OLMoE, 4 layers x 8 experts,
top-2). Each criterion prunes it with `surgeon.features.prune.run.run_prune` (what `moe-surgeon
prune` runs) on an arithmetic calibration corpus of sums drawn apart from the probe's items (seeded,
none of them a probe prompt, so the probe is not scored on what chose the experts); `random` is the
mean of 5 seeds. Every pruned model and the unpruned one answer the built-in `arith` exact-match
probe (200 sums, greedy decoding); each line gives the accuracy with its 95% bootstrap CI and the
per-item comparison with the unpruned model: items lost / gained and McNemar's p. Merge rows:
`merge-experts` (`run_merge`) to the same expert counts, on the same corpus, members averaged by
frequency and by REAP score (HC-SMoE-style clusters on output similarity).
Run: python bench/prune_quality.py [--ratios 0.25 0.5] [--seeds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def calibration_corpus(path: Path, probe_prompts: set[str], n: int = 300) -> Path:
    rng = random.Random(0)
    lines = []
    while len(lines) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if f"{a}+{b}=" not in probe_prompts:
            lines.append(f"{a}+{b}={a + b}")
    path.write_text("\n\n".join(lines) + "\n")
    return path


def score(path, spec, data):
    from surgeon.live.loader import load_model
    from surgeon.probes.run import evaluate
    from surgeon.probes.scoring import load_tokenizer

    model = load_model(path, device="cpu", gates=False)
    return [float(x) for x in evaluate(model, load_tokenizer(path), spec, data, batch_size=32).outcomes]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import json

    import numpy as np
    import torch
    from transformers.utils import logging

    from surgeon.core.donor import open_donor
    from surgeon.features.prune.merge import MergeRequest, run_merge
    from surgeon.features.prune.run import PruneRequest, run_prune
    from surgeon.probes.registry import parse_probe
    from surgeon.probes.run import load_probe_data
    from surgeon.probes.stats import bootstrap_ci, compare

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable_progress_bar()
    donor = open_donor("demo:arith")
    spec = parse_probe("em:arith")
    data = load_probe_data(spec)
    prompts = {json.loads(line)["prompt"] for line in (donor.path.parent.parent / "probes" / "arith.jsonl").open()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = calibration_corpus(tmp / "sums.txt", prompts)
        base = score(donor.path, spec, data)
        lo_hi = bootstrap_ci(base)
        print(f"demo:arith on em:arith ({len(base)} items); calibration: {corpus.name}, 300 sums none of which "
              "is a probe item")
        print(f"  {'model':<44}{'accuracy':>9}  {'95% CI':<15}{'lost':>5}{'gained':>7}  McNemar p")
        print(f"  {'unpruned':<44}{np.mean(base):9.3f}  [{lo_hi[1]:.3f}, {lo_hi[2]:.3f}]")
        for ratio in args.ratios:
            runs = [("prune", by, 0) for by in ("reap", "frequency", "gate")]
            runs += [("prune", "random", s) for s in range(args.seeds)]
            runs += [("merge-experts", by, 0) for by in ("frequency", "reap")]
            randoms = []
            for command, by, seed in runs:
                out = tmp / f"{command}-{by}-{ratio}-{seed}"
                if command == "merge-experts":
                    run_merge(MergeRequest(out=str(out), base="demo:arith", ratio=ratio, by=by,
                                           corpora=(f"sums={corpus}",), device="cpu"))
                else:
                    run_prune(PruneRequest(out=str(out), base="demo:arith", ratio=ratio, by=by, seed=seed,
                                           corpora=() if by == "random" else (f"sums={corpus}",), device="cpu"))
                outcomes = score(out, spec, data)
                c = compare(base, outcomes)
                ci = bootstrap_ci(outcomes)
                label = (f"{'merge-experts ' if command == 'merge-experts' else ''}--ratio {ratio:g} --by {by}"
                         + (f" --seed {seed}" if by == "random" else ""))
                print(f"  {label:<44}{np.mean(outcomes):9.3f}  [{ci[1]:.3f}, {ci[2]:.3f}]{c['b10']:>5}{c['b01']:>7}  "
                      f"{c['mcnemar_p']:.3g}")
                if by == "random":
                    randoms.append(np.mean(outcomes))
                if by == "random" and seed == args.seeds - 1:
                    print(f"  {'--ratio %g random, mean' % ratio:<44}{np.mean(randoms):9.3f}  (of {len(randoms)} "
                          f"seeds, min {min(randoms):.3f}, max {max(randoms):.3f})")


if __name__ == "__main__":
    main()

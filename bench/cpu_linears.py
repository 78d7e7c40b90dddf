"""Benchmark: float32 CPU linears through MKL (plain nn.Linear) and through oneDNN (what probes use),
and the least time any scorer needs for the BoolQ-style case of --vs-lmeval.

  (a) SmolLM2-135M forwards at decoding and prefill shapes, the two kernels alternating in one
      process; prints each one's best time, the ratio and the largest logit difference
  (b) the BoolQ floor: one forward over every item's context tokens (batch 8, longest first, logits
      at the last position only: nothing any scorer of one-token choices can skip), with either
      kernel. With a finished `--vs-lmeval` run, prints lm-eval's time over these forwards' time:
      about the most such a scorer can gain on lm-eval at the same model, dtype and batch size

Run: python bench/cpu_linears.py [--items N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from smollm2 import ensure_checkpoint

import surgeon.probes.linear_kernels as kernels

WORK = HERE / "_work"
SHAPES = [(8, 1), (8, 3), (8, 64), (8, 278)]  # rows x tokens: decode, decode with drafts, prefills


def forward_seconds(model, ids, use_onednn: bool) -> tuple[float, torch.Tensor]:
    with torch.no_grad(), (kernels.onednn_linears(model) if use_onednn else nullcontext()):
        t0 = time.perf_counter()
        logits = model(ids, logits_to_keep=1).logits
        return time.perf_counter() - t0, logits


def bench_shapes(model, repeat: int) -> None:
    print(f"(a) SmolLM2-135M float32 forward, {torch.get_num_threads()} threads, best of {repeat}")
    print(f"{'rows x tokens':>14} {'MKL ms':>9} {'oneDNN ms':>10} {'ratio':>7} {'max |dlogit|':>13}")
    g = torch.Generator().manual_seed(0)
    for rows, width in SHAPES:
        ids = torch.randint(0, model.config.vocab_size, (rows, width), generator=g)
        for use in (False, True):
            forward_seconds(model, ids, use)  # first call per shape picks kernels
        best = {False: float("inf"), True: float("inf")}
        out = {}
        for _ in range(repeat):
            for use in (False, True):
                t, out[use] = forward_seconds(model, ids, use)
                best[use] = min(best[use], t)
        diff = float((out[False] - out[True]).abs().max())
        print(f"{rows:>8} x {width:<3} {best[False] * 1e3:>9.1f} {best[True] * 1e3:>10.1f} "
              f"{best[False] / best[True]:>6.2f}x {diff:>13.2e}")


def boolq_contexts(tokenizer, n: int) -> list[list[int]]:
    """lm-eval's default boolq prompt for the bench's BoolQ-style items."""
    path = WORK / "items" / "boolq.jsonl"
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [tokenizer(f"{it['passage']}\nQuestion: {it['question']}?\nAnswer:")["input_ids"] for it in items]


def floor_seconds(model, contexts: list[list[int]], use_onednn: bool, batch: int = 8) -> float:
    order = sorted(contexts, key=len, reverse=True)
    total = 0.0
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = len(rows[0])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)  # left padding: the last position is every row's
            mask[r, width - len(row):] = 1
        with torch.no_grad(), (kernels.onednn_linears(model) if use_onednn else nullcontext()):
            t0 = time.perf_counter()
            model(ids, attention_mask=mask, logits_to_keep=1)
            total += time.perf_counter() - t0
    return total


def bench_floor(model, tokenizer, n: int) -> None:
    contexts = boolq_contexts(tokenizer, n)
    tokens = sum(map(len, contexts))
    print(f"\n(b) BoolQ-style floor: {len(contexts)} contexts, {tokens} tokens, batch 8, last-position logits")
    secs = {use: floor_seconds(model, contexts, use) for use in (False, True)}
    for use, label in ((False, "MKL"), (True, "oneDNN")):
        print(f"  {label:<7} {secs[use]:7.1f} s  ({tokens / secs[use]:.0f} tokens/s)")
    report = WORK / "vs_lmeval" / "full" / "native" / "results.json"
    try:
        runs = {r["case"]: r for r in json.loads(report.read_text())}
    except (OSError, ValueError):
        runs = {}
    case = runs.get("boolq-0shot")
    if case and case["n"] == len(contexts):
        lm = case["lmeval"]["seconds"]
        print(f"  lm-eval took {lm:.1f} s for these items (whole process, {report}):\n"
              f"  {lm / secs[False]:.2f}x these forwards alone with MKL, {lm / secs[True]:.2f}x with oneDNN. A scorer"
              " that runs each context once gains on lm-eval at most that, and what it pads less")
    else:
        print(f"  (no full --vs-lmeval BoolQ run of {len(contexts)} items in {report} to compare with)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300, help="BoolQ-style items for (b)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not kernels.onednn_usable():
        raise SystemExit("this torch has no oneDNN linear: nothing to compare")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_checkpoint(WORK / "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bench_shapes(model, args.repeat)
    bench_floor(model, tokenizer, args.items)


if __name__ == "__main__":
    main()

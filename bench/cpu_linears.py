"""Benchmark: float32 CPU linears through MKL (plain nn.Linear) and through oneDNN (what probes use),
and the least time any scorer needs for the BoolQ-style case of --vs-lmeval.

  (a) SmolLM2-135M forwards at decoding and prefill shapes, the two kernels alternating in one
      process; prints each one's best time, the ratio and the largest logit difference
  (b) the BoolQ floor: one forward over every item's context tokens (batch 8, longest first, logits
      at the last position only: all that a scorer which runs each context once, as lm-eval does,
      cannot skip), with either kernel. With a finished `--vs-lmeval` run, prints lm-eval's time
      over these forwards' time: about the most such a scorer can gain on lm-eval at the same
      model, dtype and batch size (ours also shares passages between contexts: see (c))
  (c) the arithmetic bound: the linear FLOPs each distinct token prefix of those contexts needs
      (what a scorer must run even if it shares every common prefix), divided by the best
      float32 matmul rate this machine reaches at the model's own shapes with either kernel: no
      exact float32 scorer can take less, so lm-eval's time over it bounds any speed-up. With a
      finished full `--vs-lmeval` BoolQ run, prints lm-eval's time and ours over it (the goal for
      ours: at most 1.3x)

Run: python bench/cpu_linears.py [--items N] [--repeat R] [--skip-floor]
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
    lm = boolq_seconds(len(contexts))
    if lm is not None:
        print(f"  lm-eval took {lm:.1f} s for these items (whole process, --vs-lmeval):\n"
              f"  {lm / secs[False]:.2f}x these forwards alone with MKL, {lm / secs[True]:.2f}x with oneDNN. A scorer"
              " that runs each context once gains on lm-eval at most that, and what it pads less")
    else:
        print(f"  (no full --vs-lmeval BoolQ run of {len(contexts)} items to compare with)")


def boolq_seconds(n: int, side: str = "lmeval") -> float | None:
    """The whole-process time of `side` ("lmeval" or "ours") in the last full --vs-lmeval BoolQ run
    of n items on our own forward, if there is one."""
    report = WORK / "vs_lmeval" / "full" / "native" / "results.json"
    try:
        runs = {r["case"]: r for r in json.loads(report.read_text())}
    except (OSError, ValueError):
        return None
    case = runs.get("boolq-0shot")
    return case[side]["seconds"] if case and case["n"] == n and case[side].get("seconds") else None


def fastest(fn, repeat: int) -> float:
    fn()  # the first call picks kernels
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_matmul_rate(model, repeat: int) -> tuple[float, str]:
    """The highest float32 GFLOP/s of the decoder's own linears on a BoolQ batch (8 x 278 rows), MKL
    or oneDNN, best of `repeat`; and a large square product, the usual peak reading."""
    rates, seen = {}, set()
    for module in model.model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.shape in seen:
            continue
        seen.add(module.weight.shape)
        x = torch.randn(8 * 278, module.in_features)
        flops = 2 * x.shape[0] * module.weight.numel()
        for use in (False, True):
            with torch.no_grad(), (kernels.onednn_linears(model) if use else nullcontext()):
                seconds = fastest(lambda: module(x), repeat)
            rates[f"{tuple(module.weight.shape)} via {'oneDNN' if use else 'MKL'}"] = flops / seconds / 1e9
    a, b = torch.randn(3072, 3072), torch.randn(3072, 3072)
    rates["3072 x 3072 square"] = 2 * 3072**3 / fastest(lambda: a @ b, repeat) / 1e9
    where = max(rates, key=rates.get)
    return rates[where], where


def bench_bound(model, tokenizer, n: int, repeat: int) -> None:
    contexts = boolq_contexts(tokenizer, n)
    prefixes = {tuple(c[:k]) for c in contexts for k in range(1, len(c) + 1)}

    def weights(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    # Every token needs every layer but the last, and there only its keys and values (whose
    # outputs other tokens attend to); the last positions' own few FLOPs are left out.
    last = model.model.layers[-1].self_attn
    linear = weights(model.model) - weights(model.model.layers[-1]) + weights(last.k_proj) + weights(last.v_proj)
    flops = 2 * linear * len(prefixes)
    rate, where = best_matmul_rate(model, repeat)
    least = flops / (rate * 1e9)
    print(f"\n(c) arithmetic bound: {sum(map(len, contexts))} context tokens, {len(prefixes)} distinct prefixes;"
          f" {linear / 1e6:.1f}M linear weights per token -> {flops / 1e12:.2f} TFLOP (attention not counted)")
    print(f"  best float32 matmul rate here: {rate:.0f} GFLOP/s ({where}); those FLOPs take at least {least:.1f} s")
    lm, ours = boolq_seconds(len(contexts)), boolq_seconds(len(contexts), "ours")
    if lm is not None:
        print(f"  lm-eval's {lm:.1f} s is {lm / least:.2f}x that: no exact float32 scorer on this machine can be faster"
              " than lm-eval by more")
    if ours is not None:
        print(f"  ours, {ours:.1f} s (whole process, the same --vs-lmeval run), is {ours / least:.2f}x it (goal: at most 1.30x)")
    if lm is None and ours is None:
        print(f"  (no full --vs-lmeval BoolQ run of {len(contexts)} items to compare with)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300, help="BoolQ-style items for (b) and (c)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-floor", action="store_true", help="skip (b), the slowest part (minutes)")
    args = ap.parse_args()
    if not kernels.onednn_usable():
        raise SystemExit("this torch has no oneDNN linear: nothing to compare")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_checkpoint(WORK / "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bench_shapes(model, args.repeat)
    if not args.skip_floor:
        bench_floor(model, tokenizer, args.items)
    bench_bound(model, tokenizer, args.items, args.repeat)


if __name__ == "__main__":
    main()

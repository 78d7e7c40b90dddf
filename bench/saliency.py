"""Benchmark: what collecting expert saliency (frequency, gate, REAP) costs over a plain forward pass.

Both sides read the same texts and run the same token sequences in the same right-padded batches
(the texts encoded by `surgeon.features.routing.probe.encode_texts`, `--batch-size` sequences per
batch, in corpus order); the plain side encodes, pads and calls the model, the saliency side is
`surgeon.features.prune.saliency.collect_saliency` (router hooks plus the expert-output norms REAP
needs, read from the experts' own forward). For comparison, the routing probe's `--importance`,
which recomputes every expert on its tokens, is timed too. Repeats are interleaved and the best of
each is kept, so load from other processes hits every side alike.                goal <= 1.20x

Models: the demo donor `demo:arith` (OLMoE, 4 layers x 8 experts, top-2, bf16) on the built-in
`arith` and `reverse` corpora with its own tokenizer; and a synthetic OLMoE of 8 layers x 32 experts
(top-8, hidden 256, float32) on 64 random texts of 128-256 characters (one token per character).
Run: python bench/saliency.py [--device cuda] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class CharTokenizer:
    """Just what the routing probe asks of a tokenizer: ids without special tokens, a pad id."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 250 for c in text]}


def synthetic_olmoe():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("olmoe", hidden_size=256, intermediate_size=128, num_hidden_layers=8, num_experts=32,
                               num_attention_heads=8, num_key_value_heads=8, num_experts_per_tok=8, vocab_size=256,
                               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +=:"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(128, 256))) for _ in range(64)]
    return "synthetic olmoe 8 layers x 32 experts (top-8), hidden 256, float32", model, CharTokenizer(), texts


def demo_olmoe(device: str):
    from surgeon.core.donor import open_donor
    from surgeon.features.routing.corpora import read_corpora
    from surgeon.features.routing.run import load_model
    from surgeon.probes.scoring import load_tokenizer

    donor = open_donor("demo:arith")
    texts = [t for ts in read_corpora(["arith", "reverse"]).values() for t in ts]
    return ("demo:arith (olmoe 4 layers x 8 experts, top-2, bf16) on arith + reverse",
            load_model(donor, device, "keep"), load_tokenizer(donor.path), texts)


def batches(model, tokenizer, texts, batch_size, device):
    import torch

    from surgeon.features.routing.probe import encode_texts

    seqs = encode_texts(tokenizer, texts, int(model.config.max_position_embeddings))
    out = []
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s:s + batch_size]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        out.append((ids.to(device), mask.to(device)))
    return out, sum(len(x) for x in seqs)


def bench(name, model, tokenizer, texts, args):
    import torch

    from surgeon.features.prune.saliency import collect_saliency
    from surgeon.features.routing.probe import probe_routing

    model.to(args.device)
    prepared, tokens = batches(model, tokenizer, texts, args.batch_size, args.device)
    # Saliency (like every probe) encodes its texts: so does the plain side, each time.

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        with torch.no_grad():
            for ids, mask in batches(model, tokenizer, texts, args.batch_size, args.device)[0]:
                model(ids, attention_mask=mask, use_cache=False)
        sync()

    def saliency():
        collect_saliency(model, tokenizer, {"c": texts}, batch_size=args.batch_size)
        sync()

    def recompute():
        probe_routing(model, tokenizer, texts, batch_size=args.batch_size, importance=True)
        sync()

    sides = {"plain forward": plain, "saliency (REAP)": saliency, "importance, recomputed": recompute}
    for fn in sides.values():  # warm-up
        fn()
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(args.repeats):
        for side, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            best[side] = min(best[side], time.perf_counter() - t0)
    print(f"{name}; on {args.device}, {torch.get_num_threads()} thread(s); {tokens} tokens in {len(prepared)} "
          f"batches of {args.batch_size}")
    for side, t in best.items():
        print(f"  {side:<24}{t:8.3f} s  {tokens / t:10,.0f} tok/s  {t / best['plain forward']:6.3f}x")
    ratio = best["saliency (REAP)"] / best["plain forward"]
    print(f"  saliency / plain = {ratio:.3f}x  (goal <= 1.20x: {'met' if ratio <= 1.20 else 'NOT met'})")
    return ratio


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch loads: see DESIGN's OpenMP trap
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from transformers.utils import logging

    logging.disable_progress_bar()
    bench(*demo_olmoe(args.device), args)
    bench(*synthetic_olmoe(), args)


if __name__ == "__main__":
    main()

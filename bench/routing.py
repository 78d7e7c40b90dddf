"""Benchmark: what the routing probe costs over a plain forward pass on the same tokens.

Both sides read the same texts in the same right-padded batches; the plain side only calls the
model, the probe side is `surgeon.features.routing.probe.probe_routing` (router hooks, per-batch statistics, the
token trace). Repeats are interleaved and the best of each is kept, so load from other processes
hits both sides alike.                                                           goal <= 1.10x
Run: python bench/routing.py [--device cuda] [--small] [--repeats N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from surgeon.features.routing.probe import probe_routing  # noqa: E402


class CharTokenizer:
    """Just what probe_routing asks of a tokenizer: ids without special tokens, a pad id."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 250 for c in text]}


def medium_olmoe(small: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    size = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_experts=16) if small else \
        dict(hidden_size=256, intermediate_size=128, num_hidden_layers=8, num_experts=32)
    cfg = AutoConfig.for_model("olmoe", **size, num_attention_heads=8, num_key_value_heads=8, num_experts_per_tok=8,
                               vocab_size=256, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, norm_topk_prob=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), cfg


def plain(model, tok, texts, batch_size, device):
    seqs = [tok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            batch = seqs[s:s + batch_size]
            width = max(len(x) for x in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, x in enumerate(batch):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            model(ids.to(device), attention_mask=mask.to(device), use_cache=False)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a smaller model and corpus (a quick check)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    model, cfg = medium_olmoe(args.small)
    model.to(args.device)
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +=:"
    n_texts, lo, hi = (64, 32, 96) if args.small else (64, 128, 256)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n_texts)]
    tok = CharTokenizer()
    tokens = sum(len(t) for t in texts)

    def probe():
        probe_routing(model, tok, texts, batch_size=args.batch_size)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    plain(model, tok, texts[:args.batch_size], args.batch_size, args.device)  # warm-up
    probe()
    best = {"plain": float("inf"), "probe": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("plain", lambda: plain(model, tok, texts, args.batch_size, args.device)), ("probe", probe)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"model: olmoe {cfg.num_hidden_layers} layers x {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
          f"hidden {cfg.hidden_size}, on {args.device}; {tokens} tokens in {n_texts} texts, batch {args.batch_size}")
    print(f"plain forward   {best['plain']:.3f} s   {tokens / best['plain']:,.0f} tok/s")
    print(f"routing probe   {best['probe']:.3f} s   {tokens / best['probe']:,.0f} tok/s")
    ratio = best["probe"] / best["plain"]
    print(f"probe / plain = {ratio:.3f}x  (goal <= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()

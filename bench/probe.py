"""Benchmark: probe throughput and hot-swap cost.

  (a) multiple-choice scoring throughput (tokens/s) of the batched, prefix-cached scorer against
      a naive loop with one forward pass per (item, choice) and no cache      goal >= 3x
  (b) hot-swap of every attention tensor of a medium OLMoE-shaped model against a plain copy
      of the same bytes from CPU tensors into the live ones                   goal <= 3x
  --vs-lmeval: moe-surgeon's probes against lm-evaluation-harness, whole process against whole
      process on a real small model (SmolLM2-135M), per-item agreement too (bench/vs_lmeval.py)
  --startup: `moe-surgeon probe` from process start to the first scored item, timed apart from
      inside the real command: import, load (transformers' model code, then the fill), first batch
      (bench/startup.py, which takes the same options run on its own)
Run: python bench/probe.py [--device cuda] [--small]
     python bench/probe.py --vs-lmeval [--small] [--case arc-0shot] [--ours native|lmeval]
     python bench/probe.py --startup [--repeat 5] [--model demo|llama135m|DIR] [--before REV] [--cold]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import vs_lmeval
from copy_timing import copy_seconds, sync


def lmeval_pair(ctx: str, cont: str) -> tuple[str, str]:
    """lm-eval moves a context's trailing spaces to the front of the continuation."""
    spaces = len(ctx) - len(ctx.rstrip(" "))
    return (ctx[:-spaces], ctx[-spaces:] + cont) if spaces else (ctx, cont)


def naive_mc(model, tok, contexts, items, sep, device):
    """One forward per (item, choice), whole string each time: what a first script would do.
    Tokenized as lm-eval does, so its answers must equal the scorer's: the whole string at once,
    the continuation being what follows the context's own tokens."""
    import torch
    import torch.nn.functional as F

    tokens = 0
    correct = 0
    for ctx_text, item in zip(contexts, items):
        scores = []
        for choice in item.choices:
            ctx, cont = lmeval_pair(ctx_text, sep + choice)
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole], device=device)
            with torch.no_grad():
                lp = F.log_softmax(model(ids).logits[0].float(), -1)
            scores.append(sum(float(lp[j - 1, whole[j]]) for j in range(n_ctx, len(whole))))
            tokens += len(whole)
        correct += scores.index(max(scores)) == item.answer
    return tokens, correct


def bench_mc(device, shots, limit):
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes import parse_probe
    from surgeon.probes.prompts import answer_sep, context
    from surgeon.probes.run import evaluate, load_probe_data
    from surgeon.probes.scoring import load_tokenizer

    donors = {"A": open_donor("demo:arith")}
    model = Hybrid.materialize(Plan("A"), donors, device=device).model
    tok = load_tokenizer(donors["A"].path)
    spec = parse_probe(f"mc:arith_mc,limit={limit},shots={shots}")
    data = load_probe_data(spec)
    evaluate(model, tok, spec, data, batch_size=64)  # warm-up: first forwards pick kernels
    sync(device)
    t0 = time.perf_counter()
    out = evaluate(model, tok, spec, data, batch_size=64)
    sync(device)
    fast = time.perf_counter() - t0
    contexts = [context(item, item_shots, data.template) for item, item_shots in zip(data.items, data.shots)]
    t0 = time.perf_counter()
    tokens, correct = naive_mc(model, tok, contexts, data.items, answer_sep(data.template), device)
    sync(device)
    slow = time.perf_counter() - t0
    assert correct == sum(out.outcomes), "the two scorers disagree"
    print(f"(a) MC scoring, {len(data.items)} items x 4 choices, {shots}-shot, on {device}")
    print(f"    batched+cached {tokens / fast:10.0f} tokens/s   naive {tokens / slow:10.0f} tokens/s"
          f"   ratio {slow / fast:6.1f}x   (goal >= 3x)")


def bench_swap(device, small):
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan, parse_spec
    from surgeon.live.hybrid import Hybrid

    work = Path(tempfile.mkdtemp(prefix="moe-surgeon-swap-"))
    shape = ["--small"] if small else []
    for seed, name in ((0, "A"), (1, "B")):
        subprocess.run([sys.executable, str(ROOT / "synthetic.py"), str(work / name), str(seed), *shape], check=True)
    donors = {n: open_donor(work / n) for n in "AB"}
    hybrid = Hybrid.materialize(Plan("A"), donors, device=device)
    names = [n for n, p in donors["A"].anatomy.parts.items() if p.kind == "attention"]
    there = Plan("A", [parse_spec("attention", "B")])
    hybrid.apply(there)
    hybrid.apply(Plan("A"))  # warm the page cache and the safetensors handles
    swaps = []
    for _ in range(3):
        swaps.append(hybrid.apply(there).seconds)
        hybrid.apply(Plan("A"))
    swap = min(swaps)
    sources = [hybrid.reader.read("B", n).clone() for n in names]
    views = [hybrid.live_view(n) for n in names]
    nbytes = sum(s.numel() * s.element_size() for s in sources)
    copy = min(copy_seconds(views, sources, device) for _ in range(3))
    print(f"(b) hot-swap of {len(names)} attention tensors ({nbytes / 1e6:.0f} MB) on {device}")
    print(f"    swap {swap * 1e3:8.1f} ms   plain copy {copy * 1e3:8.1f} ms   ratio {swap / copy:5.2f}x   (goal <= 3x)")


def main():
    if "--startup" in sys.argv[1:]:  # its own options, and no torch in this process: it times fresh ones
        import startup

        argv = [a for a in sys.argv[1:] if a != "--startup"]
        raise SystemExit(startup.main(argv, prog="bench/probe.py --startup"))
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    vs_lmeval.add_arguments(ap)
    args = ap.parse_args()
    if args.vs_lmeval:
        raise SystemExit(vs_lmeval.main(args))
    torch.manual_seed(0)
    bench_mc(args.device, shots=3, limit=50 if args.small else 200)
    bench_swap(args.device, args.small)


if __name__ == "__main__":
    main()

"""`moe-surgeon compress`: Tucker-compress chosen experts into a compact dense checkpoint (XPERT, arXiv 2605.08842).

The engine is `surgeon.features.compress` (`run_compress`; the method is in its docstring): it
chooses the experts (all, `--experts`, or the common experts of `--common` corpora through the
routing probe), decomposes them and writes the checkpoint; this file parses and prints. torch and
transformers are imported only inside the command, so `moe-surgeon --help` stays fast.
"""

from __future__ import annotations

import json
import sys

from surgeon.cli.options import DTYPES
from surgeon.core.architectures import dense_targets_text


def register(sub) -> None:
    p = sub.add_parser(
        "compress", help="Tucker-compress chosen experts into a compact dense FFN checkpoint",
        description="Per MoE layer, stack the chosen experts' gate/up/down matrices, decompose each stack by "
        "a truncated HOSVD (Tucker), report the relative reconstruction error per layer and projection, and "
        f"write a dense checkpoint ({dense_targets_text()}) whose FFN of intermediate size --rank comes from the "
        "decomposition; attention, norms, embeddings and lm_head are copied unchanged.",
    )
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("source", help="an MoE checkpoint directory or demo:NAME")
    p.add_argument("--rank", type=int, help="intermediate size of the dense FFN, and the Tucker rank of the "
                   "intermediate mode (default: the experts' intermediate size)")
    p.add_argument("--hidden-rank", type=int, help="Tucker rank of the hidden mode (default: full)")
    p.add_argument("--expert-rank", type=int, help="Tucker rank of the expert mode (default: full; more than "
                   "a layer's chosen experts means full)")
    p.add_argument("--experts", action="append", default=[], metavar="[LAYERS:]EXPERTS",
                   help="which experts to stack, e.g. 1,5 (every layer) or 0-3:1,5,7; repeatable, later wins "
                   "(default: every expert)")
    p.add_argument("--common", nargs="*", metavar="CORPUS",
                   help="stack the common experts: those in the top --q%% by activation frequency on every "
                   "corpus (NAME=FILE, a built-in probe set or a file; none given: arith reverse)")
    p.add_argument("--q", type=float, default=25.0, help="--common: the top Q%% per corpus (default 25)")
    p.add_argument("--max-tokens", type=int, help="--common: read at most this many tokens per corpus")
    p.add_argument("--device", help="where the decomposition (and --common's probe) runs: cpu, cuda or cuda:N "
                   "(default: cuda when present)")
    p.add_argument("--dtype", default="keep", choices=DTYPES, help="dtype of the written weights (default: "
                   "the source's)")
    p.add_argument("--batch-size", type=int, default=32, help="--common: sequences per forward pass")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--check", action="store_true",
                   help="load the written checkpoint with transformers and run a forward pass")
    p.add_argument("--allow-pickle", action="store_true", help="load a pickle-only source with weights_only=True")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    from surgeon.cli.progress import StepPrinter
    from surgeon.features.compress import CompressRequest, run_compress
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    request = CompressRequest(
        out=args.out, source=args.source, rank=args.rank, hidden_rank=args.hidden_rank,
        expert_rank=args.expert_rank, experts=tuple(args.experts),
        common=None if args.common is None else tuple(args.common), q=args.q, max_tokens=args.max_tokens,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_shard_size=args.max_shard_size,
        force=args.force, check=args.check, allow_pickle=args.allow_pickle)
    with cancel_on_interrupt(CancelToken()) as token:
        result = run_compress(request, progress=StepPrinter("compress"), cancel=token)
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        _print_text(args, result.donor, result.report)
    return 0


def _print_text(args, donor, r) -> None:
    from surgeon.core.plan import format_ranges
    from surgeon.io.sizes import human_bytes

    w, rk, shape = r["written"], r["ranks"], r["expert_shape"]
    moe = len(donor.anatomy.experts_per_layer)
    print(f"compress {args.source} ({r['model_type']}, {moe} MoE layers x {donor.anatomy.num_experts} experts of "
          f"{shape['intermediate']} x {shape['hidden']}) on {r['device']}")
    print(f"  experts: {r['chosen_by']}; Tucker ranks: intermediate {rk['intermediate']}, hidden {rk['hidden']}, "
          f"expert {rk['expert'] or 'full'}")
    if "common" in r:
        c = r["common"]
        print("  common experts from " + ", ".join(f"{n} ({c['tokens'][n]} tokens)" for n in c["corpora"]))
    print("relative reconstruction error ||X - X^|| / ||X|| of the stacked experts")
    print(f"  {'layer':>5}  {'experts':<12}{'gate':>11}{'up':>11}{'down':>11}{'all':>11}")
    for row in r["layers"]:
        e = row["error"]
        print(f"  {row['layer']:>5}  {format_ranges(row['experts']):<12}"
              + "".join(f"{e[k]:>11.3e}" for k in ("gate", "up", "down", "all")))
    m = r["mean_error"]
    print(f"  {'mean':>5}  {'':<12}" + "".join(f"{m[k]:>11.3e}" for k in ("gate", "up", "down", "all")))
    f, p = r["ffn_parameters"], r["model_parameters"]
    print(f"FFN parameters {f['experts_before']:,} (every expert) -> {f['after']:,} "
          f"({100 * f['after'] / max(f['experts_before'], 1):.2f}%); model {p['before']:,} -> {p['after']:,}")
    print(f"wrote {w['path']}: {w['model_type']} ({w['architecture']}), intermediate size {w['intermediate_size']}, "
          f"{w['dtype']}, {len(w['files'])} file(s), {human_bytes(w['bytes'])}")
    if r.get("target_note"):
        print(f"  note: {r['target_note']}")
    if "check" in r:
        c = r["check"]
        print(f"  check: transformers loads it as {c['class']}; a forward pass on {c['tokens']} tokens gives "
              "finite logits")
    sys.stdout.flush()

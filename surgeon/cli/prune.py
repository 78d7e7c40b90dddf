"""`moe-surgeon prune`: drop the routed experts a calibration corpus needs least (REAP, frequency, gate, random).

The engine is `surgeon.features.prune` (`run_prune`); this file parses and prints. torch and
transformers are imported only inside the command, so `moe-surgeon --help` stays fast.
"""

from __future__ import annotations

import json
import sys

from surgeon.cli.options import add_smaller_moe_options
from surgeon.features.prune.saliency import CRITERIA


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune routed experts per MoE layer by REAP, frequency, gate or at random",
        description="Score every routed expert on calibration corpora in one forward pass and write a smaller "
        "MoE that keeps the best N per layer: kept experts are byte ranges of the original, renumbered in "
        "order, router rows sliced to match, the expert count in config.json set to N. REAP is 'REAP the "
        "Experts: Why Pruning Prevails for One-Shot MoE Compression' (arXiv 2510.13999).",
    )
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--base", required=True, metavar="DIR", help="the MoE checkpoint to prune (a directory or demo:NAME)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, metavar="N", help="experts kept per MoE layer")
    size.add_argument("--ratio", type=float, metavar="R", help="share of each layer's experts pruned, e.g. 0.5")
    p.add_argument("--by", default="reap", choices=CRITERIA,
                   help="reap: gate weight x output norm over routed tokens (default); frequency: share of tokens "
                   "routed; gate: mean gate weight when routed; random: seeded, a baseline")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--per-layer", dest="scope", action="store_const", const="per-layer",
                       help="keep N in every MoE layer (default)")
    scope.add_argument("--global", dest="scope", action="store_const", const="global",
                       help="keep N x layers in all, ranked across layers by each expert's share of its layer's "
                       "score, never fewer than top-k in a layer; uneven layers are padded with unreachable experts "
                       "where the router has a bias (gpt-oss, DeepSeek-V3, GLM-4.5), refused elsewhere")
    p.set_defaults(scope="per-layer")
    p.add_argument("--seed", type=int, default=0, help="--by random: the seed (default 0)")
    add_smaller_moe_options(p, rebuilt_from="the recorded choice", record="scores, kept experts")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from surgeon.cli.progress import StepPrinter, warn
    from surgeon.features.prune.run import PruneRequest, run_prune
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    request = PruneRequest(
        out=args.out, base=args.base, keep=args.keep, ratio=args.ratio, by=args.by, seed=args.seed,
        scope=args.scope, corpora=tuple(args.corpus), max_tokens=args.max_tokens, batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force, fsync=args.fsync,
        allow_pickle=args.allow_pickle, save_session=args.save_session)
    with cancel_on_interrupt(CancelToken()) as token:
        result = run_prune(request, progress=StepPrinter("prune"), cancel=token, warn=warn)
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        _print_text(result)
        if args.save_session:
            print(f"saved session {args.save_session}: `moe-surgeon replay {args.save_session} --export DIR` "
                  "rebuilds it from the recorded choice")
    return 0


def _print_text(result) -> None:
    from surgeon.core.plan import format_ranges
    from surgeon.features.prune.choose import layer_shares
    from surgeon.io.sizes import human_bytes

    r = result.report
    s = result.saliency
    top = f", top-{r['top_k']}" if r["top_k"] is not None else ""
    glob = r.get("scope") == "global"
    what = (f"keep {r['total_kept']} in all ({r['keep']} per layer on average, at least {r['floor']}) by "
            f"{r['criterion']}, ranked across layers by share of the layer's score" if glob
            else f"keep {r['keep']} per layer by {r['criterion']}")
    print(f"prune {r['base']['spec']} ({r['base']['model_type']}, {len(r['kept'])} MoE layers x "
          f"{r['num_experts']} experts{top}): {what}")
    if r["corpora"]:
        print("  calibration: " + ", ".join(f"{c['name']} ({c['tokens']} tokens)" for c in r["corpora"])
              + f" on {r['device']}")
    elif r["seed"] is not None:
        print(f"  seed {r['seed']}")
    width = max(len(format_ranges(k)) for k in r["kept"].values())
    rest = max(len(format_ranges(k)) for k in r["pruned"].values())
    count = "  n " if glob else ""
    print(f"  {'layer':>5}  {count}{'kept':<{width}}  {'pruned':<{rest}}"
          + (f"  lowest kept / highest pruned {'share' if glob else 'score'}" if s else ""))
    for i, (layer, kept) in enumerate(r["kept"].items()):
        count = f"{len(kept):>3} " if glob else ""
        line = f"  {layer:>5}  {count}{format_ranges(kept):<{width}}  {format_ranges(r['pruned'][layer]):<{rest}}"
        if s is not None:  # global: each layer's shares, what the ranking compared
            scores = (layer_shares(s.scores(r["criterion"])) if glob else s.scores(r["criterion"]))[i]
            low = min(float(scores[e]) for e in kept)
            high = max((float(scores[e]) for e in r["pruned"][layer]), default=0.0)
            line += f"  {low:.4g} / {high:.4g}"
        print(line)
    if glob:
        for layer, alone in r["raised"].items():
            print(f"  layer {layer}: the ranking alone kept {alone}; raised to {r['floor']} (top-k, the least a layer "
                  "may keep)")
        for layer, pad in r["padded"].items():
            print(f"  layer {layer}: padded with {pad} unreachable expert(s) (zero weights, router bias -inf) to "
                  f"the {r['experts_after']} that config.json states for every layer")
    w = r["written"]
    print(f"wrote {w['path']}: {w['tensors']} tensors in {len(w['shards'])} file(s), {human_bytes(w['bytes'])}; "
          f"parameters {w['parameters_before']:,} -> {w['parameters_after']:,}")
    sys.stdout.flush()


def replay_smaller(session, donors, args, check) -> int:
    """`moe-surgeon replay SESSION [--export OUT]` for a session whose step is a pruning or a merging:
    the checkpoint is rebuilt from the recorded choice, never measured again."""
    from surgeon.cli.progress import StepPrinter, warn
    from surgeon.errors import SurgeonError
    from surgeon.features.prune.session import check_recorded, rebuild_from_session
    from surgeon.io.sizes import human_bytes
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    ext = check_recorded(session, args.session, donors)  # a bad field is refused before the donor line
    what = "merge" if ext.get("operation") == "merge" else "prune"
    if args.probes:
        raise SurgeonError(f"{args.session}: replay --probes: a {what} session records no probes; probe its "
                           "export with `moe-surgeon probe DIR`")
    if args.dtype not in (None, "keep"):
        raise SurgeonError(f"{args.session}: replay --dtype {args.dtype}: a {what} session rebuilds the "
                           "original's dtypes; drop --dtype")
    if not args.export:
        size = ext.get("into") if what == "merge" else ext.get("keep")
        if args.json:
            print(json.dumps({"session": str(args.session), "operation": what, "criterion": ext.get("criterion"),
                              "num_experts": ext.get("num_experts"), "after": size,
                              "fingerprints": check.status, "donor_check": check.line()}, indent=2))
        else:
            scope = (f" (global: {ext.get('total_kept')} in all, "
                     + ", ".join(str(len(k)) for k in ext["kept"].values()) + " per layer)"
                     if ext.get("scope") == "global" else "")
            print(f"{args.session}: {what} of {ext.get('num_experts')} experts per MoE layer to {size} by "
                  f"{ext.get('criterion')}{scope}; {check.line()}; add --export OUT to rebuild it")
        return 0
    print(f"moe-surgeon: {check.line()}", file=sys.stderr)
    with cancel_on_interrupt(CancelToken()) as token:
        _, written, _ = rebuild_from_session(session, args.session, donors, args.export, force=args.force,
                                             fsync=args.fsync, progress=StepPrinter("export"), cancel=token, warn=warn)
    if args.json:
        print(json.dumps({"path": str(written.path), "shards": written.shards, "tensors": written.tensors,
                          "bytes": written.bytes}, indent=2))
    else:
        print(f"rebuilt the {what} of {args.session} from its recorded choice: {written.tensors} tensors "
              f"({human_bytes(written.bytes)}) in {len(written.shards)} shard(s) at {written.path}")
    return 0

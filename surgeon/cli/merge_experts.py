"""`moe-surgeon merge-experts`: cluster each MoE layer's experts by their outputs and average each cluster.

The engine is `surgeon.features.prune.merge` (`run_merge`); this file parses and prints. torch and
transformers are imported only inside the command, so `moe-surgeon --help` stays fast.
"""

from __future__ import annotations

import json
import sys

from surgeon.cli.options import add_smaller_moe_options
from surgeon.features.prune.cluster import WEIGHTS


def register(sub) -> None:
    p = sub.add_parser(
        "merge-experts", help="merge routed experts per MoE layer: cluster by output similarity, average (HC-SMoE)",
        description="Run every routed expert on the same calibration tokens, cluster each MoE layer's experts "
        "bottom-up by the cosine similarity of their outputs (average linkage, as HC-SMoE), and write each "
        "cluster as one expert: every weight tensor and the router row the weighted average of its members' "
        "(by calibration frequency unless --by says otherwise). Approximate: averaged experts compute what "
        "their members did only where the members were alike.",
    )
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--base", required=True, metavar="DIR", help="the MoE checkpoint to merge (a directory or demo:NAME)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--into", type=int, metavar="N", help="experts per MoE layer after merging")
    size.add_argument("--ratio", type=float, metavar="R", help="share of each layer's experts merged away, e.g. 0.5")
    p.add_argument("--by", default="frequency", choices=WEIGHTS,
                   help="what a cluster's members are averaged by: frequency (share of calibration tokens routed "
                   "to them, HC-SMoE and MC-SMoE; default), reap (REAP score) or uniform")
    p.add_argument("--sample-tokens", type=int, default=256, metavar="N",
                   help="tokens, spread over the corpora, on which every expert is run to compare outputs "
                   "(default 256)")
    add_smaller_moe_options(p, rebuilt_from="the recorded clusters and weights", record="clusters, weights, scores")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from surgeon.cli.progress import StepPrinter, warn
    from surgeon.features.prune.merge import MergeRequest, run_merge
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    request = MergeRequest(
        out=args.out, base=args.base, into=args.into, ratio=args.ratio, by=args.by, corpora=tuple(args.corpus),
        sample_tokens=args.sample_tokens, max_tokens=args.max_tokens, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force, fsync=args.fsync,
        allow_pickle=args.allow_pickle, save_session=args.save_session)
    with cancel_on_interrupt(CancelToken()) as token:
        result = run_merge(request, progress=StepPrinter("merge"), cancel=token, warn=warn)
    if args.json:
        print(json.dumps(result.report, indent=2))
        return 0
    r = result.report
    top = f", top-{r['top_k']}" if r["top_k"] is not None else ""
    print(f"merge-experts {r['base']['spec']} ({r['base']['model_type']}, {len(r['clusters'])} MoE layers x "
          f"{r['num_experts']} experts{top}): {r['into']} per layer, members averaged by {r['criterion']}")
    print("  calibration: " + ", ".join(f"{c['name']} ({c['tokens']} tokens)" for c in r["corpora"])
          + f" on {r['device']}; outputs compared on {r['sample_tokens']} tokens")
    print(f"  {'layer':>5}  merged (new=old+old...; the others kept alone)")
    for layer, clusters in r["clusters"].items():
        merged = [f"{i}={'+'.join(map(str, c))}" for i, c in enumerate(clusters) if len(c) > 1]
        print(f"  {layer:>5}  {' '.join(merged)}")
    w = r["written"]
    from surgeon.io.sizes import human_bytes

    print(f"wrote {w['path']}: {w['tensors']} tensors in {len(w['shards'])} file(s), {human_bytes(w['bytes'])}; "
          f"parameters {w['parameters_before']:,} -> {w['parameters_after']:,} (approximate: merged experts are "
          "weighted averages)")
    if args.save_session:
        print(f"saved session {args.save_session}: `moe-surgeon replay {args.save_session} --export DIR` "
              "rebuilds it from the recorded choice")
    sys.stdout.flush()
    return 0

"""`moe-surgeon routing`: which experts fire for which corpus, common experts, drift, similarity.

The engine is `surgeon.features.routing` (`run_routing`); this file parses and prints. torch and
transformers are imported only inside the command, so `moe-surgeon --help` stays fast.
"""

from __future__ import annotations

import csv
import json
import sys

from surgeon.cli.options import add_model_options
from surgeon.errors import SurgeonError
from surgeon.features.routing.corpora import DEFAULT_CORPORA


def register(sub) -> None:
    p = sub.add_parser(
        "routing", help="expert routing analysis: activation frequency per corpus, common experts, drift",
        description="Run corpora through a checkpoint (or a session's hybrid) and report, per MoE layer and "
        "expert, how often it is selected, the router's weight, the top expert, load-balance entropy and "
        "the experts common to every corpus; optionally what one expert does, importance, routing drift "
        "against other models, expert weight similarity to another donor, and --take SPECs for export.",
    )
    p.add_argument("target", metavar="DIR_OR_SESSION", help="a checkpoint directory, demo:NAME, or a session file")
    p.add_argument("--corpus", action="append", default=[], metavar="NAME=FILE",
                   help="a domain corpus: a built-in probe set name, a .jsonl probe file or a text file "
                   f"(paragraphs); repeatable (default: {', '.join(DEFAULT_CORPORA)})")
    p.add_argument("--q", type=float, default=25.0,
                   help="common experts: the top Q%% by frequency in every corpus (default 25)")
    p.add_argument("--metric", default="frequency", choices=["frequency", "top1", "mean_prob", "importance"],
                   help="what the text heatmap shows (default frequency)")
    p.add_argument("--expert", action="append", default=[], metavar="LAYER:EXPERT",
                   help="what an expert does: top tokens in context and co-firing experts; repeatable")
    p.add_argument("--importance", action="store_true",
                   help="also score each expert by mean router probability x output norm (recomputes experts)")
    p.add_argument("--against", action="append", default=[], metavar="DIR",
                   help="routing drift (per-layer Jensen-Shannon divergence) against this model; repeatable")
    p.add_argument("--drift", action="store_true", help="for a session: drift of the hybrid against every donor")
    p.add_argument("--similarity", metavar="DIR",
                   help="cosine similarity of every expert's weights between the target (a session's base) and DIR")
    p.add_argument("--take-used", type=int, metavar="N", help="print --take SPECs for the N most used experts per layer")
    p.add_argument("--take-changed", type=int, metavar="N",
                   help="print --take SPECs for the N experts of --similarity DIR least similar to the target")
    p.add_argument("--domain", help="the corpus --take-used ranks by (default: the first)")
    p.add_argument("--layers", help="layers for --take-used / --take-changed, e.g. 0-3,8 (default all)")
    p.add_argument("--max-tokens", type=int, default=None, help="read at most this many tokens per corpus")
    p.add_argument("--save", action="append", default=[], metavar="FILE",
                   help="save the heatmap view (--metric of the target on --view, or --diff) as an image or table, "
                   "the format by extension: .svg .png .csv .json; repeatable")
    p.add_argument("--view", metavar="CORPUS", help="the corpus the view shows (default: --domain or the first)")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"),
                   help="the view is A minus B: two corpora (the target on each), or two models on --view's corpus "
                   "(`target`, an --against DIR as given, or with --drift a session donor's name)")
    add_model_options(p, batch_size=32)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print everything as JSON")
    out.add_argument("--csv", action="store_true", help="print one row per corpus, layer and expert as CSV")
    p.set_defaults(func=cmd_routing)


# ---------------------------------------------------------------- the command
def request_of(args):
    from surgeon.features.routing.run import RoutingRequest

    return RoutingRequest(
        target=args.target, corpora=tuple(args.corpus), q=args.q, metric=args.metric, experts=tuple(args.expert),
        importance=args.importance, against=tuple(args.against), drift=args.drift, similarity=args.similarity,
        take_used=args.take_used, take_changed=args.take_changed, domain=args.domain, layers=args.layers,
        max_tokens=args.max_tokens, save=tuple(args.save), view=args.view,
        diff=tuple(args.diff) if args.diff else None, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, allow_pickle=args.allow_pickle)


def cmd_routing(args) -> int:
    from surgeon.cli.progress import StepPrinter
    from surgeon.features.routing.run import run_routing
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    with cancel_on_interrupt(CancelToken()) as token:
        result = run_routing(request_of(args), progress=StepPrinter("routing"), cancel=token)
    report, stats = result.report, result.stats
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.csv:
        _print_csv(stats, report)
        for s in report.get("saved", []):  # stdout is the CSV
            print(f"saved {s['path']} ({s['format']})", file=sys.stderr)
    else:
        _print_text(args, report, stats, result.similarity, result.takes)
        if args.diff and list(args.diff) != list(stats)[:2]:  # the first two corpora's difference is printed above
            from surgeon.features.routing.view import view_lines

            print(f"\n{result.view.title}")
            for line in view_lines(result.view):
                print("  " + line)
        for s in report.get("saved", []):
            print(f"saved {s['path']} ({s['format']})")
    return 0


# ---------------------------------------------------------------- output
def _print_csv(stats, result) -> None:
    w = csv.writer(sys.stdout)
    w.writerow(["corpus", "layer", "expert", "frequency", "mean_prob", "mean_weight", "top1", "importance", "common"])
    common = result.get("common", {})
    for name, s in stats.items():
        imp = s.importance
        for li, layer in enumerate(s.layers):
            for e in range(s.num_experts):
                w.writerow([name, layer, e, f"{s.frequency[li, e]:.6f}", f"{s.mean_prob[li, e]:.6f}",
                            f"{s.mean_weight[li, e]:.6f}", f"{s.top1[li, e]:.6f}",
                            "" if imp is None else f"{imp[li, e]:.6f}", int(e in common.get(str(layer), []))])


def _metric(s, metric):
    if metric == "importance":
        if s.importance is None:
            raise SurgeonError("--metric importance needs --importance")
        return s.importance
    return getattr(s, metric)


def _print_text(args, result, stats, similarity, takes) -> None:
    import numpy as np

    from surgeon.features.routing.probe import heatmap_lines

    if stats:
        first = next(iter(stats.values()))
        common = [result["common"][str(l)] for l in first.layers]
        print(f"routing of {args.target} ({result['model_type']}, {len(first.layers)} MoE layers x "
              f"{first.num_experts} experts, top-{first.top_k}); * = common expert (top {args.q:g}% in every corpus)")
        fmt = "{:5.2f}" if args.metric == "importance" else "{:4.2f}"
        for name, s in stats.items():
            print(f"\n{name}: {s.tokens} tokens, {args.metric} per layer x expert")
            for line in heatmap_lines(_metric(s, args.metric), s.layers, marks=common, fmt=fmt):
                print("  " + line)
            print("  entropy " + "  ".join(f"L{l} {h:.3f}" for l, h in zip(s.layers, s.entropy))
                  + "   top expert " + "  ".join(f"L{l} e{int(s.top1_counts[i].argmax())}"
                                                 f" ({s.top1[i].max():.0%})" for i, l in enumerate(s.layers)))
        names = list(stats)
        if len(names) >= 2:
            a, b = stats[names[0]], stats[names[1]]
            diff = _metric(a, args.metric) - _metric(b, args.metric)
            print(f"\n{names[0]} - {names[1]} ({args.metric}; shade = size of the difference)")
            for line in heatmap_lines(diff, a.layers, fmt="{:+5.2f}"):
                print("  " + line)
            from surgeon.features.routing.probe import jsd
            print("  usage JSD between the corpora per layer: "
                  + "  ".join(f"L{l} {v:.3f}" for l, v in zip(a.layers, jsd(a.usage, b.usage, axis=1))))
        print("\ncommon experts: " + "  ".join(f"L{l}: {','.join(map(str, c)) or '-'}" for l, c in zip(first.layers, common)))
    for e in result.get("experts", []):
        tops = ", ".join(f"{t['token']!r} x{t['count']} ({t['share']:.0%} of its uses)" for t in e["top_tokens"][:6])
        ctx = " | ".join(c for t in e["top_tokens"][:3] for c in t["contexts"][:1])
        co = np.array(e["cofire_same_layer"])
        same = ", ".join(f"e{j} {co[j]:.2f}" for j in np.argsort(-co)[:3] if co[j] > 0)
        line = f"\nexpert {e['layer']}:{e['expert']} on {e['corpus']}: frequency {e['frequency']:.2f}"
        if e["importance"] is not None:
            line += f", importance {e['importance']:.3f}"
        print(line)
        print(f"  top tokens: {tops}")
        print(f"  in context: {ctx}")
        print(f"  co-fires in layer {e['layer']}: {same or '-'}")
        if e["cofire_next_layer"] is not None:
            nx = np.array(e["cofire_next_layer"])
            print("  then in the next MoE layer: " + ", ".join(f"e{j} {nx[j]:.2f}" for j in np.argsort(-nx)[:3]))
    for d in result.get("drift", []):
        print(f"\nrouting drift against {d['against']} on {d['corpus']} (Jensen-Shannon, bits):")
        print("  per-token " + "  ".join(f"L{l} {v:.4f}" for l, v in zip(d["layers"], d["token_jsd"])))
        print("  usage     " + "  ".join(f"L{l} {v:.4f}" for l, v in zip(d["layers"], d["usage_jsd"])))
    if similarity is not None:
        print(f"\nexpert weight cosine similarity, {args.target} vs {args.similarity} (same expert index):")
        layers = sorted(similarity)
        diag = np.stack([np.diag(similarity[l]) for l in layers])
        for line in heatmap_lines(diag, layers, scale=1.0, fmt="{:5.3f}"):
            print("  " + line)
    if takes:
        print("\npaste into moe-surgeon export:")
        print("  " + " ".join(f"--take {t}" for t in takes))

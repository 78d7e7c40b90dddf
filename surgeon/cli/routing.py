"""`moe-surgeon routing`: which experts fire for which corpus, common experts, drift, similarity.

The engine is `routing.py`; this file parses, loads and prints. torch and transformers are
imported only inside the command, so `moe-surgeon --help` stays fast.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from surgeon.cli.options import add_model_options
from surgeon.errors import SurgeonError

DEFAULT_CORPORA = ("arith", "reverse")  # the built-in demo domains


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


# ---------------------------------------------------------------- inputs
def parse_corpus(arg: str) -> tuple[str, Path]:
    from surgeon.probes.data import resolve_set

    name, sep, where = arg.partition("=")
    if not sep:
        name, where = Path(arg).stem, arg
    if not name or not where:
        raise SurgeonError(f"--corpus {arg!r}: expected NAME=FILE")
    return name, resolve_set(where)


def corpus_texts(path: Path) -> list[str]:
    from surgeon.probes.data import load_items, load_text
    from surgeon.probes.prompts import item_text

    items = load_items(path) if path.suffix == ".jsonl" else load_text(path)
    return [item_text(i) for i in items]


def parse_layers(text: str | None):
    if text is None:
        return None
    from surgeon.core.plan import parse_ranges

    return parse_ranges(text, "layer", f"--layers {text}")


def parse_expert(arg: str) -> tuple[int, int]:
    layer, sep, expert = arg.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), int(expert)
    except ValueError:
        raise SurgeonError(f"--expert {arg!r}: expected LAYER:EXPERT, e.g. 2:5") from None


def _require_moe(donor) -> None:
    if not donor.anatomy.experts_per_layer:
        raise SurgeonError(f"{donor.path}: {donor.model_type} has no routed experts; routing analysis needs an MoE model")


def load_model(path, device, dtype):
    from transformers import AutoModelForCausalLM

    from surgeon.live.hybrid import TORCH_DTYPE_NAMES

    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPE_NAMES.get(dtype, "auto"),
                                                 device_map=device, local_files_only=True)
    return model.eval()


# ---------------------------------------------------------------- the command
def cmd_routing(args) -> int:
    from surgeon.core.donor import open_donor
    from surgeon.core.session import (
        load_session,
        open_session_donors,
        refuse_mix_session,
    )

    if not 0 < args.q <= 100:
        raise SurgeonError(f"--q {args.q}: expected a percentage in (0, 100]")
    experts_asked = [parse_expert(e) for e in args.expert]
    layers = parse_layers(args.layers)
    session = None
    if Path(args.target).is_file():
        session = load_session(args.target)
        refuse_mix_session(session, args.target, "analyse")
        donors = open_session_donors(session, args.target, allow_pickle=args.allow_pickle)
        base = donors[session.plan.base]
    else:
        base = open_donor(args.target, allow_pickle=args.allow_pickle)
        donors = {"A": base}
    _require_moe(base)
    if args.take_changed and not args.similarity:
        raise SurgeonError("--take-changed needs --similarity DIR (the donor whose changed experts to take)")
    if args.take_used and session is not None:
        raise SurgeonError("--take-used needs a checkpoint directory as target (a hybrid is not one donor)")
    if args.drift and session is None:
        raise SurgeonError("--drift compares a session's hybrid with its donors; for a directory use --against DIR")
    against = [open_donor(a, allow_pickle=args.allow_pickle) for a in args.against]
    for d in against:
        _require_moe(d)
    sim_donor = open_donor(args.similarity, allow_pickle=args.allow_pickle) if args.similarity else None
    probe_needed = bool(args.corpus or not args.similarity or experts_asked or args.take_used or args.drift
                        or against or args.save or args.diff)
    corpora = {}
    if probe_needed:
        for arg in args.corpus or DEFAULT_CORPORA:
            name, path = parse_corpus(arg)
            if name in corpora:
                raise SurgeonError(f"--corpus {arg!r}: corpus name {name!r} given twice")
            corpora[name] = corpus_texts(path)
    if args.domain and args.domain not in corpora:
        raise SurgeonError(f"--domain {args.domain!r}: no such corpus (corpora: {', '.join(corpora) or 'none'})")
    if args.view and args.view not in corpora:
        raise SurgeonError(f"--view {args.view!r}: no such corpus (corpora: {', '.join(corpora) or 'none'})")
    target_label = args.target if session is None else f"the hybrid of {args.target}"
    model_labels = {"target": target_label, **{a: a for a in args.against}}  # --diff name -> what a view calls it
    if args.drift:
        model_labels.update({ref.name: ref.path for ref in session.donors})
    diff_kind = _diff_kind(args.diff, corpora, list(model_labels)) if args.diff else None
    from surgeon.features.routing.view import FORMATS

    for f in args.save:  # refused before any model loads
        if Path(f).suffix.lower() not in FORMATS:
            raise SurgeonError(f"--save {f}: unknown format {Path(f).suffix or '(none)'!r}; use {', '.join(FORMATS)}")

    result: dict = {"target": args.target, "model_type": base.model_type, "q": args.q}
    stats = {}
    view = None
    if probe_needed:
        stats, drift, theirs = _probe(args, session, donors, base, against, corpora)
        first = next(iter(stats.values()))
        from surgeon.features.routing.probe import common_experts

        common = common_experts({n: s.frequency for n, s in stats.items()}, args.q / 100)
        result.update(layers=first.layers, num_experts=first.num_experts, top_k=first.top_k,
                      domains={n: s.summary() for n, s in stats.items()},
                      common={str(l): c for l, c in zip(first.layers, common)})
        if drift:
            result["drift"] = drift
        if experts_asked:
            result["experts"] = _what_experts_do(stats, base, experts_asked)
        if args.save or args.diff:
            view = _view(args, stats, theirs, diff_kind, model_labels)
            result["view"] = view.title
            result["saved"] = [_save(view, f) for f in args.save]
    similarity = None
    if sim_donor is not None:
        from surgeon.features.routing.probe import expert_similarity

        _require_moe(sim_donor)
        if sim_donor.model_type != base.model_type:
            raise SurgeonError(f"{sim_donor.path} is {sim_donor.model_type}, {base.path} is {base.model_type}")
        similarity = expert_similarity(base, sim_donor)
        result["similarity"] = {"donor": args.similarity,
                                "matrices": {str(l): m.round(6).tolist() for l, m in similarity.items()}}
    takes = []
    if args.take_used:
        from surgeon.features.routing.probe import take_most_used

        domain = args.domain or next(iter(stats))
        takes += [f"{a.spec}={args.target}" for a in take_most_used(stats[domain], args.take_used, "T", layers)]
    if args.take_changed:
        from surgeon.features.routing.probe import take_most_changed

        takes += [f"{a.spec}={args.similarity}" for a in take_most_changed(similarity, args.take_changed, "T", layers)]
    if takes:
        result["takes"] = takes

    if args.json:
        print(json.dumps(result, indent=2))
    elif args.csv:
        _print_csv(stats, result)
        for s in result.get("saved", []):  # stdout is the CSV
            print(f"saved {s['path']} ({s['format']})", file=sys.stderr)
    else:
        _print_text(args, result, stats, similarity, takes)
        if args.diff and list(args.diff) != list(stats)[:2]:  # the first two corpora's difference is printed above
            from surgeon.features.routing.view import view_lines

            print(f"\n{view.title}")
            for line in view_lines(view):
                print("  " + line)
        for s in result.get("saved", []):
            print(f"saved {s['path']} ({s['format']})")
    return 0


def _diff_kind(pair, corpora, models) -> str:
    """`--diff A B` names two corpora or two models; which, checked before any model loads."""
    if all(x in corpora for x in pair):
        return "domain"
    if all(x in models for x in pair):
        return "model"
    raise SurgeonError(f"--diff {pair[0]} {pair[1]}: expected two corpora ({', '.join(corpora)}) or two models "
                       f"({', '.join(models)})")


def _view(args, stats, theirs, diff_kind, labels):
    """The heatmap view --save writes: the target on one corpus, or a difference of two."""
    from surgeon.features.routing.view import difference_view, stats_view

    domain = args.view or args.domain or next(iter(stats))
    if diff_kind is None:
        return stats_view(stats[domain], args.metric, labels["target"], domain)
    a, b = args.diff
    if diff_kind == "domain":
        return difference_view(stats[a], stats[b], args.metric, (labels["target"], a), (labels["target"], b))
    models = {"target": stats, **theirs}
    return difference_view(models[a][domain], models[b][domain], args.metric, (labels[a], domain), (labels[b], domain))


def _save(view, path) -> dict:
    from surgeon.features.routing.view import save_view

    return {"path": path, "format": save_view(view, path)}


def _probe(args, session, donors, base, against, corpora):
    """Probe the target (and, for drift, each other model on the same tokens)."""
    import torch

    from surgeon.features.routing.probe import probe_domains, routing_drift
    from surgeon.live.hybrid import Hybrid, check_device, default_device
    from surgeon.probes.scoring import load_tokenizer

    device = str(check_device(args.device or default_device()))
    tokenizer = load_tokenizer(base.path)
    kw = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, importance=args.importance)
    others = list(zip(args.against, against))  # (name for --diff, donor)
    if args.drift:
        others += list(donors.items())
    keep = bool(others)
    try:
        if session is not None:
            model = Hybrid.materialize(session.plan, donors, device=device, dtype=args.dtype).model
        else:
            model = load_model(base.path, device, args.dtype)
        stats = probe_domains(model, tokenizer, corpora, keep_probs=keep, **kw)
        del model
        drift, by_name = [], {}
        for other_name, other in others:
            model = load_model(other.path, device, args.dtype)
            theirs = by_name[other_name] = probe_domains(model, tokenizer, corpora, keep_probs=True, **kw)
            del model
            for name in corpora:
                d = routing_drift(stats[name], theirs[name])
                drift.append({"against": str(other.path), "corpus": name, "layers": d["layers"],
                              "token_jsd": [round(float(v), 6) for v in d["token_jsd"]],
                              "usage_jsd": [round(float(v), 6) for v in d["usage_jsd"]]})
    except torch.cuda.OutOfMemoryError:
        raise SurgeonError(f"out of GPU memory on {device}; try --device cpu or a smaller --batch-size") from None
    for s in [*stats.values(), *(t for theirs in by_name.values() for t in theirs.values())]:
        s.probs = None  # only drift needed them
    return stats, drift, by_name


def _what_experts_do(stats, base, asked) -> list[dict]:
    from surgeon.features.routing.probe import cofiring, expert_tokens
    from surgeon.probes.scoring import load_tokenizer

    tokenizer = load_tokenizer(base.path)
    out = []
    for layer, expert in asked:
        first = next(iter(stats.values()))
        if not 0 <= expert < first.num_experts:
            raise SurgeonError(f"--expert {layer}:{expert}: expert out of range (0-{first.num_experts - 1})")
        first.layer_index(layer)
        for name, s in stats.items():
            co = cofiring(s, layer, expert)
            imp = s.importance
            out.append({
                "layer": layer, "expert": expert, "corpus": name,
                "frequency": round(float(s.frequency[s.layer_index(layer), expert]), 6),
                "importance": None if imp is None else round(float(imp[s.layer_index(layer), expert]), 6),
                "top_tokens": expert_tokens(s, tokenizer, layer, expert),
                "cofire_same_layer": [round(float(v), 6) for v in co["same_layer"]],
                "cofire_next_layer": None if co["next_layer"] is None else [round(float(v), 6) for v in co["next_layer"]],
            })
    return out


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

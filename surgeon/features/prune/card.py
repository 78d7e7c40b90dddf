"""The model card of a pruned checkpoint: what was pruned, by which criterion, on which corpus."""

from __future__ import annotations

from surgeon.core.plan import format_ranges
from surgeon.io import model_card as card

CRITERION_TEXT = {
    "reap": "REAP (\"REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression\", arXiv 2510.13999): "
            "the mean, over the tokens routed to an expert, of its gate weight times the norm of its output",
    "frequency": "routing frequency: the share of calibration tokens routed to an expert",
    "gate": "mean gate weight: the router weight an expert gets when it is routed to",
    "random": "a seeded random choice (a baseline, not a criterion)",
}


def prune_card(report: dict, donor, resolution) -> str:
    keep, total = report["keep"], report["num_experts"]
    params = sum(resolution.parameters_by_donor().values())
    glob = report.get("scope") == "global"
    size = report.get("experts_after", keep) if glob else keep
    if glob:
        chosen = (f"{report['total_kept']} of its {total * len(report['kept'])} experts in all, ranked across layers "
                  f"by {report['criterion']} (at least {report['floor']} per layer), so layers keep different numbers.")
        if report.get("padded"):
            chosen += (" Layers keeping fewer than the most are padded to it with unreachable experts (zero weights, "
                       "router bias -inf).")
    else:
        chosen = f"{keep} of its {total} experts, chosen by {report['criterion']}."
    summary = [
        f"{card.built_by()} by pruning routed experts of `{report['base']['spec']}`: "
        + ("the model keeps" if glob else "every MoE layer keeps"),
        chosen + " Kept experts are the original's bytes,",
        "renumbered in order; router rows (and router biases) are sliced to match; nothing else changed.",
        " and ".join(f"`{k}`" for k in report["experts_keys"]) + f" is {size} in config.json.",
    ]
    how = [f"- Criterion: {CRITERION_TEXT[report['criterion']]}."]
    if glob:
        how.append(f"- Global: every expert ranked by its share of its layer's total {report['criterion']} score "
                   f"(each layer's scores over their sum), the best {report['total_kept']} kept, never fewer than "
                   f"{report['floor']} (top-k) in a layer.")
        for layer, alone in report.get("raised", {}).items():
            how.append(f"- Layer {layer}: the ranking alone kept {alone}; raised to {report['floor']}.")
        for layer, pad in report.get("padded", {}).items():
            how.append(f"- Layer {layer}: {len(report['kept'][layer])} kept experts and {pad} padding expert(s) "
                       f"(numbered {len(report['kept'][layer])}-{size - 1}): zero weights, router row zero and router "
                       "bias -inf, so no token is routed to them.")
    if report["corpora"]:
        how.append("- Calibration corpora: " + ", ".join(
            f"{c['name']} (`{c['path']}`, {c['tokens']} tokens, sha256 `{c['sha256'][:16]}`)"
            for c in report["corpora"]) + ".")
    if report["seed"] is not None:
        how.append(f"- Seed: {report['seed']}.")
    if report["top_k"] is not None:
        among = "the kept experts of its layer" if glob else keep
        how.append(f"- Every token still takes {report['top_k']} experts (`{report['top_k_key']}`), now among {among}.")
    how += ["- The same choice is made again by:", "", "```", report["command"], "```", "",
            "`moe-surgeon-prune.json` holds every saliency figure per layer and expert, and the kept experts."]
    rows = [[str(layer), format_ranges(kept), format_ranges(report["pruned"][layer])]
            for layer, kept in report["kept"].items()]
    percent = {"A": 100.0 * params / max(donor.num_parameters, 1)}
    sections = [
        ("Original", ["The share is the part of the original's parameters kept.", "",
                      *card.provenance_table({"A": donor}, "A", percent)]),
        ("Pruning", how),
        ("Kept experts per layer", ["Original expert indices; kept expert i of a layer is the layer's i-th "
                                    "listed here.", "", *card.table(["layer", "kept", "pruned"], rows)]),
    ]
    return card.model_card("Pruned MoE checkpoint made by moe-surgeon", [card.CARD_TAG, "prune", "moe"], summary,
                           sections)


WEIGHT_TEXT = {
    "frequency": "its calibration frequency (the share of tokens routed to it; HC-SMoE's and MC-SMoE's weighting)",
    "reap": "its REAP score (gate weight x output norm over the tokens routed to it)",
    "uniform": "1 (a plain average)",
}


def merge_card(report: dict, donor, resolution) -> str:
    into, total = report["into"], report["num_experts"]
    params = sum(resolution.parameters_by_donor().values())
    summary = [
        f"{card.built_by()} by merging routed experts of `{report['base']['spec']}`: every MoE layer's {total}",
        f"experts are clustered into {into} by what they compute, and each cluster is one expert. Approximate:",
        "averaged weights compute what their members computed only where the members were alike.",
        " and ".join(f"`{k}`" for k in report["experts_keys"]) + f" is {into} in config.json.",
    ]
    how = [
        f"- Clustering: {report.get('clustering', 'average linkage')} (HC-SMoE), each expert run on the same "
        f"{report.get('sample_tokens', '?')} calibration tokens.",
        f"- Merged expert = sum over members of w x member, w = {WEIGHT_TEXT.get(report['criterion'], report['criterion'])}"
        " over the cluster's sum, in float64, rounded once to the tensor's dtype: every expert tensor, and the "
        "router's rows and biases alike. A cluster of one is its expert's bytes.",
        "- For a softmax router the merged row's logit is the weighted mean of its members' logits, so the merged "
        "expert is chosen less often than its members together were.",
    ]
    if report["corpora"]:
        how.append("- Calibration corpora: " + ", ".join(
            f"{c['name']} (`{c['path']}`, {c['tokens']} tokens, sha256 `{c['sha256'][:16]}`)"
            for c in report["corpora"]) + ".")
    if report["top_k"] is not None:
        how.append(f"- Every token still takes {report['top_k']} experts (`{report['top_k_key']}`), now among {into}.")
    how += ["- The same clusters are found again by:", "", "```", report["command"], "```", "",
            "`moe-surgeon-merge.json` holds every saliency figure and the similarity per layer, the clusters "
            "and each member's weight."]
    rows = []
    for layer, clusters in report["clusters"].items():
        merged = [f"{i}={'+'.join(map(str, c))}" for i, c in enumerate(clusters) if len(c) > 1]
        rows.append([str(layer), " ".join(merged) or "-",
                     format_ranges([c[0] for c in clusters if len(c) == 1]) or "-"])
    percent = {"A": 100.0 * params / max(donor.num_parameters, 1)}
    sections = [
        ("Original", ["The share is the part of the original's parameters kept.", "",
                      *card.provenance_table({"A": donor}, "A", percent)]),
        ("Merging", how),
        ("Experts per layer", ["New expert = original experts merged into it; experts kept alone keep their "
                               "bytes, renumbered in order.", "", *card.table(["layer", "merged", "kept alone"],
                                                                              rows)]),
    ]
    return card.model_card("Merged MoE checkpoint made by moe-surgeon", [card.CARD_TAG, "merge", "moe"], summary,
                           sections)

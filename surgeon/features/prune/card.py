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
    summary = [
        f"{card.built_by()} by pruning routed experts of `{report['base']['spec']}`: every MoE layer keeps",
        f"{keep} of its {total} experts, chosen by {report['criterion']}. Kept experts are the original's bytes,",
        "renumbered in order; router rows (and router biases) are sliced to match; nothing else changed.",
        " and ".join(f"`{k}`" for k in report["experts_keys"]) + f" is {keep} in config.json.",
    ]
    how = [f"- Criterion: {CRITERION_TEXT[report['criterion']]}."]
    if report["corpora"]:
        how.append("- Calibration corpora: " + ", ".join(
            f"{c['name']} (`{c['path']}`, {c['tokens']} tokens, sha256 `{c['sha256'][:16]}`)"
            for c in report["corpora"]) + ".")
    if report["seed"] is not None:
        how.append(f"- Seed: {report['seed']}.")
    if report["top_k"] is not None:
        how.append(f"- Every token still takes {report['top_k']} experts (`{report['top_k_key']}`), now among {keep}.")
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

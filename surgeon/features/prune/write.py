"""Write a pruned or merged checkpoint from its record: the one writer `prune`, `merge-experts` and
`replay` share, so a replayed session writes what the command wrote, from the recorded choice
(kept experts, or clusters and member weights), with no saliency pass and no corpus.

Tensors stream through the export's writer (features/export.py): kept experts and untouched
tensors as byte ranges of the original, merged ones computed a tensor (or a fused row) at a time;
atomic, with the manifest, the model card and the record beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.core.donor import Donor
from surgeon.errors import SurgeonError
from surgeon.features.prune.layout import check_padding, check_top_k, moe_shape, pruned_config, pruned_layout
from surgeon.jobs import NEVER

PRUNE_FILE = "moe-surgeon-prune.json"
MERGE_FILE = "moe-surgeon-merge.json"


def record_file(record: dict) -> str:
    return MERGE_FILE if record.get("operation") == "merge" else PRUNE_FILE


def write_smaller(donor: Donor, record: dict, out, *, max_shard_size: int, force: bool = False, fsync: bool = False,
                  progress=None, cancel=NEVER, warn=None, origin: str = "record: field "):
    """Write the checkpoint `record` describes; returns (ExportResult, Resolution)."""
    from surgeon.features.export import export_hybrid
    from surgeon.features.prune.card import merge_card, prune_card

    layers, num_experts = moe_shape(donor)
    merge = record.get("operation") == "merge"
    computed, close = None, None
    if merge:
        from surgeon.features.prune.merge_layout import merged_resolution

        clusters, weights = clusters_of(record, layers, num_experts, origin)
        size = len(next(iter(clusters.values())))
        resolution, computed, close = merged_resolution(donor, clusters, weights, num_experts)
    else:
        kept = kept_of(record, layers, num_experts, origin)
        size = check_padding(donor, kept, num_experts)  # the largest kept; the others padded to it
        check_top_k(donor, min(len(k) for k in kept.values()))
        resolution, computed, close = pruned_layout(donor, kept, num_experts)

    check_top_k(donor, size)

    def finish(tmp: Path) -> None:
        card = merge_card if merge else prune_card
        (tmp / "config.json").write_text(json.dumps(pruned_config(donor, num_experts, size), indent=2) + "\n")
        (tmp / "README.md").write_text(card(record, donor, resolution))
        (tmp / record_file(record)).write_text(json.dumps(record, indent=2) + "\n")

    try:
        written = export_hybrid(resolution, {"A": donor}, Path(out).absolute(), max_shard_size=max_shard_size,
                                force=force, fsync=fsync, progress=progress, cancel=cancel, before_rename=finish,
                                warn=warn, computed=computed)
    finally:
        if close is not None:
            close()
    return written, resolution


def _layer_table(record: dict, key: str, layers: list[int], origin: str) -> dict[int, list]:
    table = record.get(key)
    if not isinstance(table, dict) or sorted(table) != sorted(str(layer) for layer in layers):
        raise SurgeonError(f"{origin}{key}: expected an entry for each MoE layer "
                           f"({', '.join(map(str, layers))})")
    return {layer: table[str(layer)] for layer in layers}


def _experts(value, num_experts: int, where: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and value and all(isinstance(e, int) and not isinstance(e, bool)
                                                      and 0 <= e < num_experts for e in value)
            and value == sorted(set(value))):
        raise SurgeonError(f"{where}: expected increasing expert indices below {num_experts}")
    return tuple(value)


def kept_of(record: dict, layers: list[int], num_experts: int, origin: str) -> dict[int, tuple[int, ...]]:
    """The kept experts per layer a prune record states, checked against the model."""
    kept = {layer: _experts(v, num_experts, f"{origin}kept/{layer}")
            for layer, v in _layer_table(record, "kept", layers, origin).items()}
    scope = record.get("scope", "per-layer")
    if scope == "global":  # layers may keep different numbers; fewer in all than the model has
        if sum(map(len, kept.values())) >= num_experts * len(layers):
            raise SurgeonError(f"{origin}kept: a global pruning keeps fewer than all "
                               f"{num_experts * len(layers)} experts")
        return kept
    if scope != "per-layer":
        raise SurgeonError(f"{origin}scope: {scope!r}, expected per-layer or global")
    if len({len(k) for k in kept.values()}) != 1 or len(next(iter(kept.values()))) >= num_experts:
        raise SurgeonError(f"{origin}kept: every layer must keep the same number of experts, fewer than "
                           f"{num_experts}")
    return kept


def clusters_of(record: dict, layers: list[int], num_experts: int, origin: str
                ) -> tuple[dict[int, list[tuple[int, ...]]], dict[int, list[list[float]]]]:
    """The clusters and member weights per layer a merge record states, checked against the model."""
    clusters, weights = {}, {}
    tables = _layer_table(record, "clusters", layers, origin), _layer_table(record, "weights", layers, origin)
    for layer in layers:
        cs, ws = tables[0][layer], tables[1][layer]
        where = f"{origin}clusters/{layer}"
        if not isinstance(cs, list) or not isinstance(ws, list) or len(cs) != len(ws):
            raise SurgeonError(f"{where}: expected a list of clusters, with one weight list each in weights/{layer}")
        clusters[layer] = [_experts(c, num_experts, f"{where}/{i}") for i, c in enumerate(cs)]
        members = sorted(e for c in clusters[layer] for e in c)
        if members != list(range(num_experts)) or [c[0] for c in clusters[layer]] != sorted(c[0] for c in cs):
            raise SurgeonError(f"{where}: every expert 0-{num_experts - 1} must be in exactly one cluster, "
                               "clusters ordered by their first expert")
        for i, (c, w) in enumerate(zip(clusters[layer], ws)):
            if not (isinstance(w, list) and len(w) == len(c)
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in w)):
                raise SurgeonError(f"{origin}weights/{layer}/{i}: expected {len(c)} non-negative weights")
        weights[layer] = [[float(x) for x in w] for w in ws]
    if len({len(c) for c in clusters.values()}) != 1 or len(clusters[layers[0]]) >= num_experts:
        raise SurgeonError(f"{origin}clusters: every layer must have the same number of clusters, fewer "
                           f"than {num_experts}")
    return clusters, weights

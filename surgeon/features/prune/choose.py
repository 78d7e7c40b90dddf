"""Which experts each MoE layer keeps: the N with the highest saliency, or N at random (seeded)."""

from __future__ import annotations

import math

import numpy as np

from surgeon.errors import SurgeonError


def keep_count(num_experts: int, keep: int | None, ratio: float | None) -> int:
    """Experts kept per layer from --keep N or --ratio R (the share pruned, REAP's compression ratio)."""
    if (keep is None) == (ratio is None):
        raise SurgeonError("give one of --keep N (experts kept per layer) or --ratio R (the share pruned)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise SurgeonError(f"--ratio {ratio:g}: expected the share of experts pruned, in (0, 1)")
        # Round half down on the pruned side, so --ratio 0.5 of 7 experts keeps 4, never 3.
        keep = num_experts - math.floor(ratio * num_experts + 0.5 - 1e-9)
        if keep >= num_experts:
            raise SurgeonError(f"--ratio {ratio:g} of {num_experts} experts prunes none; raise it")
        if keep < 1:
            raise SurgeonError(f"--ratio {ratio:g} of {num_experts} experts prunes them all; lower it")
    elif not 1 <= keep < num_experts:
        raise SurgeonError(f"--keep {keep}: expected 1 to {num_experts - 1} (the model has {num_experts} experts "
                           "per MoE layer)")
    return keep


def top_experts(scores: np.ndarray, keep: int) -> tuple[int, ...]:
    """The `keep` highest scores of one layer, ties to the lower index, in index order."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return tuple(sorted(order[:keep]))


def choose(layers: list[int], num_experts: int, keep: int, *, scores: np.ndarray | None = None,
           seed: int = 0) -> dict[int, tuple[int, ...]]:
    """Per MoE layer, the kept experts: by `scores` ([L, E], rows in `layers` order), else at random."""
    if scores is not None:
        return {layer: top_experts(scores[i], keep) for i, layer in enumerate(layers)}
    rng = np.random.default_rng(seed)
    return {layer: tuple(sorted(int(e) for e in rng.permutation(num_experts)[:keep])) for layer in layers}


SCOPES = ("per-layer", "global")


def layer_shares(scores: np.ndarray) -> np.ndarray:
    """Scores made comparable across layers: each layer's scores over the layer's sum (its experts'
    shares of the layer's saliency, summing to 1). REAP's output norms and mean gate weights differ
    in scale from layer to layer (later layers' outputs are larger); a share does not. For frequency
    the layer's sum is top-k in every layer, so shares rank as the frequencies do. A layer with no
    saliency at all (no token reached it) gives every expert 1/E."""
    scores = np.asarray(scores, dtype=np.float64)
    sums = scores.sum(axis=1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / scores.shape[1])
    return np.where(sums > 0, scores / np.where(sums > 0, sums, 1.0), uniform)


def choose_global(layers: list[int], num_experts: int, keep: int, floor: int, *, scores: np.ndarray | None = None,
                  seed: int = 0) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
    """`keep` x len(layers) experts kept in all, ranked across layers by their share of their layer's
    saliency (layer_shares), never fewer than `floor` (top-k) in any layer: each layer's best `floor`
    first, then the best of the rest across all layers; ties to the lower layer, then the lower
    expert. Random (no scores): seeded uniform scores, ranked the same way.
    Returns (kept per layer, in index order; {layer: what the ranking alone kept} for every layer the
    floor raised)."""
    if scores is None:
        scores = np.random.default_rng(seed).random((len(layers), num_experts))
    share = layer_shares(scores)
    total = keep * len(layers)
    order = sorted(((i, e) for i in range(len(layers)) for e in range(num_experts)),
                   key=lambda ie: (-float(share[ie]), ie[0], ie[1]))
    alone = {layer: 0 for layer in layers}
    for i, _ in order[:total]:
        alone[layers[i]] += 1
    kept = {layer: set(top_experts(share[i], floor)) for i, layer in enumerate(layers)}
    left = total - floor * len(layers)
    for i, e in order:
        if left <= 0:
            break
        if e not in kept[layers[i]]:
            kept[layers[i]].add(e)
            left -= 1
    raised = {layer: n for layer, n in alone.items() if n < floor}
    return {layer: tuple(sorted(k)) for layer, k in kept.items()}, raised

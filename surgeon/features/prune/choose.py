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

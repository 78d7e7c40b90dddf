"""Which experts each MoE layer merges: average-linkage agglomerative clustering on output similarity.

HC-SMoE ("Retraining-Free Merging of Sparse MoE via Hierarchical Clustering") groups experts
bottom-up by how alike their outputs are on the same calibration tokens, with average linkage: the
distance of two groups is the mean distance (1 - cosine similarity) of their members, and the
closest two groups are joined until N remain. Ties join the pair whose lowest members come first,
so the same similarity gives the same clusters on any machine.
"""

from __future__ import annotations

import numpy as np

from surgeon.errors import SurgeonError

WEIGHTS = ("frequency", "reap", "uniform")  # what members are averaged by (merge-experts --by)


def agglomerate(similarity: np.ndarray, into: int) -> list[tuple[int, ...]]:
    """The `into` clusters of one layer's experts ([E, E] similarity), each sorted, ordered by first member."""
    n = similarity.shape[0]
    dist = 1.0 - np.asarray(similarity, dtype=np.float64)
    clusters: list[list[int]] = [[e] for e in range(n)]
    alive = list(range(n))
    while len(alive) > into:
        best = None
        for ai, a in enumerate(alive):
            for b in alive[ai + 1:]:
                key = (dist[a, b], min(clusters[a]), min(clusters[b]))
                if best is None or key < best[0]:
                    best = (key, a, b)
        _, a, b = best
        na, nb = len(clusters[a]), len(clusters[b])
        # Lance-Williams for average linkage: the joined group's mean distance to every other group
        dist[a, :] = dist[:, a] = (na * dist[a, :] + nb * dist[b, :]) / (na + nb)
        clusters[a] = sorted(clusters[a] + clusters[b])
        alive.remove(b)
    return sorted((tuple(clusters[a]) for a in alive), key=lambda c: c[0])


def member_weights(cluster: tuple[int, ...], values: np.ndarray | None) -> list[float]:
    """Each member's share of the merged expert: its value (frequency or REAP) over the cluster's sum;
    equal shares for `uniform` (values None) and for a cluster no calibration token reached."""
    if values is None:
        return [1.0 / len(cluster)] * len(cluster)
    v = [max(float(values[e]), 0.0) for e in cluster]
    total = sum(v)
    if total <= 0:
        return [1.0 / len(cluster)] * len(cluster)
    return [x / total for x in v]


def cluster_layers(layers: list[int], similarity: np.ndarray, into: int, values: np.ndarray | None
                   ) -> tuple[dict[int, list[tuple[int, ...]]], dict[int, list[list[float]]]]:
    """Per MoE layer its clusters and each cluster's member weights (rows of the arrays in `layers` order)."""
    if similarity.shape[0] != len(layers):
        raise SurgeonError(f"merge: similarity for {similarity.shape[0]} layers, the model has {len(layers)}")
    clusters, weights = {}, {}
    for i, layer in enumerate(layers):
        clusters[layer] = agglomerate(similarity[i], into)
        weights[layer] = [member_weights(c, None if values is None else values[i]) for c in clusters[layer]]
    return clusters, weights

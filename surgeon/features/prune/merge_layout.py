"""What a merged checkpoint holds: per MoE layer, each cluster of experts as one expert.

The rule, for every tensor with an expert in it (each expert's gate/up/down or w1/w2/w3, their
biases, and the rows of fused expert tensors, gpt-oss and Llama 4) and for every router tensor whose
first axis is the expert axis (the router's weight rows, its bias, `e_score_correction_bias`):

    merged = sum over the cluster's members m of  w_m * tensor_m,   w_m = value_m / sum of values

where value is the member's calibration frequency (HC-SMoE's and MC-SMoE's weighting), its REAP
score, or 1 (uniform); equal shares when no calibration token reached any member. The sum is taken
in float64 in member order and rounded once to the tensor's own dtype (bf16 stays bf16,
`e_score_correction_bias` stays fp32). A cluster of one is its expert's bytes, renumbered, as in a
pruning. Merged experts are numbered in the order of their lowest member.

Approximate by construction: averaging weights averages functions only where the experts are
alike (SwiGLU is not linear in its weights), and for a softmax router the merged row's logit is the
weighted mean of the members' logits, so its probability exp(mean logit) / Z is at most the weighted
mean of the members' probabilities, not their sum (Jensen): a merged expert is chosen less often
than its members together were. Top-k and any renormalisation (norm_topk_prob) work as before.
"""

from __future__ import annotations

from surgeon.core.anatomy import Part
from surgeon.core.donor import Donor
from surgeon.core.plan import Plan
from surgeon.core.resolve import Resolution, Source
from surgeon.errors import SurgeonError
from surgeon.features.prune.layout import renamed
from surgeon.features.prune.reader import Reader as _Reader

AVERAGED_DTYPES = ("F32", "F16", "BF16", "F64")


def merged_resolution(donor: Donor, clusters: dict[int, list[tuple[int, ...]]], weights: dict[int, list[list[float]]],
                      num_experts: int) -> tuple[Resolution, dict, object]:
    """The source map of the merged checkpoint; for its new tensors, the functions writing their bytes
    (export_hybrid's `computed`); and the callable that closes the files they read."""
    sources: dict[str, Source] = {}
    parts: dict[str, Part] = {}
    computed: dict = {}
    reader = _Reader(donor)
    for name in donor.ordered_names:
        info = donor.tensors[name]
        part = donor.anatomy.parts.get(name)
        layer_clusters = clusters.get(part.layer) if part is not None else None
        src = Source("A", name, info.dtype, info.shape, info.dtype)
        if layer_clusters is None or part.kind not in ("expert", "router"):
            sources[name], parts[name] = src, part
            continue
        layer_weights = weights[part.layer]
        if part.kind == "expert" and part.expert is not None:
            for new, cluster in enumerate(layer_clusters):
                if cluster[0] != part.expert:
                    continue
                out = renamed(name, donor, part, new)
                parts[out] = Part("expert", part.layer, new)
                if len(cluster) == 1:
                    sources[out] = src
                    continue
                members = [renamed(name, donor, part, e) for e in cluster]
                for m in members:
                    _check_member(donor, m, info, name)
                sources[out] = src
                computed[out] = _averaged(reader, members, layer_weights[new], info.dtype)
            continue
        if not info.shape or info.shape[0] != num_experts:
            raise SurgeonError(f"tensor {name} ({donor.path}): shape {list(info.shape)}, not {num_experts} experts "
                               "along its first axis, so its experts cannot be merged")
        _check_dtype(name, info.dtype, donor)
        sources[name] = Source("A", name, info.dtype, (len(layer_clusters), *info.shape[1:]), info.dtype)
        parts[name] = part
        computed[name] = _rows(reader, name, layer_clusters, layer_weights, info.dtype)
    resolution = Resolution(Plan("A"), sources, {n: p for n, p in parts.items() if p is not None})
    return resolution, computed, reader.close


def _check_dtype(name: str, dtype: str, donor: Donor) -> None:
    if dtype not in AVERAGED_DTYPES:
        raise SurgeonError(f"tensor {name} ({donor.path}): {dtype} (quantized) cannot be averaged; merge a "
                           "checkpoint in bf16, fp16 or fp32")


def _check_member(donor: Donor, member: str, like, name: str) -> None:
    info = donor.tensors.get(member)
    if info is None:
        raise SurgeonError(f"tensor {member} is missing in {donor.path}, so {name}'s experts cannot be merged")
    if info.shape != like.shape or info.dtype != like.dtype:
        raise SurgeonError(f"tensor {member} ({donor.path}): {info.dtype} {list(info.shape)}, but {name} is "
                           f"{like.dtype} {list(like.shape)}; they cannot be averaged")
    _check_dtype(member, info.dtype, donor)


def weighted_average(tensors, weights: list[float], dtype):
    """sum_m w_m * t_m in float64, member by member, rounded once to `dtype` (the rule above)."""
    acc = None
    for t, w in zip(tensors, weights):
        term = t.double() * w
        acc = term if acc is None else acc.add_(term)
    return acc.to(dtype)


def _bytes(t) -> memoryview:
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _averaged(reader: _Reader, members: list[str], weights: list[float], dtype: str):
    def make():
        from surgeon.live.dtypes import TORCH_DTYPES

        yield _bytes(weighted_average((reader.read(m) for m in members), weights, TORCH_DTYPES[dtype]))

    return make


def _rows(reader: _Reader, name: str, clusters: list[tuple[int, ...]], weights: list[list[float]], dtype: str):
    """A tensor with the expert axis first, one output row per cluster: a cluster of one is its row's bytes."""
    def make():
        from surgeon.live.dtypes import TORCH_DTYPES

        for cluster, w in zip(clusters, weights):
            if len(cluster) == 1:
                yield _bytes(reader.read(name, cluster[0]))
            else:
                yield _bytes(weighted_average((reader.read(name, e) for e in cluster), w, TORCH_DTYPES[dtype]))

    return make

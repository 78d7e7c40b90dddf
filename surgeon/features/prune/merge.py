"""`run_merge`: cluster each MoE layer's experts by what they compute and write each cluster as one expert.

The command line (`moe-surgeon merge-experts`) calls this. As `run_prune`: every check that needs
no weights first (the family, --into against the expert count and top-k, dtypes that can be
averaged, the output), then one forward pass over the calibration corpora collects each expert's
frequency and REAP score and keeps the router input of a fixed sample of tokens, on which every
expert is then run once to compare their outputs (saliency.py). Per layer the experts are clustered
bottom-up on that similarity (cluster.py: HC-SMoE's average linkage) into N, and each cluster is
averaged with weights from its members' frequency (HC-SMoE, MC-SMoE), REAP score, or uniformly
(merge_layout.py states the rule and why it is approximate). Written by write.py, as a pruning is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from surgeon import __version__
from surgeon.errors import SurgeonError
from surgeon.features.prune.choose import keep_count
from surgeon.features.prune.cluster import WEIGHTS, cluster_layers
from surgeon.features.prune.layout import check_top_k, count_keys, moe_shape
from surgeon.features.prune.run import check_session_target, measure, read_corpora
from surgeon.features.prune.saliency import Saliency
from surgeon.features.prune.session import write_and_record
from surgeon.jobs import NEVER


@dataclass(frozen=True)
class MergeRequest:
    """What `moe-surgeon merge-experts` was asked; the flags' names and defaults."""

    out: str
    base: str
    into: int | None = None
    ratio: float | None = None  # the share of experts merged away
    by: str = "frequency"  # what members are averaged by: frequency | reap | uniform
    corpora: tuple[str, ...] = ()
    sample_tokens: int = 256  # tokens every expert is run on to compare outputs
    max_tokens: int | None = None
    batch_size: int = 16
    device: str | None = None
    dtype: str = "keep"  # compute dtype of the measuring pass; the averaging is float64
    max_shard_size: str = "5GB"
    force: bool = False
    fsync: bool = False
    allow_pickle: bool = False
    save_session: str | None = None


@dataclass
class MergeResult:
    report: dict
    saliency: Saliency
    clusters: dict[int, list[tuple[int, ...]]]


def run_merge(request: MergeRequest, progress=None, cancel=NEVER,
              warn: Callable[[str], None] | None = None) -> MergeResult:
    from surgeon.core.donor import open_donor
    from surgeon.features.prune.merge_layout import merged_resolution
    from surgeon.io.sizes import parse_size
    from surgeon.io.staged import check_target

    r = request
    if r.by not in WEIGHTS:
        raise SurgeonError(f"--by {r.by}: expected one of {', '.join(WEIGHTS)} (what members are averaged by)")
    if r.batch_size < 1:
        raise SurgeonError(f"--batch-size {r.batch_size}: expected at least 1")
    if r.sample_tokens < 1:
        raise SurgeonError(f"--sample-tokens {r.sample_tokens}: expected at least 1")
    max_shard = parse_size(r.max_shard_size)
    donor = open_donor(r.base, allow_pickle=r.allow_pickle)
    layers, num_experts = moe_shape(donor)
    into = merged_count(r, num_experts)
    check_top_k(donor, into)  # every refusal that needs no weights comes before the measuring pass
    count_keys(donor, num_experts)
    out = Path(r.out).absolute()
    check_target(out, {"A": donor}, r.force)
    check_session_target(r.save_session)
    # every tensor can be averaged (no quantized experts) before anything is measured
    trial = {layer: [tuple(range(num_experts - into + 1))] + [(e,) for e in range(num_experts - into + 1, num_experts)]
             for layer in layers}
    _, _, close = merged_resolution(donor, trial, {k: [[1.0] * len(c) for c in v] for k, v in trial.items()},
                                    num_experts)
    close()
    corpora = read_corpora(r.corpora)
    cancel.check()

    saliency, device = measure(donor, {c["name"]: c.pop("texts") for c in corpora}, r, progress, cancel,
                               reap=r.by == "reap", similarity_tokens=r.sample_tokens)
    report = merge_report(r, donor, saliency=saliency, corpora=corpora, device=device, max_shard=max_shard)
    write_and_record(donor, report, out, r, max_shard=max_shard, progress=progress, cancel=cancel, warn=warn)
    return MergeResult(report, saliency, {int(k): [tuple(c) for c in v] for k, v in report["clusters"].items()})


def merged_count(r: MergeRequest, num_experts: int) -> int:
    try:
        return keep_count(num_experts, r.into, r.ratio)
    except SurgeonError as e:  # the same bounds as a pruning's, in this command's words
        raise SurgeonError(str(e).replace("--keep N (experts kept per layer)", "--into N (experts per layer after)")
                           .replace("--keep", "--into").replace("prunes", "merges away")) from None


def merge_report(r: MergeRequest, donor, *, saliency: Saliency, corpora: list[dict], device: str | None,
                 max_shard: int) -> dict:
    """The record of a merging: the clusters of `saliency.similarity` and each member's weight, with
    everything the model card, the session and `replay` read; the command and the workbench both
    make it here."""
    layers, num_experts = moe_shape(donor)
    into = merged_count(r, num_experts)
    if saliency.layers != layers or saliency.num_experts != num_experts:
        raise SurgeonError(f"{donor.path}: the model routes over {saliency.num_experts} experts in layers "
                           f"{saliency.layers}, but its files hold {num_experts} in layers {layers}")
    if saliency.similarity is None:
        raise SurgeonError("merge: the saliency pass did not compare the experts' outputs")
    for c in corpora:
        c["tokens"] = saliency.corpora[c["name"]]
    values = None if r.by == "uniform" else saliency.scores(r.by)
    clusters, weights = cluster_layers(layers, saliency.similarity, into, values)
    return {
        "moe_surgeon": __version__,
        "operation": "merge",
        "base": {"spec": r.base, "path": str(donor.path), "model_type": donor.model_type,
                 "fingerprint": donor.fingerprint},
        "criterion": r.by, "num_experts": num_experts, "into": into, "ratio": r.ratio,
        "clustering": "average-linkage agglomerative on 1 - cosine similarity of the experts' outputs",
        "experts_keys": count_keys(donor, num_experts),
        "top_k": check_top_k(donor, into), "top_k_key": donor.anatomy.architecture.top_k_key,
        "corpora": corpora, "sample_tokens": saliency.similarity_tokens, "max_tokens": r.max_tokens,
        "batch_size": r.batch_size, "device": device, "dtype": r.dtype,
        "clusters": {str(layer): [list(c) for c in cs] for layer, cs in clusters.items()},
        "weights": {str(layer): ws for layer, ws in weights.items()},
        "saliency": saliency.to_json(),
        "command": command_line(r),
        "max_shard_size": max_shard,
    }


def command_line(r: MergeRequest) -> str:
    """The command that makes this merging again (the output directory aside)."""
    parts = ["moe-surgeon merge-experts OUT", f"--base {r.base}"]
    parts.append(f"--into {r.into}" if r.into is not None else f"--ratio {r.ratio:g}")
    parts.append(f"--by {r.by}")
    parts += [f"--corpus {c}" for c in r.corpora]
    parts.append(f"--sample-tokens {r.sample_tokens}")
    if r.max_tokens is not None:
        parts.append(f"--max-tokens {r.max_tokens}")
    parts.append(f"--batch-size {r.batch_size}")
    if r.dtype != "keep":
        parts.append(f"--dtype {r.dtype}")
    return " ".join(parts)

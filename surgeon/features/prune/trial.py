"""A pruning or merging tried before it is kept: chosen from routing already measured, written to a
scratch directory, probed beside the original, then exported and recorded as the commands do.

The workbench's Routing screen measures frequency, gate weight and REAP per corpus in the pass that
draws its heatmap; `saliency.from_routing` pools the corpora as `moe-surgeon prune --corpus` does, so
`prune_choice` keeps what that command keeps on the same corpora and batch size (the record's
`command` is that command). Merging also compares what the experts compute on shared tokens, which
the routing pass does not keep, so `merge_choice` runs the merge command's measuring pass.

The record is the one `run_prune` / `run_merge` make (`prune_report`, `merge_report`): the model
card, `replay` and `prune_session` read it unchanged, and `write_smaller` writes the same bytes
from it wherever it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgeon.core.plan import Plan
from surgeon.features.prune.compare import ORIGINAL, TRIAL, comparison, session_results  # noqa: F401 (re-exported)
from surgeon.jobs import NEVER


def prune_choice(donor, spec: str, stats: dict | None, keep: int, by: str, *, batch_size: int, device: str | None,
                 seed: int = 0, max_shard_size: str = "5GB") -> dict:
    """The prune record of keeping `keep` experts per layer of `donor` by `by`, given its routing
    `stats` (corpus name -> RoutingStats with REAP where `by` is reap); `--by random` reads none."""
    from surgeon.errors import SurgeonError
    from surgeon.features.prune.run import PruneRequest, prune_report, read_corpora
    from surgeon.features.prune.saliency import CRITERIA, from_routing
    from surgeon.io.sizes import parse_size

    if by not in CRITERIA:
        raise SurgeonError(f"by {by}: expected one of {', '.join(CRITERIA)}")
    corpora = tuple(stats or ()) if by != "random" else ()
    r = PruneRequest(out="", base=spec, keep=keep, by=by, seed=seed, corpora=corpora, batch_size=batch_size,
                     device=device, max_shard_size=max_shard_size)
    saliency = None
    if by != "random":
        if not stats:
            raise SurgeonError(f"by {by}: no routing has been measured for {spec} yet")
        saliency = from_routing(stats)
    records = [{k: v for k, v in c.items() if k != "texts"} for c in read_corpora(corpora)] if corpora else []
    return prune_report(r, donor, saliency=saliency, corpora=records, device=device if saliency else None,
                        max_shard=parse_size(max_shard_size))


@dataclass(frozen=True)
class MergeMeasure:
    """What a merge preview measured once: changing N or the weighting needs no new pass."""

    saliency: object  # Saliency with similarity and REAP
    corpora: list[dict]
    device: str


def measure_for_merge(donor, corpora: tuple[str, ...], *, batch_size: int, device: str | None,
                      sample_tokens: int = 256, progress=None, cancel=NEVER) -> MergeMeasure:
    """The merge command's measuring pass (frequency, REAP, the experts' outputs on `sample_tokens`)."""
    from surgeon.features.prune.merge import MergeRequest
    from surgeon.features.prune.run import measure, read_corpora

    r = MergeRequest(out="", base=str(donor.path), into=1, corpora=corpora, sample_tokens=sample_tokens,
                     batch_size=batch_size, device=device)
    read = read_corpora(corpora)
    saliency, used = measure(donor, {c["name"]: c.pop("texts") for c in read}, r, progress, cancel, reap=True,
                             similarity_tokens=sample_tokens)
    return MergeMeasure(saliency, read, used)


def merge_choice(donor, spec: str, measured: MergeMeasure, into: int, by: str, *, batch_size: int,
                 sample_tokens: int = 256, max_shard_size: str = "5GB") -> dict:
    """The merge record of clustering `donor`'s experts into `into` per layer, members weighted by `by`."""
    from surgeon.errors import SurgeonError
    from surgeon.features.prune.cluster import WEIGHTS
    from surgeon.features.prune.merge import MergeRequest, merge_report
    from surgeon.io.sizes import parse_size

    if by not in WEIGHTS:
        raise SurgeonError(f"by {by}: expected one of {', '.join(WEIGHTS)} (what members are averaged by)")
    r = MergeRequest(out="", base=spec, into=into, by=by, corpora=tuple(c["name"] for c in measured.corpora),
                     sample_tokens=sample_tokens, batch_size=batch_size, device=measured.device,
                     max_shard_size=max_shard_size)
    return merge_report(r, donor, saliency=measured.saliency, corpora=[dict(c) for c in measured.corpora],
                        device=measured.device, max_shard=parse_size(max_shard_size))


def write_trial(donor, record: dict, directory, *, progress=None, cancel=NEVER):
    """The smaller model written to `directory` (a new path in scratch space) and opened as a donor."""
    from surgeon.core.donor import open_donor
    from surgeon.features.prune.write import write_smaller

    write_smaller(donor, record, Path(directory), max_shard_size=record["max_shard_size"],
                  progress=progress, cancel=cancel)
    return open_donor(str(directory))


def probe_trial(trial, original, specs, *, device: str | None = None, batch_size: int = 16, progress=None,
                cancel=NEVER, note=None):
    """The probes on the smaller model and on the original, per item (features/probe.run_probe); the
    original's scores come from the probe cache when the Probes screen or `probe` measured it already."""
    from surgeon.features.probe import ProbeRequest, run_probe

    request = ProbeRequest(Plan(TRIAL), {TRIAL: trial, ORIGINAL: original}, list(specs), device=device,
                           batch_size=batch_size, shown_as="the smaller model")
    return run_probe(request, progress=progress, cancel=cancel, note=note)

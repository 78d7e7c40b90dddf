"""`run_prune`: score every expert on a calibration corpus, keep the N best per MoE layer, write the smaller MoE.

The command line (`moe-surgeon prune`) calls this. Every check that needs no weights runs first
(the family, --keep/--ratio against the expert count and top-k, the corpora, the output
directory), then one forward pass scores the experts (saliency.py), and the checkpoint is written
by the export's streaming writer (features/export.py): kept experts move as byte ranges of the
original, renumbered in order, so nothing is cast or held in memory, and the write is atomic.

The writing is `write.write_smaller`, which `replay` of a prune session calls with the recorded
choice. Beside the weights it writes `moe-surgeon-prune.json` (criterion, corpora with their content
hashes, settings, every saliency figure and the kept experts per layer), the model card, and the
manifest, which `moe-surgeon verify --donors` checks range by range against the original.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from surgeon import __version__
from surgeon.errors import SurgeonError
from surgeon.features.prune.choose import SCOPES, choose, choose_global, keep_count
from surgeon.features.prune.layout import check_padding, check_top_k, count_keys, moe_shape, pruned_resolution
from surgeon.features.prune.saliency import CRITERIA, Saliency
from surgeon.features.prune.session import write_and_record
from surgeon.features.prune.write import PRUNE_FILE
from surgeon.jobs import NEVER

__all__ = ["PRUNE_FILE", "PruneRequest", "PruneResult", "run_prune"]


@dataclass(frozen=True)
class PruneRequest:
    """What `moe-surgeon prune` was asked; the flags' names and defaults."""

    out: str
    base: str
    keep: int | None = None
    ratio: float | None = None  # the share of experts pruned
    by: str = "reap"
    seed: int = 0  # --by random
    scope: str = "per-layer"  # or "global": N x layers kept in all, ranked across layers (choose.choose_global)
    corpora: tuple[str, ...] = ()  # NAME=FILE, a built-in set or a file; none: the routing defaults
    max_tokens: int | None = None  # per corpus
    batch_size: int = 16
    device: str | None = None
    dtype: str = "keep"  # compute dtype of the saliency pass; the written bytes are the original's
    max_shard_size: str = "5GB"
    force: bool = False
    fsync: bool = False
    allow_pickle: bool = False
    save_session: str | None = None  # also save a session that `replay --export` rebuilds this from


@dataclass
class PruneResult:
    report: dict  # what --json prints; also the record written beside the weights
    saliency: Saliency | None
    kept: dict[int, tuple[int, ...]]


def run_prune(request: PruneRequest, progress=None, cancel=NEVER,
              warn: Callable[[str], None] | None = None) -> PruneResult:
    from surgeon.core.donor import open_donor
    from surgeon.io.sizes import parse_size
    from surgeon.io.staged import check_target

    r = request
    if r.by not in CRITERIA:
        raise SurgeonError(f"--by {r.by}: expected one of {', '.join(CRITERIA)}")
    if r.scope not in SCOPES:
        raise SurgeonError(f"scope {r.scope!r}: expected one of {', '.join(SCOPES)}")
    if r.by == "random" and r.corpora:
        raise SurgeonError("--by random reads no corpus; drop --corpus (or choose another criterion)")
    if r.batch_size < 1:
        raise SurgeonError(f"--batch-size {r.batch_size}: expected at least 1")
    max_shard = parse_size(r.max_shard_size)
    donor = open_donor(r.base, allow_pickle=r.allow_pickle)
    layers, num_experts = moe_shape(donor)
    keep = keep_count(num_experts, r.keep, r.ratio)
    check_top_k(donor, keep)  # every refusal that needs no weights comes before the saliency pass
    count_keys(donor, num_experts)
    out = Path(r.out).absolute()
    check_target(out, {"A": donor}, r.force)
    check_session_target(r.save_session)
    pruned_resolution(donor, {layer: tuple(range(keep)) for layer in layers}, num_experts)  # every slice is possible
    corpora = read_corpora(r.corpora) if r.by != "random" else []
    cancel.check()

    saliency, device = None, None
    if r.by != "random":
        saliency, device = measure(donor, {c["name"]: c.pop("texts") for c in corpora}, r, progress, cancel,
                                   reap=r.by == "reap")
    report = prune_report(r, donor, saliency=saliency, corpora=corpora, device=device, max_shard=max_shard)
    write_and_record(donor, report, out, r, max_shard=max_shard, progress=progress, cancel=cancel, warn=warn)
    return PruneResult(report, saliency, {int(k): tuple(v) for k, v in report["kept"].items()})


def prune_report(r: PruneRequest, donor, *, saliency: Saliency | None, corpora: list[dict], device: str | None,
                 max_shard: int) -> dict:
    """The record of a pruning: the experts `r.by` keeps given `saliency` (None: --by random), with
    everything the model card, the session and `replay` read. The command and the workbench (which
    pools the saliency its Routing screen measured) both make it here, so they choose alike."""
    layers, num_experts = moe_shape(donor)
    keep = keep_count(num_experts, r.keep, r.ratio)
    if saliency is not None:
        if saliency.layers != layers or saliency.num_experts != num_experts:
            raise SurgeonError(f"{donor.path}: the model routes over {saliency.num_experts} experts in layers "
                               f"{saliency.layers}, but its files hold {num_experts} in layers {layers}")
        for c in corpora:
            c["tokens"] = saliency.corpora[c["name"]]
    scores = None if saliency is None else saliency.scores(r.by)
    top_k = check_top_k(donor, keep)
    scope: dict = {"scope": r.scope}
    if r.scope == "global":
        floor = top_k or 1
        kept, raised = choose_global(layers, num_experts, keep, floor, scores=scores, seed=r.seed)
        size = check_padding(donor, kept, num_experts)
        scope.update(normalised="each layer's scores over the layer's sum (shares of the layer's saliency)",
                     total_kept=keep * len(layers), floor=floor,
                     raised={str(layer): n for layer, n in raised.items()}, experts_after=size,
                     padded={str(layer): size - len(k) for layer, k in kept.items() if len(k) < size})
    else:
        kept = choose(layers, num_experts, keep, scores=scores, seed=r.seed)
    return {
        "moe_surgeon": __version__,
        "operation": "prune",
        "base": {"spec": r.base, "path": str(donor.path), "model_type": donor.model_type,
                 "fingerprint": donor.fingerprint},
        "criterion": r.by, "num_experts": num_experts, "keep": keep, "ratio": r.ratio, **scope,
        "experts_keys": count_keys(donor, num_experts),
        "top_k": top_k, "top_k_key": donor.anatomy.architecture.top_k_key,
        "seed": r.seed if r.by == "random" else None,
        "corpora": corpora, "max_tokens": r.max_tokens, "batch_size": r.batch_size, "device": device,
        "dtype": r.dtype,
        "kept": {str(layer): list(e) for layer, e in kept.items()},
        "pruned": {str(layer): [e for e in range(num_experts) if e not in kept[layer]] for layer in layers},
        "saliency": None if saliency is None else saliency.to_json(),
        "command": command_line(r),
        "max_shard_size": max_shard,
    }


def check_session_target(path: str | None) -> None:
    """A session that cannot be saved fails before the saliency pass, not after the export."""
    if path:
        from surgeon.io.fs import check_writable

        check_writable(path, "save the session")


def read_corpora(args: tuple[str, ...]) -> list[dict]:
    """Each corpus with what identifies it in the record: its file and the hash of its bytes."""
    from surgeon.features.routing.corpora import DEFAULT_CORPORA, corpus_texts, parse_corpus

    out: list[dict] = []
    for arg in args or DEFAULT_CORPORA:
        name, path = parse_corpus(arg)
        if any(c["name"] == name for c in out):
            raise SurgeonError(f"--corpus {arg!r}: corpus name {name!r} given twice")
        out.append({"name": name, "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "texts": corpus_texts(path)})
    return out


def measure(donor, corpora: dict[str, list[str]], r, progress, cancel, *, reap: bool,
            similarity_tokens: int = 0) -> tuple[Saliency, str]:
    """The saliency of `donor`'s experts over `corpora`, on r.device in r.dtype; and the device."""
    from transformers.utils import logging

    from surgeon.features.prune.saliency import collect_saliency
    from surgeon.features.routing.run import load_model
    from surgeon.live.devices import check_device, default_device
    from surgeon.probes.scoring import load_tokenizer

    device = str(check_device(r.device or default_device()))
    logging.disable_progress_bar()  # a loading bar between the lines of a report is noise
    tokenizer = load_tokenizer(donor.path)
    cancel.check()
    model = load_model(donor, device, r.dtype)
    try:
        saliency = collect_saliency(model, tokenizer, corpora, reap=reap, batch_size=r.batch_size,
                                    max_tokens=r.max_tokens, similarity_tokens=similarity_tokens,
                                    progress=progress, cancel=cancel)
    finally:
        del model
    return saliency, device


def command_line(r: PruneRequest) -> str:
    """The command that makes this pruning again (the output directory aside)."""
    parts = ["moe-surgeon prune OUT", f"--base {r.base}"]
    parts.append(f"--keep {r.keep}" if r.keep is not None else f"--ratio {r.ratio:g}")
    parts.append(f"--by {r.by}")
    if r.scope == "global":
        parts.append("--global")
    if r.by == "random":
        parts.append(f"--seed {r.seed}")
    parts += [f"--corpus {c}" for c in r.corpora]
    if r.max_tokens is not None:
        parts.append(f"--max-tokens {r.max_tokens}")
    if r.by != "random":
        parts.append(f"--batch-size {r.batch_size}")
        if r.dtype != "keep":
            parts.append(f"--dtype {r.dtype}")
    return " ".join(parts)

"""A pruning or merging kept as a session step, and rebuilt from it byte for byte.

The session's plan is the original alone (donor A, nothing taken), its donor proven by fingerprint
and full content hashes as every session's, and `extensions["prune"]` is the record the command
wrote beside the weights (moe-surgeon-prune.json / moe-surgeon-merge.json):

  operation        "prune" or "merge"
  criterion        prune: reap | frequency | gate | random; merge: the member weights (frequency | reap | uniform)
  num_experts      experts per MoE layer before; keep (prune) or into (merge): after
  kept             prune: {layer: [original expert indices kept, increasing]}
  clusters         merge: {layer: [[original experts of merged expert 0], ...]}, ordered by first member
  weights          merge: {layer: [[each member's weight], ...]}, exactly as used
  corpora          [{name, path, sha256, tokens}] (paths relative to the session file when one is given)
  saliency         every figure measured (frequency, gate, REAP, the experts' output similarity)
  seed, max_tokens, batch_size, device, dtype, max_shard_size, command

`rebuild_from_session` writes from `kept` or `clusters` + `weights` alone: no corpus is read and
nothing is measured again, so the rebuild is the same bytes on any device. The workbench records a
pruning by `prune_session` as the command line does.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER

EXTENSION = "prune"


PROBES = "prune_probes"  # extensions[PROBES]: the workbench's trial of the smaller model against the original


def prune_session(record: dict, donor, session_path: str | os.PathLike | None, written=None, probes=None):
    """A session holding `record` (what run_prune / run_merge reported) as its step; `written` (an
    ExportResult) is recorded as the session's export. `probes` (specs, records): the workbench's
    probe run of this very record's model beside the original (trial.probe_trial), kept in
    extensions["prune_probes"]: the specs, the per-probe comparison (delta, items lost and gained,
    McNemar p) and every per-item record (trial.session_results: `pruned` / `merged` and `donor:A`).
    Not in the session's `results`, which are its plan's (the original's) and its donors'."""
    from surgeon.core.plan import Plan
    from surgeon.core.session import ExportRecord, make_session, now_utc

    session = make_session(Plan("A"), {"A": donor}, session_path)
    ext = copy.deepcopy({k: v for k, v in record.items() if k != "written"})
    session_dir = Path(session_path).resolve().parent if session_path else None
    for c in ext.get("corpora") or []:
        if session_dir is not None:
            try:
                c["path"] = os.path.relpath(Path(c["path"]).resolve(), session_dir)
            except ValueError:
                pass
    session.extensions[EXTENSION] = ext
    if probes is not None:
        from surgeon.features.prune.compare import comparison, session_results

        specs, records = probes
        operation = record.get("operation", "prune")
        session.extensions[PROBES] = {"model": f"{operation}d", "against": "donor:A",
                                      "probes": [s.to_json() for s in specs],
                                      "comparison": comparison(records),
                                      "records": session_results(records, operation)}
    if written is not None:
        session.exports.append(ExportRecord(path=str(written.path), dtype="keep",
                                            max_shard_size=record.get("max_shard_size"), shards=len(written.shards),
                                            tensors=written.tensors, bytes=written.bytes, time=now_utc(),
                                            kind=record.get("operation", "prune")))
    return session


def save_prune_session(record: dict, donor, session_path, written=None, *, probes=None, progress=None,
                       cancel=NEVER) -> None:
    """Save the session of a pruning or merging, its donor proven by full content hashes (read once, cached)."""
    from surgeon.core.session import record_full_hashes, save_session

    session = prune_session(record, donor, session_path, written, probes)
    record_full_hashes(session, {"A": donor}, progress=progress, cancel=cancel)
    save_session(session, session_path)


def recorded_step(session, session_path) -> dict:
    ext = session.extensions.get(EXTENSION)
    if not isinstance(ext, dict) or ext.get("operation", "prune") not in ("prune", "merge"):
        raise SurgeonError(f"{session_path}: invalid session: field extensions/{EXTENSION}: expected a prune or "
                           "merge record")
    return ext


def check_recorded(session, session_path, donors: dict) -> dict:
    """The session's record, every field the rebuild reads checked against the base donor: a hand
    edit is one line naming the field, before anything is written."""
    from surgeon.features.prune.layout import moe_shape
    from surgeon.features.prune.write import clusters_of, kept_of

    ext = recorded_step(session, session_path)
    layers, num_experts = moe_shape(donors[session.plan.base])
    origin = f"{session_path}: invalid session: field extensions/{EXTENSION}/"
    if ext.get("num_experts") != num_experts:
        raise SurgeonError(f"{origin}num_experts: {ext.get('num_experts')!r}, but "
                           f"{donors[session.plan.base].path} has {num_experts} experts per MoE layer")
    shard = ext.get("max_shard_size", 5 * 10**9)
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 1:
        raise SurgeonError(f"{origin}max_shard_size: {shard!r} is not a size in bytes")
    if ext.get("operation") == "merge":
        clusters_of(ext, layers, num_experts, origin)
    else:
        from surgeon.features.prune.layout import check_padding

        kept = kept_of(ext, layers, num_experts, origin)
        check_padding(donors[session.plan.base], kept, num_experts, what=f"{origin}kept")  # --global's
    return ext


def rebuild_from_session(session, session_path, donors: dict, out, *, force: bool = False, fsync: bool = False,
                         progress=None, cancel=NEVER, warn=None):
    """Write the checkpoint a prune or merge session records, from its recorded choice; returns
    (the record, ExportResult, Resolution)."""
    from surgeon.features.prune.write import write_smaller

    ext = check_recorded(session, session_path, donors)
    written, resolution = write_smaller(donors[session.plan.base], ext, out,
                                        max_shard_size=ext.get("max_shard_size", 5 * 10**9), force=force, fsync=fsync,
                                        progress=progress, cancel=cancel, warn=warn,
                                        origin=f"{session_path}: invalid session: field extensions/{EXTENSION}/")
    return ext, written, resolution


def write_and_record(donor, report: dict, out, request, *, max_shard: int, progress=None, cancel=NEVER,
                     warn=None) -> None:
    """The end a pruning and a merging share: write the checkpoint `report` describes, add what was
    written to the report, and save the session when `request.save_session` names one."""
    from surgeon.features.prune.write import write_smaller

    written, resolution = write_smaller(donor, report, out, max_shard_size=max_shard, force=request.force,
                                        fsync=request.fsync, progress=progress, cancel=cancel, warn=warn)
    report["written"] = {"path": str(written.path), "shards": written.shards, "tensors": written.tensors,
                         "bytes": written.bytes, "parameters_before": donor.num_parameters,
                         "parameters_after": sum(resolution.parameters_by_donor().values())}
    if request.save_session:
        save_prune_session(report, donor, request.save_session, written, progress=progress, cancel=cancel)

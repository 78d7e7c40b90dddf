"""Export: stream a resolved hybrid into a new checkpoint directory, and record it in the session.

`run_export` is the use case the command line (`export`, `replay --export`) and the workbench's
export dialog both call, so both write the same checkpoint and the same session record.

A same-dtype tensor moves as a byte range from its donor's file through a few small reused buffers,
hashed on the way (so the manifest needs no second read of the output) and written by a second
thread while the next piece is read, where a core is free for it; an export neither
imports torch nor holds weights in memory. Only a dtype conversion reads one tensor at a time
through torch. Everything is written into a hidden sibling directory and renamed into place at
the end (`surgeon.io.staged`): an interrupted or cancelled export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from surgeon.core.donor import Donor
from surgeon.core.gates_sidecar import (
    GATES_FILE,
    gate_layer_of,
    hidden_size_of,
    sidecar_metadata,
)
from surgeon.core.plan import Plan
from surgeon.core.resolve import Resolution, layer_gates, resolve
from surgeon.core.session import (
    ExportRecord,
    Session,
    make_session,
    now_utc,
    record_full_hashes,
    save_session,
)
from surgeon.errors import SurgeonError
from surgeon.features.verify import VerifyResult, run_verify
from surgeon.io import model_card as card
from surgeon.io.fs import check_writable, read_exact
from surgeon.io.manifest import MANIFEST_FILE, build_manifest, write_manifest
from surgeon.io.model_card import SESSION_FILE
from surgeon.io.ordered_writes import copy_buffers
from surgeon.io.safetensors_file import DTYPE_SIZES
from surgeon.io.shards import (
    COPY_BUFFER,
    ExportResult,
    HashingSink,
    shard_file_names,
    split_into_shards,
    write_hashed_shard,
    write_index,
)
from surgeon.io.staged import check_target, staged_directory
from surgeon.jobs import NEVER, CancelToken, Meter, Progress
from surgeon.live.threads import spare_cores, usable_cores


@dataclass
class ExportRequest:
    """What to export, and where to record it: `session` gets the export record appended and is
    saved to `session_path` when one is given (the command line's --save-session)."""

    plan: Plan
    donors: dict[str, Donor]
    out: str | os.PathLike
    dtype: str = "keep"
    max_shard_size: int = 5 * 10**9
    force: bool = False
    fsync: bool = False
    session: Session | None = None
    session_path: str | os.PathLike | None = None
    replay: dict | None = None  # set by `replay --export`: which session, and how its donors were checked
    verify: bool = False  # re-read the written checkpoint against its manifest (what `verify OUT` does)


@dataclass
class ExportOutcome:
    resolution: Resolution
    result: ExportResult
    record: ExportRecord
    verified: VerifyResult | None = None  # with request.verify


def run_export(request: ExportRequest, progress: Progress | None = None, cancel: CancelToken = NEVER,
               warn: Callable[[str], None] | None = None) -> ExportOutcome:
    """Resolve the plan, write the checkpoint (with the plan's own session embedded, so the
    checkpoint replays), and record the export. `warn` gets the resolution's warnings before any
    byte is written."""
    if request.session_path:  # a session that cannot be saved fails now, not after the export is written
        check_writable(request.session_path, "save the session")
    resolution = resolve(request.plan, request.donors, dtype=request.dtype)
    for w in resolution.warnings:
        if warn is not None:
            warn(w)
    cancel.check()  # resolving a large plan takes a while; a cancel meanwhile writes nothing
    if request.session is not None and request.session_path:
        # A saved session proves its donors by full hashes (read once, cached); then the export's
        # manifest names them too.
        record_full_hashes(request.session, request.donors, progress=progress, cancel=cancel)
    embedded_session = make_session(request.plan, request.donors, None)
    if request.replay is not None:  # the checkpoint says it was replayed, and whether its donors were proven
        embedded_session.extensions["replay"] = request.replay
    embedded = embedded_session.to_json()
    result = export_hybrid(
        resolution, request.donors, request.out, dtype=request.dtype, max_shard_size=request.max_shard_size,
        force=request.force, session_json=embedded, progress=progress, cancel=cancel, fsync=request.fsync,
        warn=warn,
    )
    record = ExportRecord(path=str(result.path), dtype=request.dtype, max_shard_size=request.max_shard_size,
                          shards=len(result.shards), tensors=result.tensors, bytes=result.bytes, time=now_utc(),
                          extra={"manifest": MANIFEST_FILE})
    if request.session is not None:
        request.session.exports.append(record)
        if request.session_path:
            save_session(request.session, request.session_path)
    verified = run_verify(result.path, cancel=cancel) if request.verify else None
    return ExportOutcome(resolution, result, record, verified)


def plan_shards(resolution: Resolution, max_shard_size: int) -> list[list[str]]:
    gates = set(resolution.gate_names())  # these go to the gates sidecar
    return split_into_shards(((name, _nbytes(src.shape, src.dtype)) for name, src in resolution.sources.items()
                              if name not in gates), max_shard_size)


def _nbytes(shape, dtype) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def converted_bytes(donor: Donor, name: str, src_dtype: str, dst_dtype: str, fd: int | None,
                    rows: tuple[int, int] | None = None):
    """A donor tensor (or rows [lo, hi) of its first axis) cast to `dst_dtype`, as bytes."""
    import torch  # only a dtype conversion or a pickle donor needs torch

    from surgeon.live.dtypes import TORCH_DTYPES

    if name in donor.pickled:
        t = donor.pickled[name]
        if rows is not None:
            t = t[rows[0]:rows[1]]
    else:
        info = donor.tensors[name]
        start, nbytes = info.start, info.nbytes
        if rows is not None:
            row = info.nbytes // info.shape[0]
            start, nbytes = start + rows[0] * row, (rows[1] - rows[0]) * row
        t = torch.frombuffer(bytearray(read_exact(fd, nbytes, start, info.file)), dtype=TORCH_DTYPES[src_dtype])
    t = t.to(TORCH_DTYPES[dst_dtype]).contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def export_hybrid(
    resolution: Resolution,
    donors: dict[str, Donor],
    out: str | os.PathLike,
    *,
    dtype: str = "keep",
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    session_json: dict | None = None,
    progress: Progress | None = None,
    cancel: CancelToken = NEVER,
    fsync: bool = False,
    before_rename: Callable[[Path], None] | None = None,
    warn: Callable[[str], None] | None = None,
    computed: dict[str, Callable[[], Iterable]] | None = None,
) -> ExportResult:
    """Write the hybrid to `out`. The rename at the end makes an interrupted export leave nothing;
    `fsync` also flushes every shard to disk before the rename, so the export survives a power
    loss too, at the cost of waiting for the disk (an export can always be replayed).
    `progress` gets a Step in bytes after every tensor; `cancel` is checked before every tensor
    (jobs.Cancelled, with nothing left behind).
    `before_rename(tmp_dir)` may add or rewrite files (as `gates add` does) inside the atomic step.
    `warn` gets the line saying which leftovers of killed exports were removed (stderr by default).
    `computed` maps an output tensor to a function yielding its bytes in pieces (merged experts: new
    bytes, made one piece at a time so no whole fused tensor is held); its source gives only the shape
    and dtype, and the manifest names no donor for it, so `verify --donors` does not compare it."""
    out = Path(out).absolute()
    check_target(out, donors, force)
    started = time.perf_counter()
    shards = plan_shards(resolution, max_shard_size)
    total = sum(_nbytes(s.shape, s.dtype) for s in resolution.sources.values())
    names = shard_file_names(len(shards))
    fds: dict[str, int] = {}
    meter = Meter(progress, total, "bytes", "export")
    done = 0
    buffers = copy_buffers(COPY_BUFFER, usable_cores())  # every copied byte passes through them, for the whole export
    written = {}  # shard file name -> what its writer hashed

    def fd_of(donor: Donor, tensor: str) -> int | None:
        if tensor in donor.pickled:
            return None
        file = donor.tensors[tensor].file
        if file not in fds:
            fds[file] = os.open(file, os.O_RDONLY)
        return fds[file]

    def write_tensor(n: str, sink: HashingSink) -> None:
        nonlocal done
        src = resolution.sources[n]
        if computed and n in computed:
            made = 0
            for piece in computed[n]():
                sink.write(piece)
                made += memoryview(piece).nbytes
            if made != _nbytes(src.shape, src.dtype):  # the header already promised the size
                raise SurgeonError(f"tensor {n}: computed {made} bytes, not the {_nbytes(src.shape, src.dtype)} "
                                   f"of {src.dtype} {list(src.shape)}")
            done += made
            meter(done)
            return
        # A spliced fused expert tensor is its runs of experts, each a byte range of one donor's tensor.
        for lo, hi, donor_name in src.runs or ((None, None, src.donor),):
            donor = donors[donor_name]
            info = donor.tensors[src.tensor]
            fd = fd_of(donor, src.tensor)
            rows = None if lo is None else (lo, hi)
            if src.converts or src.tensor in donor.pickled:
                sink.write(converted_bytes(donor, src.tensor, src.src_dtype, src.dtype, fd, rows))
            elif rows is None:
                sink.copy(fd, info.start, info.nbytes, info.file)
            else:
                row = info.nbytes // info.shape[0]
                sink.copy(fd, info.start + lo * row, (hi - lo) * row, info.file)
        done += _nbytes(src.shape, src.dtype)
        meter(done)

    def write_file(tmp: Path, file_name: str, members: list[str], metadata: dict) -> None:
        entries = [(n, resolution.sources[n].dtype, resolution.sources[n].shape) for n in members]
        # A writer thread gains only where it runs beside this one (docs/performance.md, "A writer
        # thread"): with every other core busy now, the shard is written in turn.
        through = buffers if spare_cores() > 1 else buffers[:1]
        written[file_name] = write_hashed_shard(tmp / file_name, entries, metadata, write_tensor, through,
                                                fsync=fsync, cancel=cancel)

    try:
        # shards, plus the side files copied from the base; headers, card and manifest are small
        needed = total + sum(f.stat().st_size for f in donors[resolution.plan.base].side_files())
        with staged_directory(out, needed_bytes=needed, warn=warn) as tmp:
            weight_map = {}
            for shard_name, members in zip(names, shards):
                write_file(tmp, shard_name, members, {"format": "pt"})
                weight_map.update(dict.fromkeys(members, shard_name))
            gates = resolution.gate_names()
            if gates:  # Self-MoE layer gates: their own file, which plain transformers does not read
                write_file(tmp, GATES_FILE, gates, gates_metadata(resolution, donors))
            write_index(tmp, names, weight_map, total - _gate_bytes(resolution))
            _write_side_files(resolution, donors, tmp, dtype)
            (tmp / "README.md").write_text(model_card(resolution, donors, dtype))
            if session_json is not None:
                (tmp / SESSION_FILE).write_text(json.dumps(session_json, indent=2) + "\n")
            if before_rename is not None:
                before_rename(tmp)
            # Last, so it describes the shards as they will appear: the same rename publishes both.
            # Shards before_rename left alone are not read again; any it rewrote or added are.
            sources = {n: s for n, s in manifest_sources(resolution).items() if n not in (computed or {})}
            write_manifest(tmp, build_manifest(tmp, sources, donor_identities(donors, out),
                                               known=written, cancel=cancel))
    finally:
        for fd in fds.values():
            os.close(fd)
    return ExportResult(out, names, len(resolution.sources), total, time.perf_counter() - started)


def manifest_sources(resolution: Resolution) -> dict[str, dict]:
    out = {}
    for name, s in resolution.sources.items():
        out[name] = {"donor": s.donor, "name": s.tensor}
        if s.runs:  # which donor each range of experts (first axis) came from
            out[name]["experts"] = [{"from": lo, "to": hi, "donor": d} for lo, hi, d in s.runs]
    return out


def donor_identities(donors: dict[str, Donor], export: Path | None = None) -> dict[str, dict]:
    """What a manifest and a model card say of each donor: where it was, its fingerprint, and its full
    content hashes where they are known (cached) without reading the donor again. With `export` (the
    output directory), also where each donor is from there (`verify --donors` run from anywhere)."""
    out = {}
    for name, d in donors.items():
        entry = {"path": str(d.path), "model_type": d.model_type, "fingerprint": d.fingerprint}
        if export is not None:
            entry["path_from_export"] = os.path.relpath(d.path.absolute(), Path(export).absolute())
        hashes = d.cached_full_hashes()
        if hashes:
            entry["content_hashes"] = hashes
        out[name] = entry
    return out


def component_shares_table(resolution: Resolution, donors: dict[str, Donor]) -> list[str]:
    """Which donor gave what share of each component's parameters: the table a reader of a published
    hybrid needs to trace a capability back to its donor."""
    parts = donors[resolution.plan.base].anatomy.parts
    counts: dict[str, dict[str, int]] = {}
    for name, s in resolution.sources.items():
        kind = parts[name].kind if name in parts else "other"
        row = counts.setdefault(kind, {})
        for donor, n in s.donors_by_numel().items():
            row[donor] = row.get(donor, 0) + n
    names = list(donors)
    rows = []
    for kind in sorted(counts):
        total = sum(counts[kind].values()) or 1
        rows.append([kind, *(f"{100 * counts[kind].get(n, 0) / total:.1f}%" for n in names)])
    return ["Share of each component's parameters taken from each donor.", "",
            *card.table(["component", *(f"{n} (base)" if n == resolution.plan.base else n for n in names)], rows)]


def donor_hash_lines(donors: dict[str, Donor]) -> list[str]:
    lines = []
    for name, d in donors.items():
        hashes = d.cached_full_hashes()
        if not hashes:
            lines.append(f"- {name}: not hashed in full when this was written (its sparse fingerprint is above; "
                         "`moe-surgeon inspect --verify` hashes it)")
            continue
        lines += [f"- {name}: " + ", ".join(f"`{shard}` `{h}`" for shard, h in hashes.items())]
    return ["Full content hashes of the donors' shards (`moe-surgeon-manifest.json` has every tensor's).", "", *lines]


def _gate_bytes(resolution: Resolution) -> int:
    return sum(_nbytes(resolution.sources[n].shape, resolution.sources[n].dtype) for n in resolution.gate_names())


def gate_types(resolution: Resolution, donors: dict[str, Donor]) -> dict[int, str]:
    """The hybrid's layer gates: layer -> scalar, vector or matrix."""
    return {layer: gate.gate_type for layer, gate in layer_gates(resolution, donors).items()}


def gates_metadata(resolution: Resolution, donors: dict[str, Donor]) -> dict[str, str]:
    """The exported sidecar's metadata: the format's, plus where each layer's gate came from."""
    base = donors[resolution.plan.base]
    origin = {}
    for n in resolution.gate_names():
        src = resolution.sources[n]
        d = donors[src.donor]
        origin[str(gate_layer_of(n))] = {"donor": src.donor, "path": str(d.path), "fingerprint": d.fingerprint}
    shapes = {gate_layer_of(n): resolution.sources[n].shape for n in resolution.gate_names()}
    return sidecar_metadata(shapes, hidden_size_of(base.config, str(base.path)), {"origin": origin})


def _write_side_files(resolution: Resolution, donors: dict[str, Donor], tmp: Path, dtype: str) -> None:
    base = donors[resolution.plan.base]
    for f in base.side_files():
        if f.name == "config.json" and dtype != "keep":
            config = dict(base.config)
            config["dtype"] = dtype  # the --dtype names are transformers' names
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype
            (tmp / f.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(f, tmp / f.name)


def gates_card_section(types: dict[int, str]) -> list[str]:
    """What the model card says about layer gates: plain transformers does not run them."""
    from surgeon.core.plan import format_ranges

    if not types:
        return []
    kinds = ", ".join(sorted(set(types.values())))
    return [
        "## Layer gates (Self-MoE)",
        "",
        f"This checkpoint carries {len(types)} {kinds} layer gate(s) on decoder layer(s) {format_ranges(types)}",
        f"in `{GATES_FILE}`: layer L computes h_L = B_L(h_(L-1)) + G_L(h_(L-1)).",
        "",
        f"**Plain transformers ignores the gates.** `AutoModelForCausalLM.from_pretrained` never reads `{GATES_FILE}`",
        "and gives the model without them. To run the model with its gates:",
        "",
        "```python",
        "from surgeon.live.loader import load_gated",
        "model = load_gated(\"path/to/this/checkpoint\")  # an AutoModelForCausalLM with the gates attached",
        "```",
        "",
    ]


def model_card(resolution: Resolution, donors: dict[str, Donor], dtype: str, gates: dict[int, str] | None = None) -> str:
    """The README.md of an export; `gates` (layer -> type) overrides the resolution's layer gates."""
    plan = resolution.plan
    params = resolution.parameters_by_donor()
    total = sum(params.values()) or 1
    percent = {name: 100.0 * params.get(name, 0) / total for name in donors}
    steps = [f"- `{a.spec}` from donor {a.donor}" for a in plan.assignments] or ["- (no transfers: a copy of the base)"]
    changed = len(resolution.changed())
    summary = [
        f"{card.built_by()} by copying tensors",
        "from the donors below, unchanged" + ("" if dtype == "keep" else f" except for a cast to {dtype}") + ".",
        card.REPLAY_LINE,
    ]
    sections = [
        ("Donors", card.provenance_table(donors, plan.base, percent)),
        ("Provenance by component", component_shares_table(resolution, donors)),
        ("Donor content hashes", donor_hash_lines(donors)),
        ("Plan", [f"Base: donor {plan.base}. Later lines win.", "", *steps, "",
                  f"{changed} of {len(resolution.sources)} tensors come from donors other than the base.", "",
                  *(f"> Note: {w}" for w in resolution.warnings)]),
    ]
    section = gates_card_section(gate_types(resolution, donors) if gates is None else gates)
    if section:
        sections.append((section[0].removeprefix("## "), section[2:]))
    return card.model_card("Hybrid checkpoint made by moe-surgeon", ["moe-surgeon", "merge"], summary, sections)

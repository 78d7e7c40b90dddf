"""Stream a resolved hybrid into a new checkpoint directory.

A same-dtype tensor moves as a byte range from its donor's file with copy_file_range, so an
export neither imports torch nor holds weights in memory. Only a dtype conversion reads one
tensor at a time through torch. Everything is written into a hidden sibling directory and
renamed into place at the end: an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from surgeon import __version__
from surgeon.core.donor import Donor
from surgeon.core.gates_sidecar import (
    GATES_FILE,
    gate_layer_of,
    gate_type_of,
    hidden_size_of,
    sidecar_metadata,
)
from surgeon.core.resolve import Resolution
from surgeon.errors import SurgeonError
from surgeon.io.process import pid_alive
from surgeon.io.safetensors_file import DTYPE_SIZES, encode_header

SESSION_FILE = "moe-surgeon-session.json"


class ExportCancelled(SurgeonError):
    """The user cancelled; nothing was left behind."""


@dataclass
class ExportResult:
    path: Path
    shards: list[str]
    tensors: int
    bytes: int
    seconds: float


def split_into_shards(sizes, max_shard_size: int) -> list[list[str]]:
    """Consecutive (name, bytes) pairs grouped into shards of at most max_shard_size bytes (a
    tensor larger than that gets a shard of its own), in the order given."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def plan_shards(resolution: Resolution, max_shard_size: int) -> list[list[str]]:
    gates = set(resolution.gate_names())  # these go to the gates sidecar
    return split_into_shards(((name, _nbytes(src.shape, src.dtype)) for name, src in resolution.sources.items()
                              if name not in gates), max_shard_size)


def _nbytes(shape, dtype) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def check_target(out: Path, donors: dict[str, Donor], force: bool) -> None:
    target = out.resolve()
    for name, d in donors.items():
        dp = d.path.resolve()
        if target == dp or dp in target.parents:
            raise SurgeonError(f"{out}: the export target is inside donor {name} ({d.path}); choose another directory")
        if target in dp.parents:
            raise SurgeonError(f"{out}: the export target contains donor {name} ({d.path}); choose another directory")
    if out.exists():
        if not out.is_dir():
            raise SurgeonError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise SurgeonError(f"{out}: directory is not empty; pass --force to replace it")


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = os.write(dst_fd, os.pread(src_fd, min(count, 1 << 24), offset))
        if n == 0:
            raise SurgeonError(f"file descriptor {src_fd}: unexpected end of data")
        offset += n
        count -= n


def converted_bytes(donor: Donor, name: str, src_dtype: str, dst_dtype: str, fd: int | None):
    import torch  # only a dtype conversion or a pickle donor needs torch

    from surgeon.live.dtypes import TORCH_DTYPES

    if name in donor.pickled:
        t = donor.pickled[name]
    else:
        info = donor.tensors[name]
        t = torch.frombuffer(bytearray(os.pread(fd, info.nbytes, info.start)), dtype=TORCH_DTYPES[src_dtype])
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
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    fsync: bool = False,
    before_rename: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Write the hybrid to `out`. The rename at the end makes an interrupted export leave nothing;
    `fsync` also flushes every shard to disk before the rename, so the export survives a power
    loss too, at the cost of waiting for the disk (an export can always be replayed).
    `before_rename(tmp_dir)` may add or rewrite files (as `gates add` does) inside the atomic step."""
    out = Path(out).absolute()
    check_target(out, donors, force)
    started = time.perf_counter()
    shards = plan_shards(resolution, max_shard_size)
    total = sum(_nbytes(s.shape, s.dtype) for s in resolution.sources.values())
    names = shard_file_names(len(shards))
    fds: dict[str, int] = {}
    done = 0

    def write_tensor(n: str, dst_fd: int) -> None:
        nonlocal done
        src = resolution.sources[n]
        donor = donors[src.donor]
        info = donor.tensors[src.tensor]
        fd = None
        if src.tensor not in donor.pickled:
            fd = fds.get(info.file)
            if fd is None:
                fd = fds[info.file] = os.open(info.file, os.O_RDONLY)
        if src.converts or src.tensor in donor.pickled:
            os.write(dst_fd, converted_bytes(donor, src.tensor, src.src_dtype, src.dtype, fd))
        else:
            copy_range(fd, dst_fd, info.start, info.nbytes)
        done += _nbytes(src.shape, src.dtype)
        if progress is not None:
            progress(done, total)

    def write_file(tmp: Path, file_name: str, members: list[str], metadata: dict) -> None:
        entries = [(n, resolution.sources[n].dtype, resolution.sources[n].shape) for n in members]
        write_shard(tmp / file_name, entries, metadata, write_tensor, fsync=fsync, cancel=cancel,
                    cancelled=f"{out}: export cancelled; nothing was written")

    try:
        with staged_directory(out) as tmp:
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
    finally:
        for fd in fds.values():
            os.close(fd)
    return ExportResult(out, names, len(resolution.sources), total, time.perf_counter() - started)


def _gate_bytes(resolution: Resolution) -> int:
    return sum(_nbytes(resolution.sources[n].shape, resolution.sources[n].dtype) for n in resolution.gate_names())


def gate_types(resolution: Resolution, donors: dict[str, Donor]) -> dict[int, str]:
    """The hybrid's layer gates: layer -> scalar, vector or matrix."""
    hidden = hidden_size_of(donors[resolution.plan.base].config, "base")
    return {gate_layer_of(n): gate_type_of(resolution.sources[n].shape, hidden, n) for n in resolution.gate_names()}


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


def shard_file_names(count: int) -> list[str]:
    """transformers' names for a checkpoint of `count` shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@contextmanager
def staged_directory(out: Path):
    """A hidden sibling of `out` to write a checkpoint into: renamed into place when the block ends,
    removed when it raises, so an interrupted write leaves nothing (and the next write to `out`
    removes what a killed one left)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    tmp = out.parent / f".{out.name}.moe-surgeon-tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shard(path: Path, entries: list, metadata: dict, write_tensor: Callable[[str, int], None], *,
                fsync: bool = False, cancel: Callable[[], bool] | None = None, cancelled: str = "") -> None:
    """One safetensors file: the header of `entries` [(name, dtype, shape)], then each tensor's bytes,
    in that order, from write_tensor(name, fd)."""
    header, _ = encode_header(entries, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, header)
        for name, _, _ in entries:
            if cancel is not None and cancel():
                raise ExportCancelled(cancelled)
            write_tensor(name, fd)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_index(tmp: Path, names: list[str], weight_map: dict, total_size: int) -> None:
    """model.safetensors.index.json, which a sharded checkpoint needs and a single file does not."""
    if len(names) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def remove_stale_leftovers(out: Path) -> None:
    """A killed export (SIGKILL, power loss) cannot clean up; the next export to it does."""
    for p in out.parent.glob(f".{out.name}.moe-surgeon-*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.moe-surgeon-old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)


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
    lines = [
        "---",
        "tags: [moe-surgeon, merge]",
        "---",
        "# Hybrid checkpoint made by moe-surgeon",
        "",
        f"Built by moe-surgeon {__version__} on {time.strftime('%Y-%m-%d', time.gmtime())} by copying tensors",
        "from the donors below, unchanged" + ("" if dtype == "keep" else f" except for a cast to {dtype}") + ".",
        "The session that made it is in `" + SESSION_FILE + "`; `moe-surgeon replay` rebuilds it.",
        "",
        "## Donors",
        "",
        "| name | path | model_type | fingerprint | share of parameters |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, d in donors.items():
        share = 100.0 * params.get(name, 0) / total
        base = " (base)" if name == plan.base else ""
        lines.append(f"| {name}{base} | `{d.path}` | {d.model_type} | `{d.fingerprint}` | {share:.2f}% |")
    lines += ["", "## Plan", "", f"Base: donor {plan.base}. Later lines win.", ""]
    if not plan.assignments:
        lines.append("- (no transfers: a copy of the base)")
    for a in plan.assignments:
        lines.append(f"- `{a.spec}` from donor {a.donor}")
    changed = len(resolution.changed())
    lines += ["", f"{changed} of {len(resolution.sources)} tensors come from donors other than the base.", ""]
    for w in resolution.warnings:
        lines.append(f"> Note: {w}")
    section = gates_card_section(gate_types(resolution, donors) if gates is None else gates)
    if section:
        lines += [""] + section
    return "\n".join(lines) + "\n"

"""A checkpoint as transformers lays it out: safetensors shards of at most a given size, their
file names, and the index a sharded checkpoint needs. Tensor bytes come from the caller, one
tensor at a time, so a writer never holds a whole model in memory.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from surgeon.errors import SurgeonError
from surgeon.io.safetensors_file import encode_header


@dataclass
class ExportResult:
    """What a checkpoint writer wrote: shard file names, tensor count, bytes, and how long it took."""

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


def shard_file_names(count: int) -> list[str]:
    """transformers' names for a checkpoint of `count` shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shard(path: Path, entries: list, metadata: dict, write_tensor: Callable[[str, int], None], *,
                fsync: bool = False, cancel=None) -> None:
    """One safetensors file: the header of `entries` [(name, dtype, shape)], then each tensor's bytes,
    in that order, from write_tensor(name, fd). `cancel` (a `surgeon.jobs.CancelToken`) is checked
    before each tensor, so a cancelled writer stops within one tensor."""
    header, _ = encode_header(entries, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, header)
        for name, _, _ in entries:
            if cancel is not None:
                cancel.check()
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


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Bytes [offset, offset+count) of one file appended to another, in the kernel where it can."""
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

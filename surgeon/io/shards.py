"""A checkpoint as transformers lays it out: safetensors shards of at most a given size, their
file names, and the index a sharded checkpoint needs. Tensor bytes come from the caller, one
tensor at a time, so a writer never holds a whole model in memory. `write_hashed_shard` also
hashes every byte on its way to the file (the manifest's hashes, known without a second read).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from surgeon.errors import SurgeonError
from surgeon.io.aligned import PAGE, view_for
from surgeon.io.content_hash import TreeHasher, identity
from surgeon.io.fs import write_all
from surgeon.io.manifest import ShardHashes, tensor_hasher
from surgeon.io.ordered_writes import OrderedWriter
from surgeon.io.safetensors_file import encode_header

# The most bytes one read() and one write() of a copy move, through a page-aligned buffer
# (io/aligned.py, PAGE bytes longer). 256 KiB stays in the CPU's cache between the read, the hashes
# and the write, and took the least system time of 32 KiB-1 MiB here. In 1 MiB pieces, copying a
# 0.94 GB shard into a new file once took 1.03-1.48 s of system time against 0.34-0.71 s
# (bench/export.py, line (e); docs/performance.md has the other runs).
COPY_BUFFER = 256 << 10


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
        write_all(fd, header)
        for name, _, _ in entries:
            if cancel is not None:
                cancel.check()
            write_tensor(name, fd)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


class HashingSink:
    """Where a hashed shard's bytes go: every byte passes the shard's content hasher and the hasher
    of the tensor being written on its way to the file, so both hashes are known when the file is
    closed, and the manifest needs no second read of what was just written. Given more than one
    buffer, copied bytes are written by an OrderedWriter's thread while the next piece is read
    (io/ordered_writes.py); `close()` must run before the file descriptor is closed."""

    def __init__(self, fd: int, buffers: list[memoryview]):
        # io.aligned.aligned_buffer(s), each PAGE bytes longer than a piece (ordered_writes.copy_buffers)
        smallest = min(len(b) for b in buffers)
        self._piece = smallest - PAGE
        if self._piece < 1:
            raise ValueError(f"a copy buffer of {smallest} bytes: it needs a page more than a piece")
        self._writer = OrderedWriter(fd, buffers)
        self.content = TreeHasher()
        self.tensor = None  # the current tensor's hasher; None while the header is written
        self.written = 0  # where the next byte goes in the file

    def write(self, data) -> None:
        """Bytes made in memory: the header, a converted tensor. Written before this returns."""
        view = memoryview(data).cast("B")
        self._hash(view)
        self._writer.write_now(view)
        self.written += len(view)

    def copy(self, src_fd: int, offset: int, count: int, source: str) -> None:
        """Bytes [offset, offset+count) of the file `source` (open as src_fd), read into a buffer,
        hashed there and written from it, a piece at a time.

        Not copy_file_range: the hashes need the bytes read once more, which cost more CPU time
        than this copy (docs/performance.md)."""
        while count > 0:
            buffer = self._writer.buffer()
            piece = view_for(buffer, offset, min(count, self._piece), to=self.written)
            n = os.preadv(src_fd, [piece], offset)
            if n == 0:
                raise SurgeonError(f"{source}: shorter than its header says (nothing at byte {offset})")
            piece = piece[:n]
            self._hash(piece)
            self._writer.write_from(buffer, piece)
            self.written += n
            offset += n
            count -= n

    def finish(self) -> None:
        """Wait until every byte is in the file (a failed write raises here)."""
        self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    def _hash(self, view: memoryview) -> None:
        self.content.update(view)
        if self.tensor is not None:
            self.tensor.update(view)


def write_hashed_shard(path: Path, entries: list, metadata: dict, write_tensor: Callable[[str, HashingSink], None],
                       buffers: list[memoryview], *, fsync: bool = False, cancel=None) -> ShardHashes:
    """write_shard's file, hashed as it is written: write_tensor(name, sink) puts each tensor's bytes
    through `sink` (HashingSink.copy or .write), and `buffers` (ordered_writes.copy_buffers) are the
    buffers copies pass through."""
    header, _ = encode_header(entries, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = None
    try:
        sink = HashingSink(fd, buffers)
        sink.write(header)
        tensors = {}
        for name, _, _ in entries:
            if cancel is not None:
                cancel.check()
            sink.tensor = tensor_hasher()
            write_tensor(name, sink)
            tensors[name] = sink.tensor.hexdigest()
        sink.finish()  # every byte in the file before its times are set and its identity read
        # The identity must change with any later rewrite, but before Linux 6.13 mtime moves in
        # clock ticks of milliseconds: a same-size rewrite within this tick would keep it. A time
        # no tick gives (one nanosecond back) makes any later write show.
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns - 1))
        if fsync:
            os.fsync(fd)
        return ShardHashes(sink.content.hexdigest(), tensors, identity(os.fstat(fd)))
    finally:
        if sink is not None:
            sink.close()
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
            piece = os.pread(src_fd, min(count, 1 << 24), offset)
            write_all(dst_fd, piece)
            n = len(piece)
        if n == 0:
            raise SurgeonError(f"file descriptor {src_fd}: unexpected end of data")
        offset += n
        count -= n

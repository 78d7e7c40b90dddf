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
from surgeon.io.aligned import PAGE, aligned_buffer, slow_copy, view_for
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
    closed, and the manifest needs no second read of what was just written. `close()` must run
    before the file descriptor is closed.

    The bytes reach the file through windows: a buffer stands for the file's bytes [k*W, (k+1)*W)
    (W its length), every tensor's bytes are read or copied into it at their place, and it is written
    once it is full, by an OrderedWriter's thread while the next window fills where there is more
    than one buffer (io/ordered_writes.py). So every write but the file's first and last starts and
    ends on a window boundary, whatever the tensors' sizes, and a buffer's page offsets are the
    file's. Writing each tensor's pieces as they came, starting and ending within pages, cost the
    writer thread about a third more system time: 0.25 against 0.19 s for a 0.94 GB shard of
    3,219 tensors (docs/performance.md, "Windows")."""

    def __init__(self, fd: int, buffers: list[memoryview]):
        # io.aligned.aligned_buffer(s) of one size (ordered_writes.copy_buffers)
        self._size = min(len(b) for b in buffers)
        self._writer = OrderedWriter(fd, buffers)
        self._window: memoryview | None = None  # the buffer filling now, and where its bytes start
        self._first = 0
        self._bounce: memoryview | None = None  # see _read
        self.content = TreeHasher()
        self.tensor = None  # the current tensor's hasher; None while the header is written
        self.written = 0  # where the next byte goes in the file

    def write(self, data) -> None:
        """Bytes made in memory: the header, a converted tensor. The caller may reuse them at once."""
        view = memoryview(data).cast("B")
        self._hash(view)
        while len(view):
            window, at = self._filling()
            n = min(len(view), self._size - at)
            window[at:at + n] = view[:n]
            self._advance(n)
            view = view[n:]

    def copy(self, src_fd: int, offset: int, count: int, source: str) -> None:
        """Bytes [offset, offset+count) of the file `source` (open as src_fd), read into the window
        at their place, and hashed there.

        Not copy_file_range: the hashes need the bytes read once more, which cost more CPU time
        than this copy (docs/performance.md)."""
        while count > 0:
            window, at = self._filling()
            piece = window[at:at + min(count, self._size - at)]
            n = self._read(src_fd, piece, at, offset)
            if n == 0:
                raise SurgeonError(f"{source}: shorter than its header says (nothing at byte {offset})")
            self._hash(piece[:n])
            self._advance(n)
            offset += n
            count -= n

    def finish(self) -> None:
        """Write what the window holds and wait until every byte is in the file (a failed write
        raises here)."""
        if self._window is not None:
            window, self._window = self._window, None
            end = self._place()
            if end > self._first:
                self._writer.write_from(window, window[self._first:end])
            else:
                self._writer.give_back(window)
        self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    def _place(self) -> int:
        return self.written % self._size

    def _filling(self) -> tuple[memoryview, int]:
        """The window the next byte goes into, and where in it."""
        if self._window is None:
            self._window = self._writer.buffer()
            self._first = self._place()
        return self._window, self._place()

    def _advance(self, n: int) -> None:
        self.written += n
        if self._place() == 0:  # the window is full
            window, self._window = self._window, None
            self._writer.write_from(window, window[self._first:])

    def _read(self, fd: int, piece: memoryview, at: int, offset: int) -> int:
        """Read into `piece` (at `at` in a page-aligned window) from `offset`. Where that is the
        kernel's slow copy (the piece 1-63 bytes ahead of the file's bytes within a page: a donor
        whose header length differs from the one this file's was padded to match), the bytes land
        first in a buffer at a place neither copy is slow from or to (io.aligned.view_for), and
        are moved from there in this process; a memcpy that near is as slow as the kernel's. For a
        0.94 GB shard whose every read was that near: 0.50 s of the main thread read the slow way,
        0.27 s this way, 0.20 s for a shard whose reads were in place."""
        if not slow_copy(at, offset):
            return os.preadv(fd, [piece], offset)
        if self._bounce is None:
            self._bounce = aligned_buffer(self._size + PAGE)
        landing = view_for(self._bounce, offset, len(piece), to=at)
        n = os.preadv(fd, [landing], offset)
        piece[:n] = landing[:n]
        return n

    def _hash(self, view: memoryview) -> None:
        self.content.update(view)
        if self.tensor is not None:
            self.tensor.update(view)


def write_hashed_shard(path: Path, entries: list, metadata: dict, write_tensor: Callable[[str, HashingSink], None],
                       buffers: list[memoryview], *, fsync: bool = False, cancel=None,
                       data_at: int | None = None) -> ShardHashes:
    """write_shard's file, hashed as it is written: write_tensor(name, sink) puts each tensor's bytes
    through `sink` (HashingSink.copy or .write), and `buffers` (ordered_writes.copy_buffers) are the
    buffers copies pass through. `data_at`: where within a page the tensors' bytes start
    (data_offset_for)."""
    header, _ = encode_header(entries, metadata, data_at)
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


def data_offset_for(copied) -> int | None:
    """Where within a page a shard's data should start so that most of the bytes it copies lie at
    the same offset within a page as in their source files, and are read in whole pages:
    `copied` gives (offset in the data, offset in its source file, bytes) of every byte range
    copied. None where nothing is copied, or where that offset is not a multiple of 8 (a source
    whose data the reference implementation did not align): the data stays 8-aligned."""
    weight: dict[int, int] = {}
    for at, source, nbytes in copied:
        key = (source - at) % PAGE
        weight[key] = weight.get(key, 0) + nbytes
    if not weight:
        return None
    best = max(weight, key=weight.__getitem__)
    return best if best % 8 == 0 else None


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

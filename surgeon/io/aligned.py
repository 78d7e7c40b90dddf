"""Page-aligned buffers, and where in them a file's bytes should land: every read of a file into
this process's memory goes through one (the export's copy, content hashes, manifest hashes).

The kernel's copy between the page cache and a buffer is slow when its destination is 1-16 bytes
ahead of its source within a page: on this AMD EPYC, reading 256 MiB from the page cache took
0.096 s of system time 8 bytes ahead, 0.039-0.042 s 16 bytes ahead and 0.028-0.032 s in place
(bench/export.py, line (f)); writes behave the same. A Python `bytearray` starts 16 bytes into a
page (its allocator's header comes first), so a read of a page-aligned file offset into one is such
a copy. An anonymous memory map starts on a page boundary, and `view_for` puts a file's bytes at
the same offset within a page as in the file, so the read copies whole pages without shifting them.
"""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE
_NEAR = 64  # within a cache line ahead: the slow copies measured were 1-16 bytes ahead


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, zero-filled buffer of exactly `nbytes` bytes (at least 1) whose first byte is on a
    page boundary. Its memory goes back to the system when the last view of it is gone."""
    if nbytes < 1:
        raise ValueError(f"a buffer of {nbytes} bytes")
    return memoryview(mmap.mmap(-1, nbytes))


def view_for(buffer: memoryview, offset: int, n: int, to: int | None = None) -> memoryview:
    """`n` bytes of `buffer` (an aligned_buffer of at least n + PAGE bytes) to read the bytes at
    `offset` of a file into: at the offset within a page that they have in the file. With `to`,
    where they will be written in another file: half a page further on when they would otherwise sit
    1-63 bytes behind their offset within a page there (that write would be the slow copy)."""
    at = offset % PAGE
    if to is not None and 0 < (to - at) % PAGE < _NEAR:
        at = (at + PAGE // 2) % PAGE
    if at + n > len(buffer):
        raise ValueError(f"{n} bytes at {at} of a buffer of {len(buffer)}: it needs a page more than a piece")
    return buffer[at:at + n]

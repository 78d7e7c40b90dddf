"""Writes to one file in the order they were handed over, by a thread of their own, so that the
caller reads and hashes the next piece of a copy while the kernel copies this one into the page
cache.

A copy through a buffer is a read, the hashes and a write, one after another on one core. The
write holds the file's lock and the read does not, so on two cores the two overlap: copying a
0.94 GB shard from the page cache into a new file took 0.35-0.42 s this way (medians of four runs)
against 0.50-0.60 s in turn, and 0.42-0.48 s for `copy_file_range`, which hashes nothing
(bench/export.py, line (e)). Beside a busy process there is no core to spare and the hand-over
cost 17% of a whole export (docs/performance.md, "A writer thread"), so the export passes one
buffer when no other core is free: each write then happens in the caller's thread before the next
read.
"""

from __future__ import annotations

import queue
import threading

from surgeon.io.aligned import PAGE, aligned_buffer
from surgeon.io.fs import write_all

# Pieces a copy may have read but not yet written. Two would keep both cores busy if every piece
# took as long to read as to write; four leave room for pieces that do not. Two, four and eight
# buffers of 256 KiB copied the 0.94 GB shard within each other's spread (5 rounds each).
IN_FLIGHT = 4


def copy_buffers(piece: int, cores: int) -> list[memoryview]:
    """The page-aligned buffers one export copies through, each a piece and a page long: IN_FLIGHT of
    them where a second core can write while the first reads, one otherwise."""
    return [aligned_buffer(piece + PAGE) for _ in range(IN_FLIGHT if cores > 1 else 1)]


class OrderedWriter:
    """Writes whole views of `buffers` to `fd` in the order given. `buffer()` hands out one that no
    pending write reads; `close()` must run before the file descriptor is closed.

    A thread and two queues rather than an executor: a copy hands over a piece every 256 KiB, and
    a future per piece cost about 30 us of Python each, a tenth of the copy."""

    def __init__(self, fd: int, buffers: list[memoryview]):
        if not buffers:
            raise ValueError("an ordered writer needs at least one buffer")
        self.fd = fd
        self._free = list(buffers)
        self._pending = 0  # handed to the thread, not yet back
        self._error: BaseException | None = None  # the first write that failed; later ones are skipped
        self._todo: queue.SimpleQueue = queue.SimpleQueue()  # (buffer, view), or None: stop
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # buffers written (or skipped)
        self._thread = None
        self._threaded = len(buffers) > 1

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buffer, view = item
            if self._error is None:
                try:
                    write_all(self.fd, view)
                except BaseException as e:  # whatever it is, the caller waits on `_done` and must hear of it
                    self._error = e
            self._done.put(buffer)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> memoryview:
        """A buffer to read the next piece into, once the oldest write using it is done (an earlier
        write's error raised here)."""
        if not self._free:
            self._free.append(self._done.get())
            self._pending -= 1
        self._raise()
        return self._free.pop()

    def write_from(self, buffer: memoryview, view: memoryview) -> None:
        """Write `view`, a part of `buffer` (from `buffer()`), after every earlier write."""
        if not self._threaded:
            try:
                write_all(self.fd, view)
            finally:
                self._free.append(buffer)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="surgeon-write", daemon=True)
            self._thread.start()
        self._pending += 1
        self._todo.put((buffer, view))

    def write_now(self, data) -> None:
        """Write bytes the caller owns, after every earlier write, before returning: the caller may
        reuse or free them at once."""
        self.drain()
        write_all(self.fd, data)

    def drain(self) -> None:
        """Wait for every pending write; the first that failed raises."""
        while self._pending:
            self._free.append(self._done.get())
            self._pending -= 1
        self._raise()

    def close(self) -> None:
        """Wait for the writes still pending and stop the thread. It raises nothing: after an error
        elsewhere, that error is the one to see, and a write's own error is `drain`'s to raise."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        while self._pending:
            self._free.append(self._done.get())
            self._pending -= 1

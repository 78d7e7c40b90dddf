"""glibc's allocator told to keep a forward's freed temporaries for the next forward.

torch allocates CPU tensors with glibc's malloc. glibc gives a large freed block back to the system
once the free memory at the top of its heap passes its trim threshold (twice the largest block it
has freed, at most 64 MiB), and the next forward then faults every page of its temporaries in
again, each zeroed by the kernel. A SmolLM2-135M forward of 8 x 463 tokens (a BoolQ-length batch:
its MLP's outputs are 23 MB each) took 350,000 page faults and 0.75 s of system time of its 5.7 s,
every time; with the settings below, none, and 5.0 s. At 8 x 160 tokens nothing changes: no block
is large enough to be trimmed.

Setting the trim threshold alone would be worse than nothing: glibc stops raising its mmap threshold
once any of these is set, so every block over 128 KiB would be mapped and unmapped on each use (3x
the faults). So both are set: blocks up to 32 MiB (glibc's largest mmap threshold) come from the
heap, and up to 1 GiB of free memory at its top is kept. That memory is the next forward's
temporaries; the peak is what it was. A long-lived process (the workbench, `serve`) keeps it between
probes too: its resident size after a probe stays near the probe's peak, at most 1 GiB above what
it would have returned.

Left alone where the user tuned malloc (a MALLOC_*_ variable or a glibc.malloc tunable) and where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the most it accepts
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_done: bool | None = None


def user_tuned_malloc(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return any(k in environ for k in USER_SETTINGS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory(environ=None) -> bool:
    """Apply the settings above once per process; whether they are in effect."""
    global _done
    if _done is None:
        _done = False
        if not user_tuned_malloc(environ):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done

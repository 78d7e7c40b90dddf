"""Leaving the process without the interpreter's teardown, for a command that only read and printed.

At exit Python frees every object one by one: for `inspect` of a DeepSeek-V3 donor that is 92,000
header entries and their anatomy, a tenth of a second after the answer is already on the screen. A
command with nothing left to finish (no thread still running, no file open for writing, no exit
handler that matters) calls `leave_quickly()`; the entry point then flushes the standard streams and
ends the process with `os._exit`. Commands run inside another process (tests call `main()`) never
reach `finish`, so the flag does nothing there.
"""

from __future__ import annotations

import os
import sys

_QUICKLY = False


def leave_quickly() -> None:
    global _QUICKLY
    _QUICKLY = True


def finish(code: int) -> None:
    if _QUICKLY:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: what could be written was
                pass
        os._exit(code)
    sys.exit(code)

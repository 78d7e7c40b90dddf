"""Masked attention over grouped keys and values without copying them, on CPU.

With an explicit attention mask (the scorer's tree mask, the decoder's slot mask), transformers'
SDPA attention repeats each key/value head for every query head of its group before calling torch
(`repeat_kv`, a copy of the whole cache per layer and forward), because on CUDA a mask and grouped
heads together fall back to the slow math kernel. Torch's CPU kernel takes grouped heads and a mask
together (`enable_gqa`) and gives the same numbers bit for bit, without the copy: on a 2-core CPU
the copies were a fifth of a decoding step. transformers reads TRANSFORMERS_SDPA_FORCE_GQA at each
call, so it is set around our forwards, and only where the model is on CPU.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"
_lock = threading.Lock()
_users = 0
_saved: str | None = None


@contextmanager
def grouped_kv_on_cpu(device):
    """Within the block, SDPA gets grouped keys/values as they are when `device` is the CPU."""
    global _users, _saved
    if getattr(device, "type", str(device)) != "cpu":
        yield
        return
    with _lock:
        if _users == 0:
            _saved = os.environ.get(_FLAG)
            os.environ[_FLAG] = "1"
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                if _saved is None:
                    os.environ.pop(_FLAG, None)
                else:
                    os.environ[_FLAG] = _saved

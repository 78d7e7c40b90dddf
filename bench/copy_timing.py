"""Timing helpers the benches share: a barrier for queued GPU work, and the plain in-memory copy a
hot-swap is measured against. torch is imported on use: bench/scale.py's parent process must not
load it (it would raise every child's peak-RSS floor)."""

from __future__ import annotations

import time


def sync(device) -> None:
    """Wait for the GPU's queued work; nothing on CPU. "auto" means the GPU when there is one."""
    import torch

    name = str(device)
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.synchronize()


def copy_seconds(views, sources, device) -> float:
    """Seconds to copy each source tensor into its live view, queued work included."""
    import torch

    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for view, source in zip(views, sources):
            view.copy_(source, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0

"""Where a live model runs: the default device, and a --device checked before anything loads."""

from __future__ import annotations

import torch

from surgeon.errors import SurgeonError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SurgeonError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeonError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SurgeonError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise SurgeonError(f"--device {device}: unsupported device type {dev.type!r}")
    return dev

"""Loading a checkpoint as a live transformers model: the one place `from_pretrained` is called.

Local files only (a path is never a Hub id here), eval mode, and the Self-MoE layer gates of a
sidecar `from_pretrained` does not read attached as forward hooks (see `layer_gates.py`), in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.core.gates_sidecar import read_gates
from surgeon.errors import SurgeonError
from surgeon.live.devices import check_device, default_device
from surgeon.live.dtypes import torch_dtype
from surgeon.live.layer_gates import attach_gates, gate_modules


def load_model(directory: str | os.PathLike, *, device: str | None = None, dtype: str = "keep",
               gates: bool = True, device_map: str | None = None, loading_info: bool = False):
    """`AutoModelForCausalLM` of `directory` on `device` (default: cuda when present) in `dtype`
    (keep: the checkpoint's own), in eval mode, its layer gates attached when `gates` and it has any.

    `device="auto"` spreads a model larger than one GPU over every GPU (accelerate's
    device_map=auto). With `loading_info`, returns (model, what transformers found missing or
    unexpected) so a caller can check a checkpoint it wrote.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise SurgeonError(f"{directory}: no config.json (not a checkpoint directory)")
    device = device or default_device()
    dev = "auto" if device == "auto" else str(check_device(device))
    sidecar, _ = read_gates(directory) if gates else ({}, {})
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch_dtype(dtype), device_map=device_map or dev, local_files_only=True,
        output_loading_info=loading_info,
    )
    model, info = loaded if loading_info else (loaded, None)
    model.eval()
    if sidecar:
        with torch.no_grad():
            attach_gates(model, {layer: tuple(g.shape) for layer, g in sidecar.items()})
            for layer, module in gate_modules(model).items():
                module.weight.copy_(sidecar[layer])
    return (model, info) if loading_info else model


def load_gated(directory: str | os.PathLike, *, device: str | None = None, dtype: str = "keep"):
    """A checkpoint with its layer gates attached (the name the gates' model cards print)."""
    return load_model(directory, device=device, dtype=dtype)

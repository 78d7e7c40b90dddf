"""Loading a checkpoint as a live transformers model: the one place `from_pretrained` is called."""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.core.gates_sidecar import read_gates
from surgeon.errors import SurgeonError
from surgeon.live.hybrid import TORCH_DTYPE_NAMES, check_device, default_device
from surgeon.live.layer_gates import attach_gates, gate_modules


def load_gated(directory: str | os.PathLike, *, device: str | None = None, dtype: str = "keep"):
    """A transformers model of `directory` with its layer gates attached (none if it has no sidecar).

    The model is `AutoModelForCausalLM.from_pretrained(directory)`; the gates run as forward hooks
    on its decoder layers (see `surgeon/gates.py`), in float32 whatever the model's dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise SurgeonError(f"{directory}: no config.json (not a checkpoint directory)")
    dev = check_device(device or default_device())
    gates, _ = read_gates(directory)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=TORCH_DTYPE_NAMES.get(dtype, "auto"), device_map=str(dev), local_files_only=True,
    )
    model.eval()
    with torch.no_grad():
        attach_gates(model, {layer: tuple(g.shape) for layer, g in gates.items()})
        for layer, module in gate_modules(model).items():
            module.weight.copy_(gates[layer])
    return model


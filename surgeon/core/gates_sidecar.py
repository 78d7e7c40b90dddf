"""The layer-gates sidecar: Self-MoE gates stored beside a checkpoint, and the loader that uses them.

Format (version 1), a safetensors file named `layer_gates.safetensors` next to `config.json`:

  tensors   `model.layers.{L}.layer_gate.weight`, one per gated decoder layer L, stored in float32.
            Layer L's output becomes h_L = B_L(h_{L-1}) + G_L(h_{L-1}), where h_{L-1} is the input
            of layer L (the embeddings for L = 0). The gate type follows from the shape, H being
            the config's hidden_size:
              scalar  [1]     G(h) = w * h          (one value for every channel)
              vector  [H]     G(h) = w ⊙ h          (one value per channel)
              matrix  [H, H]  G(h) = h @ W^T        (nn.Linear(H, H) without bias, W is [out, in])
  metadata  format = "moe-surgeon-layer-gates", format_version = "1", gate_type (scalar, vector,
            matrix or mixed), hidden_size, layers (e.g. "1-3"), and, once made, JSON strings
            `training` (settings and losses summary) and `selection` (the per-layer table).

Plain transformers never reads this file (it loads model.safetensors or the index only), so
`AutoModelForCausalLM.from_pretrained` gives the model without gates; `load_gated` gives it with
them. The tensor names are those of the live gate modules (`surgeon/live/layer_gates.py` registers them as
`model.layers.{L}.layer_gate`), so a donor, the anatomy and a hybrid see them as one more
component per layer, `layer_gate`.

This module imports torch only inside the functions that need it: the donor opens the sidecar's
header without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.dtypes import FLOATS

GATES_FILE = "layer_gates.safetensors"
FORMAT = "moe-surgeon-layer-gates"
FORMAT_VERSION = "1"
GATE_TYPES = ("scalar", "vector", "matrix")
GATE_KIND = "layer_gate"  # the anatomy's component kind, and the SPEC component name


def gate_tensor_name(layer: int) -> str:
    return f"model.layers.{layer}.{GATE_KIND}.weight"


def gate_layer_of(name: str) -> int | None:
    """The layer of a gate tensor name, or None when `name` is not one."""
    segs = name.split(".")
    if len(segs) == 5 and segs[:2] == ["model", "layers"] and segs[2].isascii() and segs[2].isdigit() and segs[3:] == [GATE_KIND, "weight"]:
        return int(segs[2])
    return None


def gate_shape(gate_type: str, hidden: int) -> tuple[int, ...]:
    if gate_type not in GATE_TYPES:
        raise SurgeonError(f"--type {gate_type!r}: one of {', '.join(GATE_TYPES)}")
    return {"scalar": (1,), "vector": (hidden,), "matrix": (hidden, hidden)}[gate_type]


def gate_type_of(shape, hidden: int, where: str = "") -> str:
    """The gate type a tensor shape stands for; a SurgeonError naming `where` when none fits."""
    shape = tuple(shape)
    for t in GATE_TYPES:
        if shape == gate_shape(t, hidden):
            return t
    raise SurgeonError(
        f"{where}: shape {list(shape)} is no layer gate for hidden_size {hidden} "
        f"(scalar [1], vector [{hidden}] or matrix [{hidden}, {hidden}])"
    )


def hidden_size_of(config: dict, where: str) -> int:
    hidden = config.get("hidden_size")
    if not isinstance(hidden, int) or hidden <= 0:
        raise SurgeonError(f"{where}: config.json has no hidden_size; layer gates need it")
    return hidden


def summary_type(types) -> str:
    types = set(types)
    return types.pop() if len(types) == 1 else ("mixed" if types else "none")


def sidecar_metadata(shapes: dict[int, tuple[int, ...]], hidden: int, extra: dict | None = None) -> dict[str, str]:
    """The metadata a sidecar with gates of these shapes carries; `extra` values become JSON strings."""
    from surgeon.core.plan import format_ranges

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gate_type": summary_type(gate_type_of(s, hidden, "layer gate") for s in shapes.values()),
        "hidden_size": str(hidden),
        "layers": format_ranges(shapes),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return meta


def check_sidecar(header, config: dict, path) -> None:
    """Refuse a sidecar that is not ours or whose tensors are not layer gates of this model."""
    meta = header.metadata or {}
    if meta.get("format") != FORMAT:
        raise SurgeonError(f"{path}: not a moe-surgeon layer-gates file (metadata format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SurgeonError(
            f"{path}: layer-gates format_version {meta.get('format_version')!r}; this moe-surgeon reads {FORMAT_VERSION}"
        )
    hidden = hidden_size_of(config, str(path))
    layers = config.get("num_hidden_layers")
    for name, info in header.tensors.items():
        layer = gate_layer_of(name)
        if layer is None:
            raise SurgeonError(f"{path}: tensor {name} is not a layer gate (expected model.layers.L.layer_gate.weight)")
        if isinstance(layers, int) and layer >= layers:
            raise SurgeonError(f"{path}: tensor {name}: layer {layer} out of range (the model has {layers} layers)")
        if info.dtype not in FLOATS:
            raise SurgeonError(f"{path}: tensor {name} has dtype {info.dtype}; a gate is floating point")
        gate_type_of(info.shape, hidden, f"{path}: tensor {name}")


# ---------------------------------------------------------------- torch side
def read_gates(directory: str | os.PathLike, config: dict | None = None):
    """(gates by layer as float32 CPU tensors, metadata) of a checkpoint's sidecar; ({}, {}) if none."""
    from safetensors.torch import load_file

    from surgeon.io.safetensors_file import read_header

    path = Path(directory) / GATES_FILE
    if not path.is_file():
        return {}, {}
    header = read_header(str(path))
    if config is None:
        config = _config_of(directory)
    check_sidecar(header, config, path)
    tensors = load_file(str(path))
    gates = {gate_layer_of(n): t.float() for n, t in tensors.items()}
    return dict(sorted(gates.items())), dict(header.metadata)


def write_gates(directory: str | os.PathLike, gates: dict, hidden: int, extra: dict | None = None) -> Path:
    """Write (atomically) the sidecar holding `gates` (layer -> tensor); no gates removes the file."""
    import torch
    from safetensors.torch import save

    from surgeon.io.atomic import write_atomic

    path = Path(directory) / GATES_FILE
    if not gates:
        path.unlink(missing_ok=True)
        return path
    tensors = {gate_tensor_name(l): g.detach().to("cpu", torch.float32).contiguous() for l, g in sorted(gates.items())}
    meta = sidecar_metadata({l: tuple(g.shape) for l, g in gates.items()}, hidden, extra)
    write_atomic(path, save(tensors, metadata=meta))
    return path


def _config_of(directory) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SurgeonError(f"{path}: cannot read the config ({e})") from None

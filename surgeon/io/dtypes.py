"""The one dtype table, torch-free: safetensors dtype names, their sizes, their torch names, and the
`--dtype` names a user casts to. `surgeon.live.dtypes` builds the torch mapping from it, so
`inspect` and `export` can plan sizes and casts without importing torch."""

from __future__ import annotations

# safetensors name -> (bytes per element, torch dtype attribute; None: torch has no such dtype)
TABLE = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
    "I16": (2, "int16"), "U16": (2, None), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I32": (4, "int32"), "U32": (4, None), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, None), "F64": (8, "float64"),
}
DTYPE_SIZES = {name: size for name, (size, _) in TABLE.items()}
TORCH_NAMES = {name: torch for name, (_, torch) in TABLE.items() if torch is not None}
# `str(tensor.dtype)` -> safetensors name, for tensors read from a pickle
FROM_TORCH = {f"torch.{torch}": name for name, torch in TORCH_NAMES.items()}

# What a checkpoint can be cast to (--dtype), by the name the user gives.
CASTS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DTYPE_CHOICES = ["keep", *CASTS]  # every --dtype option of the command line and the workbench
FLOATS = frozenset({"F16", "BF16", "F32", "F64"})  # floating point: what a cast may convert


def cast_name(dtype: str) -> str | None:
    """The safetensors name a --dtype casts to; None for keep."""
    return None if dtype == "keep" else CASTS[dtype]

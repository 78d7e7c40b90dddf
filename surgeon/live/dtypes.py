"""The torch side of the dtype table in `surgeon.io.dtypes` (imports torch)."""

import torch

from surgeon.io.dtypes import CASTS, TORCH_NAMES

TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in TORCH_NAMES.items()}  # safetensors name -> torch
TORCH_DTYPE_NAMES = {user: TORCH_DTYPES[st] for user, st in CASTS.items()}  # --dtype name -> torch


def torch_dtype(dtype: str):
    """The torch dtype of a --dtype name; "auto" (the checkpoint's own) for keep."""
    return TORCH_DTYPE_NAMES.get(dtype, "auto")


def dtype_name(dtype) -> str:
    """A torch dtype as config.json names it (torch.bfloat16 -> bfloat16)."""
    return str(dtype).removeprefix("torch.")

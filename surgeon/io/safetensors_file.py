"""Read a safetensors header without torch.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype, shape and byte offsets, then the raw bytes. Reading the header alone tells us everything
we need to plan surgery; the bytes are only touched by an export or a materialisation.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod

from surgeon.errors import SurgeonError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# A header larger than this is not a checkpoint we wrote or transformers wrote: refuse it early
# instead of trying to allocate it.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range, dtype and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: str
    raw: bytes  # the JSON header bytes, part of the donor fingerprint
    size: int  # the file size, also part of the fingerprint
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str) -> Header:
    """Parse and validate the header of one safetensors file."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SurgeonError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SurgeonError(
                    f"{path}: corrupted safetensors header (declares {n} header bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None
    try:
        table = json.loads(raw)
        if not isinstance(table, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SurgeonError(f"{path}: corrupted safetensors header ({e})") from None
    data_start = 8 + n
    metadata = table.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for tname, entry in table.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SurgeonError(f"{path}: corrupted safetensors header at tensor {tname}") from None
        if dtype not in DTYPE_SIZES:
            raise SurgeonError(f"{path}: tensor {tname} has unknown dtype {dtype}")
        if stop - begin != prod(shape) * DTYPE_SIZES[dtype] or begin < 0:
            raise SurgeonError(
                f"{path}: corrupted safetensors header: tensor {tname} spans {stop - begin} bytes "
                f"but {dtype}{list(shape)} needs {prod(shape) * DTYPE_SIZES[dtype]}"
            )
        if data_start + stop > size:
            raise SurgeonError(
                f"{path}: truncated shard: tensor {tname} ends at byte {data_start + stop} "
                f"but {name} has only {size} bytes"
            )
        tensors[tname] = TensorInfo(path, dtype, shape, data_start + begin, data_start + stop)
    return Header(path=path, raw=raw, size=size, tensors=tensors, metadata=metadata)


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Build a header for tensors laid out back to back in the given order.

    Returns the bytes to write before the data (length prefix included) and each tensor's
    offset relative to the start of the data. The JSON is padded with spaces to a multiple of
    8 bytes, as the reference implementation does, so the data stays aligned for memory maps.
    """
    table: dict[str, object] = {"__metadata__": metadata}
    offsets = []
    pos = 0
    for tname, dtype, shape in entries:
        nbytes = prod(shape) * DTYPE_SIZES[dtype]
        table[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets

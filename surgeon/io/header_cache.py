"""Safetensors headers already parsed and checked, kept on disk by their exact bytes.

Parsing a header is building Python objects: DeepSeek-V3's 161 headers hold 92,000 tensor entries
and take 0.6 s to decode and check, which is most of `inspect` and of the workbench's start. What
`read_header` checks depends only on the header's bytes and the file's size, so an entry keyed by a
hash of exactly those is never stale: a changed header is a different key. The entry is a small
binary table (tensor names, dtype codes, shapes, byte ranges, metadata) read back with `array`,
ending in an XXH3 digest of itself, so a truncated or damaged entry is ignored, never trusted.

Only headers with many tensors are kept: a small one parses faster than a file can be opened.
Everything here is best effort: an unreadable or unwritable cache costs speed, never correctness.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from pathlib import Path

from surgeon.io.cache import cache_root

MAGIC = b"MSHDR001"
MIN_TENSORS = 256  # below this a header parses in well under a millisecond
_HEAD = struct.Struct("<8sQQQQQ")  # magic, tensors, name bytes, metadata bytes, dims, dtype-table bytes


def _key(raw: bytes, size: int) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(raw + struct.pack("<Q", size))


def _file(raw: bytes, size: int) -> Path:
    return cache_root() / "headers" / f"{_key(raw, size)}.bin"


def load(raw: bytes, size: int) -> tuple[dict, list[tuple[str, str, tuple[int, ...], int, int]]] | None:
    """(metadata, [(name, dtype, shape, start, end)]) stored for this header, or None."""
    import xxhash

    try:
        data = _file(raw, size).read_bytes()
    except OSError:
        return None
    body, digest = data[:-16], data[-16:]
    if len(data) < _HEAD.size + 16 or xxhash.xxh3_128_digest(body) != digest:
        return None
    magic, n, names_len, meta_len, dims_len, types_len = _HEAD.unpack_from(body)
    if magic != MAGIC:
        return None
    at = _HEAD.size
    try:
        ndim = array("B", body[at:at + n]); at += n
        codes = array("B", body[at:at + n]); at += n
        dims = array("Q"); dims.frombytes(body[at:at + 8 * dims_len]); at += 8 * dims_len
        starts = array("Q"); starts.frombytes(body[at:at + 8 * n]); at += 8 * n
        ends = array("Q"); ends.frombytes(body[at:at + 8 * n]); at += 8 * n
        names = body[at:at + names_len].decode("utf-8").split("\0"); at += names_len
        types = body[at:at + types_len].decode("ascii").split(","); at += types_len
        metadata = json.loads(body[at:at + meta_len].decode("utf-8")); at += meta_len
    except (ValueError, UnicodeDecodeError):
        return None
    if at != len(body) or len(names) != n or len(dims) != sum(ndim) or max(codes, default=0) >= len(types):
        return None
    dims_list, entries, d = dims.tolist(), [], 0
    for name, k, code, start, end in zip(names, ndim, codes, starts.tolist(), ends.tolist()):
        entries.append((name, types[code], tuple(dims_list[d:d + k]), start, end))
        d += k
    return metadata, entries


def store(raw: bytes, size: int, metadata: dict, tensors: dict) -> None:
    """Keep a checked header: `tensors` name -> TensorInfo (file, dtype, shape, start, end)."""
    import xxhash

    if (len(tensors) < MIN_TENSORS or any("\0" in name for name in tensors)
            or any(len(t.shape) > 255 for t in tensors.values())):
        return
    types = sorted({t.dtype for t in tensors.values()})
    code = {t: i for i, t in enumerate(types)}
    infos = list(tensors.values())
    dims = array("Q", [d for t in infos for d in t.shape])
    names = "\0".join(tensors).encode("utf-8")
    type_text = ",".join(types).encode("ascii")
    meta = json.dumps(metadata).encode("utf-8")
    body = b"".join([
        _HEAD.pack(MAGIC, len(infos), len(names), len(meta), len(dims), len(type_text)),
        bytes(array("B", [len(t.shape) for t in infos])), bytes(array("B", [code[t.dtype] for t in infos])),
        dims.tobytes(), array("Q", [t.start for t in infos]).tobytes(), array("Q", [t.end for t in infos]).tobytes(),
        names, type_text, meta,
    ])
    try:
        from surgeon.io.atomic import write_atomic

        write_atomic(_file(raw, size), body + xxhash.xxh3_128_digest(body), fsync=False)
    except OSError:
        pass


def clear() -> None:
    """Remove every kept header (tests; a user can delete the folder just as well)."""
    folder = cache_root() / "headers"
    for f in folder.glob("*.bin") if folder.is_dir() else ():
        try:
            os.unlink(f)
        except OSError:
            pass

"""Read a safetensors header without torch.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype, shape and byte offsets, then the raw bytes. Reading the header alone tells us everything
we need to plan surgery; the bytes are only touched by an export or a materialisation.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from functools import partial
from math import prod
from typing import NamedTuple

from surgeon.errors import SurgeonError
from surgeon.io import header_cache
from surgeon.io.dtypes import DTYPE_SIZES

# A header larger than this is not a checkpoint we wrote or transformers wrote: refuse it early
# instead of trying to allocate it.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class TensorInfo(NamedTuple):
    """Where one tensor lives: its file and absolute byte range, dtype and shape. A NamedTuple, not a
    dataclass: a donor has up to ~90,000 of them and this one is made three times faster."""

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
        size = DTYPE_SIZES[self.dtype]
        return (self.end - self.start) // size if self.end > self.start else prod(self.shape)


# A TensorInfo from a tuple of its five fields, made in C: a NamedTuple call runs a Python-level
# `__new__`, and a DeepSeek-V3 donor makes 92,000 of them.
_info = partial(tuple.__new__, TensorInfo)


class Header(NamedTuple):
    path: str
    raw: bytes  # the JSON header bytes, part of the donor fingerprint
    size: int  # the file size, also part of the fingerprint
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str) -> Header:
    """Parse and validate the header of one safetensors file, as strictly as the format reads.

    Only the header is read. Everything the format promises is checked here, once, so nothing
    downstream can plan surgery on a file that the safetensors library would refuse to load:
    known dtypes, non-negative integer dims, byte ranges that tile the data exactly (no overlap,
    no gap, nothing past the end or after the last tensor), unique keys, string metadata.
    """
    size, n, raw = _read_raw(path)
    data_start = 8 + n
    known = _CHECKED.get((raw, size))
    if known is not None:  # the same header bytes and file size passed every check below before
        metadata, layout = known
        tensors = {tname: _info((path, *rest)) for tname, rest in layout.items()}
        return Header(path=path, raw=raw, size=size, tensors=tensors, metadata=dict(metadata))
    kept = header_cache.load(raw, size) if n > _KEEP_FROM else None
    if kept is not None:  # checked in an earlier run: the cache is keyed by these very bytes
        metadata, entries = kept
        tensors = {name: _info((path, *rest)) for name, *rest in entries}
        _remember(raw, size, metadata, tensors)
        return Header(path=path, raw=raw, size=size, tensors=tensors, metadata=metadata)
    table = _parse_json(path, raw)
    metadata = _metadata(path, table.pop("__metadata__", None))
    tensors = _tensor_infos(path, table, data_start, size)
    if tensors is None:  # something is wrong: check tensor by tensor, to name the first bad one
        tensors = {tname: _tensor_info(path, tname, entry, data_start, size) for tname, entry in table.items()}
    if not _tiles(tensors, size - data_start, data_start):
        _check_tiling(path, tensors, size - data_start, data_start)  # says where it does not
    _remember(raw, size, metadata, tensors)
    if n > _KEEP_FROM:
        header_cache.store(raw, size, metadata, tensors)
    return Header(path=path, raw=raw, size=size, tensors=tensors, metadata=metadata)


def _remember(raw: bytes, size: int, metadata: dict, tensors: dict[str, TensorInfo]) -> None:
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[(raw, size)] = (dict(metadata), {tname: t[1:] for tname, t in tensors.items()})


# Headers shorter than this (about 256 tensor entries) are parsed: faster than opening a cache file.
_KEEP_FROM = 256 * 80


# Headers already parsed and checked in this process, by their exact bytes and file size: everything
# `read_header` checks depends on nothing else. Sibling checkpoints cut by one script (a base and its
# fine-tunes, a pair in the workbench) often have byte-identical headers, and then the second donor's
# 160 shards are not parsed again. A few donors' worth of shards; cleared when full.
_CHECKED: dict[tuple[bytes, int], tuple[dict, dict]] = {}
_CHECKED_MAX = 2048


# The format stores dims and offsets as u64; anything larger cannot come from a real writer.
U64_MAX = (1 << 64) - 1


def _read_raw(path: str) -> tuple[int, int, bytes]:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block the read forever
            raise SurgeonError(f"{path}: not a regular file, so not a safetensors shard")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SurgeonError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SurgeonError(
                    f"{path}: corrupted safetensors header (declares {n} header bytes, file has {size})"
                )
            return size, n, f.read(n)
    except OSError as e:
        raise SurgeonError(f"{path}: cannot read ({e.strerror})") from None


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a header's text can be invalid
# UTF-8 once decoded. Without one, the per-string check below is skipped (92,000 tensors: 0.3 s).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_json(path: str, raw: bytes) -> dict:
    def fast_unique(pairs):
        out = dict(pairs)
        return out if len(out) == len(pairs) else unique(pairs)  # the slow path names the duplicate

    def unique(pairs):
        # json keeps the last of duplicated keys silently; which tensor is meant is then a guess.
        out: dict = {}
        for key, value in pairs:
            for text in (key, value) if isinstance(value, str) else (key,):
                if not _utf8(text):  # a lone surrogate escape: the reference reader refuses it too
                    raise SurgeonError(f"{path}: corrupted safetensors header: {_short(text)} is not valid UTF-8")
            if key in out:
                raise SurgeonError(
                    f"{path}: corrupted safetensors header: key {_show(key)} appears twice "
                    f"(first {_short(out[key])}, then {_short(value)})"
                )
            out[key] = value
        return out

    try:
        # Decoded explicitly: json.loads(bytes) would also guess UTF-16 and UTF-32; the format is UTF-8.
        table = json.loads(raw.decode("utf-8"),
                           object_pairs_hook=unique if _SURROGATE_ESCAPE.search(raw) else fast_unique)
    except (ValueError, UnicodeDecodeError) as e:
        raise SurgeonError(f"{path}: corrupted safetensors header ({e})") from None
    except RecursionError:
        raise SurgeonError(f"{path}: corrupted safetensors header (JSON nested too deeply)") from None
    if not isinstance(table, dict):
        raise SurgeonError(f"{path}: corrupted safetensors header (a {type(table).__name__}, not an object)")
    return table


def _metadata(path: str, metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SurgeonError(
            f"{path}: corrupted safetensors header: __metadata__ is {_short(metadata)}, "
            "expected an object of strings"
        )
    return metadata


def _is_u64(x) -> bool:
    return type(x) is int and 0 <= x <= U64_MAX  # not bool, not float, not a numeric string


def _tensor_infos(path: str, table: dict, data_start: int, size: int) -> dict[str, TensorInfo] | None:
    """Every entry checked at once, column by column: the same checks as `_tensor_info`, several times
    faster on a header of 90,000 tensors. None when any check fails (`_tensor_info` then says which)."""
    entries = list(table.values())
    try:
        if any(type(e) is not dict for e in entries):
            return None
        dtypes = [e["dtype"] for e in entries]
        shapes = [e["shape"] for e in entries]
        offsets = [e["data_offsets"] for e in entries]
    except KeyError:
        return None
    if any(type(d) is not str for d in dtypes) or not set(dtypes) <= DTYPE_SIZES.keys() \
            or any(type(x) is not list for x in shapes) \
            or any(type(x) is not list or len(x) != 2 for x in offsets):
        return None
    dims = [d for shape in shapes for d in shape]
    flat = [x for pair in offsets for x in pair]
    for values in (dims, flat):
        if values and (set(map(type, values)) != {int} or min(values) < 0 or max(values) > U64_MAX):
            return None
    infos = {}
    for tname, dtype, shape, (begin, stop) in zip(table, dtypes, shapes, offsets):
        need = prod(shape) * DTYPE_SIZES[dtype]
        if stop - begin != need or need > U64_MAX or data_start + stop > size:
            return None
        if need == 0 and prod(d for d in shape if d) > U64_MAX:  # overflows on the way (see _tensor_info)
            return None
        infos[tname] = _info((path, dtype, tuple(shape), data_start + begin, data_start + stop))
    return infos


def _tensor_info(path: str, tname: str, entry, data_start: int, size: int) -> TensorInfo:
    def where() -> str:  # built only for an error: a header has tens of thousands of tensors
        return f"{path}: corrupted safetensors header: tensor {_show(tname)}"

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SurgeonError(f"{where()} is {_short(entry)}, expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SurgeonError(f"{path}: tensor {_show(tname)} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise SurgeonError(f"{where()} has shape {_short(shape)}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        raise SurgeonError(f"{where()} has data_offsets {_short(offsets)}, expected [begin, end] with begin <= end")
    numel = 1
    for d in shape:  # the reference reader refuses a shape whose size overflows u64 on the way
        numel *= d
        if numel > U64_MAX:
            raise SurgeonError(f"{where()} has shape {_short(shape)}, whose size overflows 64 bits")
    begin, stop = offsets
    need = numel * DTYPE_SIZES[dtype]
    if stop - begin != need:
        raise SurgeonError(
            f"{where()} spans {stop - begin} bytes but {dtype}{list(shape)} needs {need}"
        )
    if data_start + stop > size:
        raise SurgeonError(
            f"{path}: truncated shard: tensor {_show(tname)} ends at byte {data_start + stop} "
            f"but {os.path.basename(path)} has only {size} bytes"
        )
    return TensorInfo(path, dtype, tuple(shape), data_start + begin, data_start + stop)


def _tiles(tensors: dict[str, TensorInfo], data_bytes: int, data_start: int) -> bool:
    """Whether the tensors cover the data exactly, back to back (the quick test; `_check_tiling` names
    the fault)."""
    spans = sorted((t.start, t.end) for t in tensors.values())
    end = data_start
    for start, stop in spans:
        if start != end:
            return False
        end = stop
    return end - data_start == data_bytes


def _check_tiling(path: str, tensors: dict[str, TensorInfo], data_bytes: int, data_start: int) -> None:
    """The tensors must cover the data exactly, back to back: an overlap means two tensors share
    bytes, a gap or a tail means bytes no tensor owns; the safetensors library refuses both."""
    end, last = 0, None
    for tname, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        begin, stop = t.start - data_start, t.end - data_start
        if begin < end:
            raise SurgeonError(
                f"{path}: corrupted safetensors header: tensor {_show(tname)} (bytes {begin}-{stop}) "
                f"overlaps tensor {_show(last)} (which ends at byte {end})"
            )
        if begin > end:
            after = f"after tensor {_show(last)} (which ends at byte {end})" if last else "at the start of the data"
            raise SurgeonError(
                f"{path}: corrupted safetensors header: a gap of {begin - end} bytes {after}; "
                f"tensor {_show(tname)} starts at byte {begin}"
            )
        end, last = stop, tname
    if end != data_bytes:
        raise SurgeonError(
            f"{path}: corrupted safetensors header: the tensors end at data byte {end} "
            f"but the file holds {data_bytes} data bytes ({data_bytes - end} bytes no tensor owns)"
        )


def _show(name: str) -> str:
    """A name from the file, quoted when it would break the one-line error (newlines, controls)."""
    return name if name.isprintable() and name.strip() == name and name else repr(name)


def _short(value, limit: int = 80) -> str:
    try:
        text = json.dumps(value)
    except RecursionError:
        return "a deeply nested value"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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

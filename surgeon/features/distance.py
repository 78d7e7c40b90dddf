"""How far a donor's tensor is from the base's: the relative L2 norm ||donor - base|| / ||base||.

It shows where post-training moved the weights most, which is what a researcher wants to see
before choosing what to transplant. Tensors are read through numpy memory maps in chunks (no
torch, no full copy in memory); results are cached by (base fingerprint, donor fingerprint,
tensor), in memory and on disk (one small JSON file per pair of donors), because a
fingerprint changes whenever a shard does: a figure computed once is never computed again.

A part made of several tensors (a layer's attention, an expert) shows the parameter-weighted mean
of its tensors' relative distances (AGGREGATE). One relative L2 over all of them together would
let norm weights (values near 1, so a large ||base||) swamp the projections: attention whose
q/k/v/o all moved 0.7-0.9 would read 0.2. The weighted mean reads as "how far this part's
parameters moved, on average", so a moved matrix shows; the max would instead let one small
tensor (a bias, a norm, a router bias) speak for the whole part.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from surgeon.core.donor import Donor
from surgeon.errors import SurgeonError
from surgeon.io.atomic import write_atomic
from surgeon.io.cache import cache_root as user_cache_root
from surgeon.io.dtypes import TORCH_NAMES
from surgeon.io.safetensors_file import TensorInfo
from surgeon.jobs import NEVER, Meter


def _numpy_dtype(name: str):
    """numpy's dtype for a safetensors dtype (from the one dtype table); None where numpy has none."""
    try:
        return np.dtype(TORCH_NAMES.get(name, ""))
    except TypeError:  # bfloat16, float8: numpy has no such type
        return None


# What a part's figure is, for the screen's title and the CLI's header.
AGGREGATE = "parameter-weighted mean of per-tensor relative L2 ||donor - base|| / ||base||"

CHUNK = 1 << 22  # elements per read: 16 MB of float32 at a time


def _e4m3_values() -> np.ndarray:
    """float32 value of every float8_e4m3fn byte: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal, and 0x7f/0xff are NaN (the format has no infinity)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0)) * sign
    return np.where((b & 0x7F) == 0x7F, np.nan, value).astype(np.float32)


_E4M3 = _e4m3_values()


def _e4m3_pairs() -> np.ndarray:
    """The float32 values of two float8_e4m3fn bytes, indexed by the two read as one little-endian
    uint16 and held as one 8-byte item: one lookup decodes two values (1.7-1.9x faster than two)."""
    index = np.arange(1 << 16)
    pairs = np.stack([_E4M3[index & 0xFF], _E4M3[index >> 8]], axis=1)
    return np.ascontiguousarray(pairs).view(np.float64).reshape(-1)


_E4M3_PAIRS = _e4m3_pairs()
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


# A sample (`every` > 1) reads pieces of this many elements, one every `every` pieces, spread over the
# whole tensor; an FP8 weight's sample is every `every`-th block row (its scales come by block).
PIECE = 1 << 16

# A tensor of more elements than this whose exact distance is not cached yet is first estimated from
# about 1/SAMPLE_EVERY of its values: DeepSeek-V3's experts (14.7M FP8 values), not OLMoE's (2.1M).
ESTIMATE_ABOVE = 1 << 22
SAMPLE_EVERY = 16


def _spans(total: int, step: int, every: int, piece: int):
    """(start, stop) over range(total): runs of `step`, or with `every` > 1 one run of `piece` in
    every `every` runs of it."""
    if every > 1:
        step, stride = piece, piece * every
    else:
        stride = step
    for i in range(0, total, stride):
        yield i, min(i + step, total)


def _quantized_chunks(donor: Donor, name: str, info: TensorInfo, every: int = 1):
    """The values a quantized weight stands for, block row by block row: an FP8 weight times its
    `weight_scale_inv` blocks (DeepSeek-V3's layout), MXFP4 `*_blocks` times 2^(scale - 127) per 32
    values (gpt-oss's). None for a tensor stored as plain numbers."""
    if info.dtype.startswith("F8_") and name + "_scale_inv" in donor.tensors and len(info.shape) == 2:
        scale_info = donor.tensors[name + "_scale_inv"]
        scales = np.asarray(next(_chunks(donor, scale_info)), dtype=np.float32).reshape(scale_info.shape)
        rows, cols = info.shape
        block_r, block_c = -(-rows // scales.shape[0]), -(-cols // scales.shape[1])
        raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(rows, cols))

        def decode(block: np.ndarray) -> np.ndarray:
            if cols % 2:
                return np.take(_E4M3, block)
            return np.take(_E4M3_PAIRS, block.view("<u2")).view(np.float32).reshape(block.shape)

        def fp8():
            for r, stop in _spans(rows, block_r, every, block_r):
                values = decode(raw[r:stop])
                values *= np.repeat(scales[r // block_r], block_c)[:cols]
                yield values.reshape(-1)

        return fp8()
    scales_name = name.removesuffix("_blocks") + "_scales"
    if name.endswith("_blocks") and info.dtype == "U8" and scales_name in donor.tensors:
        s_info = donor.tensors[scales_name]
        groups = info.numel // 16
        raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(groups, 16))
        exps = np.memmap(s_info.file, dtype=np.uint8, mode="r", offset=s_info.start, shape=(groups,))

        def mxfp4():
            for g, stop in _spans(groups, CHUNK // 32, every, PIECE // 32):
                b = raw[g:stop]
                values = np.stack([_E2M1[b & 0x0F], _E2M1[b >> 4]], axis=-1).reshape(len(b), 32)
                yield (values * np.exp2(exps[g:stop].astype(np.float32) - 127.0)[:, None]).reshape(-1)

        return mxfp4()
    return None


def _chunks(donor: Donor, info: TensorInfo, every: int = 1):
    if info.dtype == "BF16":
        raw = np.memmap(info.file, dtype=np.uint16, mode="r", offset=info.start, shape=(info.numel,))
        for i, stop in _spans(info.numel, CHUNK, every, PIECE):
            yield (raw[i:stop].astype(np.uint32) << 16).view(np.float32)
        return
    dtype = _numpy_dtype(info.dtype)
    if dtype is None or info.dtype == "BOOL":
        raise SurgeonError(f"distance: tensor dtype {info.dtype} is not supported")
    arr = np.memmap(info.file, dtype=dtype, mode="r", offset=info.start, shape=(info.numel,))
    for i, stop in _spans(info.numel, CHUNK, every, PIECE):
        yield arr[i:stop]


# Values of float32 and narrower (bf16, fp16, FP8, MXFP4) are subtracted and squared in float32, and
# summed by float32 dot products of DOT elements each, whose results add up in float64: within about
# 1e-7 of the float64 computation. The float64 copies of every chunk were most of the arithmetic: a
# third of the time on an FP8 expert held in memory, two thirds with its bytes read from the cache.
DOT = 8192


def _sums(b: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """(sum of (d - b)^2, sum of b^2) of one chunk."""
    if b.dtype.itemsize > 4 or d.dtype.itemsize > 4 or b.dtype.kind != "f" or d.dtype.kind != "f":
        b = b.astype(np.float64)
        delta = d.astype(np.float64) - b
        return float(np.dot(delta, delta)), float(np.dot(b, b))
    b = b.astype(np.float32, copy=False)
    delta = d.astype(np.float32, copy=False) - b
    diff = ref = 0.0
    for i in range(0, len(b), DOT):
        x, y = delta[i:i + DOT], b[i:i + DOT]
        diff += float(np.dot(x, x))
        ref += float(np.dot(y, y))
    return diff, ref


def _aligned(a_pieces, b_pieces):
    """Pairs of equal-length runs from two streams of 1-D arrays that hold the same number of values
    cut at different places."""
    a_iter, b_iter = iter(a_pieces), iter(b_pieces)
    a = b = np.empty(0, np.float32)
    while True:
        if not len(a):
            a = next(a_iter, None)
        if not len(b):
            b = next(b_iter, None)
        if a is None or b is None:
            return
        n = min(len(a), len(b))
        yield a[:n], b[:n]
        a, b = a[n:], b[n:]


def squared_norms(base: Donor, donor: Donor, name: str, every: int = 1) -> tuple[float, float]:
    """(||donor - base||^2, ||base||^2) of one tensor, summed in float64 (DOT says how); with `every`
    > 1, of a sample of about 1/every of its values (PIECE says which), for an estimate."""
    b_info, d_info = base.tensors[name], donor.tensors.get(name)
    if d_info is None:
        raise SurgeonError(f"tensor {name}: {donor.path} has no such tensor")
    if b_info.shape != d_info.shape:
        raise SurgeonError(f"tensor {name}: shape {list(d_info.shape)} in {donor.path} but {list(b_info.shape)} in {base.path}")
    if b_info.numel == 0:
        return 0.0, 0.0
    if base.pickled or donor.pickled:
        raise SurgeonError("distance: pickle donors are not supported")
    diff = ref = 0.0
    # Quantized weights compare by the values they stand for, so a distance reads the same whether a
    # checkpoint is stored in FP8, MXFP4 or bf16, and a bf16 release can be compared with its FP8 one
    # (which resolve refuses to mix). Such a pair's values come in pieces cut at different places, and
    # a sample of each would be of different values: they are compared whole, piece against piece.
    b_values, d_values = _quantized_chunks(base, name, b_info), _quantized_chunks(donor, name, d_info)
    if (b_values is None) != (d_values is None):
        b_values = b_values or _chunks(base, b_info)
        d_values = d_values or _chunks(donor, d_info)
        pairs = _aligned(b_values, d_values)
    else:
        pairs = zip(_quantized_chunks(base, name, b_info, every) or _chunks(base, b_info, every),
                    _quantized_chunks(donor, name, d_info, every) or _chunks(donor, d_info, every))
    for b, d in pairs:
        chunk_diff, chunk_ref = _sums(b, d)
        diff += chunk_diff
        ref += chunk_ref
    return diff, ref


def relative(diff: float, ref: float) -> float:
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / ref)


def cache_root() -> Path:
    return user_cache_root() / "distances"


class DistanceCache:
    """Thread-safe memo of squared norms per (base, donor) pair of fingerprints, saved on disk."""

    def __init__(self, root: Path | None = None):
        self.root = root if root is not None else cache_root()
        self._pairs: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._estimates: dict[tuple, float] = {}  # ((base, donor) fingerprints, tensor, every) -> estimate
        self._lock = threading.Lock()

    def _file(self, pair: tuple[str, str]) -> Path:
        return self.root / f"{pair[0].removeprefix('sha256:')}-{pair[1].removeprefix('sha256:')}.json"

    def _memo(self, base: Donor, donor: Donor) -> tuple[tuple[str, str], dict]:
        pair = (base.fingerprint, donor.fingerprint)
        with self._lock:
            memo = self._pairs.get(pair)
            if memo is None:
                try:
                    memo = {k: tuple(v) for k, v in json.loads(self._file(pair).read_text()).items()}
                except (OSError, ValueError, AttributeError):
                    memo = {}
                self._pairs[pair] = memo
        return pair, memo

    def norms(self, base: Donor, donor: Donor, name: str) -> tuple[float, float]:
        pair, memo = self._memo(base, donor)
        hit = memo.get(name)
        if hit is None:
            hit = (0.0, 0.0) if donor is base else squared_norms(base, donor, name)
            with self._lock:
                memo[name] = hit
                self._dirty.add(pair)
        return hit

    def save(self) -> None:
        """Write the pairs that gained figures; a failed write only costs a recomputation later."""
        with self._lock:
            todo = [(p, dict(self._pairs[p])) for p in self._dirty]
            self._dirty.clear()
        for pair, memo in todo:
            try:
                write_atomic(self._file(pair), json.dumps(memo).encode())
            except OSError:
                pass

    def tensor(self, base: Donor, donor: Donor, name: str) -> float:
        return relative(*self.norms(base, donor, name))

    def group(self, base: Donor, donor: Donor, names, estimate_above: int | None = None) -> float:
        """Distance of a part made of several tensors (an expert, a layer's attention): the
        parameter-weighted mean of their relative distances (AGGREGATE; the module says why). With
        `estimate_above`, a tensor of more values whose exact figure is not cached counts with its
        estimate (`estimate`), so the result is an estimate."""
        total = weighted = 0.0
        for n in names:
            numel = base.tensors[n].numel
            if estimate_above is not None and numel > estimate_above and self.cached(base, donor, n) is None:
                value = self.estimate(base, donor, n)
            else:
                value = relative(*self.norms(base, donor, n))  # computed (and cached) even when empty
            if numel:
                total += numel
                weighted += numel * value
        return weighted / total if total else 0.0

    def estimate(self, base: Donor, donor: Donor, name: str, every: int = SAMPLE_EVERY) -> float:
        """The distance of one tensor estimated from about 1/every of its values (`squared_norms`).
        Kept in memory only, apart from the exact figures, so an estimate is never shown as one."""
        pair, _ = self._memo(base, donor)
        key = (pair, name, every)
        hit = self._estimates.get(key)
        if hit is None:
            hit = 0.0 if donor is base else relative(*squared_norms(base, donor, name, every))
            with self._lock:
                self._estimates[key] = hit
        return hit

    def cached(self, base: Donor, donor: Donor, name: str) -> float | None:
        _, memo = self._memo(base, donor)
        hit = memo.get(name)
        return None if hit is None else relative(*hit)


def component_tensors(base: Donor) -> dict[tuple[int | None, str], list[str]]:
    """Tensor names per grid cell (layer, component kind); globals have layer None."""
    cells: dict[tuple[int | None, str], list[str]] = {}
    for name in base.ordered_names:
        part = base.anatomy.parts.get(name)
        if part is not None:
            cells.setdefault((part.layer, part.kind), []).append(name)
    return cells


def distance_map(base: Donor, donor: Donor, cache: DistanceCache, progress=None, cancel=NEVER,
                 estimate_above: int | None = None):
    """Yield ((layer, kind), distance) for every cell: where fine-tuning moved the weights, by
    component and layer, the view that helps pick what to transplant. With `estimate_above`, a
    tensor of more values whose exact figure is not cached counts with its estimate
    (`DistanceCache.group`), and such a cell is an estimate. A job (surgeon.jobs): Steps in cells,
    `cancel` checked before each; what was computed is cached even when cancelled."""
    yield from _map_cells(base, donor, cache, list(component_tensors(base).items()), "distance", progress, cancel,
                          estimate_above)


def _map_cells(base: Donor, donor: Donor, cache: DistanceCache, cells: list, what: str, progress, cancel,
               estimate_above: int | None):
    meter = Meter(progress, len(cells), "cells", what)
    try:
        for i, (cell, names) in enumerate(cells):
            cancel.check()
            if cell[1] == "layer_gate" and any(n not in donor.tensors for n in names):
                continue  # a donor without that Self-MoE gate: nothing to compare, no distance
            yield cell, cache.group(base, donor, names, estimate_above)
            meter(i + 1)
    finally:
        cache.save()


class Distance(NamedTuple):
    """One tensor's distance in one donor; `estimate`: from a sample (`DistanceCache.estimate`), and
    the exact figure follows."""

    donor: str
    name: str
    value: float
    estimate: bool = False


def _or_nan(compute, *args) -> float:
    """compute(*args), or NaN where a donor cannot be compared (no such tensor, another shape, an
    unreadable file)."""
    try:
        return compute(*args)
    except (SurgeonError, OSError):
        return math.nan


def estimated_map(base: Donor, donor: Donor, cache: DistanceCache, progress=None, cancel=NEVER,
                  estimate_above: int = ESTIMATE_ABOVE):
    """Yield ((layer, kind), estimate) for every cell holding a tensor over `estimate_above` values
    whose exact figure is not cached: the distance map of DeepSeek-V3 (690 GB a donor) is all there
    after reading about a sixteenth of it; `distance_map` then gives the exact figures. A job, as
    distance_map."""
    def pending(names) -> bool:
        return any(base.tensors[n].numel > estimate_above and cache.cached(base, donor, n) is None for n in names)

    cells = [(cell, names) for cell, names in component_tensors(base).items() if pending(names)]
    yield from _map_cells(base, donor, cache, cells, "estimate", progress, cancel, estimate_above)


def tensor_distances(base: Donor, donors: dict[str, Donor], names: list[str], cache: DistanceCache, progress=None,
                     cancel=NEVER, estimate_above: int = ESTIMATE_ABOVE):
    """Yield a Distance for every tensor of `names` in every donor; NaN where a donor cannot be compared.
    A tensor over `estimate_above` elements whose figure is not cached is first estimated from a sample,
    and its exact figure follows once every tensor has one: a layer of DeepSeek-V3 (1,557 tensors,
    11.5 GB a donor) shows every figure after reading a sixteenth of it, then the exact ones. A job,
    as distance_map (Steps count both passes)."""
    todo = [(name, d, donor) for name in names for d, donor in donors.items()]
    later = [(name, d, donor) for name, d, donor in todo
             if donor is not base and base.tensors[name].numel > estimate_above and cache.cached(base, donor, name) is None]
    estimated = {(name, d) for name, d, _ in later}
    meter = Meter(progress, len(todo) + len(later), "tensors", "distance")
    try:
        for i, (name, d, donor) in enumerate(todo):
            cancel.check()
            if (name, d) in estimated:
                yield Distance(d, name, _or_nan(cache.estimate, base, donor, name), estimate=True)
            else:
                yield Distance(d, name, _or_nan(cache.tensor, base, donor, name))
            meter(i + 1)
        for i, (name, d, donor) in enumerate(later):
            cancel.check()
            yield Distance(d, name, _or_nan(cache.tensor, base, donor, name))
            meter(len(todo) + i + 1)
    finally:
        cache.save()

"""How far a donor's tensor is from the base's: the relative L2 norm ||donor - base|| / ||base||.

It shows where post-training moved the weights most, which is what a researcher wants to see
before choosing what to transplant. Tensors are read through numpy memory maps in chunks (no
torch, no full copy in memory); results are cached by (base fingerprint, donor fingerprint,
tensor) because a fingerprint changes whenever a shard does. The key also holds each donor's
path: the fingerprint hashes headers, not weights, so same-shaped siblings (a base and its
post-trained version) share one.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .donor import Donor
from .safetensors_file import TensorInfo

_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8}
CHUNK = 1 << 22  # elements per read: 16 MB of float32 at a time


def _chunks(donor: Donor, info: TensorInfo):
    if info.dtype == "BF16":
        raw = np.memmap(info.file, dtype=np.uint16, mode="r", offset=info.start, shape=(info.numel,))
        for i in range(0, info.numel, CHUNK):
            yield (raw[i:i + CHUNK].astype(np.uint32) << 16).view(np.float32)
        return
    if info.dtype not in _NUMPY:
        raise ValueError(f"distance: dtype {info.dtype} is not supported")
    arr = np.memmap(info.file, dtype=_NUMPY[info.dtype], mode="r", offset=info.start, shape=(info.numel,))
    for i in range(0, info.numel, CHUNK):
        yield arr[i:i + CHUNK]


def squared_norms(base: Donor, donor: Donor, name: str) -> tuple[float, float]:
    """(||donor - base||^2, ||base||^2) of one tensor, accumulated in float64."""
    b_info, d_info = base.tensors[name], donor.tensors[name]
    if b_info.shape != d_info.shape:
        raise ValueError(f"tensor {name}: shapes differ ({list(d_info.shape)} vs {list(b_info.shape)})")
    if b_info.numel == 0:
        return 0.0, 0.0
    if base.pickled or donor.pickled:
        raise ValueError("distance: pickle donors are not supported")
    diff = ref = 0.0
    for b, d in zip(_chunks(base, b_info), _chunks(donor, d_info)):
        b = b.astype(np.float64)
        delta = d.astype(np.float64) - b
        diff += float(np.dot(delta, delta))
        ref += float(np.dot(b, b))
    return diff, ref


def relative(diff: float, ref: float) -> float:
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / ref)


class DistanceCache:
    """Thread-safe memo of squared norms, keyed by both fingerprints and the tensor name."""

    def __init__(self):
        self._memo: dict[tuple, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(base: Donor, donor: Donor, name: str) -> tuple:
        return (str(base.path.resolve()), base.fingerprint, str(donor.path.resolve()), donor.fingerprint, name)

    def norms(self, base: Donor, donor: Donor, name: str) -> tuple[float, float]:
        key = self.key(base, donor, name)
        with self._lock:
            hit = self._memo.get(key)
        if hit is None:
            hit = (0.0, 0.0) if donor is base else squared_norms(base, donor, name)
            with self._lock:
                self._memo[key] = hit
        return hit

    def tensor(self, base: Donor, donor: Donor, name: str) -> float:
        return relative(*self.norms(base, donor, name))

    def group(self, base: Donor, donor: Donor, names) -> float:
        """Distance of several tensors taken together (a part: an expert, a layer's attention)."""
        diff = ref = 0.0
        for n in names:
            d, r = self.norms(base, donor, n)
            diff += d
            ref += r
        return relative(diff, ref)

    def cached(self, base: Donor, donor: Donor, name: str) -> float | None:
        with self._lock:
            hit = self._memo.get(self.key(base, donor, name))
        return None if hit is None else relative(*hit)

"""Donor tensors read back as torch tensors for the bytes a pruning or merging computes (merged
experts, a global pruning's padded rows): a whole tensor or one row of its expert axis at a time,
so nothing larger than one fused expert row is held. torch is imported on the first read."""

from __future__ import annotations

import os

from surgeon.core.donor import Donor
from surgeon.io.fs import read_exact


class Reader:
    """Reads donor tensors (or one row of their first axis) as torch tensors, a file descriptor per shard."""

    def __init__(self, donor: Donor):
        self.donor = donor
        self.fds: dict[str, int] = {}

    def read(self, name: str, row: int | None = None):
        import torch

        from surgeon.live.dtypes import TORCH_DTYPES

        if name in self.donor.pickled:
            t = self.donor.pickled[name]
            return t if row is None else t[row]
        info = self.donor.tensors[name]
        if info.file not in self.fds:
            self.fds[info.file] = os.open(info.file, os.O_RDONLY)
        start, count, shape = info.start, info.nbytes, info.shape
        if row is not None:
            count //= info.shape[0]
            start, shape = start + row * count, info.shape[1:]
        data = read_exact(self.fds[info.file], count, start, info.file)
        return torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[info.dtype]).view(shape)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

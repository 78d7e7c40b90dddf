"""Timing helpers the benches share: a barrier for queued GPU work, the plain in-memory copy a
hot-swap is measured against, and paired, synced runs of a command against its baseline (an export
against `cp -r`). torch is imported on use: bench/scale.py's parent process must not load it (it
would raise every child's peak-RSS floor)."""

from __future__ import annotations

import compileall
import os
import statistics
import time
from pathlib import Path
from typing import Callable


def as_installed() -> None:
    """Make the processes this bench starts read moe-surgeon's modules as bytecode, as they do after
    `pip install` (which compiles them): with PYTHONDONTWRITEBYTECODE set, as on the machine these
    benches ran on, every process compiled about 40 of our modules from source first, about 50 ms
    that a user's run does not pay (a 0.94 GB export: 0.70-0.78 s, and 0.65-0.70 s compiled)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "surgeon", quiet=1)


def sync(device) -> None:
    """Wait for the GPU's queued work; nothing on CPU. "auto" means the GPU when there is one."""
    import torch

    name = str(device)
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.synchronize()


def copy_seconds(views, sources, device) -> float:
    """Seconds to copy each source tensor into its live view, queued work included."""
    import torch

    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for view, source in zip(views, sources):
            view.copy_(source, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def paired(baseline: Callable[[], float], others: dict[str, Callable[[], float]], repeats: int
           ) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds of `repeats` rounds of `baseline` and each of `others` (each callable runs once and
    returns its seconds), with the order reversed every other round so that no side always runs
    right after the other, and os.sync() before every run: a run that follows fresh writes would
    otherwise pay for flushing them."""
    base: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in others}
    for r in range(repeats):
        runs = [(None, baseline), *others.items()]
        for name, run in runs[::-1] if r % 2 else runs:
            os.sync()
            (base if name is None else times[name]).append(run())
    return base, times


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """min / median / max."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def ratios(times: list[float], base: list[float]) -> list[float]:
    """Each round's time over the baseline's in the same round."""
    return [t / b for t, b in zip(times, base)]


def drop_from_page_cache(target) -> None:
    """Evict a checkpoint directory's files from the page cache (a `demo:` name is left alone)."""
    folder = Path(target)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_back(folders) -> None:
    """Put checkpoint directories in the page cache as a read puts them, not as their writer did.

    The kernel keeps what a program just wrote in the pieces its writes made (for a writer of
    tensors of any size, folios of about six pages here), and what it reads ahead in larger ones,
    which copy out faster: the 96 attention tensors of a 0.94 GB OLMoE-shape donor (34 MB) were read
    in 5.7 ms on one thread from the pages their writer left, and in 3.3 ms once the file had been
    evicted and read again (Zen 4 VM, 2026-12-08). A user's donors were read from a disk, or
    downloaded in large writes; a bench's donors were just written by the bench, so a bench that
    times copies out of the page cache reads them back first."""
    os.sync()  # only clean pages can be evicted
    buf = bytearray(1 << 20)
    for folder in folders:
        drop_from_page_cache(folder)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass

"""A plan's weights read from the donors' files while torch imports, for our own forward to use in place.

A probe's process spends about a second importing torch before it can make a tensor, and then
about 0.3 s filling a 135M model from the page cache (bench/startup.py). Reading the bytes needs
no torch: a thread started before the import reads each tensor the plan takes whole, in the dtype
it is stored in, into one anonymous memory map; the import and the reads run on two cores at once.
Afterwards our own forward (`native_model.py`, built by `loader.build_empty`) takes those tensors as
its parameters, views of that memory, instead of allocating and filling its own (torch.frombuffer:
no copy). Hot-swaps then write into that memory as into any parameter.

Only for the CPU and tensors read as stored (no cast, no splice of several donors' experts); what
is not preloaded is read as before. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import mmap
import os
import threading

from surgeon.io.dtypes import cast_name

ALIGN = 64  # each tensor starts on a cache line, as torch's own allocations do
READ_STEP = 64 << 20  # bytes per pread: one read returns at most about 2 GiB


class Preload:
    """The bytes of tensors {name: (file, start, nbytes)}, each read to its place in one memory map
    by a thread started with `start`; `tensors` waits for it."""

    def __init__(self, sources: dict[str, tuple[str, int, int, str, tuple]]):
        # name -> (file, start in the file, bytes, safetensors dtype, shape)
        self.sources = sources
        self.at: dict[str, int] = {}
        size = 0
        for name, (_, _, nbytes, _, _) in sources.items():
            self.at[name] = size
            size += -(-nbytes // ALIGN) * ALIGN
        self.memory = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.memory.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults while the bytes land
            except OSError:
                pass
        self.error: str | None = None
        self._thread = threading.Thread(target=self._read, name="moe-surgeon-preload", daemon=True)

    def start(self) -> "Preload":
        self._thread.start()
        return self

    def _read(self) -> None:
        view = memoryview(self.memory)
        fds: dict[str, int] = {}
        try:
            for name, (file, start, nbytes, _, _) in sorted(self.sources.items(), key=lambda s: s[1][:2]):
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = os.open(file, os.O_RDONLY)
                at, done = self.at[name], 0
                while done < nbytes:
                    n = os.preadv(fd, [view[at + done:at + min(nbytes, done + READ_STEP)]], start + done)
                    if n == 0:
                        raise OSError(f"{file} is shorter than its header says")
                    done += n
        except OSError as e:  # the load reads these tensors again and reports what is wrong
            self.error = str(e)
        finally:
            view.release()
            for fd in fds.values():
                os.close(fd)

    def tensors(self) -> dict:
        """{name: CPU tensor of its stored dtype and shape, a view of the preloaded bytes}; empty when
        the reads failed."""
        import torch

        from surgeon.live.dtypes import TORCH_DTYPES

        self._thread.join()
        if self.error is not None:
            return {}
        out = {}
        for name, (_, _, nbytes, dtype, shape) in self.sources.items():
            t = TORCH_DTYPES[dtype]
            count = nbytes // t.itemsize
            out[name] = torch.frombuffer(self.memory, dtype=t, count=count, offset=self.at[name]).view(shape) \
                if count else torch.empty(shape, dtype=t)
        return out


def start_preload(plan, donors: dict, dtype: str) -> Preload | None:
    """Start reading what materialising `plan` in `dtype` (a --dtype name) takes whole and as stored,
    or None where there is nothing to read or the bytes are more than half the available memory."""
    from surgeon.core.resolve import resolve
    from surgeon.live.loader import available_memory

    try:
        resolution = resolve(plan, donors, dtype=dtype)
    except Exception:  # materialising reports what is wrong with the plan
        return None
    fused = bool(donors[plan.base].anatomy.architecture.fused_experts)
    want = cast_name(dtype)
    picked = {}
    for name, src in resolution.sources.items():
        part = resolution.parts.get(name)
        if fused and part is not None and part.expert is not None:
            continue  # one expert's tensor on disk is a slice of a fused parameter live: copied there
        donor = donors[src.donor]
        info = donor.tensors.get(src.tensor)
        if src.runs or src.converts or info is None or src.tensor in donor.pickled or src.tensor != name:
            continue
        if want is not None and info.dtype != want:
            continue
        picked[name] = (str(info.file), info.start, info.nbytes, info.dtype, tuple(info.shape))
    total = sum(s[2] for s in picked.values())
    available = available_memory()
    if not total or available is None or total > available // 2:
        return None
    return Preload(picked).start()

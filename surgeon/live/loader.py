"""Loading a checkpoint as a live transformers model: the one place `from_pretrained` is called,
and where an empty model is built for a hybrid to fill from the donors' files (`build_empty`).

Local files only (a path is never a Hub id here), eval mode, and the Self-MoE layer gates of a
sidecar `from_pretrained` does not read attached as forward hooks (see `layer_gates.py`), in
float32 whatever the model's dtype.

Importing this module imports neither torch nor transformers (each function imports what it
uses): `prefetch` is called before torch's import, to read a model's files while the libraries load.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from surgeon.core.gates_sidecar import read_gates
from surgeon.errors import SurgeonError
from surgeon.io.dtypes import DTYPE_CHOICES


def _from_pretrained_dtype(dtype):
    """What `from_pretrained` gets for `dtype`: a --dtype name (keep: "auto", the checkpoint's own)
    or a floating torch.dtype as given. Anything else is refused: an unknown name used to read as
    keep, so torch.float32 silently loaded a bf16 checkpoint as bf16."""
    import torch

    from surgeon.live.dtypes import torch_dtype

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise SurgeonError(f"dtype {dtype}: a model loads in a floating dtype (e.g. torch.float32)")
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_CHOICES:
        return torch_dtype(dtype)
    raise SurgeonError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_CHOICES)} or a torch dtype")


def load_model(directory: str | os.PathLike, *, device: str | None = None, dtype="keep",
               gates: bool = True, device_map: str | None = None, loading_info: bool = False,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None):
    """`AutoModelForCausalLM` of `directory` on `device` (default: cuda when present) in `dtype`
    (keep: the checkpoint's own), in eval mode, its layer gates attached when `gates` and it has any.

    `device="auto"` spreads a model larger than one GPU over every GPU (accelerate's
    device_map=auto); what does not fit in `max_memory` (default: the environment variable
    MOE_SURGEON_MAX_MEMORY, e.g. "0=20GiB,cpu=60GiB", else all free memory) is offloaded to
    `offload_folder`. With `loading_info`, returns (model, what transformers found missing or
    unexpected) so a caller can check a checkpoint it wrote.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from surgeon.live.devices import check_device, default_device
    from surgeon.live.layer_gates import attach_gates, gate_modules

    directory = Path(directory)
    dtype_arg = _from_pretrained_dtype(dtype)
    if not (directory / "config.json").is_file():
        raise SurgeonError(f"{directory}: no config.json (not a checkpoint directory)")
    device = device or default_device()
    dev = "auto" if device == "auto" else str(check_device(device))
    sidecar, _ = read_gates(directory) if gates else ({}, {})
    split = {}
    if (device_map or dev) == "auto":
        split = {"max_memory": max_memory or parse_max_memory(os.environ.get("MOE_SURGEON_MAX_MEMORY", "")),
                 "offload_folder": offload_folder}
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype_arg, device_map=device_map or dev, local_files_only=True,
        output_loading_info=loading_info, **split,
    )
    model, info = loaded if loading_info else (loaded, None)
    model.eval()
    if sidecar:
        with torch.no_grad():
            attach_gates(model, {layer: tuple(g.shape) for layer, g in sidecar.items()})
            for layer, module in gate_modules(model).items():
                module.weight.copy_(sidecar[layer])
    return (model, info) if loading_info else model


def build_empty(directory: str | os.PathLike, *, device: str, dtype="keep", first_dtype=None, native: bool = False,
                preload=None):
    """The checkpoint's model on `device` with its weights allocated but not initialised, in eval
    mode: what `from_pretrained` would build before it reads a byte. A caller that fills every
    weight itself (Hybrid.materialize, straight from the donors' files) thus holds one copy of the
    model and no memory map, where `from_pretrained` also maps every file it reads.

    The dtype is `from_pretrained`'s: a --dtype name, or for keep the config's own, else
    `first_dtype` (the checkpoint's first floating tensor's, a torch.dtype). Modules the class keeps
    in float32 under bf16/fp16 (`_keep_in_fp32_modules_strict`) are upcast as `from_pretrained` does.
    Buffers the constructor computes (rotary frequencies) are computed as usual.

    With `native`, a checkpoint our own forward runs (`native_config.py`) is built as
    `NativeCausalLM`, and transformers is not imported; on the CPU it takes the tensors of
    `preload` (live/preload.py) as its parameters (`model.preloaded` names them)."""
    import torch

    if native:
        model = _build_native(Path(directory), device, dtype, first_dtype, preload)
        if model is not None:
            return model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise SurgeonError(f"{directory}: no config.json (not a checkpoint directory)")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    dt = _from_pretrained_dtype(dtype)
    if dt == "auto":
        dt = getattr(config, "dtype", None) or first_dtype or torch.float32
    dt = getattr(torch, dt) if isinstance(dt, str) else dt
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model.tie_weights()  # no_init_weights skips init_weights, which is where tying happens
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    if keep and dt in (torch.float16, torch.bfloat16):
        import re

        pattern = re.compile("|".join(rf"(^|\.){re.escape(k)}($|\.)" for k in keep))
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if pattern.search(name) and t.is_floating_point():
                    t.data = t.data.float()
    if torch.device(device).type == "cpu":
        prefer_huge_pages(model)
    return model.eval()


def _build_native(directory: Path, device: str, dtype, first_dtype, preload=None):
    """`NativeCausalLM` of the checkpoint, allocated and not initialised; None where the forward
    does not cover its config."""
    import torch

    from surgeon.live.native_config import read_native_config
    from surgeon.live.native_model import NativeCausalLM

    config = read_native_config(directory)
    if config is None:
        return None
    dt = _from_pretrained_dtype(dtype)
    if dt == "auto":
        dt = getattr(torch, config.dtype, None) if isinstance(config.dtype, str) else None
        dt = dt if isinstance(dt, torch.dtype) and dt.is_floating_point else (first_dtype or torch.float32)
    model = NativeCausalLM(config, device=device, dtype=dt)
    if torch.device(device).type == "cpu":
        if preload is not None:
            model.adopt(preload.tensors())
        prefer_huge_pages(model)
    return model.eval()


HUGE_PAGES_FROM = 8 << 30  # model bytes; below this, 4 KiB pages filled faster (see prefer_huge_pages)


def prefer_huge_pages(model) -> None:
    """Ask Linux for 2 MiB pages under each weight not yet written, for a model of 8 GiB or more: a
    model that large filled through 4 KiB pages spends much of its load time in page faults. Below
    that the hint cost time. On a 2-core virtual machine (bench/scale.py donors, cached where they
    fit), materialising 0.94 GB took 1.0-1.6 s with it and 0.5-1.0 s without, 3.4 GB 2.8-4.5 s
    against 1.5-3.4 s, and 13.8 GB 9.1-17.0 s (median 12.7) against 12.1-21.1 s (median 16.6); the
    same with the kernel's THP defrag set to defer, so it is not compaction (fresh huge pages from
    the hypervisor, we think). Only a hint: anywhere it is not available nothing changes."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    if sum(p.numel() * p.element_size() for p in model.parameters()) < HUGE_PAGES_FROM:
        return
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    huge, advice = 1 << 21, 14  # MADV_HUGEPAGE
    for param in model.parameters():
        start = (param.data_ptr() + huge - 1) & ~(huge - 1)
        end = (param.data_ptr() + param.numel() * param.element_size()) & ~(huge - 1)
        if end > start:
            madvise(start, end - start, advice)


def parse_max_memory(text: str) -> dict | None:
    """ "0=20GiB,cpu=60GiB" -> {0: "20GiB", "cpu": "60GiB"} (accelerate's max_memory); "" -> None."""
    if not text.strip():
        return None
    out: dict = {}
    for part in text.split(","):
        where, sep, size = part.strip().partition("=")
        if not sep or not where or not size:
            raise SurgeonError(f"MOE_SURGEON_MAX_MEMORY {text!r}: use DEVICE=SIZE[,DEVICE=SIZE] (e.g. 0=20GiB,cpu=60GiB)")
        out[int(where) if where.isdigit() else where] = int(size) if size.isdigit() else size
    return out


def load_gated(directory: str | os.PathLike, *, device: str | None = None, dtype="keep"):
    """A checkpoint with its layer gates attached (the name the gates' model cards print). `dtype`:
    a --dtype name or a torch.dtype."""
    return load_model(directory, device=device, dtype=dtype)


# ---------------------------------------------------------------- reading ahead while libraries load
PREFETCH_GAP = 1 << 20  # byte ranges of one file closer than this are asked for as one
# Linux reads at most one read-ahead window (the device's, often 128 KiB to 8 MiB) per WILLNEED:
# a whole file asked for at once came in as its first 8 MiB here. Asked for in steps this size,
# all of it comes in (538 MB from a cold disk in under 2 s, the calls 0.3 s of a thread's time).
PREFETCH_STEP = 512 << 10


def prefetch_ranges(plan, donors: dict) -> dict[str, list[tuple[int, int]]]:
    """{file: [(start, end), ...]} of the bytes materialising `plan` reads from the donors' files,
    each file's ranges sorted and merged."""
    from surgeon.core.resolve import resolve

    wanted: dict[str, list[tuple[int, int]]] = {}
    for src in resolve(plan, donors).sources.values():
        for lo, hi, name in src.runs or ((None, None, src.donor),):
            donor = donors[name]
            for tensor in (src.tensor, src.tensor + "_scale_inv"):  # an FP8 weight reads its scales too
                info = donor.tensors.get(tensor)
                if info is None or tensor in donor.pickled or not info.nbytes:
                    continue
                start, end = info.start, info.end
                if lo is not None and info.shape and info.shape[0]:  # one run of a spliced expert tensor
                    per = info.nbytes // info.shape[0]
                    start, end = info.start + lo * per, info.start + hi * per
                wanted.setdefault(info.file, []).append((start, end))
    merged: dict[str, list[tuple[int, int]]] = {}
    for file, ranges in wanted.items():
        out: list[list[int]] = []
        for start, end in sorted(ranges):
            if out and start <= out[-1][1] + PREFETCH_GAP:
                out[-1][1] = max(out[-1][1], end)
            else:
                out.append([start, end])
        merged[file] = [(a, b) for a, b in out]
    return merged


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def prefetch(plan, donors: dict) -> threading.Thread | None:
    """Ask the kernel to read the bytes materialising `plan` will read into the page cache, in the
    background (posix_fadvise WILLNEED, from a daemon thread: the reads go on while torch and
    transformers import, which takes seconds, instead of after them). Only a hint: nothing is read
    into this process, nothing changes when it is not done, and it is not done where the system has
    no posix_fadvise or where the bytes are more than half of the memory available (they would push
    out one another). Returns the thread, or None when nothing was asked for."""
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        ranges = prefetch_ranges(plan, donors)
    except Exception:  # a hint never fails a command: materialising reports what is wrong with the plan
        return None
    total = sum(end - start for spans in ranges.values() for start, end in spans)
    available = available_memory()
    if not total or available is None or total > available // 2:
        return None

    def advise() -> None:
        for file, spans in ranges.items():
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                for start, end in spans:
                    for at in range(start, end, PREFETCH_STEP):
                        os.posix_fadvise(fd, at, min(PREFETCH_STEP, end - at), os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=advise, name="moe-surgeon-prefetch", daemon=True)
    thread.start()
    return thread

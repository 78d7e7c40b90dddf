"""A live hybrid: a transformers model on a device with a plan applied, hot-swappable.

Materialising builds the model empty on its device and reads every tensor once, from the donor
the plan takes it from, into its place (one copy in memory: a 7B bf16 model peaks at its own
bytes plus the runtime). A model larger than its devices (`device_map="auto"`), or one whose files
do not fill every weight, is loaded with transformers' own `from_pretrained` instead and the
plan's tensors copied in. Changing the plan copies only the tensors whose source changed, in place,
straight from the donors' files, including into the fused expert tensors transformers
holds in memory (see `architectures.FUSED_QWEN_STYLE`). A sweep then costs probe time, not
reload time.

A model larger than its devices (`--device auto` with accelerate offloading layers to disk) is
swapped through accelerate's offload store: an offloaded tensor is moved once into a file of the
hybrid's own offload folder and then written there in place, so the next forward pass accelerate
runs reads the swapped weights; the donors' files are never written.

Self-MoE layer gates (a sidecar `from_pretrained` does not read, see `core/gates_sidecar.py`) are attached
as modules when materialising and re-fitted on every swap: a plan may add, drop or retype them.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.core.architectures import Architecture
from surgeon.core.donor import Donor
from surgeon.core.gates_sidecar import gate_layer_of, gate_tensor_name
from surgeon.core.plan import Plan
from surgeon.core.resolve import Resolution, changed_between, resolve
from surgeon.errors import SurgeonError
from surgeon.live.alignment import PAGE, align
from surgeon.live.devices import check_device, default_device
from surgeon.live.dtypes import TORCH_DTYPES
from surgeon.live.layer_gates import attach_gates, gate_modules
from surgeon.live.layout import ConversionLayout, LiveTarget, live_slice, load_converted
from surgeon.live.loader import build_empty, load_model, prefer_huge_pages

FILL_THREADS = 4  # reads in flight while materialising: enough to keep a disk and the page faults busy
SWAP_LANES = 4  # at most, threads copying one swap's tensors (never more than torch's thread count)
LANE_BYTES = 16 << 20  # a swap smaller than this is copied in one thread: starting threads would cost more


@dataclass
class SwapReport:
    tensors: int
    bytes: int
    seconds: float


def live_target(disk_name: str, arch: Architecture, live_names: set[str], expert: int | None,
                layout: ConversionLayout | None = None) -> LiveTarget:
    """The live place of a disk tensor: by the architecture's own table where it describes the family,
    else by transformers' conversion mapping (`layout`, see live/layout.py)."""
    if disk_name in live_names:
        return LiveTarget(disk_name)
    segs = disk_name.split(".")
    if segs[:2] == ["model", "layers"]:
        rest = ".".join(segs[3:])
        for old, new in arch.live_renames:
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old):]
        segs = segs[:3] + rest.split(".")
        if ".".join(segs) in live_names:
            return LiveTarget(".".join(segs))
    if expert is not None and arch.fused_experts:
        for i in range(len(segs) - 2):
            if segs[i] == "experts" and segs[i + 1] == str(expert) and segs[i + 2] in arch.fused_experts:
                fused, half = arch.fused_experts[segs[i + 2]]
                name = ".".join(segs[: i + 1] + [fused])
                if name in live_names and segs[i + 3:] == ["weight"]:
                    return LiveTarget(name, expert, half)
    if layout is not None:
        found = layout.target(disk_name)
        if found is not None:
            return found
    raise SurgeonError(f"tensor {disk_name}: no matching tensor in the live {arch.model_type} model")


class TensorReader:
    """Donor tensors read straight from the donors' files.

    Into CPU memory of the same dtype a tensor is read with one pread into its place: no map, no
    temporary. Otherwise (another device or dtype, a strided slice) through a zero-copy view of one
    memory map per file, so a copy costs one pass (map -> live tensor) instead of two; the maps are
    copy-on-write so torch gets a writable buffer without any chance of writing to a donor, and a
    tensor's mapped pages are dropped once it is copied (`release`): mapped pages count as this
    process's memory for as long as the map lives, and a 7B model read through maps would count twice.
    """

    def __init__(self, donors: dict[str, Donor]):
        self.donors = donors
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}
        self._opening = threading.Lock()  # materialising reads from several threads
        weakref.finalize(self, _close_all, self._fds)  # a sweep makes and drops many readers

    def read(self, donor_name: str, tensor: str) -> torch.Tensor:
        donor = self.donors[donor_name]
        if tensor in donor.pickled:
            return donor.pickled[tensor]
        info = donor.tensors[tensor]
        mm = self._maps.get(info.file)
        if mm is None:
            with self._opening:
                mm = self._maps.get(info.file)
                if mm is None:
                    try:
                        with open(info.file, "rb") as f:
                            mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    except OSError as e:
                        raise SurgeonError(f"{info.file}: cannot read tensor {tensor} ({e.strerror})") from None
        if info.numel == 0:
            return torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
        flat = torch.frombuffer(mm, dtype=TORCH_DTYPES[info.dtype], count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def release(self, donor_name: str, tensor: str) -> None:
        """Unmap the pages `read` mapped for a tensor (the page cache keeps them: a later read is cheap)."""
        donor = self.donors[donor_name]
        mm = None if tensor in donor.pickled else self._maps.get(donor.tensors[tensor].file)
        if mm is not None and donor.tensors[tensor].nbytes:
            info = donor.tensors[tensor]
            start = info.start - info.start % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def release_all(self) -> None:
        """Unmap every page of every map: reads in parallel fault neighbours' pages back in (the
        kernel maps up to 64 kB around a fault) after those neighbours released theirs."""
        for mm in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)

    def destination(self, view: torch.Tensor, donor_name: str, tensor: str) -> memoryview | None:
        """The bytes of `view` that `pread` can fill with the donor tensor: when `view` is contiguous
        CPU memory of the tensor's dtype and size; None otherwise."""
        donor = self.donors[donor_name]
        if tensor in donor.pickled or view.device.type != "cpu" or not view.is_contiguous():
            return None
        info = donor.tensors[tensor]
        if TORCH_DTYPES[info.dtype] != view.dtype or view.numel() != info.numel:
            return None
        return memoryview(view.detach().reshape(-1).view(torch.uint8).numpy())

    def pread(self, buf: memoryview, donor_name: str, tensor: str) -> None:
        """Read a donor tensor's bytes into `buf` (see `destination`)."""
        info = self.donors[donor_name].tensors[tensor]
        if info.nbytes == 0:
            return
        try:
            with self._opening:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            done = 0
            while done < info.nbytes:  # one read returns at most ~2 GiB
                n = os.preadv(fd, [buf[done:]], info.start + done)
                if n == 0:
                    raise SurgeonError(f"{info.file}: tensor {tensor}: file shorter than its header says")
                done += n
        except OSError as e:
            raise SurgeonError(f"{info.file}: cannot read tensor {tensor} ({e.strerror})") from None

    def close(self) -> None:
        _close_all(self._fds)


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def _file_order(donors: dict[str, Donor], src) -> tuple:
    """Where a source tensor's bytes lie: reading in this order reads each file front to back, which
    the kernel's read-ahead turns into streaming (in the model's order a cold 7B load took 4x the disk read)."""
    info = donors[src.donor].tensors.get(src.tensor)
    return (src.donor, info.file, info.start) if info is not None else (src.donor, "", 0)


def _attach_layer_gates(model, resolution: Resolution) -> None:
    """Give the live model the layer gates `resolution` has (see live/layer_gates.py); new ones are zero."""
    shapes = {gate_layer_of(n): tuple(resolution.sources[n].shape) for n in resolution.gate_names()}
    if shapes or gate_modules(model):
        attach_gates(model, shapes)


def offload_stores(model) -> dict:
    """{live tensor name: accelerate's OffloadedWeightsLoader holding it} for every offloaded tensor."""
    stores = {}
    for _, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            weights = getattr(h, "weights_map", None)
            if not getattr(h, "offload", False) or weights is None:
                continue
            loader, prefix = getattr(weights, "dataset", weights), getattr(weights, "prefix", "")
            for key in list(loader.state_dict) + list(loader.index):
                if key.startswith(prefix):
                    stores[key] = loader
    return stores


class Hybrid:
    def __init__(self, model, donors: dict[str, Donor], resolution: Resolution):
        self.model = model
        self.donors = donors
        self.resolution = resolution
        self.reader = TensorReader(donors)
        base = donors[resolution.plan.base]
        self.arch = base.anatomy.architecture
        self._live = dict(model.named_parameters())
        self._live.update(dict(model.named_buffers()))
        self._offloaded = offload_stores(model)
        missing = [n for n, t in self._live.items() if t.device.type == "meta" and n not in self._offloaded]
        if missing:
            raise SurgeonError(f"{base.path}: {len(missing)} tensors are on the meta device with no offload store "
                               f"(e.g. {missing[0]}); hot-swapping needs each weight in memory or offloaded by accelerate")
        self._offload_views: dict[str, torch.Tensor] = {}
        self._targets: dict[str, LiveTarget] = {}
        self._offload_dir = None  # a TemporaryDirectory when materialize made one; removed with the hybrid
        self._layout: ConversionLayout | None = None
        # (live name, donor, tensor) -> the live bytes a pread fills: a swap back to a source seen
        # before skips finding its place again (a sweep swaps the same tensors over and over).
        self._preads: dict[tuple[str, str, str], memoryview] = {}
        # live name -> (those bytes, their dtype and shape): a first swap from another donor whose tensor
        # has the same dtype and shape reads into them without finding them again (_same_place).
        self._places: dict[str, tuple[memoryview, torch.dtype, tuple]] = {}
        self.filled_from_files = False  # True: built empty and filled by the reader, not from_pretrained

    @classmethod
    def materialize(cls, plan: Plan, donors: dict[str, Donor], *, device: str | None = None,
                    dtype: str = "keep", device_map: str | None = None, max_memory: dict | None = None,
                    native: bool = False, preload=None) -> "Hybrid":
        """The hybrid of `plan` on `device`. With `native`, a model whose config our own forward covers
        (`native_model.py`) is built as that, without importing transformers: for callers that only
        score text with it (probes that compute log-likelihoods); any other model is transformers' as
        always. Layer gates hook its decoder layers as they hook transformers'. `preload`: the plan's
        tensors already being read (live/preload.py), which our own forward takes in place."""
        base = donors[plan.base]
        if base.pickled:
            raise SurgeonError(f"base {base.path}: a pickle-only base cannot be materialised; convert it first")
        device = device or default_device()
        offload_dir = None
        if device == "auto":  # larger than one GPU: accelerate spreads it over GPUs, CPU and disk
            device_map, dev = "auto", "auto"
        else:
            dev = check_device(device)
        if device_map == "auto":
            # What does not fit goes to disk here; a folder of the hybrid's own, because swaps write into it.
            offload_dir = tempfile.TemporaryDirectory(prefix="moe-surgeon-offload-")
        try:
            if device_map is None:
                hybrid = cls._filled(plan, donors, str(dev), dtype, native, preload)
                if hybrid is not None:
                    return hybrid
            # Without gates: the plan's own (below) may differ from the base's sidecar.
            model = load_model(base.path, device=str(dev), dtype=dtype, gates=False, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_dir.name if offload_dir else None)
        except torch.cuda.OutOfMemoryError:
            raise SurgeonError(f"{base.path}: out of GPU memory materialising on {dev}; "
                               "try --device cpu or a smaller --dtype") from None
        start = resolve(Plan(plan.base), donors, dtype=dtype)
        # The base's layer gates (a sidecar from_pretrained does not read): attach them, then load.
        _attach_layer_gates(model, start)
        hybrid = cls(model, donors, start)
        hybrid._offload_dir = offload_dir
        with torch.no_grad():
            for name in start.gate_names():
                hybrid._copy(name, start.sources[name])
        hybrid.apply(plan, dtype=dtype)
        return hybrid

    @classmethod
    def _filled(cls, plan: Plan, donors: dict[str, Donor], device: str, dtype: str,
                native: bool = False, preload=None) -> "Hybrid | None":
        """The hybrid built empty and filled tensor by tensor from the donors' files, each tensor
        read once from the donor the plan takes it from: one copy of the model in memory, where
        from_pretrained's memory maps of the base would count a second time, and the plan's swaps
        are not a second pass. None when the files do not fill every weight of the live model (a
        name transformers renames in a way the architecture table does not know): then
        from_pretrained loads the base instead."""
        base = donors[plan.base]
        first = next((TORCH_DTYPES[t.dtype] for t in base.tensors.values()
                      if t.dtype in TORCH_DTYPES and TORCH_DTYPES[t.dtype].is_floating_point), None)
        resolution = resolve(plan, donors, dtype=dtype)
        model = build_empty(base.path, device=device, dtype=dtype, first_dtype=first, native=native, preload=preload)
        _attach_layer_gates(model, resolution)
        hybrid = cls(model, donors, resolution)
        if not hybrid._fills_every_weight(resolution):
            return None
        # Parameters made of preloaded bytes are filled already (a disk name that is its live name).
        done = getattr(model, "preloaded", frozenset())
        order = sorted(((name, src) for name, src in resolution.sources.items()
                        if not (name in done and hybrid.target(name) == LiveTarget(name))),
                       key=lambda item: _file_order(donors, item[1]))
        if device == "cpu":
            hybrid._align_to_files(order)

        def copy(item) -> None:
            with torch.no_grad():
                hybrid._copy(*item)

        # A few reads in flight: while one waits for the disk another takes its page faults (reads
        # and copies let go of the GIL).
        with ThreadPoolExecutor(max_workers=FILL_THREADS) as pool:
            for _ in pool.map(copy, order):
                pass
        hybrid.reader.release_all()
        hybrid.filled_from_files = True
        return hybrid

    def _align_to_files(self, order: list) -> None:
        """Move each live weight, before a byte of it is written, to memory at the page offset of
        the first file bytes `order` (disk name, source) reads into it (live/alignment.py). Only
        parameters: every byte of each is written by the fill (_fills_every_weight), where a buffer
        may hold values its module computed."""
        params = {n for n, _ in self.model.named_parameters()}
        offsets: dict[str, int] = {}
        for name, src in order:
            info = self.donors[src.donor].tensors.get(src.tensor)
            t = self.target(name)
            if (t.name in offsets or t.name not in params or src.runs or info is None
                    or src.tensor in self.donors[src.donor].pickled):
                continue
            view, live = live_slice(self._live, t), self._live[t.name]
            if TORCH_DTYPES.get(info.dtype) != view.dtype or view.numel() != info.numel:
                continue  # converted or dequantized on the way: not one read into place
            offsets[t.name] = (info.start - (view.data_ptr() - live.data_ptr())) % PAGE
        if align(self._live, offsets):
            prefer_huge_pages(self.model)  # the new memory has not had the hint the old had

    def _fit_layer_gates(self, resolution: Resolution) -> set[str]:
        """Attach or detach gate modules to match `resolution`; the names of those now zero."""
        before = {n: tuple(t.shape) for n, t in self._live.items()
                  if n.endswith("layer_gate.weight") and gate_layer_of(n) is not None}
        want = {n: tuple(resolution.sources[n].shape) for n in resolution.gate_names()}
        if before == want:
            return set()
        _attach_layer_gates(self.model, resolution)
        for n in before:
            self._live.pop(n, None)
            self._targets.pop(n, None)
        self._preads.clear()  # gate parameters were made anew
        self._places.clear()
        for layer, gate in gate_modules(self.model).items():
            self._live[gate_tensor_name(layer)] = gate.weight
        return {n for n, shape in want.items() if before.get(n) != shape}

    @property
    def layout(self) -> ConversionLayout:
        if self._layout is None:
            self._layout = ConversionLayout(self.model, set(self._live))
        return self._layout

    def target(self, name: str) -> LiveTarget:
        t = self._targets.get(name)
        if t is None:
            part = self.resolution.parts.get(name)
            expert, names = (part.expert if part else None), set(self._live)
            try:
                t = live_target(name, self.arch, names, expert)
            except SurgeonError:
                # Only then transformers' conversion mapping (importing it costs a second); our own
                # forward has transformers' names and no conversions.
                if getattr(self.model, "native", False):
                    raise
                t = live_target(name, self.arch, names, expert, self.layout)
            self._targets[name] = t
        return t

    def in_place(self, name: str) -> bool:
        """Whether a disk tensor has a place in the live model to be copied into (else it is converted)."""
        try:
            self.target(name)
        except SurgeonError:
            return False
        return True

    def _convert(self, names: list[str], resolution: Resolution) -> int:
        """Load tensors that transformers converts on load (concatenated, split) through its own loader,
        with every disk tensor that feeds the same live tensor, each from its source in `resolution`."""
        feeds: dict[str, list[str]] = {}
        for n in resolution.sources:
            if n not in self._targets and not self.in_place(n):
                feeds.setdefault(self.layout.renamed(n), []).append(n)
        wanted = sorted({m for n in names for m in feeds.get(self.layout.renamed(n), [n])})
        tensors = {n: self._source_tensor(resolution.sources[n]) for n in wanted}
        load_converted(self.model, tensors, self.donors[resolution.plan.base].config.get("quantization_config"))
        for src in (resolution.sources[n] for n in wanted):
            for _, _, donor in src.runs or ((0, 0, src.donor),):
                self.reader.release(donor, src.tensor)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def _source_tensor(self, src) -> torch.Tensor:
        if not src.runs:
            return self.reader.read(src.donor, src.tensor)
        return torch.cat([self.reader.read(donor, src.tensor)[lo:hi] for lo, hi, donor in src.runs])

    def live_view(self, name: str) -> torch.Tensor:
        t = self.target(name)
        if t.name in self._offloaded:
            return live_slice({t.name: self._offloaded_tensor(t.name)}, t)
        return live_slice(self._live, t)

    @property
    def offloaded(self) -> list[str]:
        """Live tensors accelerate keeps off the devices (loaded into place for each forward pass)."""
        return sorted(self._offloaded)

    def _offloaded_tensor(self, name: str) -> torch.Tensor:
        """A writable tensor over what accelerate loads for offloaded `name` on each forward pass."""
        view = self._offload_views.get(name)
        if view is not None:
            return view
        loader = self._offloaded[name]
        if name in loader.state_dict:  # offloaded to CPU memory: the tensor itself
            view = loader.state_dict[name]
        else:
            import numpy as np
            from accelerate.utils import offload_weight

            folder = Path(loader.save_folder)
            info = loader.index[name]
            if info.get("safetensors_file") is not None or not (folder / f"{name}.dat").is_file():
                # accelerate reads this one from a safetensors file, maybe a donor's own: give it a
                # .dat of its own first (accelerate then reads that), so a swap never writes a donor.
                offload_weight(loader[name], name, str(folder), index=loader.index)
                info = loader.index[name]
            bf16 = info["dtype"] == "bfloat16"  # stored as int16 (numpy has no bfloat16), as accelerate does
            shape = tuple(info["shape"]) or (1,)
            arr = np.memmap(folder / f"{name}.dat", dtype="int16" if bf16 else info["dtype"], mode="r+", shape=shape)
            view = torch.from_numpy(arr)
            view = view.view(torch.bfloat16) if bf16 else view
            view = view.view(tuple(info["shape"]))
        self._offload_views[name] = view
        return view

    def _copy(self, name: str, src) -> int:
        known = None
        if not src.runs:
            known = self._preads.get((name, src.donor, src.tensor))
            if known is None:
                known = self._same_place(name, src)
        if known is not None:
            self.reader.pread(known, src.donor, src.tensor)
            return len(known)
        view = self.live_view(name)
        if src.runs:  # a fused expert tensor spliced from several donors: each run of experts in place
            moved = 0
            for lo, hi, donor in src.runs:
                data = self.reader.read(donor, src.tensor)
                if tuple(data.shape) != tuple(view.shape):
                    raise SurgeonError(f"tensor {name}: shape {list(data.shape)} does not fit live {list(view.shape)}")
                view[lo:hi].copy_(data[lo:hi])
                moved += data[lo:hi].numel() * data.element_size()
                self.reader.release(donor, src.tensor)
            return moved
        info = self.donors[src.donor].tensors.get(src.tensor)
        scale = self._scale_of(src, view)
        if scale is not None:  # an FP8 weight into the dequantized live model: as from_pretrained does
            data = dequantize_fp8(self.reader.read(src.donor, src.tensor), self.reader.read(src.donor, scale),
                                  view.dtype)
            view.copy_(data)
            self.reader.release(src.donor, src.tensor)
            return info.nbytes
        if info is not None and tuple(info.shape) != tuple(view.shape):
            raise SurgeonError(f"tensor {name}: shape {list(info.shape)} does not fit live {list(view.shape)}")
        buf = self.reader.destination(view, src.donor, src.tensor)
        if buf is not None:
            self.reader.pread(buf, src.donor, src.tensor)
            self._preads[name, src.donor, src.tensor] = buf
            self._places[name] = (buf, view.dtype, tuple(view.shape))
            return info.nbytes
        data = self.reader.read(src.donor, src.tensor)
        if tuple(data.shape) != tuple(view.shape):
            raise SurgeonError(f"tensor {name}: shape {list(data.shape)} does not fit live {list(view.shape)}")
        view.copy_(data, non_blocking=True)
        if view.is_cuda:  # the copy must have read the mapped pages before they are dropped
            torch.cuda.current_stream(view.device).synchronize()
        self.reader.release(src.donor, src.tensor)
        return data.numel() * data.element_size()

    def _same_place(self, name: str, src) -> memoryview | None:
        """The live bytes a read from another donor filled for `name`, when `src` is a tensor of the
        same dtype and shape (so it would be given the same place): finding a place costs about
        10 us a tensor, most of the Python in a first swap of many tensors."""
        placed = self._places.get(name)
        if placed is None:
            return None
        buf, dtype, shape = placed
        donor = self.donors[src.donor]
        info = donor.tensors.get(src.tensor)
        if info is None or src.tensor in donor.pickled or TORCH_DTYPES.get(info.dtype) != dtype \
                or tuple(info.shape) != shape:
            return None
        self._preads[name, src.donor, src.tensor] = buf
        return buf

    def _scale_of(self, src, view: torch.Tensor) -> str | None:
        """The block-scale tensor of an FP8 source weight when the live model holds it dequantized."""
        info = self.donors[src.donor].tensors.get(src.tensor)
        scale = src.tensor + "_scale_inv"
        if (info is None or not info.dtype.startswith("F8_") or scale not in self.donors[src.donor].tensors
                or view.element_size() == 1):
            return None
        return scale

    def _rides_along(self, name: str, resolution: Resolution) -> bool:
        """An FP8 scale the live model does not hold: it was applied when its weight was copied."""
        weight = name.removesuffix("_scale_inv")
        return weight != name and weight in resolution.sources and not self.in_place(name)

    def _fills_every_weight(self, resolution: Resolution) -> bool:
        """Whether copying every tensor of `resolution` writes every element of every live parameter
        (a fused expert tensor counts once all its experts' slices are there)."""
        written: dict[str, int] = {}
        try:
            for name in resolution.sources:
                t = self.target(name)
                written[t.name] = written.get(t.name, 0) + live_slice(self._live, t).numel()
        except SurgeonError:
            return False  # a tensor with no live place: from_pretrained knows what to do with it
        return all(written.get(n, 0) == p.numel() for n, p in self.model.named_parameters())

    def apply(self, plan: Plan, *, dtype: str = "keep") -> SwapReport:
        """Move to `plan`, copying only tensors whose source changed. Returns what moved."""
        started = time.perf_counter()
        new = resolve(plan, self.donors, dtype=dtype)
        old = self.resolution.sources
        # Layer gates may appear, vanish or change type between plans: fit the gate modules first;
        # every gate that was (re)attached is zero and is then copied like a changed tensor.
        fresh = self._fit_layer_gates(new)
        changed = changed_between(self.resolution, new)
        changed += sorted(fresh - set(changed))
        moved = 0
        done: list[str] = []
        changed = [n for n in changed if not self._rides_along(n, new)]
        converted = [n for n in changed if not self.in_place(n)]
        with torch.no_grad():
            try:
                moved += self._copy_in_lanes([n for n in changed if n not in converted], new.sources, done)
                if converted:
                    moved += self._convert(converted, new)
            except BaseException:
                # All or nothing: put back what was already swapped, so the live weights match
                # the plan the hybrid says it holds and a later swap skips nothing.
                refit = self._fit_layer_gates(self.resolution)
                for name in done:
                    if name in old and name not in refit:
                        self._copy(name, old[name])
                for name in refit:
                    self._copy(name, old[name])
                if converted:
                    self._convert(converted, self.resolution)
                raise
        if changed and any(p.is_cuda for p in self._live.values()):
            torch.cuda.synchronize()
        if changed:
            self.reader.release_all()  # what fault-around mapped next to each released tensor
        self.resolution = new
        return SwapReport(len(changed), moved, time.perf_counter() - started)

    def _copy_in_lanes(self, names: list[str], sources: dict, done: list[str]) -> int:
        """Copy each of `names` from its source in `sources`, appending it to `done` once copied (what
        a rollback puts back); the bytes moved. One read copies at one core's rate: a swap with
        enough to move is split into lanes, a thread each, its tensors shared out by bytes (experts@0-7
        of a 0.94 GB OLMoE-shape pair, 403 MB from the page cache: 50 ms in one thread, 38 ms in two
        lanes, at about a plain copy's rate; bench/scale.py)."""
        sizes = [self._source_bytes(sources[n]) for n in names]
        count = min(SWAP_LANES, torch.get_num_threads(), len(names))
        if count < 2 or sum(sizes) < LANE_BYTES:
            moved = 0
            for name in names:
                moved += self._copy(name, sources[name])
                done.append(name)
            return moved
        lanes: list[list[str]] = [[] for _ in range(count)]
        load = [0] * count
        for name, size in zip(names, sizes):  # each, in the plan's order, to the lightest lane
            i = load.index(min(load))
            lanes[i].append(name)
            load[i] += size
        failed = threading.Event()

        def run(lane: list[str]) -> int:
            moved = 0
            with torch.no_grad():  # grad mode is per thread
                for name in lane:
                    if failed.is_set():
                        break
                    try:
                        moved += self._copy(name, sources[name])
                    except BaseException:
                        failed.set()
                        raise
                    done.append(name)
            return moved

        # This thread copies the first lane itself; the others go to threads kept for the next swap
        # (all attention of the 0.94 GB OLMoE-shape pair, 34 MB: 5.6 ms with a pool started for each
        # swap and this thread waiting on it, 4.3 ms so).
        futures = [_lane_pool().submit(run, lane) for lane in lanes[1:]]
        moved, error = 0, None
        try:
            moved = run(lanes[0])
        except BaseException as e:
            error = e
        wait(futures)  # a failed lane stops the others within a tensor; a rollback must wait for them
        errors = [e for e in (error, *(f.exception() for f in futures)) if e is not None]
        if errors:
            raise errors[0]
        return moved + sum(f.result() for f in futures)

    def _source_bytes(self, src) -> int:
        info = self.donors[src.donor].tensors.get(src.tensor)
        return info.nbytes if info is not None else 0


_lanes: ThreadPoolExecutor | None = None
_lanes_lock = threading.Lock()


def _lane_pool() -> ThreadPoolExecutor:
    """The threads that copy a swap's other lanes, started by the first swap that needs them and
    shared by every hybrid (a lane never waits on another, so swaps in two threads only queue)."""
    global _lanes
    with _lanes_lock:
        if _lanes is None:
            _lanes = ThreadPoolExecutor(max_workers=SWAP_LANES - 1, thread_name_prefix="moe-surgeon-swap")
        return _lanes


def _forget_lanes() -> None:
    global _lanes, _lanes_lock
    _lanes, _lanes_lock = None, threading.Lock()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lanes)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An FP8 weight times its per-block scales, in `dtype`: transformers' own dequantization (what
    from_pretrained does on a machine without FP8 kernels), so a swap gives the bytes a load would."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=dtype)

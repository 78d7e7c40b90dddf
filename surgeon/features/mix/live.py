"""A mix as a live `transformers` model on a device: for hidden-state router init, router
training, and probing or routing views before anything is written.

The model is built from the mix's config with weight initialisation skipped, then every tensor of
the layout is copied in from the donors' memory maps, through the same disk-name -> live-tensor
mapping hot-swapping uses (Mixtral's `block_sparse_moe` is `mlp` in memory, and experts are held
fused: see architectures.FUSED_MIXTRAL / FUSED_QWEN_STYLE).
"""

from __future__ import annotations

import torch

from surgeon.core.anatomy import classify
from surgeon.core.architectures import ARCHITECTURES
from surgeon.core.donor import Donor
from surgeon.errors import SurgeonError
from surgeon.features.mix.plan import MixLayout, MixTensor
from surgeon.jobs import NEVER, CancelToken
from surgeon.live.devices import check_device
from surgeon.live.dtypes import TORCH_DTYPE_NAMES, TORCH_DTYPES
from surgeon.live.hybrid import TensorReader, live_slice, live_target


class LiveMix:
    """A live mix: `model`, and `view(name)` for any tensor of the layout by its disk name."""

    def __init__(self, model, layout: MixLayout):
        self.model = model
        self.layout = layout
        self.arch = ARCHITECTURES[layout.output.model_type]
        self._live = dict(model.named_parameters())
        self._names = set(self._live)

    def view(self, name: str) -> torch.Tensor:
        part = classify(name, self.arch)
        return live_slice(self._live, live_target(name, self.arch, self._names, part.expert if part else None))

    def router_parameters(self) -> list[torch.nn.Parameter]:
        return [self._live[live_target(n, self.arch, self._names, None).name] for n in self.layout.routers]

    def routers(self) -> dict:
        """The live router weights, as float32 CPU copies by disk name."""
        return {n: self.view(n).detach().float().cpu().clone() for n in self.layout.routers}


def tensor_value(t: MixTensor, reader: TensorReader, routers: dict | None) -> torch.Tensor:
    """The values of one mix tensor, in its source dtype (routers: float32)."""
    if t.kind == "router":
        return routers[t.name] if routers is not None else torch.zeros(t.shape)
    if t.kind == "zeros":
        return torch.zeros(t.shape)
    parts = [reader.read(s.donor, s.tensor) for s in t.parts]
    if t.kind == "copy":
        return parts[0]
    if t.kind == "concat":
        return torch.cat(parts, dim=t.axis)
    if t.kind == "double":
        return parts[0] * 2
    raise SurgeonError(f"tensor {t.name}: unknown kind {t.kind!r}")


def materialize_mix(layout: MixLayout, donors: dict[str, Donor], routers: dict | None = None, *,
                    device: str = "cpu", dtype: str = "float32", cancel: CancelToken = NEVER) -> LiveMix:
    """Build the mix on `device` in `dtype` (keep: the layout's own dtype); `cancel` stops it
    between tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dev = check_device(device)
    torch_dtype = TORCH_DTYPE_NAMES.get(dtype) or TORCH_DTYPES[layout.dtype]
    cfg = dict(layout.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with no_init_weights(), torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    live = LiveMix(model, layout)
    reader = TensorReader(donors)
    written = set()
    with torch.no_grad():
        for t in layout.tensors.values():
            cancel.check()
            view = live.view(t.name)
            value = tensor_value(t, reader, routers)
            if tuple(value.shape) != tuple(view.shape):
                raise SurgeonError(f"tensor {t.name}: shape {list(value.shape)} does not fit live {list(view.shape)}")
            view.copy_(value)
            part = classify(t.name, live.arch)
            written.add(live_target(t.name, live.arch, live._names, part.expert if part else None).name)
    # Skipped initialisation leaves garbage behind: every parameter must have been written.
    unwritten = sorted(set(dict(model.named_parameters())) - written)
    if unwritten:
        raise SurgeonError(f"mix: live parameter {unwritten[0]} has no source in the layout")
    return live

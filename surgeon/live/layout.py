"""Where a disk tensor lives in a loaded model, by transformers' own conversion mapping.

transformers 5 renames and fuses tensors on load (per-expert projections stacked into one
`experts.gate_up_proj`, `block_sparse_moe` -> `mlp`, ERNIE's `moe_statics` moved under the gate, ...),
and keeps the rules as data (`transformers.conversion_mapping`). A hot-swap must write where
from_pretrained would have put the bytes, so for a family whose live layout is not described in
`core/architectures.py` the rules are read from transformers itself: renamings, then stacking along
the expert axis (MergeModulelist) and concatenating the projections (Concatenate) become a slice of
the live tensor. Any other conversion (a concatenation of q/k/v convolutions, a split of a fused
projection) has no slice to write in place: such tensors go through transformers' own loader,
`load_converted`, with every disk tensor that feeds the same live tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LiveTarget:
    """Where a disk tensor lives in the model: a parameter or buffer, maybe a slice of a fused one."""

    name: str
    expert: int | None = None  # index along dim 0 of a fused expert tensor
    half: int | None = None  # which of `parts` equal pieces of the expert's dim 0 (0: gate, 1: up)
    parts: int = 2


def live_slice(live: dict, t: LiveTarget):
    """The part of a live parameter a disk tensor maps to: the whole tensor, one expert of a fused
    one, or the gate or up piece of that expert's gate_up_proj (gate first)."""
    p = live[t.name]
    if t.expert is None:
        return p
    p = p[t.expert]
    if t.half is None:
        return p
    n = p.shape[0] // t.parts
    return p[t.half * n:(t.half + 1) * n]


class ConversionLayout:
    """Disk name -> LiveTarget for one loaded model, from the transforms from_pretrained applied to it."""

    def __init__(self, model, live_names: set[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._prefix = getattr(model, "base_model_prefix", None)
        self._live = dict.fromkeys(live_names, True)

    def renamed(self, disk_name: str) -> str:
        """The live name transformers gives a disk tensor (for a converted one, its converter's first target)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(disk_name, self._renamings, self._converters, self._prefix, self._live)[0]

    def target(self, disk_name: str) -> LiveTarget | None:
        from transformers.core_model_loading import Concatenate, MergeModulelist, rename_source_key

        renamed, pattern = rename_source_key(disk_name, self._renamings, self._converters, self._prefix, self._live)
        if pattern is None:
            return LiveTarget(renamed) if renamed in self._live else None
        if renamed not in self._live:
            return None
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        expert = _expert_index(disk_name, pattern)
        if expert is None:
            return None
        if ops == [(MergeModulelist, 0)]:
            return LiveTarget(renamed, expert)
        if ops == [(MergeModulelist, 0), (Concatenate, 1)]:
            parts = len(converter.source_patterns)
            return LiveTarget(renamed, expert, converter.source_patterns.index(pattern), parts)
        return None


def _expert_index(disk_name: str, pattern: str) -> int | None:
    """The number the converter's `*` matched in `disk_name` (the expert)."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(regex, disk_name)
    return int(m.group(1)) if m and m.groups() else None


def load_converted(model, tensors: dict, quantization_config: dict | None = None) -> None:
    """Load disk-named `tensors` into `model` through transformers' own loader (its renamings and
    converters), then put the values into the model's existing tensors: the loader assigns new
    parameters, and a hybrid keeps its own (their memory, and every reference to them).

    `quantization_config` (the checkpoint's, e.g. gpt-oss's MXFP4): its quantizer joins the loader
    as in from_pretrained, which on a machine without the kernels dequantizes `*_blocks` and
    `*_scales` into the model's weights."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    quantizer = None
    if quantization_config:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(dict(quantization_config), pre_quantized=True)
        quantizer.validate_environment(device_map=None)
    before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    convert_and_load_state_dict_in_model(
        model, dict(tensors), LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model, hf_quantizer=quantizer),
                                                  hf_quantizer=quantizer))
    with torch.no_grad():
        for name, new in [*model.named_parameters(), *model.named_buffers()]:
            old = before.get(name)
            if old is None or new is old:
                continue
            old.copy_(new)
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if attr in module._parameters:
                module._parameters[attr] = old
            else:
                module._buffers[attr] = old

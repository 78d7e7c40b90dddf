"""Float32 linear layers on the CPU through oneDNN rather than MKL, while a probe runs.

PyTorch runs a float32 `nn.Linear` on the CPU through MKL's sgemm. Torch also ships oneDNN's
matmul for the same products (`mkldnn._linear_pointwise`, the op its own compiler emits for CPU
linears). On the AMD EPYC the benches run on, oneDNN computed SmolLM2-135M's forwards 1.16-1.31x
faster than MKL, from a decoding step of 8 rows x 1 token to 8 x 278-token prefills
(bench/cpu_linears.py). The products are the same float32 products summed in another order, so
the logits differ from MKL's in float rounding only (docs/probes.md, "Against lm-evaluation-harness").

While a probe runs, each plain float32 `nn.Linear` on the CPU calls that op from its `forward`
(an attribute on the module that shadows the class's method, removed afterwards), so nothing is
copied: hot-swapped weights are read where they are. A module whose `forward` is already replaced
(accelerate's offload hooks) or whose class has its own `forward` (quantized linears) keeps it.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

_lock = threading.Lock()
_users: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> blocks using it
_usable: bool | None = None


def _op():
    return torch.ops.mkldnn._linear_pointwise


def onednn_usable() -> bool:
    """Whether this torch has oneDNN's linear and it computes what F.linear computes (checked
    once, on a small product whose sum order cannot change the result)."""
    global _usable
    if _usable is None:
        try:
            x, w, b = torch.ones(3, 4), torch.full((5, 4), 0.5), torch.arange(5.0)
            _usable = bool(torch.backends.mkldnn.is_available()
                           and torch.equal(_op()(x, w, b, "none", [], ""), F.linear(x, w, b)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _usable = False
    return _usable


def cpu_linears(device) -> str | None:
    """The kernel a probe on `device` multiplies float32 linears with ("onednn" or "mkl"; None off
    the CPU). The two round differently, so results record it and donor scores are cached by it."""
    if str(device).split(":")[0] != "cpu":
        return None
    return "onednn" if onednn_usable() else "mkl"


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or torch.is_grad_enabled():
        return F.linear(x, module.weight, module.bias)  # the op has no backward
    return _op()(x, module.weight, module.bias, "none", [], "")


def _routable(module: nn.Module) -> bool:
    return (type(module).forward is nn.Linear.forward and "forward" not in vars(module)
            and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32)


def _route(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear) and _routable(module):
            module.forward = partial(_forward, module)


def _routed(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, partial) and forward.func is _forward


def _unroute(model: nn.Module) -> None:
    for module in model.modules():
        if _routed(module):
            del module.forward


def routed_linears(model: nn.Module) -> int:
    """How many of the model's linear layers run through oneDNN now."""
    return sum(map(_routed, model.modules()))


@contextmanager
def onednn_linears(model: nn.Module):
    """Within the block, the model's float32 CPU linears run through oneDNN (where torch has it).
    Blocks on one model may nest or overlap across threads: the last one out restores MKL."""
    if not onednn_usable():
        yield
        return
    with _lock:
        if _users.get(model, 0) == 0:
            _route(model)
        _users[model] = _users.get(model, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _users[model] -= 1
            if _users[model] == 0:
                del _users[model]
                _unroute(model)

"""Self-MoE layer gates on a live transformers model, without touching transformers' code.

A gate G_L joins decoder layer L: h_L = B_L(h_{L-1}) + G_L(h_{L-1}) (Self-MoE, eq. 2). It is an
`nn.Module` registered on the decoder layer as `layer_gate` (so its parameter is named
`model.layers.L.layer_gate.weight`, the sidecar's name, and moves with `model.to(...)`), and a
forward hook on that layer adds its output to the layer's output. Both decoder-layer return
styles are handled: a tensor (transformers 5) or a tuple whose first element is the hidden state.

Gates compute in float32 whatever the model's dtype (a gate is trained, and bf16 weights do not
take small AdamW steps), and their output is cast to the hidden state's dtype before the add.
A zero gate adds exact zeros, so a zero-initialised model gives the same logits bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.core.gates_sidecar import GATE_KIND, gate_shape, gate_type_of
from surgeon.errors import SurgeonError


class LayerGate(nn.Module):
    """G(h) for one decoder layer; the type follows from the weight's shape (see core/gates_sidecar.py)."""

    def __init__(self, shape: tuple[int, ...], hidden: int, *, device=None):
        super().__init__()
        self.gate_type = gate_type_of(shape, hidden, "layer gate")
        self.weight = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        # Called as observer(h_in, out_without_gate, gate_output) when set: how selection sees
        # both sides of eq. 3 and 4 in one forward pass.
        self.observer = None
        self._hook = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.weight.dtype)
        if self.gate_type == "matrix":
            return F.linear(x, self.weight)
        return x * self.weight  # scalar [1] and vector [H] broadcast over the last dimension

    def extra_repr(self) -> str:
        return f"{self.gate_type}, shape={list(self.weight.shape)}"


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers` in every architecture we know)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SurgeonError(f"{type(model).__name__}: no model.layers list; layer gates cannot be attached")
    return layers


def hidden_size(model) -> int:
    return int(model.config.hidden_size)


def _gate_hook(layer, args, kwargs, output):
    gate = getattr(layer, GATE_KIND, None)
    if gate is None:
        return None
    h = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    g = gate(h).to(out.dtype)
    if gate.observer is not None:
        gate.observer(h, out, g)
    new = out + g
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


def gate_modules(model) -> dict[int, LayerGate]:
    """The gates attached to `model`, by layer."""
    return {i: g for i, layer in enumerate(decoder_layers(model)) if isinstance(g := getattr(layer, GATE_KIND, None), LayerGate)}


def attach_gate(model, layer: int, shape: tuple[int, ...]) -> LayerGate:
    """A zero gate of `shape` on decoder layer `layer`, replacing any gate already there."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SurgeonError(f"layer {layer}: out of range (the model has {len(layers)} layers: 0-{len(layers) - 1})")
    detach_gate(model, layer)
    module = layers[layer]
    device = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
    gate = LayerGate(tuple(shape), hidden_size(model), device=device)
    module.add_module(GATE_KIND, gate)
    gate._hook = module.register_forward_hook(_gate_hook, with_kwargs=True)
    return gate


def detach_gate(model, layer: int) -> bool:
    module = decoder_layers(model)[layer]
    gate = getattr(module, GATE_KIND, None)
    if gate is None:
        return False
    if gate._hook is not None:
        gate._hook.remove()
    delattr(module, GATE_KIND)
    return True


def attach_gates(model, shapes: dict[int, tuple[int, ...]]) -> dict[int, LayerGate]:
    """Make the model's gates exactly `shapes` (layer -> weight shape): new ones are zero, gates
    of an unchanged shape keep their weights, the rest are removed."""
    current = gate_modules(model)
    for layer in set(current) - set(shapes):
        detach_gate(model, layer)
    for layer, shape in shapes.items():
        g = current.get(layer)
        if g is None or tuple(g.weight.shape) != tuple(shape):
            attach_gate(model, layer, shape)
    return gate_modules(model)


def add_zero_gates(model, gate_type: str, layers) -> dict[int, LayerGate]:
    shape = gate_shape(gate_type, hidden_size(model))
    for layer in layers:
        attach_gate(model, layer, shape)
    return gate_modules(model)


def gate_state(model) -> dict[int, torch.Tensor]:
    """The gates' weights by layer, detached float32 CPU copies."""
    return {l: g.weight.detach().to("cpu", torch.float32).clone() for l, g in gate_modules(model).items()}


def gate_parameters(model) -> list[nn.Parameter]:
    return [g.weight for g in gate_modules(model).values()]

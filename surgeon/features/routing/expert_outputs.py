"""How much each routed expert adds to each token, read from the expert outputs the forward pass computes.

REAP ("REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression", arXiv 2510.13999) scores
an expert by its gate value times the norm of its output, over the tokens routed to it. Recomputing
every expert on its tokens would double the MoE's cost; here the norms come from the forward pass
itself:

- Families whose experts module is built with transformers' `use_experts_implementation` (every
  fused-expert class but a few) run their experts through this module's `grouped_forward` instead of
  their own: the same grouped computation transformers' `grouped_mm` implementation does (its
  kernels, `_grouped_linear`), which also keeps each routed slot's output before the gate weight
  multiplies it. Only the sort that groups the slots by expert is stable here, so the slot order
  is known; the sum a token gets is the same.
- Llama 4's experts scale their input by the gate and run every expert on every token (unrouted
  tokens are zeros): a forward hook reads the expert outputs, and a routed token's contribution
  norm is ||expert(gate * x)||, which is what the gate does in that family.

Either way the layer's recorder gets, per routed slot, the expert index, the gate weight the model
applied and the norm of the expert's output (Llama 4: of its contribution).
"""

from __future__ import annotations

import inspect
import types

from surgeon.errors import SurgeonError


def record_expert_norms(experts, on_slots, routed_of) -> object | None:
    """Make `experts` (a layer's experts module) report each forward's routed slots to
    `on_slots(idx [T, k], weights [T, k] or None, norms [T, k])`; `routed_of()` gives the router's
    latest (idx, weights) where the experts module is not told them (Llama 4). Returns an undo
    callable, or None where this family's experts cannot be read this way."""
    if _decorated(experts):
        return _replace_forward(experts, on_slots)
    if _every_expert_on_every_token(experts):
        return _hook_dense(experts, on_slots, routed_of)
    return None


def readable(experts) -> bool:
    """Whether `record_expert_norms` can read this experts module, without touching it."""
    return experts is not None and (_decorated(experts) or _every_expert_on_every_token(experts))


def unsupported_line(experts) -> str:
    return (f"{type(experts).__name__}: its expert outputs cannot be read during the forward pass (neither "
            "transformers' experts interface nor Llama 4's layout), so REAP cannot be scored for this family")


# ---------------------------------------------------------------- transformers' experts interface
def _decorated(experts) -> bool:
    # `use_experts_implementation` sets these in __init__; the grouped computation needs nothing else.
    return all(hasattr(experts, a) for a in ("has_gate", "has_bias", "is_transposed", "_apply_gate", "down_proj"))


def _replace_forward(experts, on_slots):
    params = list(inspect.signature(type(experts).forward).parameters)[1:4]

    def forward(self, *args, **kwargs):
        bound = list(args) + [kwargs[p] for p in params[len(args):] if p in kwargs]
        if len(bound) != 3 or any(k not in params for k in kwargs):
            raise SurgeonError(f"{type(self).__name__}: called as ({', '.join(kwargs) or len(args)} arguments), "
                               "not with (hidden states, expert indices, weights); REAP cannot read its outputs")
        return grouped_forward(self, *bound, on_slots=on_slots)

    experts.forward = types.MethodType(forward, experts)  # an instance attribute: the class is untouched

    def undo():
        del experts.forward

    return undo


def grouped_forward(self, hidden_states, top_k_index, top_k_weights, *, on_slots):
    """transformers' grouped_mm experts forward (integrations/moe.py), with each slot's output norm kept."""
    import torch
    from transformers.integrations.moe import _grouped_linear

    if getattr(self, "_is_expert_parallel", False):
        raise SurgeonError(f"{type(self).__name__}: expert-parallel experts hold only some experts; score on one device")
    num_tokens, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    ids_g, perm = torch.sort(ids, stable=True)
    x_g = hidden_states[perm // k]
    w_g = top_k_weights.reshape(-1)[perm]
    count_in = ids_g.float() if ids_g.device.type in ("cpu", "mps") else ids_g.int()
    per_expert = torch.histc(count_in, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    if self.has_gate:
        weight, bias = self.gate_up_proj, (self.gate_up_proj_bias[ids_g] if self.has_bias else None)
    else:
        weight, bias = self.up_proj, (self.up_proj_bias[ids_g] if self.has_bias else None)
    h = _grouped_linear(x_g, weight, offsets, bias=bias, is_transposed=self.is_transposed)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    bias = self.down_proj_bias[ids_g] if self.has_bias else None
    out = _grouped_linear(h, self.down_proj, offsets, bias=bias, is_transposed=self.is_transposed)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    norms = torch.empty(ids.shape[0], dtype=torch.float32, device=out.device)
    norms[perm] = out.float().norm(dim=-1)
    on_slots(top_k_index, top_k_weights, norms.view(num_tokens, k))
    weighted = (out * w_g.unsqueeze(-1))[torch.argsort(perm)]
    return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


# ---------------------------------------------------------------- Llama 4
def _every_expert_on_every_token(experts) -> bool:
    """Llama 4's layout: forward(hidden_states) over [E * T, H], gate_up_proj [E, H, 2I]."""
    try:
        params = list(inspect.signature(experts.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["hidden_states"] and hasattr(experts, "gate_up_proj") and hasattr(experts, "num_experts")


def _hook_dense(experts, on_slots, routed_of):
    import torch

    def hook(module, args, output):
        idx, _ = routed_of()
        out = output.view(module.num_experts, -1, output.shape[-1])
        if idx is None or out.shape[1] != idx.shape[0]:
            raise SurgeonError(f"{type(module).__name__}: its outputs do not line up with its router's tokens")
        tokens = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        norms = out[idx, tokens].float().norm(dim=-1)  # [T, k]: the gate is inside the output
        on_slots(idx, None, norms)

    handle = experts.register_forward_hook(hook)
    return handle.remove


# ---------------------------------------------------------------- every expert on the same tokens
def every_expert_on(experts, x, chunk: int = 64):
    """[E, S, H] float32: each expert's output on each of the tokens x [S, H], through the experts
    module's own forward (every token routed to one expert with weight 1), so whatever the family
    computes (biases, clamped SwiGLU, transposed weights) is what is compared. Tokens go `chunk` at a
    time: E x chunk rows per call."""
    import torch

    num = getattr(experts, "num_experts", None)
    if not isinstance(num, int):
        raise SurgeonError(f"{type(experts).__name__}: no num_experts; its experts cannot be run one by one")
    dense = _every_expert_on_every_token(experts)
    if not dense and not _decorated(experts):
        raise SurgeonError(f"{type(experts).__name__}: neither transformers' experts interface nor Llama 4's "
                           "layout, so every expert cannot be run on the same tokens")
    pieces = []
    with torch.no_grad():
        for lo in range(0, x.shape[0], chunk):
            part = x[lo:lo + chunk]
            n = part.shape[0]
            rep = part.repeat(num, 1)  # expert e's copy of the tokens is rows e*n .. (e+1)*n
            if dense:
                out = experts(rep)
            else:
                idx = torch.arange(num, device=x.device).repeat_interleave(n).unsqueeze(1)
                out = experts(rep, idx, torch.ones(idx.shape, dtype=x.dtype, device=x.device))
            pieces.append(out.float().view(num, n, -1))
    return torch.cat(pieces, dim=1)

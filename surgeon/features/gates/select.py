"""Keep or drop each layer gate by its per-layer logit-lens perplexity (Self-MoE, eq. 3-5).

For a gated layer t with input h_{t-1}, the logit lens projects a hidden state into the
vocabulary through the model's final norm and lm_head (`proj`) and scores the calibration text:

  p_t1 = perp(proj(B_t(h_{t-1})))                    without the gate   (eq. 3)
  p_t2 = perp(proj(B_t(h_{t-1}) + G_t(h_{t-1})))     with the gate      (eq. 4)

One forward pass of the gated model gives both for every gate (h_{t-1} is what the gated model
feeds layer t, earlier gates included, as in Self-MoE). A gate is kept when it lowers the
perplexity: p_t2 < p_t1 * (1 - min_gain); otherwise dropped (eq. 5). The issue and Self-MoE's
prose keep the gates that help; eq. 5 as printed has its two cases the other way round, which
would keep exactly the gates that hurt, so we follow the prose. `min_gain` > 0 also drops the
gates whose gain is minor, as Self-MoE's section 3.3 does.

Perplexity here is exp of the mean next-token NLL over every token of the calibration sequences
(the text cut as in train.text_data).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from surgeon.errors import SurgeonError
from surgeon.features.gates.train import TextData
from surgeon.jobs import NEVER, Meter
from surgeon.live.layer_gates import gate_modules


@dataclass(frozen=True)
class LayerSelection:
    layer: int
    gate_type: str
    ppl_without: float  # p_t1
    ppl_with: float  # p_t2
    keep: bool

    @property
    def change(self) -> float:
        """Relative change of the perplexity the gate makes (negative: it helps)."""
        return self.ppl_with / self.ppl_without - 1.0


@dataclass
class Selection:
    layers: list[LayerSelection]
    tokens: int
    min_gain: float

    @property
    def kept(self) -> list[int]:
        return [s.layer for s in self.layers if s.keep]

    @property
    def dropped(self) -> list[int]:
        return [s.layer for s in self.layers if not s.keep]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "min_gain": self.min_gain,
                "layers": [{**asdict(s), "change": s.change} for s in self.layers],
                "kept": self.kept, "dropped": self.dropped}


def logit_lens(model):
    """proj: the final norm then lm_head, as the model applies them after its last layer."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise SurgeonError(f"{type(model).__name__}: no model.norm or lm_head; the logit lens needs both")
    return lambda h: head(norm(h))


def keep_gate(ppl_without: float, ppl_with: float, min_gain: float = 0.0) -> bool:
    """Eq. 5 as the prose reads it: keep a gate that lowers the layer's perplexity (by min_gain)."""
    return ppl_with < ppl_without * (1.0 - min_gain)


def with_min_gain(selection: Selection, min_gain: float) -> Selection:
    """The same measurements with the verdicts of eq. 5 for another min_gain (no rerun)."""
    rows = [replace(r, keep=keep_gate(r.ppl_without, r.ppl_with, min_gain)) for r in selection.layers]
    return Selection(rows, selection.tokens, min_gain)


@torch.no_grad()
def select_gates(model, data: TextData, *, batch_size: int = 16, min_gain: float = 0.0, progress=None,
                 cancel=NEVER) -> Selection:
    """p_t1 and p_t2 of every gate of `model` on calibration sequences, and the verdicts. A job
    (surgeon.jobs): Steps in sequences, `cancel` checked before every batch."""
    if not 0.0 <= min_gain < 1.0:
        raise SurgeonError(f"--min-gain {min_gain}: must be in [0, 1)")
    gates = gate_modules(model)
    if not gates:
        raise SurgeonError("gates select: the model has no layer gates")
    proj = logit_lens(model)
    dev = next(model.parameters()).device
    sums = {layer: [0.0, 0.0] for layer in gates}  # summed NLL without, with
    targets: list[torch.Tensor] = []

    def nll(h: torch.Tensor) -> float:
        logits = proj(h).float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[0].reshape(-1),
                                     reduction="sum", ignore_index=-100))

    def observer(layer: int):
        def seen(h_in, out, g):
            sums[layer][0] += nll(out)
            sums[layer][1] += nll(out + g)  # the very sum the gated model passes on
        return seen

    tokens = 0
    meter = Meter(progress, len(data), "sequences", "select")
    try:
        for layer, gate in gates.items():
            gate.observer = observer(layer)
        for i in range(0, len(data), batch_size):
            cancel.check()
            ids, valid = data.batch(slice(i, i + batch_size), dev)
            targets[:] = [ids[:, 1:].masked_fill(~valid, -100)]
            model(ids[:, :-1], use_cache=False)
            tokens += int(valid.sum())
            meter(min(i + batch_size, len(data)))
    finally:
        for gate in gates.values():
            gate.observer = None
    rows = []
    for layer, gate in gates.items():
        p1, p2 = (math.exp(s / tokens) for s in sums[layer])
        rows.append(LayerSelection(layer, gate.gate_type, p1, p2, keep_gate(p1, p2, min_gain)))
    return Selection(rows, tokens, min_gain)

"""Saliency of every routed expert, per MoE layer, from one forward pass over a calibration corpus.

Per MoE layer l and expert e, over the N tokens of the corpora (padding excluded):
  frequency[l, e]  share of the tokens routed to e: the routing probe's activation frequency (XPERT's);
                   over e it sums to top-k, so frequency / top-k is e's share of the routed slots
  gate[l, e]       mean combine weight the model applied to e, over the tokens routed to e (0 if none)
  reap[l, e]       REAP's score ("REAP the Experts", arXiv 2510.13999): mean over the tokens routed to e
                   of gate weight x ||e's output||, 0 where no token was routed to e

All three come from the routing probe's hooks in the same forward pass (the output norms from
the expert outputs the model computes: routing/expert_outputs.py), so collecting them costs about
one plain forward pass over the corpus (bench/saliency.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER

CRITERIA = ("reap", "frequency", "gate", "random")


@dataclass
class Saliency:
    layers: list[int]  # the decoder layer of each row
    num_experts: int
    top_k: int
    tokens: int
    frequency: np.ndarray  # [L, E]
    gate: np.ndarray  # [L, E]
    reap: np.ndarray | None  # [L, E]; None when not collected
    corpora: dict[str, int] = field(default_factory=dict)  # corpus -> tokens read
    meta: dict = field(default_factory=dict)

    def scores(self, by: str) -> np.ndarray:
        if by not in ("reap", "frequency", "gate"):
            raise SurgeonError(f"--by {by}: expected one of {', '.join(CRITERIA)}")
        values = getattr(self, by)
        if values is None:
            raise SurgeonError(f"--by {by}: the saliency pass did not collect {by}")
        return values

    def to_json(self) -> dict:
        out = {"layers": list(self.layers), "num_experts": self.num_experts, "top_k": self.top_k,
               "tokens": self.tokens, "corpora": dict(self.corpora)}
        for name in ("frequency", "gate", "reap"):
            values = getattr(self, name)
            if values is not None:
                out[name] = [[float(v) for v in row] for row in values]
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


def from_routing(stats: dict) -> Saliency:
    """The saliency of routing results on several corpora (name -> RoutingStats), pooled over their tokens."""
    if not stats:
        raise SurgeonError("saliency: no corpus")
    runs = list(stats.values())
    first = runs[0]
    tokens = sum(s.tokens for s in runs)
    counts = sum(s.counts for s in runs)
    weight = sum(s.weight_sum for s in runs)
    routed = np.maximum(counts, 1)
    reap = None
    if all(s.reap_sum is not None for s in runs):
        reap = sum(s.reap_sum for s in runs) / routed
    meta = {}
    for s in runs:
        meta.update(s.meta)
    return Saliency(layers=list(first.layers), num_experts=first.num_experts, top_k=first.top_k, tokens=tokens,
                    frequency=counts / max(tokens, 1), gate=weight / routed, reap=reap,
                    corpora={name: s.tokens for name, s in stats.items()}, meta=meta)


def collect_saliency(model, tokenizer, corpora: dict[str, list[str]], *, reap: bool = True, batch_size: int = 16,
                     max_tokens: int | None = None, progress=None, cancel=NEVER) -> Saliency:
    """Frequency, gate and (with `reap`) REAP's score of every expert of `model` over `corpora`
    (name -> texts), in one forward pass per batch."""
    from surgeon.features.routing.probe import probe_domains

    stats = probe_domains(model, tokenizer, corpora, batch_size=batch_size, max_tokens=max_tokens, reap=reap,
                          trace=False, progress=progress, cancel=cancel, label="saliency")
    return from_routing(stats)

"""Saliency of every routed expert, per MoE layer, from one forward pass over a calibration corpus.

Per MoE layer l and expert e, over the N tokens of the corpora (padding excluded):
  frequency[l, e]  share of the tokens routed to e: the routing probe's activation frequency (XPERT's);
                   over e it sums to top-k, so frequency / top-k is e's share of the routed slots
  gate[l, e]       mean combine weight the model applied to e, over the tokens routed to e (0 if none)
  reap[l, e]       REAP's score ("REAP the Experts", arXiv 2510.13999): mean over the tokens routed to e
                   of gate weight x ||e's output||, 0 where no token was routed to e
  similarity[l, i, j]  (for merging, with `similarity_tokens`) cosine similarity of what experts i and j
                   compute on the same S tokens: each expert's outputs on a fixed sample of the corpus's
                   tokens (every stride-th, the router inputs kept during the same pass), concatenated
                   into one vector. HC-SMoE ("Retraining-Free Merging of Sparse MoE via Hierarchical
                   Clustering") compares experts by their mean output over the calibration tokens; the
                   outputs token by token also tell apart two experts whose means agree.

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
    similarity: np.ndarray | None = None  # [L, E, E]; None when not collected
    similarity_tokens: int = 0  # the tokens the similarity was measured on
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
        if self.similarity is not None:
            out["similarity"] = [[[round(float(v), 6) for v in row] for row in m] for m in self.similarity]
            out["similarity_tokens"] = self.similarity_tokens
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
                     max_tokens: int | None = None, similarity_tokens: int = 0, progress=None,
                     cancel=NEVER) -> Saliency:
    """Frequency, gate and (with `reap`) REAP's score of every expert of `model` over `corpora`
    (name -> texts), in one forward pass per batch; with `similarity_tokens`, also how alike the
    experts' outputs are on that many of the same tokens (every expert run on them once, after the pass)."""
    from surgeon.features.routing.probe import probe_domains

    stats = probe_domains(model, tokenizer, corpora, batch_size=batch_size, max_tokens=max_tokens, reap=reap,
                          trace=False, progress=progress, cancel=cancel, label="saliency",
                          sample_tokens=similarity_tokens)
    saliency = from_routing(stats)
    if similarity_tokens:
        saliency.similarity, saliency.similarity_tokens = _similarity(model, list(stats.values()),
                                                                      similarity_tokens, cancel)
    return saliency


def _similarity(model, runs, limit: int, cancel) -> tuple[np.ndarray, int]:
    """Per MoE layer, the cosine similarity [E, E] of the experts' outputs on the sampled tokens."""
    import torch

    from surgeon.features.routing.expert_outputs import every_expert_on
    from surgeon.features.routing.probe import moe_layers

    out, used = [], 0
    for li, m in enumerate(moe_layers(model)):
        cancel.check()
        x = torch.cat([r.samples[li] for r in runs if r.samples and r.samples[li] is not None])[:limit]
        used = x.shape[0]
        experts = getattr(m.mlp, "experts", None)
        if experts is None:
            raise SurgeonError(f"layer {m.layer}: {type(m.mlp).__name__} has no `experts` module to compare")
        gram = None
        for lo in range(0, used, 64):  # the Gram matrix a chunk at a time: no [E, S, H] in memory
            flat = every_expert_on(experts, x[lo:lo + 64]).flatten(1).double()
            gram = flat @ flat.T if gram is None else gram + flat @ flat.T
        norm = gram.diagonal().clamp_min(1e-300).sqrt()
        out.append((gram / norm[:, None] / norm[None, :]).clamp(-1, 1).cpu().numpy())
    return np.stack(out), used

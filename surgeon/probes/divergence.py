"""Divergence from each donor: how far did the surgery move the model, without labels.

For every item, the mean over positions of KL(P_donor || P_model) of the next-token
distributions. A per-donor kind: `run` gives one model's distributions; the runner computes the
model's, swaps the hybrid to each donor in turn, and `versus` compares the two.
"""

from __future__ import annotations

from .types import Metric, ProbeKind, ProbeOutcome
from .prompts import item_text

KIND = ProbeKind("kl", "divergence: mean KL(donor || model) of next-token distributions, per donor (label-free)",
                 Metric("kl", higher_is_better=False, shown_as="KL"), per_donor=True,
                 scores_only=True)


def log_probs(model, tokenizer, items, progress=None) -> list:
    """Next-token log-distributions per item, kept on the CPU (items are short samples)."""
    import torch
    import torch.nn.functional as F

    from surgeon.probes.scoring import encode, probe_forwards

    dev = next(model.parameters()).device
    out = []
    with probe_forwards(model, dev):
        for n, item in enumerate(items):
            ids = encode(tokenizer, item_text(item))
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            logits = model(torch.tensor([ids[:1024]], device=dev)).logits[0].float()
            out.append(F.log_softmax(logits, -1).cpu())
            if progress is not None:
                progress(n + 1, len(items))
    return out


def kl_per_item(model_lp: list, donor_lp: list) -> list[float]:
    return [float((d.exp() * (d - m)).sum(-1).mean()) for m, d in zip(model_lp, donor_lp)]


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> list:
    return log_probs(model, tokenizer, items, progress)


def versus(mine: list, theirs: list, items) -> ProbeOutcome:
    return ProbeOutcome([i.id for i in items], kl_per_item(mine, theirs), metric=KIND.metric.name)

"""Perplexity on text. Each item's outcome is its mean per-token negative log-likelihood (nats);
the reported perplexity is exp of the mean over items, so items weigh equally and the bootstrap
over items gives its confidence interval.

`token_nll` is also the loss the layer gates train on (features/gates/train.py), so a gate is
trained on exactly what this probe measures.
"""

from __future__ import annotations

import math

from surgeon.errors import SurgeonError

from .types import Metric, ProbeKind, ProbeOutcome
from .prompts import item_text

# Outcomes are mean nll per item; the score is exp of their mean, and exp is monotone, so CIs map through.
# The metric names the score (lm-eval's "perplexity"), not the outcomes; results saved before it did
# say "nll" for the same numbers.
KIND = ProbeKind("ppl", "perplexity on text (item-averaged per-token negative log-likelihood)",
                 Metric("perplexity", higher_is_better=False, shown_as="ppl", to_score=math.exp,
                        recorded_as=("nll",)), scores_only=True)
WINDOW = 512


def token_nll(model, ids, valid=None, reduction: str = "none"):
    """Next-token negative log-likelihood (nats) of a batch of sequences `ids` [B, T]: target j is token
    j + 1, and targets where `valid` [B, T-1] is False are left out. `reduction` as F.cross_entropy's
    ("none": one value per target, flattened). Gradients flow: callers that only score use no_grad."""
    import torch.nn.functional as F

    logits = model(ids[:, :-1], use_cache=False).logits.float()
    targets = ids[:, 1:] if valid is None else ids[:, 1:].masked_fill(~valid, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def text_nll(model, tokenizer, text: str):
    """Negative log-likelihood of every token of `text` after the first, in windows of WINDOW tokens."""
    import torch

    from surgeon.probes.scoring import encode, probe_forwards

    ids = encode(tokenizer, text)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise SurgeonError(f"text {text[:40]!r}: too short to score")
    dev = next(model.parameters()).device
    with probe_forwards(model, dev):
        return torch.cat([token_nll(model, torch.tensor([ids[start:start + WINDOW + 1]], device=dev))
                          for start in range(0, len(ids) - 1, WINDOW)])


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    outcomes = []
    for n, item in enumerate(items):
        outcomes.append(float(text_nll(model, tokenizer, item_text(item)).mean()))
        if progress is not None:
            progress(n + 1, len(items))
    return ProbeOutcome([i.id for i in items], outcomes, metric=KIND.metric.name)

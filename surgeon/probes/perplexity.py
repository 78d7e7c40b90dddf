"""Perplexity on text. Each item's outcome is its mean per-token negative log-likelihood (nats);
the reported perplexity is exp of the mean over items, so items weigh equally and the bootstrap
over items gives its confidence interval."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgeon.errors import SurgeonError
from surgeon.probes.scoring import encode

from . import ProbeOutcome
from .prompts import item_text

WINDOW = 512


def token_nll(model, tokenizer, text: str) -> torch.Tensor:
    """Negative log-likelihood of every token after the first, in windows of WINDOW tokens."""
    ids = encode(tokenizer, text)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise SurgeonError(f"text {text[:40]!r}: too short to score")
    dev = next(model.parameters()).device
    nll = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, WINDOW):
            chunk = torch.tensor([ids[start:start + WINDOW + 1]], device=dev)
            logits = model(chunk[:, :-1]).logits.float()
            nll.append(F.cross_entropy(logits[0], chunk[0, 1:], reduction="none"))
    return torch.cat(nll)


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    outcomes = []
    for n, item in enumerate(items):
        outcomes.append(float(token_nll(model, tokenizer, item_text(item)).mean()))
        if progress is not None:
            progress(n + 1, len(items))
    return ProbeOutcome([i.id for i in items], outcomes, metric="nll")

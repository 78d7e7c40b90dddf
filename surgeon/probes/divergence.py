"""Divergence from each donor: how far did the surgery move the model, without labels.

For every item, the mean over positions of KL(P_donor || P_model) of the next-token
distributions. The runner computes the model's distributions, hot-swaps the hybrid to each
donor in turn, and calls `kl_per_item` with the donor's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgeon.probes.scoring import encode

from .prompts import item_text


def log_probs(model, tokenizer, items) -> list[torch.Tensor]:
    """Next-token log-distributions per item, kept on the CPU (items are short samples)."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for item in items:
            ids = encode(tokenizer, item_text(item))
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            logits = model(torch.tensor([ids[:1024]], device=dev)).logits[0].float()
            out.append(F.log_softmax(logits, -1).cpu())
    return out


def kl_per_item(model_lp: list[torch.Tensor], donor_lp: list[torch.Tensor]) -> list[float]:
    return [float((d.exp() * (d - m)).sum(-1).mean()) for m, d in zip(model_lp, donor_lp)]

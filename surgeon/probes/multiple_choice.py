"""Multiple choice by log-likelihood of each continuation.

acc: the choice with the highest log-likelihood is the gold one. acc_norm: the same after
dividing by the continuation's length in bytes (lm-evaluation-harness's acc_norm).
"""

from __future__ import annotations

from . import ACCURACY, ProbeKind, ProbeOutcome
from .prompts import answer_sep, prompt, shots_prefix

KIND = ProbeKind("mc", "multiple choice by log-likelihood: acc and acc_norm (by continuation bytes)", ACCURACY,
                 items="mc", needs="multiple-choice items (choices and an answer index)")


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    from surgeon.probes.scoring import loglikelihoods  # torch, only when a probe runs

    sep = answer_sep(template)
    requests, owners = [], []
    for n, item in enumerate(items):
        for choice in item.choices:
            requests.append((prompt(item, template), sep + choice))
            owners.append(n)
    lls = loglikelihoods(model, tokenizer, requests, prefix=shots_prefix(shots, template),
                         batch_size=batch_size, progress=progress)
    acc, acc_norm = [], []
    start = 0
    for item in items:
        scores = lls[start:start + len(item.choices)]
        start += len(item.choices)
        raw = [s.logprob for s in scores]
        norm = [s.logprob / max(1, len((sep + c).encode())) for s, c in zip(scores, item.choices)]
        acc.append(float(raw.index(max(raw)) == int(item.answer)))
        acc_norm.append(float(norm.index(max(norm)) == int(item.answer)))
    return ProbeOutcome([i.id for i in items], acc, extra={"acc_norm": acc_norm})

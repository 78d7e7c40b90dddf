"""Multiple choice by the log-likelihood of each choice, with lm-evaluation-harness's metrics.

Each choice is scored as the continuation " " + choice (the target delimiter; none for the raw
template) of the item's whole prompt. acc: the choice with the highest log-likelihood is the gold
one. acc_norm: the same after dividing each log-likelihood by the choice's length in characters
(lm-eval's acc_norm, which counts the choice without the delimiter). acc_bytes: by its length in
UTF-8 bytes (lm-eval's acc_bytes). A tie goes to the first choice, as numpy's argmax does.
"""

from __future__ import annotations

from .types import ACCURACY, ProbeKind, ProbeOutcome
from .prompts import answer_sep, context

KIND = ProbeKind("mc", "multiple choice by log-likelihood: acc, acc_norm (by choice characters) and acc_bytes, "
                 "as lm-evaluation-harness", ACCURACY,
                 items="mc", needs="multiple-choice items (choices and an answer index)", scores_only=True)


def lmeval_metric(record: dict) -> str:
    """The primary outcome is lm-eval's `acc` (recorded as accuracy, the name sessions keep)."""
    return "acc"


def first_best(scores: list[float]) -> int:
    """The index of the highest score, the first one on a tie (numpy's argmax)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _per_length(logprob: float, length: int) -> float:
    # lm-eval divides by zero for an empty choice: a log-likelihood below zero becomes -inf.
    return logprob / length if length else float("-inf")


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    from surgeon.probes.scoring import loglikelihoods  # torch, only when a probe runs

    sep = answer_sep(template)
    contexts = [context(item, item_shots, template) for item, item_shots in zip(items, shots)]
    requests = [(ctx, sep + choice) for ctx, item in zip(contexts, items) for choice in item.choices]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    metrics: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    samples = []
    start = 0
    for item, ctx in zip(items, contexts):
        scores = lls[start:start + len(item.choices)]
        start += len(item.choices)
        raw = [s.logprob for s in scores]
        picks = {
            "acc": first_best(raw),
            "acc_norm": first_best([_per_length(s, len(c)) for s, c in zip(raw, item.choices)]),
            "acc_bytes": first_best([_per_length(s, len(c.encode())) for s, c in zip(raw, item.choices)]),
        }
        values = {name: float(pick == int(item.answer)) for name, pick in picks.items()}
        for name, value in values.items():
            metrics[name].append(value)
        resps = [[s.logprob, s.greedy] for s in scores]
        samples.append({"doc_id": item.id, "prompt": ctx, "target": int(item.answer),
                        "arguments": [[ctx, sep + c] for c in item.choices],
                        "resps": [[r] for r in resps], "filtered_resps": resps, **values})  # lm-eval: per repeat
    acc = metrics.pop("acc")
    return ProbeOutcome([i.id for i in items], acc, extra=metrics, samples=samples)

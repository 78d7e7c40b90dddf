"""Generative exact match: greedy decoding, stop sequences, answer extraction."""

from __future__ import annotations

from surgeon.probes.answers import is_correct

from . import ACCURACY, ProbeKind, ProbeOutcome
from .prompts import COT, prompt, shots_prefix, stop_sequences

KIND = ProbeKind("em", "generative exact match: greedy decoding, stop sequences, answer extraction", ACCURACY,
                 items="exact", needs="items with a gold answer string")


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    from surgeon.probes.scoring import greedy_generate  # torch, only when a probe runs

    prefix = shots_prefix(shots, template)
    cot = COT if spec.cot else ""
    prompts = [prompt(item, template) + cot for item in items]
    outputs = greedy_generate(model, tokenizer, prompts, prefix=prefix, max_new_tokens=spec.max_new_tokens,
                              stop=stop_sequences(template), batch_size=batch_size, progress=progress)
    outcomes = [float(is_correct(out, str(item.answer), spec.extract)) for out, item in zip(outputs, items)]
    return ProbeOutcome([i.id for i in items], outcomes, outputs=outputs)

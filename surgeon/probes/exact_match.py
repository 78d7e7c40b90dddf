"""Generative exact match: greedy decoding to stop strings, then the answer compared with the gold.

Each item's whole prompt (exemplars + its own) is decoded greedily until a stop string (`until=`,
else the data's default: lm-eval's gsm8k stops for GSM8K, "\\n\\n" and "Question:" for other qa
items, "\\n" for raw) or max_new_tokens (256 for qa, lm-eval's max_gen_toks; 16 for raw).

GSM8K items are scored as lm-evaluation-harness's gsm8k task: the outcome is its
`exact_match,flexible-extract` (the last number in the generation, which is what a model without
the "#### " habit is judged by), and `exact_match,strict-match` is kept as an extra. An explicit
`extract=` mode decides the outcome instead, with both of lm-eval's kept as extras. Other items are
scored by `extract=` (see answers.py).
"""

from __future__ import annotations

from surgeon.probes.answers import (
    extract,
    gsm8k_filtered,
    is_correct,
    lmeval_exact_match,
)

from .types import ACCURACY, ProbeKind, ProbeOutcome
from .prompts import context, max_new_tokens, stop_sequences

KIND = ProbeKind("em", "generative exact match: greedy decoding to stop strings; GSM8K as lm-evaluation-harness "
                 "(flexible-extract, strict-match as an extra)", ACCURACY,
                 items="exact", needs="items with a gold answer string")

STRICT, FLEXIBLE = "exact_match,strict-match", "exact_match,flexible-extract"  # lm-eval's metric,filter names


def lmeval_metric(record: dict) -> str:
    """lm-eval's name of the primary outcome: GSM8K's is flexible-extract (strict-match is an extra),
    anything else plain exact_match."""
    return FLEXIBLE if STRICT in record.get("extra", {}) else "exact_match"


def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    from surgeon.probes.generation import greedy_generate  # torch, only when a probe runs

    contexts = [context(item, item_shots, template, spec.cot) for item, item_shots in zip(items, shots)]
    until = stop_sequences(template, spec.until)
    limit = max_new_tokens(template, spec.max_new_tokens)
    outputs = greedy_generate(model, tokenizer, contexts, until=until, max_new_tokens=limit,
                              batch_size=batch_size, progress=progress)
    gsm8k = getattr(template, "fmt", None) == "gsm8k"
    arguments = {"until": list(until), "max_gen_toks": limit}
    outcomes, extra, samples = [], {}, []
    for item, ctx, out in zip(items, contexts, outputs):
        outcome, scored = _gsm8k_scores(out, item, spec.extract) if gsm8k else _plain_scores(out, item, spec.extract)
        outcomes.append(outcome)
        for name in (STRICT, FLEXIBLE):
            if name in scored and (name == STRICT or spec.extract != "exact"):
                extra.setdefault(name, []).append(scored[name])
        samples.append({"doc_id": item.id, "prompt": ctx, "target": item.solution if gsm8k else str(item.answer),
                        "arguments": [[ctx, arguments]], "resps": [[out]], **scored})  # lm-eval: per request, per repeat
    return ProbeOutcome([i.id for i in items], outcomes, outputs=outputs, extra=extra, samples=samples)


def _plain_scores(generated: str, item, mode: str) -> tuple[float, dict]:
    value = float(is_correct(generated, str(item.answer), mode))
    return value, {"filtered_resps": {mode: extract(generated, mode)}, "exact_match": value}


def _gsm8k_scores(generated: str, item, mode: str) -> tuple[float, dict]:
    """lm-eval's two filtered answers and their exact_match against the full worked answer; the
    outcome is flexible-extract's unless an explicit extract= mode (against the gold number) decides."""
    filtered = gsm8k_filtered(generated)
    scores = {f"exact_match,{name}": float(lmeval_exact_match(answer, item.solution))
              for name, answer in filtered.items()}
    outcome = scores[FLEXIBLE] if mode == "exact" else float(is_correct(generated, str(item.answer), mode))
    return outcome, {"filtered_resps": filtered, **scores}

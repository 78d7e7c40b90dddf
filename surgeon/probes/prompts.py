"""How items become prompts: the two templates and the k-shot preamble.

`qa` is lm-evaluation-harness's style for ARC/BoolQ/GSM8K ("Question: ...\\nAnswer:" and a
space before the answer); `raw` puts the question and the answer side by side, which is how
the demo donors were trained ("12+7=" then "19").
"""

from __future__ import annotations

import random

from surgeon.probes.data import Item

COT = " Let's think step by step."


def template_for(spec, builtin: bool) -> str:
    return spec.template or ("raw" if builtin else "qa")


def prompt(item: Item, template: str) -> str:
    context = f"{item.context}\n" if item.context else ""
    if template == "raw":
        return context + item.question
    return f"{context}Question: {item.question}\nAnswer:"


def answer_sep(template: str) -> str:
    return "" if template == "raw" else " "


def stop_sequences(template: str) -> tuple[str, ...]:
    return ("\n",) if template == "raw" else ("\n\n", "Question:")


def gold_text(item: Item) -> str:
    if item.choices is not None:
        return item.choices[int(item.answer)]
    return item.solution or str(item.answer)


def shots_prefix(shots: list[Item], template: str) -> str:
    joiner = "\n" if template == "raw" else "\n\n"
    return "".join(prompt(s, template) + answer_sep(template) + gold_text(s) + joiner for s in shots)


def split_shots(items: list[Item], pool: list[Item], k: int, seed: int) -> list[Item]:
    """k exemplars drawn (seeded) from `pool` minus the evaluated items, so none is its own shot."""
    if k <= 0:
        return []
    used = {i.id for i in items}
    candidates = [i for i in pool if i.id not in used]
    return random.Random(seed).sample(candidates, min(k, len(candidates)))


def item_text(item: Item) -> str:
    """The text a perplexity-like probe reads: plain text, or a worked item written out whole."""
    if item.text:
        return item.text
    gold = gold_text(item) if item.answer is not None else ""
    return (f"{item.context}\n" if item.context else "") + item.question + gold

"""How items become prompts: the two templates, k-shot exemplars and generation defaults.

`qa` is lm-evaluation-harness's prompt for ARC, BoolQ and GSM8K: "Question: ...\\nAnswer:" (BoolQ's
passage first, its "?" comes from the reader), a space (target delimiter) before the answer, and
each exemplar closed by "\\n\\n" (fewshot delimiter); a GSM8K exemplar's answer is the full worked
solution. `raw` puts the question and the answer side by side, which is how the demo donors were
trained ("12+7=" then "19").

A k-shot prompt is one string (exemplars + the item's prompt), tokenized whole by the scorer, as
lm-eval does: tokenizing the exemplars apart would change the tokens where the parts meet.

Exemplars are chosen per item as lm-eval's default sampler does (order `lmeval`): one
random.Random(1234) advanced item after item, `sample(pool, K)` from a separate few-shot file, or
`sample(pool, K + 1)` minus the evaluated record when the pool is the evaluated file. Order `fixed`
draws one set (seeded by the spec) for every item, so every prompt starts with the same exemplars.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from surgeon.errors import SurgeonError
from surgeon.probes.data import Item

COT = " Let's think step by step."
LMEVAL_FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_seed

# lm-eval's gsm8k.yaml generation_kwargs.until; its max_gen_toks default.
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
QA_UNTIL = ("\n\n", "Question:")
RAW_UNTIL = ("\n",)
QA_MAX_NEW_TOKENS = 256
RAW_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Template:
    """How a probe's items are written: `name` (qa or raw) and the data format they were read in,
    which sets the defaults of generation and, for gsm8k, how answers are scored."""

    name: str
    fmt: str = "jsonl"

    def __str__(self) -> str:
        return self.name


def template_for(spec, builtin: bool, fmt: str = "jsonl") -> Template:
    return Template(spec.template or ("raw" if builtin else "qa"), fmt)


def _name(template) -> str:
    return template.name if isinstance(template, Template) else template


def prompt(item: Item, template) -> str:
    context = f"{item.context}\n" if item.context else ""
    if _name(template) == "raw":
        return context + item.question
    return f"{context}Question: {item.question}\nAnswer:"


def answer_sep(template) -> str:
    """lm-eval's target delimiter: between a prompt and its answer (an exemplar's or a choice)."""
    return "" if _name(template) == "raw" else " "


def shot_sep(template) -> str:
    """lm-eval's fewshot delimiter: after each exemplar."""
    return "\n" if _name(template) == "raw" else "\n\n"


def stop_sequences(template, until: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if until is not None:
        return until
    if isinstance(template, Template) and template.fmt == "gsm8k":
        return GSM8K_UNTIL
    return RAW_UNTIL if _name(template) == "raw" else QA_UNTIL


def max_new_tokens(template, given: int | None = None) -> int:
    if given is not None:
        return given
    return RAW_MAX_NEW_TOKENS if _name(template) == "raw" else QA_MAX_NEW_TOKENS


def gold_text(item: Item) -> str:
    if item.choices is not None:
        return item.choices[int(item.answer)]
    return item.solution or str(item.answer)


def shots_prefix(shots: list[Item], template) -> str:
    return "".join(prompt(s, template) + answer_sep(template) + gold_text(s) + shot_sep(template) for s in shots)


def context(item: Item, shots: list[Item], template, cot: bool = False) -> str:
    """The whole prompt an item is scored from: its exemplars, then its own prompt."""
    return shots_prefix(shots, template) + prompt(item, template) + (COT if cot else "")


# ---------------------------------------------------------------- choosing exemplars
def lmeval_shots(items: list[Item], pool: list[Item], k: int, *, same_file: bool,
                 docs: dict[Item, str] | None = None, source: str = "") -> list[list[Item]]:
    """Each item's k exemplars as lm-eval's default ContextSampler draws them.

    One Random(1234) serves the items in evaluation order. When the pool is the evaluated file,
    k + 1 are drawn and every exemplar equal to the evaluated record dropped (equal as whole records,
    `docs`: item -> its record), keeping k; should that leave fewer (duplicate records), k are drawn
    again from the pool without them, as lm-eval does.
    """
    if k <= 0:
        return [[] for _ in items]
    need = k + 1 if same_file else k
    if len(pool) < need:
        raise SurgeonError(_too_few(source, k, len(pool), same_file))
    docs = docs or {}
    rnd = random.Random(LMEVAL_FEWSHOT_SEED)
    out = []
    for item in items:
        if not same_file:
            out.append(rnd.sample(pool, k))
            continue
        doc = docs.get(item, item)
        chosen = [s for s in rnd.sample(pool, need) if docs.get(s, s) != doc][:k]
        if len(chosen) < k:
            others = [s for s in pool if docs.get(s, s) != doc]
            if len(others) < k:
                raise SurgeonError(f"{source}: shots={k}: only {len(others)} records differ from item {item.id}")
            chosen = rnd.sample(others, k)
        out.append(chosen)
    return out


def fixed_shots(items: list[Item], pool: list[Item], k: int, seed: int, *, same_file: bool,
                source: str = "") -> list[list[Item]]:
    """One seeded set of k exemplars for every item; from the evaluated file, none of them is evaluated."""
    if k <= 0:
        return [[] for _ in items]
    if same_file:
        used = {i.id for i in items}
        candidates = [i for i in pool if i.id not in used]
        if len(candidates) < k:
            raise SurgeonError(f"{source}: shots={k} with fewshot_order=fixed needs {k} items that are not "
                               f"evaluated; {len(pool)} items, {len(items)} evaluated, {len(candidates)} left "
                               "(use first=/limit= for fewer items, or fewshot=FILE)")
    else:
        candidates = pool
        if len(candidates) < k:
            raise SurgeonError(_too_few(source, k, len(pool), False))
    shots = random.Random(seed).sample(candidates, k)
    return [shots for _ in items]


def _too_few(source: str, k: int, n: int, same_file: bool) -> str:
    if same_file:
        return (f"{source}: shots={k} needs {k + 1} items (k exemplars besides the evaluated one); the file has {n}"
                " (give fewshot=FILE for exemplars from another file)")
    return f"{source}: shots={k} needs {k} exemplars; the few-shot file has {n}"


def item_text(item: Item) -> str:
    """The text a perplexity-like probe reads: plain text, or a worked item written out whole."""
    if item.text:
        return item.text
    gold = gold_text(item) if item.answer is not None else ""
    return (f"{item.context}\n" if item.context else "") + item.question + gold

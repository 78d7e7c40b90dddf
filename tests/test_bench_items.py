"""The lm-eval comparison's synthetic items (bench/lmeval_items.py): the same on every run, a small
run reading a prefix of the full one, and the shapes of the real sets by the tokenizer-free
estimate (`python bench/lmeval_items.py --stats` checks them with SmolLM2's tokenizer)."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import lmeval_items as items  # noqa: E402


@pytest.fixture(scope="module")
def docs():
    return items.stdlib_docs()


def _near(value: float, target: float, within: float = 0.15) -> bool:
    return abs(value / target - 1) <= within


def test_items_repeat_and_a_small_run_reads_a_prefix(docs):
    assert items.arc_items(40, docs=docs) == items.arc_items(60, docs=docs)[:40]
    assert items.boolq_items(16, docs=docs) == items.boolq_items(30, docs=docs)[:16]
    assert items.gsm8k_items(8) == items.gsm8k_items(20)[:8]
    assert items.arc_items(10, docs=items.stdlib_docs()) == items.arc_items(10, docs=docs)


def test_arc_has_four_choices_and_the_real_lengths(docs):
    arc = items.arc_items(300, docs=docs)
    assert len({r["question"] for r in arc}) == 300
    contexts, choices = [], []
    for r in arc:
        texts = r["choices"]["text"]
        assert len(texts) == 4 == len(set(texts)) and r["choices"]["label"] == list("ABCD")
        assert r["answerKey"] in "ABCD"
        contexts.append(items.approx_tokens(items.ARC_PROMPT.format(question=r["question"])))
        choices += [items.approx_tokens(t) for t in texts]
    mean, median = items.REAL["arc"]["context tokens"][:2]
    assert _near(statistics.mean(contexts), mean) and _near(statistics.median(contexts), median)
    mean, median = items.REAL["arc"]["choice tokens"][:2]
    assert _near(statistics.mean(choices), mean) and _near(statistics.median(choices), median)


def test_boolq_passages_are_distinct_and_the_real_lengths(docs):
    boolq = items.boolq_items(300, docs=docs)
    assert len({r["passage"] for r in boolq}) >= 295
    contexts = [items.approx_tokens(items.BOOLQ_PROMPT.format(**r)) for r in boolq]
    mean, median = items.REAL["boolq"]["context tokens"][:2]
    assert _near(statistics.mean(contexts), mean) and _near(statistics.median(contexts), median)
    for r in boolq:
        word = r["question"].removeprefix("does the passage use the word ")
        if word != r["question"]:
            assert (word in r["passage"].lower()) == r["answer"]


def test_gsm8k_working_adds_up_and_prompts_have_the_real_length():
    gsm8k = items.gsm8k_items(300)
    for r in gsm8k:
        notes = re.findall(r"<<([^=]+)=(\d+)>>", r["answer"])
        assert notes and all(eval(expr) == int(value) for expr, value in notes)  # noqa: S307 (digits and + - * /)
        assert r["answer"].endswith(f"#### {notes[-1][1]}")
    prompts = [items.approx_tokens(items.GSM8K_PROMPT.format(question=r["question"])) for r in gsm8k]
    assert _near(statistics.mean(prompts), items.REAL["gsm8k"]["prompt tokens"][0])


def test_files_hold_the_items_in_both_field_layouts(tmp_path):
    files = items.make_items(tmp_path, {"arc": 5, "boolq": 4, "gsm8k": 3}, fewshot=2)
    read = {t: [json.loads(line) for line in f.native.read_text().splitlines()] for t, f in files.items()}
    assert [len(read[t]) for t in ("arc", "boolq", "gsm8k")] == [5, 4, 3]
    lmeval = [json.loads(line) for line in files["boolq"].lmeval.read_text().splitlines()]
    assert [r["label"] for r in lmeval] == [int(r["answer"]) for r in read["boolq"]]

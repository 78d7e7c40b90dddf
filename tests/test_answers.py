"""Answer extraction on real GSM8K-style outputs: our extract= modes, and lm-eval's GSM8K filters and
exact_match (checked against lm-eval's own where it is installed)."""

import pytest

from surgeon.errors import SurgeonError
from surgeon.probes.answers import (
    extract,
    gsm8k_filtered,
    is_correct,
    lmeval_exact_match,
)

# Gold solutions in GSM8K's own format, and typical model outputs.
GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
COT_OUTPUT = "Let's think step by step. She sold 48 in April and 24 in May, so 48 + 24 = 72 clips. The answer is 72."


def test_gsm8k_strict():
    assert extract(GSM8K_GOLD, "gsm8k") == "72"
    assert extract("so the total is #### 1,234", "gsm8k") == "1234"
    assert extract("#### $18.00", "gsm8k") == "18"
    assert extract("no marker 5", "gsm8k") is None


def test_last_number_flexible():
    assert extract(COT_OUTPUT, "last_number") == "72"
    assert extract("It costs $1,250.50 in total.", "last_number") == "1250.5"
    assert extract("negative: -3 then 4.", "last_number") == "4"
    assert extract("nothing numeric", "last_number") is None


def test_is_correct_compares_numbers_not_strings():
    assert is_correct(COT_OUTPUT, "72", "last_number")
    assert is_correct("#### 72.0", "72", "gsm8k")
    assert not is_correct(COT_OUTPUT, "73", "last_number")
    assert is_correct("  cba ", "cba", "exact")
    assert not is_correct("cb", "cba", "exact")


def test_regex_mode():
    assert extract("Answer: (B) because", r"\(([A-D])\)") == "B"
    with pytest.raises(SurgeonError, match="not a valid regex"):
        extract("x", "([")


# ---- lm-eval's GSM8K definitions

GENERATIONS = [
    GSM8K_GOLD, COT_OUTPUT, "so the total is #### 1,234", "#### $18.00", "no number at all", "",
    "The answer is 72.", "It costs $1,250.50 in total.", "negative: -3 then 4.", "#### -5\nQuestion: next",
    "1.5 and 2.", "#### 7. and then 8", "ans: 12,000,000", "just 5", "$$ .. ,,", "#### ,",
]
GOLDS = [GSM8K_GOLD, "so it is 72\n#### 72", "#### 1,234", "#### 18", "#### 5", "x\n#### 8"]


def test_gsm8k_filters_literal():
    assert gsm8k_filtered(GSM8K_GOLD) == {"strict-match": "72", "flexible-extract": "72"}
    assert gsm8k_filtered("#### 1,234 then 5") == {"strict-match": "1,234", "flexible-extract": "5"}
    assert gsm8k_filtered("no digits") == {"strict-match": "[invalid]", "flexible-extract": "[invalid]"}
    assert gsm8k_filtered("it costs $18.")["flexible-extract"] == "$18."


def test_lmeval_exact_match_against_the_full_worked_answer():
    assert lmeval_exact_match("72", GSM8K_GOLD)  # "(?s).*#### " leaves the gold's final number
    assert lmeval_exact_match("$1,234.", "#### 1234")  # "$", "," and a final "." are ignored
    assert not lmeval_exact_match("72.0", "#### 72")  # numbers compare as text, as lm-eval does
    assert not lmeval_exact_match("[invalid]", "#### 72")


def test_our_gsm8k_scoring_is_lmevals_own():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    filters = {"strict-match": RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)"),
               "flexible-extract": RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)}
    for name, f in filters.items():
        theirs = [r[0] for r in f.apply([[g] for g in GENERATIONS], [])]
        assert [gsm8k_filtered(g)[name] for g in GENERATIONS] == theirs, name
        for answer in theirs:
            for gold in GOLDS:
                want = exact_match_hf_evaluate(predictions=[answer], references=[gold], ignore_case=True,
                                               regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])["exact_match"]
                assert lmeval_exact_match(answer, gold) == bool(want), (answer, gold)

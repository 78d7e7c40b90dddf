"""Answer extraction on real GSM8K-style outputs."""

import pytest

from surgeon.errors import SurgeonError
from surgeon.probes.answers import extract, is_correct

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

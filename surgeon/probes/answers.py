"""Answer extraction for exact-match probes, as lm-evaluation-harness does for GSM8K.

`gsm8k` takes the number after `####` (strict match), `last_number` the last number in the
text (flexible extract), `exact` the stripped text; anything else is a regex whose first group
(or whole match) is the answer.
"""

from __future__ import annotations

import re

from surgeon.errors import SurgeonError

_GSM8K = re.compile(r"####\s*(-?[$0-9.,]+)")
_NUMBER = re.compile(r"-?[$0-9.,]*[0-9]")
MODES = ("gsm8k", "last_number", "exact")


def normalize_number(text: str) -> str:
    """`$1,234.50` -> `1234.5`, `7.` -> `7`, so equal numbers compare equal as strings."""
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def extract(text: str, mode: str = "exact") -> str | None:
    if mode == "exact":
        return text.strip()
    if mode == "gsm8k":
        m = _GSM8K.search(text)
        return normalize_number(m.group(1)) if m else None
    if mode == "last_number":
        found = _NUMBER.findall(text)
        return normalize_number(found[-1]) if found else None
    try:
        pattern = re.compile(mode)
    except re.error as e:
        raise SurgeonError(f"extract {mode!r}: not one of {', '.join(MODES)} and not a valid regex ({e})") from None
    m = pattern.search(text)
    if not m:
        return None
    return (m.group(1) if pattern.groups else m.group(0)).strip()


def is_correct(generated: str, gold: str, mode: str) -> bool:
    got = extract(generated, mode)
    if got is None:
        return False
    if mode in ("gsm8k", "last_number"):
        return got == normalize_number(gold)
    return got == gold.strip()

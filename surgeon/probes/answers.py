"""Answer extraction for exact-match probes.

GSM8K items are scored by lm-evaluation-harness's definitions (its gsm8k.yaml): two filters,
`strict-match` (the number after "#### ") and `flexible-extract` (the last number-like run), then
its exact_match with regexes_to_ignore and ignore_case, applied to the filtered answer and to the
gold reference, the full worked answer ("(?s).*#### " leaves its final number).

The `extract=` modes serve other files: `gsm8k` takes the number after `####`, `last_number` the
last number in the text, `exact` the stripped text; anything else is a regex whose first group
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


# ---------------------------------------------------------------- lm-eval's GSM8K definitions
LMEVAL_FALLBACK = "[invalid]"  # what lm-eval's regex filter gives when nothing matches
# filter name -> (regex, which match: lm-eval's group_select indexes the list of all matches)
GSM8K_FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def regex_filter(text: str, pattern: re.Pattern, group_select: int = 0, fallback: str = LMEVAL_FALLBACK) -> str:
    """lm-eval's RegexFilter on one response: the `group_select`-th of all matches; a match of a
    pattern with several groups is its first non-empty group."""
    found = pattern.findall(text)
    if not found:
        return fallback
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def lmeval_exact_match(prediction: str, reference: str, ignore: tuple[str, ...] = GSM8K_IGNORE,
                       ignore_case: bool = True) -> bool:
    """lm-eval's exact_match: each regex in `ignore` removed from both strings, in turn, then compared."""
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return prediction == reference


def gsm8k_filtered(generated: str) -> dict[str, str]:
    """The answer each of lm-eval's GSM8K filters takes from a generation."""
    return {name: regex_filter(generated, pattern, select) for name, (pattern, select) in GSM8K_FILTERS.items()}

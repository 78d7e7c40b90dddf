"""Byte sizes as people write and read them (decimal units, as transformers' "5GB")."""

from __future__ import annotations

from surgeon.errors import SurgeonError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def human_bytes(n: float, digits: int = 2) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    return f"{n} B"


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise SurgeonError(f"{what} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(value * _UNITS[unit])


def amount_text(n: float, unit: str) -> str:
    return human_bytes(n) if unit == "bytes" else f"{n:,.0f}"


def rate_text(per_second: float, unit: str) -> str:
    return f"{human_bytes(per_second)}/s" if unit == "bytes" else f"{per_second:,.1f} {unit}/s"


def step_text(step) -> str:
    """A job's progress (`surgeon.jobs.Step`) as the screens show it: amount, rate, ETA."""
    return (f"{amount_text(step.done, step.unit)} of {amount_text(step.total, step.unit)}"
            f"{'' if step.unit == 'bytes' else ' ' + step.unit}  ·  {rate_text(step.rate(), step.unit)}"
            f"  ·  ETA {step.eta():.0f}s")

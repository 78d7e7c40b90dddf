"""Probes: quick measurements of a model. One module per probe, one registry here.

A probe takes a model, its tokenizer and a spec, and returns per-item outcomes, so every
statistic can be recomputed and a replay can be compared item by item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from surgeon.errors import SurgeonError


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # a key of PROBES
    data: str  # a built-in set name or a file path
    limit: int | None = None
    seed: int = 0
    shots: int = 0
    cot: bool = False  # prepend "Let's think step by step." to the answer (exact match)
    extract: str = "exact"  # exact | gsm8k | last_number | a regex (exact match)
    max_new_tokens: int = 16
    template: str | None = None  # qa ("Question: ...\nAnswer:") or raw (the question as is)
    fmt: str | None = None  # force a data format (gsm8k, arc, boolq, demo, text, jsonl)

    @property
    def label(self) -> str:
        defaults = ProbeSpec(self.kind, self.data)
        extra = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.name not in ("kind", "data") and getattr(self, f.name) != getattr(defaults, f.name)]
        return f"{self.kind}:{self.data}" + "".join("," + e for e in extra)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ProbeOutcome:
    """Per-item results of one probe on one model. `outcomes` are 0/1 for accuracy probes and
    per-token negative log-likelihoods (nats) for perplexity-like probes."""

    ids: list[str]
    outcomes: list[float]
    outputs: list[str] = field(default_factory=list)  # generated text, for exact match
    metric: str = "accuracy"
    extra: dict[str, list[float]] = field(default_factory=dict)  # e.g. acc_norm


_INT_FIELDS = {"limit", "seed", "shots", "max_new_tokens"}


def parse_probe(text: str) -> ProbeSpec:
    """`KIND:DATA[,key=value...]`, e.g. `em:arith,limit=100` or `mc:arc.jsonl,shots=5`."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise SurgeonError(f"--probe {text!r}: expected KIND:DATA[,key=value...], e.g. em:arith")
    if kind not in PROBES:
        raise SurgeonError(f"--probe {text!r}: unknown probe {kind!r} (one of: {', '.join(PROBES)})")
    data, *opts = rest.split(",")
    kwargs: dict = {}
    names = {f.name for f in fields(ProbeSpec)} - {"kind", "data"}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in names:
            raise SurgeonError(f"--probe {text!r}: bad option {opt!r} (options: {', '.join(sorted(names))})")
        if key in _INT_FIELDS:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise SurgeonError(f"--probe {text!r}: {key} must be an integer, not {value!r}") from None
        elif key == "cot":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[key] = value
    return ProbeSpec(kind, data, **kwargs)


def spec_from_json(data: dict) -> ProbeSpec:
    known = {f.name for f in fields(ProbeSpec)}
    unknown = set(data) - known
    if unknown or "kind" not in data or "data" not in data:
        raise SurgeonError(f"probe spec {data}: fields must be among {', '.join(sorted(known))}")
    return ProbeSpec(**data)


PROBES = {
    "mc": "multiple choice by log-likelihood: acc and acc_norm (by continuation bytes)",
    "em": "generative exact match: greedy decoding, stop sequences, answer extraction",
    "ppl": "perplexity on text (item-averaged per-token negative log-likelihood)",
    "kl": "divergence: mean KL(donor || model) of next-token distributions, per donor (label-free)",
}
_MODULES = {"mc": "multiple_choice", "em": "exact_match", "ppl": "perplexity", "kl": "divergence"}


def probe_module(kind: str):
    """The module implementing a probe; imported on first use (probes import torch)."""
    import importlib

    return importlib.import_module(f".{_MODULES[kind]}", __package__)

"""Probes: quick measurements of a model. One module per probe kind, one registry here.

A probe takes a model, its tokenizer and a spec, and returns per-item outcomes, so every
statistic can be recomputed and a replay can be compared item by item.

Each kind's module declares a `KIND` (its name, its metric, which items it reads, whether it is
measured against each donor) next to its `run`; everything outside that module asks the registry
(`KINDS`, `metric_of`) instead of testing a kind's name. Adding a kind is one module here plus
its line in `_KIND_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from surgeon.errors import SurgeonError


@dataclass(frozen=True)
class Metric:
    """What a probe's per-item outcomes measure, and how its score reads."""

    name: str  # recorded in every result as "metric"
    higher_is_better: bool = True
    proportion: bool = False  # 0/1 outcomes: shown in percent, and paired tests (McNemar, z) apply
    shown_as: str = ""  # what the score is called on screen when not the metric's name ("ppl" for perplexity)
    to_score: Callable[[float], float] | None = None  # mean outcome (and CI ends) -> reported score
    recorded_as: tuple[str, ...] = ()  # older names of this metric in saved results, read as this one

    @property
    def label(self) -> str:
        return self.shown_as or self.name

    def score(self, mean: float) -> float:
        return self.to_score(mean) if self.to_score is not None else mean

    def better(self, delta: float) -> bool:
        """A score difference `delta` is an improvement."""
        return delta > 0 if self.higher_is_better else delta < 0

    def score_text(self, score: float) -> str:
        return f"{100 * score:.1f}%" if self.proportion else f"{score:.3f}"

    def ci_text(self, lo: float, hi: float) -> str:
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]" if self.proportion else f"[{lo:.3f}, {hi:.3f}]"

    def delta_text(self, delta: float, digits: int = 4) -> str:
        """A score difference: in points for a proportion, else as is."""
        return f"{100 * delta:+.1f}" if self.proportion else f"{delta:+.{digits}g}"


ACCURACY = Metric("accuracy", proportion=True)  # shared by every kind that marks items right or wrong


@dataclass(frozen=True)
class ProbeKind:
    """What callers need to know about a probe kind; declared as `KIND` by the kind's module.

    A `per_donor` kind measures the model against each donor (a divergence): its module's `run`
    returns a measurement of one model, and `versus(mine, theirs, items)` the ProbeOutcome of the
    model against one donor. Other kinds' `run` returns the ProbeOutcome directly.
    """

    name: str
    description: str
    metric: Metric
    items: str | None = None  # the Item.kind it needs ("mc", "exact"); None: any item, read as text
    needs: str = ""  # what those items are, for the error naming a file without them
    per_donor: bool = False


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # a key of KINDS
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
    metric: str = ACCURACY.name
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


# The kinds' modules import torch only when they run, so the registry is cheap to load.
from . import divergence, exact_match, multiple_choice, perplexity  # noqa: E402

_KIND_MODULES = {m.KIND.name: m for m in (multiple_choice, exact_match, perplexity, divergence)}
KINDS: dict[str, ProbeKind] = {name: m.KIND for name, m in _KIND_MODULES.items()}
PROBES = {name: k.description for name, k in KINDS.items()}  # name -> what it measures, for --list


def probe_module(kind: str):
    """The module implementing a probe kind."""
    return _KIND_MODULES[kind]


def metric_of(name: str) -> Metric:
    """The Metric recorded as `name` in a result; an unknown one (a hand-edited session) reads as a
    plain higher-is-better score."""
    for kind in KINDS.values():
        if name == kind.metric.name or name in kind.metric.recorded_as:
            return kind.metric
    return Metric(name)


def single_model_kinds() -> list[str]:
    """Kinds that score one model on its own (what a sweep can measure per configuration)."""
    return [name for name, k in KINDS.items() if not k.per_donor]

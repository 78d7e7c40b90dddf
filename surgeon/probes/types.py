"""The probes' types: a metric, a kind, a spec as the user wrote it, and the per-item outcome a
kind returns. Every kind module and the registry import these from here, never from the package."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field


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
    scores_only: bool = False  # only scores text with forwards (no generation): runs on our own forward


@dataclass(frozen=True)
class ProbeSpec:
    """One probe as the user wrote it. Optional fields left at None take the data's defaults, so a
    spec's label names only what the user set."""

    kind: str  # a key of KINDS
    data: str  # a built-in set name or a file path
    limit: int | None = None  # a seeded subset of this many items
    seed: int = 0
    shots: int | None = None  # None: the data's default (0, or an lm-eval task's own num_fewshot)
    cot: bool = False  # prepend "Let's think step by step." to the answer (exact match)
    extract: str = "exact"  # exact | gsm8k | last_number | a regex (exact match)
    max_new_tokens: int | None = None  # None: the template's default (256 for qa, 16 for raw)
    template: str | None = None  # qa ("Question: ...\nAnswer:") or raw (the question as is)
    fmt: str | None = None  # force a data format (gsm8k, arc, boolq, demo, text, jsonl)
    first: int | None = None  # the first N items in file order (lm-eval's --limit)
    fewshot: str | None = None  # the file (or built-in set) exemplars come from; None: the probe's own
    fewshot_order: str = "lmeval"  # lmeval: exemplars sampled per item, as lm-eval does; fixed: one set
    until: tuple[str, ...] | None = None  # stop strings for exact match; None: the data's defaults
    fields: tuple[tuple[str, str], ...] = ()  # (Item or format field, the file's field), sorted
    # The user's --trust-task-code for this run: a task may run the Python it carries (an lm-eval
    # YAML's !function). Never part of the label, the JSON or a probe string, so a recorded probe
    # never grants it and a replay must be given it again; not compared, so results match up.
    trust_code: bool = field(default=False, compare=False, repr=False)

    @property
    def label(self) -> str:
        defaults = ProbeSpec(self.kind, self.data)
        extra = [_option_text(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in ("kind", "data", *_UNRECORDED) and getattr(self, f.name) != getattr(defaults, f.name)]
        return f"{self.kind}:{self.data}" + "".join("," + e for e in extra)

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if v is not None and k not in ("until", "fields", *_UNRECORDED)}
        if self.until is not None:
            out["until"] = list(self.until)
        if self.fields:
            out["fields"] = dict(self.fields)
        return out

    def problem(self) -> str | None:
        """What makes this spec unusable, in one phrase naming the option; None when it is fine."""
        for name in ("limit", "first", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"{name} must be at least 1, not {value}"
        if self.limit is not None and self.first is not None:
            return "limit=N (a seeded subset) and first=N (the first N items) exclude each other"
        if self.shots is not None and self.shots < 0:
            return f"shots must be 0 or more, not {self.shots}"
        if self.fewshot is not None and not self.shots:
            return "fewshot=FILE needs shots=K (K at least 1)"
        if self.fewshot_order not in FEWSHOT_ORDERS:
            return f"fewshot_order must be one of {', '.join(FEWSHOT_ORDERS)}, not {self.fewshot_order!r}"
        if self.template not in (None, *TEMPLATES):
            return f"template must be one of {', '.join(TEMPLATES)}, not {self.template!r}"
        if self.extract not in ("exact", "gsm8k", "last_number"):
            try:
                re.compile(self.extract)
            except re.error as e:
                return f"extract {self.extract!r} is not exact, gsm8k, last_number or a valid regex ({e})"
        for name, _ in self.fields:
            if name not in FIELD_NAMES:
                return f"cannot map field {name!r} (mappable: {', '.join(FIELD_NAMES)})"
        return None


_UNRECORDED = ("trust_code",)  # ProbeSpec fields that are the run's, not the probe's
FEWSHOT_ORDERS = ("lmeval", "fixed")
TEMPLATES = ("qa", "raw")
# Options that map the file's field names: Item's fields and the native formats' own names.
FIELD_NAMES = ("question", "answer", "choices", "context", "solution", "text", "id", "passage", "answerKey")


@dataclass
class ProbeOutcome:
    """Per-item results of one probe on one model. `outcomes` are 0/1 for accuracy probes and
    per-token negative log-likelihoods (nats) for perplexity-like probes."""

    ids: list[str]
    outcomes: list[float]
    outputs: list[str] = field(default_factory=list)  # generated text, for exact match
    metric: str = ACCURACY.name
    extra: dict[str, list[float]] = field(default_factory=dict)  # e.g. acc_norm
    # One dict per item with lm-eval's --log_samples keys (doc_id, prompt, target, arguments, resps,
    # filtered_resps, metric values), so a run can be diffed against lm-eval's item by item.
    samples: list[dict] = field(default_factory=list)


def until_text(stops: tuple[str, ...]) -> str:
    """The option text parse_until reads back as `stops`."""
    def escape(s: str) -> str:
        return (s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
                .replace("|", "\\|").replace(",", "\\,"))
    return "|".join(escape(s) for s in stops)


def _option_text(name: str, value) -> str:
    if name == "until":
        return f"until={until_text(value)}"
    if name == "fields":
        return ",".join(f"{k}={v}" for k, v in value)
    return f"{name}={value}"


def short_label(label: str) -> str:
    """A probe label with a file path cut to the file's name: `mc:/data/arc/test.jsonl,limit=5` ->
    `mc:test.jsonl,limit=5`. Only for display; records keep the full label."""
    kind, sep, rest = label.partition(":")
    data, comma, opts = rest.partition(",")
    if not sep or "/" not in data:
        return label
    return f"{kind}:{data.rstrip('/').rsplit('/', 1)[-1]}{comma}{opts}"

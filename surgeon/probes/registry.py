"""The registry of probe kinds (one module per kind) and the parsing of `--probe` strings and
recorded specs into ProbeSpecs. Everything outside a kind's module asks here (`KINDS`,
`metric_of`) instead of testing a kind's name."""

from __future__ import annotations

import dataclasses

from surgeon.errors import SurgeonError

# The kinds' modules import torch only when they run, so the registry is cheap to load.
from . import divergence, exact_match, lmeval, multiple_choice, perplexity
from .types import _UNRECORDED, FIELD_NAMES, Metric, ProbeKind, ProbeSpec


_INT_FIELDS = {"limit", "seed", "shots", "max_new_tokens", "first"}
_ESCAPES = {"n": "\n", "t": "\t", "|": "|", ",": ",", "\\": "\\"}


def _split_unescaped(text: str, sep: str) -> list[str]:
    """`text` cut at each `sep` not preceded by a backslash; escapes stay in the parts."""
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_until(value: str) -> tuple[str, ...]:
    """`\\n\\n|Question:` -> ("\\n\\n", "Question:"): '|' separates, backslash escapes \\n \\t \\| \\, \\\\."""
    if value == "":
        return ()
    stops = []
    for part in _split_unescaped(value, "|"):
        out, chars = [], iter(part)
        for ch in chars:
            if ch != "\\":
                out.append(ch)
                continue
            nxt = next(chars, "")
            if nxt not in _ESCAPES:
                raise SurgeonError(f"until: unknown escape \\{nxt} (use \\n, \\t, \\|, \\, or \\\\)")
            out.append(_ESCAPES[nxt])
        if not out:
            raise SurgeonError(f"until {value!r}: an empty stop string (two '|' in a row, or one at an end)")
        stops.append("".join(out))
    return tuple(stops)


def _options_help() -> str:
    names = sorted(f.name for f in dataclasses.fields(ProbeSpec) if f.name not in ("kind", "data", "fields", *_UNRECORDED))
    return f"options: {', '.join(names)}; or map a field: {', '.join(FIELD_NAMES)}"


def parse_probe(text: str) -> ProbeSpec:
    """`KIND:DATA[,key=value...]`, e.g. `em:arith,limit=100`, `mc:arc.jsonl,shots=5` or
    `em:qa.jsonl,question=q,answer=a,until=\\n|Q:` (a field name as key maps the file's field)."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise SurgeonError(f"--probe {text!r}: expected KIND:DATA[,key=value...], e.g. em:arith")
    if kind not in PROBES:
        raise SurgeonError(f"--probe {text!r}: unknown probe {kind!r} (one of: {', '.join(PROBES)})")
    data, *opts = _split_unescaped(rest, ",")
    kwargs: dict = {}
    mapped: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(ProbeSpec)} - {"kind", "data", "fields", *_UNRECORDED}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or (key not in names and key not in FIELD_NAMES):
            raise SurgeonError(f"--probe {text!r}: bad option {opt!r} ({_options_help()})")
        if key in kwargs or key in mapped:  # which one was meant? taking the last would hide the other
            raise SurgeonError(f"--probe {text!r}: option {key} is given twice")
        if key in FIELD_NAMES:
            mapped[key] = value
        elif key in _INT_FIELDS:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise SurgeonError(f"--probe {text!r}: {key} must be an integer, not {value!r}") from None
        elif key == "cot":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif key == "until":
            try:
                kwargs[key] = parse_until(value)
            except SurgeonError as e:
                raise SurgeonError(f"--probe {text!r}: {e}") from None
        else:
            kwargs[key] = value
    spec = ProbeSpec(kind, data, fields=tuple(sorted(mapped.items())), **kwargs)
    if (problem := spec.problem()) is not None:
        raise SurgeonError(f"--probe {text!r}: {problem}")
    return spec


# Before fewshot_order existed every spec was written with "max_new_tokens": 16, the default then;
# read as "the default" so that the spec keeps the label its results were recorded under.
_LEGACY_MAX_NEW_TOKENS = 16


def spec_from_json(data: dict) -> ProbeSpec:
    known = {f.name for f in dataclasses.fields(ProbeSpec)} - set(_UNRECORDED)
    unknown = set(data) - known
    if unknown or "kind" not in data or "data" not in data:
        raise SurgeonError(f"probe spec {data}: fields must be among {', '.join(sorted(known))}")
    values = dict(data)
    if "fewshot_order" not in values:  # written before the defaults became "unset": keep its label
        if values.get("max_new_tokens") == _LEGACY_MAX_NEW_TOKENS:
            values["max_new_tokens"] = None
        if values.get("shots") == 0:
            values["shots"] = None
    if values.get("until") is not None:
        if not isinstance(values["until"], list) or not all(isinstance(s, str) for s in values["until"]):
            raise SurgeonError(f"probe spec {data}: 'until' must be a list of stop strings")
        values["until"] = tuple(values["until"])
    if "fields" in values:
        mapping = values["fields"]
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise SurgeonError(f"probe spec {data}: 'fields' must map field names to the file's names")
        values["fields"] = tuple(sorted(mapping.items()))
    spec = ProbeSpec(**values)
    if (problem := spec.problem()) is not None:
        raise SurgeonError(f"probe spec {data}: {problem}")
    return spec


_KIND_MODULES = {m.KIND.name: m for m in (multiple_choice, exact_match, perplexity, divergence, lmeval)}
KINDS: dict[str, ProbeKind] = {name: m.KIND for name, m in _KIND_MODULES.items()}
PROBES = {name: k.description for name, k in KINDS.items()}  # name -> what it measures, for --list


def probe_module(kind: str):
    """The module implementing a probe kind."""
    return _KIND_MODULES[kind]


def metric_of(name: str) -> Metric:
    """The Metric recorded as `name` in a result: a kind's own, else lm-eval's metric of that name (an
    `lmeval:` task's), else (a hand-edited session) a plain higher-is-better score."""
    for kind in KINDS.values():
        if name == kind.metric.name or name in kind.metric.recorded_as:
            return kind.metric
    return lmeval.metric_for(name)


def task_code(spec: ProbeSpec) -> str | None:
    """What code beyond the installed engine the task of `spec` would run (an lm-eval task YAML's
    own Python), in a phrase; None when none."""
    check = getattr(probe_module(spec.kind), "task_code", None)
    return check(spec) if check is not None else None


def trusting(specs: list[ProbeSpec], trust: bool) -> list[ProbeSpec]:
    """`specs` with the user's --trust-task-code applied to each."""
    return [dataclasses.replace(s, trust_code=trust) for s in specs]


def shown_metric(record: dict) -> str:
    """The name lm-eval gives a record's primary metric (`acc`, `exact_match,flexible-extract`), where
    the kind mirrors an lm-eval metric (its module's `lmeval_metric`); else the recorded name."""
    probe = record.get("probe")
    module = _KIND_MODULES.get(probe.get("kind")) if isinstance(probe, dict) else None
    name = getattr(module, "lmeval_metric", None)
    return name(record) if name is not None else record["metric"]


def kind_for_items(item_kind: str) -> str | None:
    """The kind that scores items of `item_kind` ("mc", "exact") on one model, as the registry
    lists them; None when no kind reads such items."""
    return next((name for name, k in KINDS.items() if k.items == item_kind and not k.per_donor), None)


def single_model_kinds() -> list[str]:
    """Kinds that score one model on its own (what a sweep can measure per configuration)."""
    return [name for name, k in KINDS.items() if not k.per_donor]

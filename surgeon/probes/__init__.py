"""Probes: quick measurements of a model. One module per probe kind, one registry here.

A probe takes a model, its tokenizer and a spec, and returns per-item outcomes, so every
statistic can be recomputed and a replay can be compared item by item.

Each kind's module declares a `KIND` (its name, its metric, which items it reads, whether it is
measured against each donor) next to its `run`; everything outside that module asks the registry
(`KINDS`, `metric_of`) instead of testing a kind's name. Adding a kind is one module here plus
its line in `registry._KIND_MODULES`. The types live in `types.py`, the registry and parsing in
`registry.py`; this file only re-exports them, so no module of the package imports back from it.
"""

from .registry import (
    KINDS,
    PROBES,
    metric_of,
    parse_probe,
    parse_until,
    probe_module,
    shown_metric,
    single_model_kinds,
    spec_from_json,
    task_code,
    trusting,
)
from .types import ACCURACY, FEWSHOT_ORDERS, FIELD_NAMES, TEMPLATES, Metric, ProbeKind, ProbeOutcome, ProbeSpec, short_label, until_text

__all__ = [
    "ACCURACY", "FEWSHOT_ORDERS", "FIELD_NAMES", "KINDS", "PROBES", "TEMPLATES", "Metric", "ProbeKind", "ProbeOutcome",
    "ProbeSpec", "metric_of", "parse_probe", "parse_until", "probe_module", "short_label", "shown_metric", "single_model_kinds", "spec_from_json",
    "task_code", "trusting", "until_text",
]

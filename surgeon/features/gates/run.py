"""The gates use cases, each one engine function: add, train, select, eval and show on a gated checkpoint,
and `select_hybrid` for the workbench's hybrid (what `gates select --dry-run` measures on a checkpoint).

Cheap refusals (a directory without gates, a missing data file) come before torch is imported or a
model loads; the long ones are jobs (surgeon.jobs) that write nothing when cancelled. Running out of
memory is left to the caller to phrase (the command line names the flags to change).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER

TRAINING_LOG = "layer_gates_training.json"
SELECTION_LOG = "layer_gates_selection.json"


@dataclass(frozen=True)
class DataSpec:
    """Where sequences come from: a file or a built-in set, cut as `--unit` and `--seq-len` say."""

    source: str
    seq_len: int = 64
    unit: str = "auto"
    template: str | None = None

    def load(self, tokenizer, where: str = "--data"):
        from surgeon.features.gates.train import load_data

        return load_data(tokenizer, self.source, self.seq_len, self.unit, where, self.template)


def gated_dir(path: str) -> Path:
    from surgeon.core.donor import resolve_path
    from surgeon.core.gates_sidecar import GATES_FILE

    d = resolve_path(path)
    if not (d / "config.json").is_file():
        raise SurgeonError(f"{d}: not a checkpoint directory (no config.json)")
    if not (d / GATES_FILE).is_file():
        raise SurgeonError(f"{d}: has no {GATES_FILE}; add gates with moe-surgeon gates add")
    return d


def check_source(source: str | None, what: str) -> None:
    """Refuse a missing data file before the minutes of loading a model."""
    from surgeon.probes.data import builtin_sets

    if source is not None and not Path(source).is_file() and source not in builtin_sets():
        raise SurgeonError(f"{what} {source}: no such file (nor a built-in set: {', '.join(builtin_sets())})")


def recorded_source(source: str) -> str:
    """A data source as recorded: a built-in set's name as is, a file as an absolute path."""
    return str(Path(source).resolve()) if Path(source).exists() else source


# ---------------------------------------------------------------- add
def run_add(base: str, out: str, gate_type: str, layers_text: str, *, force: bool = False) -> dict:
    """A copy of a checkpoint (or a session's hybrid) with zero gates of `gate_type` on the layers."""
    from surgeon.core.gates_sidecar import (
        gate_shape,
        hidden_size_of,
        read_gates,
        write_gates,
    )
    from surgeon.core.plan import format_ranges, parse_layers
    from surgeon.core.resolve import resolve
    from surgeon.core.session import make_session, open_target
    from surgeon.features.export import export_hybrid, gate_types, model_card

    _, donors, plan = open_target(base, "add gates to")
    session_json = make_session(plan, donors, None).to_json()
    base_donor = donors[plan.base]
    hidden = hidden_size_of(base_donor.config, str(base_donor.path))
    layers = parse_layers(layers_text, base_donor.anatomy.num_layers)
    resolution = resolve(plan, donors)
    existing = gate_types(resolution, donors)
    taken = sorted(set(existing) & set(layers))
    if taken:
        raise SurgeonError(f"--layers {layers_text}: layer {taken[0]} already has a {existing[taken[0]]} gate "
                           f"(gated layers: {format_ranges(existing)})")
    types = {**existing, **{layer: gate_type for layer in layers}}
    shape = gate_shape(gate_type, hidden)

    def add_zero_gates(tmp: Path) -> None:
        import torch

        gates, _ = read_gates(tmp)
        gates.update({layer: torch.zeros(shape) for layer in layers})
        write_gates(tmp, gates, hidden, {"added": {"type": gate_type, "layers": format_ranges(layers)}})
        (tmp / "README.md").write_text(model_card(resolution, donors, "keep", gates=types))

    result = export_hybrid(resolution, donors, out, force=force, session_json=session_json,
                           before_rename=add_zero_gates)
    return {"path": str(result.path), "gate_type": gate_type, "layers": list(layers),
            "gates": {str(k): v for k, v in sorted(types.items())},
            "gate_parameters": math.prod(shape) * len(layers), "seconds": result.seconds}


# ---------------------------------------------------------------- train
@dataclass
class TrainRun:
    directory: Path
    result: object  # TrainResult
    log: dict  # what TRAINING_LOG holds
    device: str
    tokens: int  # scored training tokens


def run_train(directory: str, data: DataSpec, settings, *, held_out: str | None = None, device: str | None = None,
              dtype: str = "keep", progress=None, cancel=NEVER) -> TrainRun:
    """Train the gates of a gated checkpoint in place: the sidecar and TRAINING_LOG are written only
    when training finished. On a model of its own, never the workbench's shared live hybrid
    (live/keeper.py): training changes the gate weights."""
    directory = gated_dir(directory)  # cheap refusals first: torch takes seconds to import
    check_source(data.source, "--data")
    check_source(held_out, "--eval")
    from surgeon.core.gates_sidecar import hidden_size_of, read_gates, write_gates
    from surgeon.features.gates.train import train_gates
    from surgeon.io.atomic import write_atomic
    from surgeon.live.layer_gates import gate_state
    from surgeon.live.loader import load_gated
    from surgeon.probes.scoring import load_tokenizer

    settings.check()
    _, meta = read_gates(directory)
    tokenizer = load_tokenizer(directory)
    train_data = data.load(tokenizer, "--data")
    eval_data = DataSpec(held_out, settings.seq_len, data.unit, data.template).load(tokenizer, "--eval") \
        if held_out else None
    cancel.check()
    model = load_gated(directory, device=device, dtype=dtype)
    device = str(next(model.parameters()).device)
    result = train_gates(model, train_data, settings, held_out=eval_data, progress=progress, cancel=cancel)
    config = json.loads((directory / "config.json").read_text())
    summary = {**result.summary(), "data": recorded_source(data.source), "unit": data.unit, "device": device,
               "dtype": dtype}
    extra = {k: v for k, v in meta.items() if k in ("added", "origin")}
    write_gates(directory, gate_state(model), hidden_size_of(config, str(directory)), {**extra, "training": summary})
    log = {**result.to_json(), "data": summary["data"], "unit": data.unit,
           "eval": recorded_source(held_out) if held_out else None, "device": device, "dtype": dtype}
    write_atomic(directory / TRAINING_LOG, (json.dumps(log, indent=2) + "\n").encode())
    return TrainRun(directory, result, log, device, train_data.tokens)


# ---------------------------------------------------------------- select
def run_select(directory: str, data: DataSpec, *, batch_size: int = 16, min_gain: float = 0.0,
               dry_run: bool = False, device: str | None = None, dtype: str = "keep", progress=None,
               cancel=NEVER) -> tuple[object, dict]:
    """Keep the gates that lower their layer's logit-lens perplexity; (Selection, record). Unless
    `dry_run`, the sidecar keeps only those and SELECTION_LOG is written (nothing when cancelled)."""
    directory = gated_dir(directory)  # cheap refusals first: torch takes seconds to import
    if data.seq_len < 1 or batch_size < 1:
        raise SurgeonError("--seq-len and --batch-size must be at least 1")
    check_source(data.source, "--data")
    from surgeon.core.gates_sidecar import hidden_size_of, read_gates, write_gates
    from surgeon.features.gates.select import select_gates
    from surgeon.io.atomic import write_atomic
    from surgeon.live.layer_gates import gate_state
    from surgeon.live.loader import load_gated
    from surgeon.probes.scoring import load_tokenizer

    _, meta = read_gates(directory)
    calibration = data.load(load_tokenizer(directory), "--data")
    cancel.check()
    model = load_gated(directory, device=device, dtype=dtype)
    device = str(next(model.parameters()).device)
    sel = select_gates(model, calibration, batch_size=batch_size, min_gain=min_gain, progress=progress,
                       cancel=cancel)
    record = {**sel.to_json(), "data": recorded_source(data.source), "unit": data.unit, "device": device,
              "dtype": dtype, "applied": not dry_run}
    if not dry_run:
        kept = {l: w for l, w in gate_state(model).items() if l in sel.kept}
        config = json.loads((directory / "config.json").read_text())
        extra = {k: v for k, v in meta.items() if k in ("added", "origin", "training")}
        write_gates(directory, kept, hidden_size_of(config, str(directory)), {**extra, "selection": record})
        write_atomic(directory / SELECTION_LOG, (json.dumps(record, indent=2) + "\n").encode())
    return sel, {"path": str(directory), **record}


def calibration(plan, donors: dict, corpus: str, seq_len: int = 64):
    """The calibration sequences of `corpus` (a set or a file) cut with the base's tokenizer."""
    from surgeon.probes.scoring import load_tokenizer

    return DataSpec(corpus, seq_len).load(load_tokenizer(donors[plan.base].path), "calibration data")


def select_hybrid(plan, donors: dict, corpus: str, *, seq_len: int = 64, batch_size: int = 16, dtype: str = "keep",
                  device: str | None = None, keeper=None, note=None, progress=None, cancel=NEVER) -> tuple[object, str]:
    """`gates select --dry-run` on the hybrid of `plan` (calibrated on `corpus`, a set or a file);
    (Selection, device). The workbench's Layer gates screen runs this.

    keeper: a live.keeper.HybridKeeper whose live hybrid is held for the selection and moved to
    `plan` (a probe or routing run meanwhile waits; `note` hears that this one waits for them);
    without one a hybrid is materialised for this call. Sharing the live hybrid is safe here and
    only here: selection reads the gates through an observer it removes afterwards and runs forward
    passes without gradients, so no weight changes and no module is added or removed (the gate
    modules are the plan's, fitted by the hot-swap). Training (`run_train`: AdamW steps on the gate
    weights) and `run_eval` (which zeroes the gates) change weights, so they never run on the
    shared hybrid: they load a gated checkpoint of their own.
    """
    from surgeon.features.gates.select import select_gates
    from surgeon.live.devices import default_device

    data = calibration(plan, donors, corpus, seq_len)
    device = device or default_device()
    cancel.check()
    if keeper is not None:
        with keeper.use(plan, donors, device, dtype, job="gate selection", note=note, cancel=cancel) as lease:
            return select_gates(lease.model, data, batch_size=batch_size, progress=progress, cancel=cancel), device
    from surgeon.live.hybrid import Hybrid

    hybrid = Hybrid.materialize(plan, donors, device=device, dtype=dtype)
    try:
        return select_gates(hybrid.model, data, batch_size=batch_size, progress=progress, cancel=cancel), device
    finally:
        del hybrid


# ---------------------------------------------------------------- eval
def run_eval(directory: str, data: DataSpec, *, batch_size: int = 16, device: str | None = None,
             dtype: str = "keep", progress=None, cancel=NEVER) -> dict:
    """Perplexity of a gated checkpoint with its gates and without them (zeroed). On a model of its
    own, never the workbench's shared live hybrid: zeroing the gates changes its weights."""
    directory = gated_dir(directory)
    check_source(data.source, "--data")
    import torch

    from surgeon.features.gates.train import perplexity
    from surgeon.live.layer_gates import gate_modules
    from surgeon.live.loader import load_gated
    from surgeon.probes.scoring import load_tokenizer

    scored = data.load(load_tokenizer(directory), "--data")
    cancel.check()
    model = load_gated(directory, device=device, dtype=dtype)
    device = str(next(model.parameters()).device)
    with_gates = perplexity(model, scored, batch_size)
    cancel.check()
    with torch.no_grad():  # zero gates are the model without them, bit for bit
        for gate in gate_modules(model).values():
            gate.weight.zero_()
    without = perplexity(model, scored, batch_size)
    return {"path": str(directory), "data": recorded_source(data.source), "tokens": scored.tokens, "device": device,
            "dtype": dtype, "ppl_without_gates": without, "ppl_with_gates": with_gates}


# ---------------------------------------------------------------- show
def gates_report(path: str) -> dict:
    """The gates of a checkpoint: per layer type, size, mean and largest weight; the sidecar's metadata."""
    from safetensors.numpy import load_file

    from surgeon.core.donor import open_donor
    from surgeon.core.gates_sidecar import (
        GATES_FILE,
        gate_layer_of,
        gate_type_of,
        hidden_size_of,
    )

    donor = open_donor(path)  # validates the sidecar against the config
    sidecar = donor.path / GATES_FILE
    if not sidecar.is_file():
        raise SurgeonError(f"{donor.path}: has no {GATES_FILE}")
    hidden = hidden_size_of(donor.config, str(donor.path))
    meta = dict(donor.shards[GATES_FILE].metadata)
    rows = []
    for name, arr in sorted(load_file(str(sidecar)).items(), key=lambda kv: gate_layer_of(kv[0])):
        a = arr.astype("float64")
        rows.append({"layer": gate_layer_of(name), "type": gate_type_of(arr.shape, hidden, name),
                     "parameters": int(a.size), "mean": float(a.mean()), "max_abs": float(abs(a).max())})
    for key in ("added", "origin", "training", "selection"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return {"path": str(sidecar), "hidden_size": hidden, "gates": rows, "metadata": meta}

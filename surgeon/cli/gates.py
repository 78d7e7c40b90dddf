"""`moe-surgeon gates`: Self-MoE layer gates (seed 003) on a checkpoint: add, train, select, eval, show.

A gated checkpoint is an ordinary one plus `layer_gates.safetensors` (surgeon/gates_file.py).
Gates move between checkpoints like any component, through a plan: `export OUT --base X
--take layer_gate@2-3=GATED_DIR`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from surgeon.cli.options import out_of_memory_is_an_error
from surgeon.errors import SurgeonError

TRAINING_LOG = "layer_gates_training.json"
SELECTION_LOG = "layer_gates_selection.json"
SPARK = "▁▂▃▄▅▆▇█"


def register(sub) -> None:
    p = sub.add_parser("gates", help="Self-MoE gates between decoder layers: add, train, select, eval, show")
    gsub = p.add_subparsers(dest="gates_command", required=True)

    a = gsub.add_parser("add", help="write a copy of a checkpoint (or a session's hybrid) with zero gates")
    a.add_argument("out")
    a.add_argument("--base", required=True, metavar="DIR_OR_SESSION", help="a checkpoint, demo:NAME, or a session file")
    a.add_argument("--type", required=True, choices=["scalar", "vector", "matrix"], dest="gate_type")
    a.add_argument("--layers", required=True, metavar="SPEC", help="all, N, A-B or a comma list of those")
    a.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_add)

    t = gsub.add_parser("train", help="train only the gates of a gated checkpoint, in place")
    t.add_argument("dir")
    t.add_argument("--data", required=True, metavar="FILE", help="text or prompt/answer jsonl to train on")
    t.add_argument("--eval", metavar="FILE", help="held-out data (same --unit): perplexity before and after")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=20, help="steps of linear warm-up (default 20)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    _unit_option(t)
    _model_options(t)
    t.set_defaults(func=cmd_train)

    s = gsub.add_parser("select", help="drop the gates that do not lower per-layer logit-lens perplexity")
    s.add_argument("dir")
    s.add_argument("--data", required=True, metavar="FILE", help="calibration text or prompt/answer jsonl")
    s.add_argument("--seq-len", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--min-gain", type=float, default=0.0,
                   help="keep a gate only if it lowers the perplexity by this fraction (default 0)")
    _unit_option(s)
    s.add_argument("--dry-run", action="store_true", help="report only; leave the gates file as it is")
    _model_options(s)
    s.set_defaults(func=cmd_select)

    e = gsub.add_parser("eval", help="perplexity of a gated checkpoint with and without its gates")
    e.add_argument("dir")
    e.add_argument("--data", required=True, metavar="FILE", help="held-out text or prompt/answer jsonl")
    e.add_argument("--seq-len", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16)
    _unit_option(e)
    _model_options(e)
    e.set_defaults(func=cmd_eval)

    w = gsub.add_parser("show", help="the gates of a checkpoint: layers, types, sizes, weights")
    w.add_argument("dir")
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_show)


def _unit_option(p) -> None:
    p.add_argument("--unit", default="auto", choices=["auto", "stream", "line", "pairs"],
                   help="stream: the file is one text cut into --seq-len windows; line: every line is one "
                   "sequence ending in <eos>; pairs: a prompt/answer jsonl (or a built-in set such as arith), "
                   "scored on the answers; auto (default): pairs for .jsonl and built-in sets, else stream")
    p.add_argument("--template", choices=["raw", "qa"],
                   help="pairs: raw puts prompt and answer side by side (\"12+7=\" \"19\"); qa is "
                   "\"Question: ...\\nAnswer: ...\" (default: raw for built-in sets, qa for files, as the probes)")


def _model_options(p) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"],
                   help="compute dtype of the model (the gates are float32 always)")
    p.add_argument("--json", action="store_true")


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    from surgeon.core.plan import parse_ranges

    if text.strip() == "all":
        return tuple(range(num_layers))
    layers = parse_ranges(text, "layer", f"--layers {text}")
    bad = [l for l in layers if l >= num_layers]
    if bad:
        raise SurgeonError(f"--layers {text}: layer {bad[0]} out of range (the model has {num_layers} layers: 0-{num_layers - 1})")
    return layers


def _gated_dir(path: str) -> Path:
    from surgeon.core.donor import resolve_path
    from surgeon.core.gates_sidecar import GATES_FILE

    d = resolve_path(path)
    if not (d / "config.json").is_file():
        raise SurgeonError(f"{d}: not a checkpoint directory (no config.json)")
    if not (d / GATES_FILE).is_file():
        raise SurgeonError(f"{d}: has no {GATES_FILE}; add gates with moe-surgeon gates add")
    return d


def _check_source(source: str | None, what: str) -> None:
    """Refuse a missing data file before the minutes of loading a model."""
    from surgeon.probes.data import builtin_sets

    if source is not None and not Path(source).is_file() and source not in builtin_sets():
        raise SurgeonError(f"{what} {source}: no such file (nor a built-in set: {', '.join(builtin_sets())})")


def _where(source: str) -> str:
    """A data source as recorded: a built-in set's name as is, a file as an absolute path."""
    return str(Path(source).resolve()) if Path(source).exists() else source


# ---------------------------------------------------------------- add
def cmd_add(args) -> int:
    from surgeon.core.donor import open_donor
    from surgeon.core.gates_sidecar import (
        GATES_FILE,
        gate_shape,
        hidden_size_of,
        read_gates,
        write_gates,
    )
    from surgeon.core.plan import Plan, format_ranges
    from surgeon.core.resolve import resolve
    from surgeon.core.session import (
        load_session,
        make_session,
        open_session_donors,
        refuse_mix_session,
    )
    from surgeon.features.export import export_hybrid, gate_types, model_card

    if Path(args.base).is_file():
        session = load_session(args.base)
        refuse_mix_session(session, args.base, "add gates to")
        donors = open_session_donors(session, args.base)
        plan = session.plan
    else:
        donors = {"A": open_donor(args.base)}
        plan = Plan("A")
    session_json = make_session(plan, donors, None).to_json()
    base = donors[plan.base]
    hidden = hidden_size_of(base.config, str(base.path))
    layers = parse_layers(args.layers, base.anatomy.num_layers)
    resolution = resolve(plan, donors)
    existing = gate_types(resolution, donors)
    taken = sorted(set(existing) & set(layers))
    if taken:
        raise SurgeonError(f"--layers {args.layers}: layer {taken[0]} already has a {existing[taken[0]]} gate "
                           f"(gated layers: {format_ranges(existing)})")
    types = {**existing, **{layer: args.gate_type for layer in layers}}
    shape = gate_shape(args.gate_type, hidden)

    def add_zero_gates(tmp: Path) -> None:
        import torch

        gates, _ = read_gates(tmp)
        gates.update({layer: torch.zeros(shape) for layer in layers})
        write_gates(tmp, gates, hidden, {"added": {"type": args.gate_type, "layers": format_ranges(layers)}})
        (tmp / "README.md").write_text(model_card(resolution, donors, "keep", gates=types))

    result = export_hybrid(resolution, donors, args.out, force=args.force, session_json=session_json,
                           before_rename=add_zero_gates)
    params = math.prod(shape) * len(layers)
    record = {"path": str(result.path), "gate_type": args.gate_type, "layers": list(layers),
              "gates": {str(k): v for k, v in sorted(types.items())}, "gate_parameters": params,
              "seconds": result.seconds}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"wrote {result.path} with {len(layers)} zero {args.gate_type} gate(s) on layer(s) {format_ranges(layers)} "
              f"({params:,} gate parameters) in {GATES_FILE}")
        print("  plain transformers ignores the gates; surgeon.live.loader.load_gated runs them")
    return 0


# ---------------------------------------------------------------- train
def _train_progress(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    state = {"t0": time.perf_counter(), "last": 0.0}

    def report(step: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if now - state["last"] < 0.1 and step < steps:
            return
        state["last"] = now
        width = 30
        filled = int(width * step / steps)
        rate = step / max(now - state["t0"], 1e-9)
        print(f"\rtrain [{'#' * filled}{'.' * (width - filled)}] {step}/{steps}  loss {loss:.4f}  "
              f"{rate:.1f} steps/s  ETA {(steps - step) / max(rate, 1e-9):4.0f}s",
              end="" if step < steps else "\n", file=sys.stderr)

    return report


def sparkline(values: list[float], width: int = 60) -> str:
    """The curve in one line: `width` buckets of means, scaled between their min and max."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((m - lo) / span * len(SPARK)))] for m in means)


def cmd_train(args) -> int:
    directory = _gated_dir(args.dir)  # cheap refusals first: torch takes seconds to import
    _check_source(args.data, "--data")
    _check_source(args.eval, "--eval")
    from surgeon.core.gates_sidecar import (
        GATES_FILE,
        hidden_size_of,
        read_gates,
        write_gates,
    )
    from surgeon.features.gates.train import TrainSettings, load_data, train_gates
    from surgeon.io.atomic import write_atomic
    from surgeon.live.layer_gates import gate_state
    from surgeon.live.loader import load_gated
    from surgeon.probes.scoring import load_tokenizer

    settings = TrainSettings(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
                             seq_len=args.seq_len, seed=args.seed)
    settings.check()
    _, meta = read_gates(directory)
    tokenizer = load_tokenizer(directory)
    data = load_data(tokenizer, args.data, settings.seq_len, args.unit, "--data", args.template)
    held_out = load_data(tokenizer, args.eval, settings.seq_len, args.unit, "--eval", args.template) if args.eval else None
    model = load_gated(directory, device=args.device, dtype=args.dtype)
    device = str(next(model.parameters()).device)
    with out_of_memory_is_an_error(device):
        result = train_gates(model, data, settings, held_out=held_out, progress=_train_progress(not args.json))
    config = json.loads((directory / "config.json").read_text())
    summary = {**result.summary(), "data": _where(args.data), "unit": args.unit, "device": device, "dtype": args.dtype}
    extra = {k: v for k, v in meta.items() if k in ("added", "origin")}
    write_gates(directory, gate_state(model), hidden_size_of(config, str(directory)), {**extra, "training": summary})
    log = {**result.to_json(), "data": summary["data"], "unit": args.unit, "eval": _where(args.eval) if args.eval else None,
           "device": device, "dtype": args.dtype}
    write_atomic(directory / TRAINING_LOG, (json.dumps(log, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps({"path": str(directory), **log}, indent=2))
        return 0
    s = result.summary()
    print(f"trained the gates of {directory} for {settings.steps} steps in {result.seconds:.1f}s on {device} "
          f"({result.sequences} sequences of up to {settings.seq_len + 1} tokens, {data.tokens} scored tokens, batch {settings.batch_size}, "
          f"lr {settings.lr:g}, warm-up {settings.warmup}, seed {settings.seed})")
    print(f"  loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean of the first and last 10 steps)")
    print(f"  loss curve  {sparkline(result.losses)}")
    if result.eval_before is not None:
        change = 100 * (result.eval_after / result.eval_before - 1)
        print(f"  held-out perplexity {result.eval_before:.4f} -> {result.eval_after:.4f} ({change:+.2f}%)")
    print(f"  wrote {directory / GATES_FILE} and {TRAINING_LOG} (every step's loss)")
    return 0


# ---------------------------------------------------------------- select
def cmd_select(args) -> int:
    directory = _gated_dir(args.dir)  # cheap refusals first: torch takes seconds to import
    if args.seq_len < 1 or args.batch_size < 1:
        raise SurgeonError("--seq-len and --batch-size must be at least 1")
    _check_source(args.data, "--data")
    from surgeon.core.gates_sidecar import (
        GATES_FILE,
        hidden_size_of,
        read_gates,
        write_gates,
    )
    from surgeon.core.plan import format_ranges
    from surgeon.features.gates.select import select_gates
    from surgeon.features.gates.train import load_data
    from surgeon.io.atomic import write_atomic
    from surgeon.live.layer_gates import gate_state
    from surgeon.live.loader import load_gated
    from surgeon.probes.scoring import load_tokenizer

    _, meta = read_gates(directory)
    tokenizer = load_tokenizer(directory)
    data = load_data(tokenizer, args.data, args.seq_len, args.unit, "--data", args.template)
    model = load_gated(directory, device=args.device, dtype=args.dtype)
    device = str(next(model.parameters()).device)
    with out_of_memory_is_an_error(device):
        sel = select_gates(model, data, batch_size=args.batch_size, min_gain=args.min_gain)
    record = {**sel.to_json(), "data": _where(args.data), "unit": args.unit, "device": device, "dtype": args.dtype,
              "applied": not args.dry_run}
    if not args.dry_run:
        kept = {l: w for l, w in gate_state(model).items() if l in sel.kept}
        config = json.loads((directory / "config.json").read_text())
        extra = {k: v for k, v in meta.items() if k in ("added", "origin", "training")}
        write_gates(directory, kept, hidden_size_of(config, str(directory)), {**extra, "selection": record})
        write_atomic(directory / SELECTION_LOG, (json.dumps(record, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps({"path": str(directory), **record}, indent=2))
        return 0
    print(f"per-layer logit-lens perplexity on {sel.tokens} calibration tokens ({device}, {args.dtype})")
    print(f"{'layer':>5}  {'type':<7}{'without gate':>14}{'with gate':>12}{'change':>9}  verdict")
    for r in sel.layers:
        print(f"{r.layer:>5}  {r.gate_type:<7}{r.ppl_without:>14.4f}{r.ppl_with:>12.4f}{100 * r.change:>8.2f}%  "
              + ("keep" if r.keep else "drop"))
    kept = format_ranges(sel.kept) or "none"
    if args.dry_run:
        print(f"would keep layer(s) {kept}; --dry-run: {GATES_FILE} unchanged")
    elif sel.kept:
        print(f"kept layer(s) {kept}; dropped {format_ranges(sel.dropped) or 'none'}; rewrote {directory / GATES_FILE}")
    else:
        print(f"no gate lowers the perplexity: removed {directory / GATES_FILE}")
    return 0


# ---------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    directory = _gated_dir(args.dir)
    _check_source(args.data, "--data")
    import torch

    from surgeon.features.gates.train import load_data, perplexity
    from surgeon.live.layer_gates import gate_modules
    from surgeon.live.loader import load_gated
    from surgeon.probes.scoring import load_tokenizer

    tokenizer = load_tokenizer(directory)
    data = load_data(tokenizer, args.data, args.seq_len, args.unit, "--data", args.template)
    model = load_gated(directory, device=args.device, dtype=args.dtype)
    device = str(next(model.parameters()).device)
    with out_of_memory_is_an_error(device):
        with_gates = perplexity(model, data, args.batch_size)
        with torch.no_grad():  # zero gates are the model without them, bit for bit
            for gate in gate_modules(model).values():
                gate.weight.zero_()
        without = perplexity(model, data, args.batch_size)
    record = {"path": str(directory), "data": _where(args.data), "tokens": data.tokens, "device": device,
              "dtype": args.dtype, "ppl_without_gates": without, "ppl_with_gates": with_gates}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"perplexity on {data.tokens} tokens of {args.data}: without gates {without:.4f}, "
              f"with gates {with_gates:.4f} ({100 * (with_gates / without - 1):+.2f}%)")
    return 0


# ---------------------------------------------------------------- show
def cmd_show(args) -> int:
    from safetensors.numpy import load_file

    from surgeon.core.donor import open_donor
    from surgeon.core.gates_sidecar import (
        GATES_FILE,
        gate_layer_of,
        gate_type_of,
        hidden_size_of,
    )

    donor = open_donor(args.dir)  # validates the sidecar against the config
    path = donor.path / GATES_FILE
    if not path.is_file():
        raise SurgeonError(f"{donor.path}: has no {GATES_FILE}")
    hidden = hidden_size_of(donor.config, str(donor.path))
    meta = dict(donor.shards[GATES_FILE].metadata)
    rows = []
    for name, arr in sorted(load_file(str(path)).items(), key=lambda kv: gate_layer_of(kv[0])):
        a = arr.astype("float64")
        rows.append({"layer": gate_layer_of(name), "type": gate_type_of(arr.shape, hidden, name),
                     "parameters": int(a.size), "mean": float(a.mean()), "max_abs": float(abs(a).max())})
    for key in ("added", "origin", "training", "selection"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    if args.json:
        print(json.dumps({"path": str(path), "gates": rows, "metadata": meta}, indent=2))
        return 0
    print(f"{path}  (format {meta.get('format_version')}, hidden size {hidden})")
    print(f"{'layer':>5}  {'type':<7}{'parameters':>11}{'mean':>12}{'max |w|':>12}")
    for r in rows:
        print(f"{r['layer']:>5}  {r['type']:<7}{r['parameters']:>11,}{r['mean']:>12.5f}{r['max_abs']:>12.5f}")
    if "training" in meta:
        t = meta["training"]
        print(f"  trained {t['settings']['steps']} steps; loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}")
    if "selection" in meta:
        s = meta["selection"]
        print(f"  selection kept layer(s) {s['kept']}, dropped {s['dropped']}")
    return 0

"""`moe-surgeon gates`: Self-MoE layer gates (docs/references.md) on a checkpoint: add, train, select, eval, show.

A gated checkpoint is an ordinary one plus `layer_gates.safetensors` (surgeon/core/gates_sidecar.py).
The use cases are `surgeon.features.gates.run`; this file parses and prints.
Gates move between checkpoints like any component, through a plan: `export OUT --base X
--take layer_gate@2-3=GATED_DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.cli.options import DTYPES, out_of_memory_is_an_error

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
    p.add_argument("--dtype", default="keep", choices=DTYPES,
                   help="compute dtype of the model (the gates are float32 always)")
    p.add_argument("--json", action="store_true")


def _data(args, source: str):
    from surgeon.features.gates.run import DataSpec

    return DataSpec(source, args.seq_len, args.unit, args.template)


def _job(label: str, enabled: bool = True):
    """The progress printer and the ctrl+c token of a long subcommand."""
    from surgeon.cli.progress import StepPrinter
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    return (StepPrinter(label) if enabled else None), cancel_on_interrupt(CancelToken())


class _device_label:
    """The device an out-of-memory message names, found only when one is printed: importing torch to
    find the default would delay the cheap refusals that come first."""

    def __init__(self, args):
        self.device = args.device

    def __str__(self) -> str:
        from surgeon.live.devices import default_device

        return str(self.device or default_device())


# ---------------------------------------------------------------- add
def cmd_add(args) -> int:
    from surgeon.core.gates_sidecar import GATES_FILE
    from surgeon.core.plan import format_ranges
    from surgeon.features.gates.run import run_add

    record = run_add(args.base, args.out, args.gate_type, args.layers, force=args.force)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        layers = record["layers"]
        print(f"wrote {record['path']} with {len(layers)} zero {args.gate_type} gate(s) on layer(s) "
              f"{format_ranges(layers)} ({record['gate_parameters']:,} gate parameters) in {GATES_FILE}")
        print("  plain transformers ignores the gates; surgeon.live.loader.load_gated runs them")
    return 0


# ---------------------------------------------------------------- train
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
    from surgeon.core.gates_sidecar import GATES_FILE
    from surgeon.features.gates.run import TRAINING_LOG, run_train
    from surgeon.features.gates.train import TrainSettings

    settings = TrainSettings(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
                             seq_len=args.seq_len, seed=args.seed)
    progress, interrupt = _job("train", not args.json)
    with interrupt as token, out_of_memory_is_an_error(_device_label(args)):
        run = run_train(args.dir, _data(args, args.data), settings, held_out=args.eval, device=args.device,
                        dtype=args.dtype, progress=progress, cancel=token)
    if args.json:
        print(json.dumps({"path": str(run.directory), **run.log}, indent=2))
        return 0
    result, s = run.result, run.result.summary()
    print(f"trained the gates of {run.directory} for {settings.steps} steps in {result.seconds:.1f}s on {run.device} "
          f"({result.sequences} sequences of up to {settings.seq_len + 1} tokens, {run.tokens} scored tokens, "
          f"batch {settings.batch_size}, lr {settings.lr:g}, warm-up {settings.warmup}, seed {settings.seed})")
    print(f"  loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean of the first and last 10 steps)")
    print(f"  loss curve  {sparkline(result.losses)}")
    if result.eval_before is not None:
        change = 100 * (result.eval_after / result.eval_before - 1)
        print(f"  held-out perplexity {result.eval_before:.4f} -> {result.eval_after:.4f} ({change:+.2f}%)")
    print(f"  wrote {run.directory / GATES_FILE} and {TRAINING_LOG} (every step's loss)")
    return 0


# ---------------------------------------------------------------- select
def cmd_select(args) -> int:
    from surgeon.core.gates_sidecar import GATES_FILE
    from surgeon.core.plan import format_ranges
    from surgeon.features.gates.run import run_select

    progress, interrupt = _job("select", not args.json)
    with interrupt as token, out_of_memory_is_an_error(_device_label(args)):
        sel, record = run_select(args.dir, _data(args, args.data), batch_size=args.batch_size,
                                 min_gain=args.min_gain, dry_run=args.dry_run, device=args.device, dtype=args.dtype,
                                 progress=progress, cancel=token)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    directory = Path(record["path"])
    print(f"per-layer logit-lens perplexity on {sel.tokens} calibration tokens ({record['device']}, {args.dtype})")
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
    from surgeon.features.gates.run import run_eval

    _, interrupt = _job("eval", False)
    with interrupt as token, out_of_memory_is_an_error(_device_label(args)):
        record = run_eval(args.dir, _data(args, args.data), batch_size=args.batch_size, device=args.device,
                          dtype=args.dtype, cancel=token)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        without, with_gates = record["ppl_without_gates"], record["ppl_with_gates"]
        print(f"perplexity on {record['tokens']} tokens of {args.data}: without gates {without:.4f}, "
              f"with gates {with_gates:.4f} ({100 * (with_gates / without - 1):+.2f}%)")
    return 0


# ---------------------------------------------------------------- show
def cmd_show(args) -> int:
    from surgeon.features.gates.run import gates_report

    report = gates_report(args.dir)
    path, hidden, rows, meta = report["path"], report["hidden_size"], report["gates"], report["metadata"]
    if args.json:
        print(json.dumps({"path": path, "gates": rows, "metadata": meta}, indent=2))
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

"""`moe-surgeon probe`: measure a session's hybrid against its donors, or one checkpoint."""

from __future__ import annotations

import json
import shutil

from surgeon.cli.options import (
    add_model_options,
    out_of_memory_is_an_error,
)
from surgeon.cli.progress import StepPrinter, note_loading
from surgeon.errors import SurgeonError
from surgeon.jobs import CancelToken, cancel_on_interrupt


def _vs_text(vs: dict) -> str:
    """One line per donor: a cell of short lines never needs rich to wrap it."""
    from surgeon.probes.stats import significance_stars

    return "\n".join(
        f"{name.split(':')[1]}: {100 * v['delta']:+.1f} p={v['mcnemar_p']:.3g}{significance_stars(v['mcnemar_p'])}"
        f" z={v['z_p']:.3g}"
        for name, v in vs.items()
    )


def _print_probe_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from surgeon.probes import metric_of, short_label

    headers = ("model", "probe", "n", "score", "95% CI", "vs donors (delta, McNemar p, z p)")
    table = Table(show_edge=False, header_style="bold")
    for col in headers:
        table.add_column(col, justify="right" if col in ("n", "score") else "left", no_wrap=True)
    lines = []
    for r in rows:
        metric = metric_of(r["metric"])
        # The file's name, not its path, and the metric by lm-eval's name (acc, exact_match,flexible-extract)
        lines.append((r["model"], f"{short_label(r['probe'])} ({r['metric']})", str(r["n"]),
                      metric.score_text(r["score"]), metric.ci_text(*r["ci"]), _vs_text(r["vs"])))
        for name, e in r.get("extra", {}).items():  # acc_norm and the like, on rows of their own under it
            lines.append(("", f"  {name}", str(r["n"]), metric.score_text(e["score"]), metric.ci_text(*e["ci"]),
                          _vs_text(e.get("vs", {}))))
    for line in lines:
        table.add_row(*line)
    # Wide enough for every cell: a probe label is what a reader looks a row up by, and a cut one
    # (or a cut p-value) misleads; a terminal narrower than that wraps the lines instead.
    cells = [max(len(part) for part in text.split("\n")) for text in headers]
    for line in lines:
        cells = [max(w, *(len(part) for part in text.split("\n"))) for w, text in zip(cells, line)]
    Console(width=max(120, shutil.get_terminal_size().columns, sum(cells) + 3 * len(cells))).print(table)


def _named(records: list[dict], name: str) -> list[dict]:
    """A checkpoint probed on its own is called by its name, not "hybrid" (which sessions keep)."""
    return [{**r, "model": name} if r["model"] == "hybrid" else r for r in records]


def _json_rows(rows: list[dict], records: list[dict]) -> list[dict]:
    """summarize() rows (one per record, in order) with each record's per-item outcomes."""
    out = []
    for row, r in zip(rows, records, strict=True):
        row = {**row, "ids": r["ids"], "outcomes": r["outcomes"]}
        if "forward" in r:  # whose forward pass computed it: "native" (ours) or "transformers"
            row["forward"] = r["forward"]
        if "extra" in row:
            row["extra"] = {k: {**v, "outcomes": r["extra"][k]["outcomes"]} for k, v in row["extra"].items()}
        out.append(row)
    return out


def _open_probe_target(target: str, allow_pickle: bool):
    """A session file (hybrid vs its donors) or a checkpoint directory (that model alone)."""
    from surgeon.core.session import open_target

    return open_target(target, "probe", allow_pickle=allow_pickle)


TRUST_HELP = ("let lm-eval task YAMLs run the Python they carry (!function, a dataset's trust_remote_code, an HF "
              "evaluate metric), like transformers' trust_remote_code; without it such a task is refused")


def add_trust_option(p) -> None:
    p.add_argument("--trust-task-code", action="store_true", help=TRUST_HELP)


def record_trust(session, specs, args) -> None:
    """Mark `session` as having run task code when this run trusted a task that carries some, so a
    replay asks for --trust-task-code again (the flag itself is never recorded in a probe)."""
    from surgeon.probes import task_code

    if args.trust_task_code and any(task_code(s) for s in specs):
        session.trust_task_code = True


def check_replay_trust(session, args) -> None:
    """Before anything is read or run: a session whose probes ran task code replays only when trusted again."""
    if session.trust_task_code and not args.trust_task_code:
        raise SurgeonError(f"{args.session}: the session's probes ran code their lm-eval tasks carry; "
                           "pass --trust-task-code to run it again")


def cmd_probe(args) -> int:
    from surgeon.probes import PROBES, parse_probe, spec_from_json, trusting

    if args.list:
        from surgeon.probes.data import builtin_sets

        print("probes:")
        width = max(map(len, PROBES)) + 2  # `lmeval` is six letters: a fixed 6 ran it into its text
        for name, text in PROBES.items():
            print(f"  {name:<{width}}{text}")
        print("built-in probe sets (use as DATA, e.g. em:arith):")
        for name, path in builtin_sets().items():
            print(f"  {name:<14}{path}")
        return 0
    if not args.target:
        raise SurgeonError("probe: give a SESSION or DIR (or --list)")
    session, donors, plan = _open_probe_target(args.target, args.allow_pickle)
    specs = [parse_probe(p) for p in args.probe]
    if not specs and session is not None:
        specs = [spec_from_json(p) for p in session.probes]
    specs = trusting(specs, args.trust_task_code)
    if not specs:
        raise SurgeonError("probe: no --probe given and the session records none (see probe --list)")
    if args.samples:
        from surgeon.io.fs import check_writable

        check_writable(args.samples, "write the samples")  # now, not after the run
    from surgeon.features.probe import ProbeRequest, check_probe_data, run_probe, start_reading

    check_probe_data(specs)  # a bad probe file is refused before a line says that a model loads
    alone = None if session is not None else donors["A"].path.resolve().name
    note_loading("probe", alone or "the hybrid", donors[plan.base])  # before torch's import, the first wait
    # What the load reads is read while torch imports, into the weights themselves on the CPU.
    preload = start_reading(plan, donors, specs, args.device, args.dtype)
    from surgeon.live.devices import default_device
    from surgeon.probes.run import record_probe_results, summarize

    device = args.device or default_device()
    request = ProbeRequest(plan, donors, specs, device=device, dtype=args.dtype, batch_size=args.batch_size,
                           compare_donors=session is not None and not args.no_donors,
                           keep_samples=bool(args.samples), shown_as=alone or "hybrid",
                           preload=preload if device == "cpu" else None)
    with out_of_memory_is_an_error(device), cancel_on_interrupt(CancelToken()) as cancel:
        records = run_probe(request, progress=StepPrinter("probe"), cancel=cancel).records
    if session is not None and not args.no_save:
        from surgeon.core.session import record_full_hashes, save_session

        record_probe_results(session, specs, records)
        record_trust(session, specs, args)
        record_full_hashes(session, donors, progress=StepPrinter("hashing donors"))  # upgrades an old session
        save_session(session, args.target)
    if alone:
        records = _named(records, alone)
    if args.samples:
        from surgeon.probes.run import write_samples

        write_samples(args.samples, records)
    rows = summarize(records)
    if args.json:
        print(json.dumps({"device": device, "dtype": args.dtype, "results": _json_rows(rows, records)}, indent=2))
    else:
        _print_probe_table(rows)
    return 0


def _where(record: dict) -> str:
    """The device, and on the CPU the kernel of its float32 linears (older records do not say)."""
    kernel = record.get("cpu_linears")
    return f"{record['device']} ({kernel} linears)" if kernel else record["device"]


def replay_probes(session, donors, args) -> int:
    """Re-run the recorded hybrid probes; report every per-item difference from the recording."""
    from surgeon.features.probe import ProbeRequest, run_probe
    from surgeon.live.devices import default_device
    from surgeon.probes import spec_from_json, trusting

    check_replay_trust(session, args)
    recorded = {}
    for r in session.results:
        if r.get("model") == "hybrid" and "vs" not in r:
            recorded[r["label"]] = r  # the latest run of each probe
    if not recorded:
        raise SurgeonError(f"{args.session}: the session records no hybrid probe results to replay")
    device = args.device or default_device()
    specs = trusting([spec_from_json(r["probe"]) for r in recorded.values()], args.trust_task_code)
    dtypes = {r["dtype"] for r in recorded.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else args.dtype
    request = ProbeRequest(session.plan, donors, specs, device=device, dtype=dtype,
                           batch_size=next(iter(recorded.values()))["batch_size"], compare_donors=False)
    with cancel_on_interrupt(CancelToken()) as cancel:
        fresh = run_probe(request, progress=StepPrinter("replay"), cancel=cancel).records
    differences = []
    for new in fresh:
        old = recorded[new["label"]]
        before = dict(zip(old["ids"], old["outcomes"]))
        for item, value in zip(new["ids"], new["outcomes"]):
            if before.get(item) != value:
                differences.append({"probe": new["label"], "item": item, "recorded": before.get(item), "now": value})
        devices = f"recorded on {_where(old)}, replayed on {_where(new)}"
        if not args.json:
            print(f"{new['label']}: {new['n']} items, score {new['score']:.4f} (recorded {old['score']:.4f}); {devices}")
    if args.json:
        print(json.dumps({"differences": differences}, indent=2))
    else:
        for d in differences:
            print(f"  {d['probe']} item {d['item']}: recorded {d['recorded']}, now {d['now']}")
        print(f"{len(differences)} per-item difference(s) from the recording")
    return 1 if differences else 0


def register(sub) -> None:
    p = sub.add_parser("probe", help="measure a session's hybrid against its donors, or one checkpoint")
    p.add_argument("target", nargs="?", metavar="SESSION_OR_DIR")
    p.add_argument("--probe", action="append", default=[], metavar="KIND:DATA[,key=value...]",
                   help="e.g. em:arith, mc:arith_mc,limit=100, ppl:corpus.txt; repeatable")
    p.add_argument("--list", action="store_true", help="list the probes and the built-in probe sets")
    add_model_options(p)
    p.add_argument("--no-donors", action="store_true", help="probe the hybrid only")
    p.add_argument("--no-save", action="store_true", help="do not record results in the session")
    p.add_argument("--samples", metavar="FILE",
                   help="write every item's prompt, answers and outcome as JSONL (lm-eval's --log_samples "
                        "fields), one line per item per model and probe")
    p.add_argument("--json", action="store_true", help="print the results with their per-item outcomes as JSON")
    add_trust_option(p)
    p.set_defaults(func=cmd_probe)

"""`moe-surgeon probe`: measure a session's hybrid against its donors, or one checkpoint."""

from __future__ import annotations

import json
import shutil

from surgeon.cli.options import (
    add_model_options,
    out_of_memory_is_an_error,
)
from surgeon.cli.progress import StepPrinter
from surgeon.errors import SurgeonError
from surgeon.jobs import CancelToken, cancel_on_interrupt


def _print_probe_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from surgeon.probes import metric_of
    from surgeon.probes.stats import significance_stars

    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "probe", "n", "score", "95% CI", "vs donors (delta, McNemar p, z p)"):
        table.add_column(col, justify="right" if col in ("n", "score") else "left")
    for r in rows:
        metric = metric_of(r["metric"])
        score, ci = metric.score_text(r["score"]), metric.ci_text(*r["ci"])
        vs = "  ".join(
            f"{name.split(':')[1]}: {100 * v['delta']:+.1f} p={v['mcnemar_p']:.3g}{significance_stars(v['mcnemar_p'])}"
            f" z={v['z_p']:.3g}"
            for name, v in r["vs"].items()
        )
        table.add_row(r["model"], r["probe"] + ("" if metric.proportion else f" ({metric.name})"),
                      str(r["n"]), score, ci, vs)
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


def _open_probe_target(target: str, allow_pickle: bool):
    """A session file (hybrid vs its donors) or a checkpoint directory (that model alone)."""
    from surgeon.core.session import open_target

    return open_target(target, "probe", allow_pickle=allow_pickle)


def cmd_probe(args) -> int:
    from surgeon.probes import PROBES, parse_probe, spec_from_json

    if args.list:
        from surgeon.probes.data import builtin_sets

        print("probes:")
        for name, text in PROBES.items():
            print(f"  {name:<6}{text}")
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
    if not specs:
        raise SurgeonError("probe: no --probe given and the session records none (see probe --list)")
    from surgeon.live.devices import default_device
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes.run import (
        load_probe_data,
        record_probe_results,
        run_probes,
        summarize,
    )

    for s in specs:
        load_probe_data(s)  # refuse bad probe data before loading any model
    device = args.device or default_device()
    hybrid = Hybrid.materialize(plan, donors, device=device, dtype=args.dtype)
    with out_of_memory_is_an_error(device), cancel_on_interrupt(CancelToken()) as cancel:
        records = run_probes(hybrid, plan, specs, device=device, dtype=args.dtype, batch_size=args.batch_size,
                             compare_donors=session is not None and not args.no_donors,
                             progress=StepPrinter("probe"), cancel=cancel)
    if session is not None and not args.no_save:
        from surgeon.core.session import record_full_hashes, save_session

        record_probe_results(session, specs, records)
        record_full_hashes(session, donors, progress=StepPrinter("hashing donors"))  # upgrades an old session
        save_session(session, args.target)
    rows = summarize(records)
    if args.json:
        print(json.dumps({"device": device, "dtype": args.dtype, "results": rows}, indent=2))
    else:
        _print_probe_table(rows)
    return 0


def replay_probes(session, donors, args) -> int:
    """Re-run the recorded hybrid probes; report every per-item difference from the recording."""
    from surgeon.live.devices import default_device
    from surgeon.live.hybrid import Hybrid
    from surgeon.probes import spec_from_json
    from surgeon.probes.run import run_probes

    recorded = {}
    for r in session.results:
        if r.get("model") == "hybrid" and "vs" not in r:
            recorded[r["label"]] = r  # the latest run of each probe
    if not recorded:
        raise SurgeonError(f"{args.session}: the session records no hybrid probe results to replay")
    device = args.device or default_device()
    specs = [spec_from_json(r["probe"]) for r in recorded.values()]
    dtypes = {r["dtype"] for r in recorded.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else args.dtype
    hybrid = Hybrid.materialize(session.plan, donors, device=device, dtype=dtype)
    with cancel_on_interrupt(CancelToken()) as cancel:
        fresh = run_probes(hybrid, session.plan, specs, device=device, dtype=dtype,
                           batch_size=next(iter(recorded.values()))["batch_size"], compare_donors=False,
                           progress=StepPrinter("replay"), cancel=cancel)
    differences = []
    for new in fresh:
        old = recorded[new["label"]]
        before = dict(zip(old["ids"], old["outcomes"]))
        for item, value in zip(new["ids"], new["outcomes"]):
            if before.get(item) != value:
                differences.append({"probe": new["label"], "item": item, "recorded": before.get(item), "now": value})
        devices = f"recorded on {old['device']}, replayed on {device}"
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

"""`moe-surgeon probe`: measure a session's hybrid against its donors, or one checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from surgeon.cli.options import (
    add_model_options,
    out_of_memory_is_an_error,
)
from surgeon.errors import SurgeonError


def _print_probe_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from surgeon.probes.stats import significance_stars

    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "probe", "n", "score", "95% CI", "vs donors (delta, McNemar p, z p)"):
        table.add_column(col, justify="right" if col in ("n", "score") else "left")
    for r in rows:
        score = f"{100 * r['score']:.1f}%" if r["metric"] == "accuracy" else f"{r['score']:.3f}"
        ci = (f"[{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]" if r["metric"] == "accuracy"
              else f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
        vs = "  ".join(
            f"{name.split(':')[1]}: {100 * v['delta']:+.1f} p={v['mcnemar_p']:.3g}{significance_stars(v['mcnemar_p'])}"
            f" z={v['z_p']:.3g}"
            for name, v in r["vs"].items()
        )
        table.add_row(r["model"], r["probe"] + (f" ({r['metric']})" if r["metric"] != "accuracy" else ""),
                      str(r["n"]), score, ci, vs)
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


def _probe_progress(json_out: bool):
    if not sys.stderr.isatty():
        return None
    t0 = time.perf_counter()

    def report(label: str, done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"\r{label}: {done}/{total}  {rate:.1f}/s ", end="" if done < total else "\n", file=sys.stderr)

    return report


def _open_probe_target(target: str, allow_pickle: bool):
    """A session file (hybrid vs its donors) or a checkpoint directory (that model alone)."""
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan
    from surgeon.core.session import (
        load_session,
        open_session_donors,
        refuse_mix_session,
    )

    if Path(target).is_file():
        session = load_session(target)
        refuse_mix_session(session, target, "probe")
        return session, open_session_donors(session, target, allow_pickle=allow_pickle), session.plan
    donor = open_donor(target, allow_pickle=allow_pickle)
    return None, {"A": donor}, Plan("A")


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
    from surgeon.live.hybrid import Hybrid, default_device
    from surgeon.probes.run import load_probe_data, run_probes, summarize

    for s in specs:
        load_probe_data(s)  # refuse bad probe data before loading any model
    device = args.device or default_device()
    hybrid = Hybrid.materialize(plan, donors, device=device, dtype=args.dtype)
    with out_of_memory_is_an_error(device):
        records = run_probes(hybrid, plan, specs, device=device, dtype=args.dtype, batch_size=args.batch_size,
                             compare_donors=session is not None and not args.no_donors,
                             progress=_probe_progress(args.json))
    if session is not None and not args.no_save:
        from surgeon.core.session import save_session

        for s in specs:
            if s.to_json() not in session.probes:
                session.probes.append(s.to_json())
        session.results.extend(records)
        save_session(session, args.target)
    rows = summarize(records)
    if args.json:
        print(json.dumps({"device": device, "dtype": args.dtype, "results": rows}, indent=2))
    else:
        _print_probe_table(rows)
    return 0


def replay_probes(session, donors, args) -> int:
    """Re-run the recorded hybrid probes; report every per-item difference from the recording."""
    from surgeon.live.hybrid import Hybrid, default_device
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
    fresh = run_probes(hybrid, session.plan, specs, device=device, dtype=dtype,
                       batch_size=next(iter(recorded.values()))["batch_size"], compare_donors=False)
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

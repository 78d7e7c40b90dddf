"""The `moe-surgeon` command line.

Every subcommand imports only what it needs: `inspect`, `export` and `replay` never import torch
or transformers unless a dtype conversion (or a pickle donor) requires it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .cli_options import add_model_options, out_of_memory_is_an_error
from .errors import SurgeonError
from .sizes import human_bytes

SUBCOMMANDS = ("inspect", "export", "replay", "demo", "probe", "sweep", "distance", "routing", "compress", "mix", "gates")
DONOR_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _warn(msg: str) -> None:
    print(f"moe-surgeon: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- inspect
def inspect_summary(donor, verify: bool = False) -> dict:
    from .anatomy import parameters_by_kind

    anatomy = donor.anatomy
    numel = {n: t.numel for n, t in donor.tensors.items()}
    summary = {
        "path": str(donor.path),
        "model_type": donor.model_type,
        "architecture_known": anatomy.known,
        "architectures": donor.config.get("architectures", []),
        "layers": anatomy.num_layers,
        "experts_per_layer": {str(k): v for k, v in anatomy.experts_per_layer.items()},
        "experts": anatomy.num_experts,
        "tied_embeddings": donor.tied_embeddings,
        "dtype": donor.dtype,
        "tensors": len(donor.tensors),
        "parameters": donor.num_parameters,
        "parameters_by_kind": parameters_by_kind(anatomy, numel),
        "bytes": donor.total_bytes,
        "shards": len(donor.shards),
        "fingerprint": donor.fingerprint,
        "unclassified": anatomy.unclassified,
    }
    if verify:
        summary["content_hash"] = donor.content_hash()
    return summary


def cmd_inspect(args) -> int:
    from .donor import open_donor

    donor = open_donor(args.dir, allow_pickle=args.allow_pickle)
    s = inspect_summary(donor, verify=args.verify)
    if not s["architecture_known"]:
        _warn(f"{donor.path}: model_type {donor.model_type!r} has no architecture table; components inferred from names")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    experts = sorted(set(s["experts_per_layer"].values()))
    moe_layers = len(s["experts_per_layer"])
    print(f"{s['path']}")
    print(f"  architecture  {s['model_type']} ({', '.join(s['architectures']) or 'no architectures field'})")
    print(f"  layers        {s['layers']}" + (f" ({moe_layers} MoE)" if moe_layers and moe_layers != s["layers"] else ""))
    print(f"  experts       {', '.join(map(str, experts)) or 'none (dense)'} per layer")
    print(f"  dtype         {s['dtype']}")
    print(f"  parameters    {s['parameters']:,} in {s['tensors']} tensors, {human_bytes(s['bytes'])} in {s['shards']} shard(s)")
    for kind, n in sorted(s["parameters_by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"    {kind:<14}{n:>16,}  {100 * n / max(1, s['parameters']):5.1f}%")
    if s["tied_embeddings"]:
        print("  lm_head       tied to the embedding")
    print(f"  fingerprint   {s['fingerprint']}")
    if "content_hash" in s:
        print(f"  content hash  {s['content_hash']}")
    if s["unclassified"]:
        print(f"  unclassified  {len(s['unclassified'])} tensor(s), always taken from the base:")
        for n in s["unclassified"]:
            print(f"    {n}")
    return 0


# ---------------------------------------------------------------- export
def _open_plan_donors(base_dir: str, takes: list[str], allow_pickle: bool):
    from .donor import open_donor
    from .plan import Plan, parse_spec

    donors = {}
    by_path = {}

    def name_for(path: str) -> str:
        donor = open_donor(path, allow_pickle=allow_pickle)
        key = donor.path.resolve()
        if key not in by_path:
            name = DONOR_LETTERS[len(donors)]
            donors[name] = donor
            by_path[key] = name
        return by_path[key]

    base = name_for(base_dir)
    assignments = []
    for take in takes:
        spec, sep, path = take.rpartition("=")
        if not sep or not spec or not path:
            raise SurgeonError(f"--take {take!r}: expected SPEC=DIR, e.g. experts@0-7=/path/to/donor")
        assignments.append(parse_spec(spec, name_for(path)))
    return Plan(base, assignments), donors


def progress_printer(label: str):
    if not sys.stderr.isatty():
        return None
    state = {"t0": time.perf_counter(), "last": 0.0}

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - state["last"] < 0.2 and done < total:
            return
        state["last"] = now
        rate = done / max(now - state["t0"], 1e-9)
        eta = (total - done) / rate if rate else 0
        print(f"\r{label}: {100 * done / max(total, 1):5.1f}%  {human_bytes(done)} of {human_bytes(total)}"
              f"  {human_bytes(rate)}/s  ETA {eta:4.0f}s", end="" if done < total else "\n", file=sys.stderr)

    return report


def _run_export(plan, donors, out, args, session_path=None, session=None) -> int:
    from .export import export_hybrid
    from .sizes import parse_size
    from .resolve import resolve
    from .session import make_session, save_session

    resolution = resolve(plan, donors, dtype=args.dtype)
    for w in resolution.warnings:
        _warn(w)
    max_shard = parse_size(args.max_shard_size)
    if session is None:
        session = make_session(plan, donors, session_path)
    embedded = make_session(plan, donors, None).to_json()
    result = export_hybrid(
        resolution, donors, out, dtype=args.dtype, max_shard_size=max_shard, force=args.force,
        session_json=embedded, progress=progress_printer("export"), fsync=args.fsync,
    )
    record = {
        "path": str(result.path), "dtype": args.dtype, "max_shard_size": max_shard,
        "shards": len(result.shards), "tensors": result.tensors, "bytes": result.bytes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if session_path:
        session.exports.append(record)
        save_session(session, session_path)
    params = resolution.parameters_by_donor()
    total = sum(params.values()) or 1
    shares = {name: params.get(name, 0) / total for name in donors}
    if args.json:
        print(json.dumps({**record, "seconds": result.seconds, "changed_tensors": len(resolution.changed()),
                          "share_by_donor": shares}, indent=2))
    else:
        print(f"exported {result.tensors} tensors ({human_bytes(result.bytes)}) in {len(result.shards)} shard(s) "
              f"to {result.path} in {result.seconds:.2f}s")
        print(f"  {len(resolution.changed())} tensors from donors other than the base")
        for name, d in donors.items():
            print(f"  {name} {100 * shares[name]:6.2f}% of parameters  {d.path}")
    return 0


def cmd_export(args) -> int:
    plan, donors = _open_plan_donors(args.base, args.take, args.allow_pickle)
    return _run_export(plan, donors, args.out, args, session_path=args.save_session)


# ---------------------------------------------------------------- replay
def cmd_replay(args) -> int:
    from .resolve import resolve
    from .session import load_session, open_session_donors

    session = load_session(args.session)
    donors = open_session_donors(
        session, args.session, ignore_fingerprints=args.ignore_fingerprints, verify=args.verify,
        allow_pickle=args.allow_pickle,
    )
    # --- mix session step (surgeon/mix_build.py): its export is rebuilt by the mix command's code
    if "mix" in session.extensions:
        from .mix_cli import replay_mix

        return replay_mix(session, donors, args)
    # --- end mix
    if args.probes:
        return replay_probes(session, donors, args)
    if args.export:
        return _run_export(session.plan, donors, args.export, args, session_path=None, session=session)
    resolution = resolve(session.plan, donors, dtype=args.dtype)
    for w in resolution.warnings:
        _warn(w)
    summary = {"session": str(args.session), "donors": {n: str(d.path) for n, d in donors.items()},
               "fingerprints": "verified" if not args.ignore_fingerprints else "ignored",
               "tensors": len(resolution.sources), "changed_tensors": len(resolution.changed())}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.session}: {len(donors)} donor(s), fingerprints {summary['fingerprints']}, "
              f"{summary['changed_tensors']} of {summary['tensors']} tensors from donors other than the base")
    return 0


# ---------------------------------------------------------------- probe
def _print_probe_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .stats import significance_stars

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
    from .donor import open_donor
    from .plan import Plan
    from .session import load_session, open_session_donors, refuse_mix_session

    if Path(target).is_file():
        session = load_session(target)
        refuse_mix_session(session, target, "probe")
        return session, open_session_donors(session, target, allow_pickle=allow_pickle), session.plan
    donor = open_donor(target, allow_pickle=allow_pickle)
    return None, {"A": donor}, Plan("A")


def cmd_probe(args) -> int:
    from .probes import PROBES, parse_probe, spec_from_json

    if args.list:
        from .probe_data import builtin_sets

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
    from .hybrid import Hybrid, default_device
    from .probe_run import load_probe_data, run_probes, summarize

    for s in specs:
        load_probe_data(s)  # refuse bad probe data before loading any model
    device = args.device or default_device()
    hybrid = Hybrid.materialize(plan, donors, device=device, dtype=args.dtype)
    with out_of_memory_is_an_error(device):
        records = run_probes(hybrid, plan, specs, device=device, dtype=args.dtype, batch_size=args.batch_size,
                             compare_donors=session is not None and not args.no_donors,
                             progress=_probe_progress(args.json))
    if session is not None and not args.no_save:
        from .session import save_session

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
    from .hybrid import Hybrid, default_device
    from .probe_run import run_probes
    from .probes import spec_from_json

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


# ---------------------------------------------------------------- distance
def cmd_distance(args) -> int:
    """Relative L2 distance of DONOR from BASE per layer and component (the TUI's distance map)."""
    from .architectures import GLOBAL_KINDS, LAYER_KINDS
    from .distance import DistanceCache, distance_map
    from .donor import open_donor

    base, donor = open_donor(args.base), open_donor(args.donor)
    if base.model_type != donor.model_type:
        raise SurgeonError(f"{donor.path} is {donor.model_type}, {base.path} is {base.model_type}")
    cells = dict(distance_map(base, donor, DistanceCache()))
    if args.json:
        out = {"base": str(base.path), "donor": str(donor.path), "cells": [
            {"layer": layer, "component": kind, "distance": value} for (layer, kind), value in cells.items()]}
        print(json.dumps(out, indent=2))
        return 0
    kinds = [k for k in LAYER_KINDS if any(kind == k for _, kind in cells)]
    print(f"relative L2 distance of {donor.path} from {base.path}")
    print("layer " + "".join(f"{k:>14}" for k in kinds))
    for layer in range(base.anatomy.num_layers):
        row = [cells.get((layer, k)) for k in kinds]
        print(f"{layer:>5} " + "".join(f"{v:>14.4f}" if v is not None else f"{'-':>14}" for v in row))
    print("globals " + "  ".join(f"{k} {cells[(None, k)]:.4f}" for k in GLOBAL_KINDS if (None, k) in cells))
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .donor import DEMO_ROOT

    names = sorted(p.name for p in DEMO_ROOT.iterdir() if p.is_dir()) if DEMO_ROOT.is_dir() else []
    if not names:
        raise SurgeonError(f"{DEMO_ROOT}: the demo donors are missing from this installation")
    paths = {}
    for n in names:
        if args.dir:
            dst = Path(args.dir) / n
            if dst.exists() and any(dst.iterdir()):
                raise SurgeonError(f"{dst}: exists and is not empty")
            shutil.copytree(DEMO_ROOT / n, dst, dirs_exist_ok=True)
            paths[n] = str(dst.resolve())
        else:
            paths[n] = str((DEMO_ROOT / n).resolve())
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        for n, p in paths.items():
            print(f"{n}\t{p}")
    return 0


# ---------------------------------------------------------------- parsers
def common_export_options(p) -> None:
    p.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"],
                   help="dtype of the written tensors (default keep; e_score_correction_bias stays fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--fsync", action="store_true", help="flush every shard to disk before the final rename")
    p.add_argument("--allow-pickle", action="store_true", help="load pickle-only donors with weights_only=True")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-surgeon", description="Mixture-of-Experts model surgery.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture, layers, experts, parameters and fingerprint of a checkpoint")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="also hash every byte of the weights")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a hybrid checkpoint")
    p.add_argument("out")
    p.add_argument("--base", required=True, help="the donor every tensor comes from unless taken")
    p.add_argument("--take", action="append", default=[], metavar="SPEC=DIR",
                   help="take component[@layers] from DIR; repeatable, later wins")
    p.add_argument("--save-session", metavar="FILE", help="also save the plan as a session file")
    common_export_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("replay", help="verify a session's donors, resolve its plan, optionally export")
    p.add_argument("session")
    p.add_argument("--export", metavar="OUT")
    p.add_argument("--ignore-fingerprints", action="store_true", help="replay even if a donor changed")
    p.add_argument("--verify", action="store_true", help="also compare full content hashes where recorded")
    p.add_argument("--probes", action="store_true",
                   help="re-run the recorded probes and report per-item differences (exit 1 if any)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    common_export_options(p)
    p.set_defaults(func=cmd_replay)

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

    p = sub.add_parser("demo", help="print (or copy into DIR) the built-in demo donors")
    p.add_argument("dir", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("distance", help="how far DONOR's weights are from BASE's, per layer and component")
    p.add_argument("base")
    p.add_argument("donor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_distance)

    from .sweep_cli import register as register_sweep  # the sweep's parser lives beside its command

    register_sweep(sub)
    from .routing_cli import register as register_routing

    register_routing(sub)
    from .compress_cli import register as register_compress
    from .gates_cli import register as register_gates
    from .mix_cli import register as register_mix

    register_compress(sub)
    register_mix(sub)
    register_gates(sub)
    return parser


def build_tui_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-surgeon",
        description="Mixture-of-Experts model surgery. With no subcommand, opens the workbench "
        f"(subcommands: {', '.join(SUBCOMMANDS)}; see moe-surgeon SUBCOMMAND --help).",
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="donor checkpoints (default: the demo donors)")
    parser.add_argument("--session", metavar="FILE", help="open a saved session")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in SUBCOMMANDS:
            args = build_parser().parse_args(argv)
            return args.func(args)
        args = build_tui_parser().parse_args(argv)
        from screens.app import run_app

        return run_app(args.dirs, args.session)
    except SurgeonError as e:
        print("moe-surgeon: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-surgeon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

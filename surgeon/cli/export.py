"""`moe-surgeon export` and `replay`: write a hybrid checkpoint; replay a session."""

from __future__ import annotations

import json
import sys

from surgeon.cli.options import (
    common_export_options,
)
from surgeon.cli.progress import StepPrinter, warn
from surgeon.cli.quick_exit import leave_quickly
from surgeon.io.dtypes import DTYPE_CHOICES
from surgeon.io.sizes import human_bytes
from surgeon.jobs import CancelToken, cancel_on_interrupt


def _open_plan_donors(base_dir: str, takes: list[str], allow_pickle: bool):
    from surgeon.core.donor import DonorsByPath
    from surgeon.core.plan import Plan, parse_take

    opened = DonorsByPath(allow_pickle=allow_pickle)
    base = opened.name_for(base_dir)
    assignments = [parse_take(take, opened.name_for) for take in takes]
    return Plan(base, assignments), opened.donors


def _run_export(plan, donors, out, args, session_path=None, replay=None) -> int:
    from surgeon.core.session import make_session
    from surgeon.features.export import ExportRequest, run_export
    from surgeon.io.sizes import parse_size

    request = ExportRequest(
        plan, donors, out, dtype=args.dtype, max_shard_size=parse_size(args.max_shard_size), force=args.force,
        fsync=args.fsync, session=make_session(plan, donors, session_path) if session_path else None,
        session_path=session_path, replay=replay,
    )
    with cancel_on_interrupt(CancelToken()) as token:
        outcome = run_export(request, progress=StepPrinter("export"), cancel=token, warn=warn)
    resolution, result = outcome.resolution, outcome.result
    params = resolution.parameters_by_donor()
    total = sum(params.values()) or 1
    shares = {name: params.get(name, 0) / total for name in donors}
    if args.json:
        print(json.dumps({**outcome.record.to_json(), "seconds": result.seconds,
                          "changed_tensors": len(resolution.changed()), "share_by_donor": shares}, indent=2))
    else:
        print(f"exported {result.tensors} tensors ({human_bytes(result.bytes)}) in {len(result.shards)} shard(s) "
              f"to {result.path} in {result.seconds:.2f}s")
        print(f"  {len(resolution.changed())} tensors from donors other than the base")
        for name, d in donors.items():
            print(f"  {name} {100 * shares[name]:6.2f}% of parameters  {d.path}")
    return 0


def cmd_export(args) -> int:
    plan, donors = _open_plan_donors(args.base, args.take, args.allow_pickle)
    code = _run_export(plan, donors, args.out, args, session_path=args.save_session)
    # Written, renamed into place and reported; its writer thread is joined and every file closed.
    # The interpreter's teardown would take 10-15 ms more of a 0.4 s export of 0.94 GB.
    leave_quickly()
    return code


# ---------------------------------------------------------------- replay
def check_replay_donors(session, donors, args):
    """Replay's proof that the donors are the session's: full hashes where the session has them."""
    from surgeon.core.session import DonorCheck, check_donor_contents

    if args.ignore_fingerprints:
        return DonorCheck(ignored=True)
    with cancel_on_interrupt(CancelToken()) as token:
        return check_donor_contents(session, donors, args.session, progress=StepPrinter("hashing donors"),
                                    cancel=token)


def _recipe_dtype(session) -> str | None:
    recipe = session.extensions.get("recipe")
    dtype = recipe.get("dtype") if isinstance(recipe, dict) else None
    return dtype if dtype in DTYPE_CHOICES else None


def cmd_replay(args) -> int:
    from surgeon.core.resolve import resolve
    from surgeon.core.session import load_session, open_session_donors

    session = load_session(args.session)
    if args.dtype is None:  # not given: what the session's recipe writes, else the donors' own
        args.dtype = _recipe_dtype(session) or "keep"
        if args.dtype != "keep" and args.export:
            print(f"moe-surgeon: writing {args.dtype}, as the mergekit recipe this session was imported from "
                  "does (--dtype keep writes the donors' own)", file=sys.stderr)
    if args.probes:
        from surgeon.cli.probe import check_replay_trust

        check_replay_trust(session, args)  # before the donors are opened and hashed
    donors = open_session_donors(
        session, args.session, ignore_fingerprints=args.ignore_fingerprints, allow_pickle=args.allow_pickle,
    )
    check = check_replay_donors(session, donors, args)
    # --- mix session step (surgeon/features/mix/build.py): its export is rebuilt by the mix command's code
    if "mix" in session.extensions:
        from surgeon.cli.mix import replay_mix

        return replay_mix(session, donors, args, check)
    # --- end mix
    if "prune" in session.extensions:  # a pruning or merging: rebuilt from its recorded choice
        from surgeon.cli.prune import replay_smaller

        return replay_smaller(session, donors, args, check)
    if args.probes or args.export:
        print(f"moe-surgeon: {check.line()}", file=sys.stderr)
    if args.probes:
        from surgeon.cli.probe import replay_probes

        return replay_probes(session, donors, args)
    if args.export:
        replay = {"session": str(args.session), "donors": check.status}
        return _run_export(session.plan, donors, args.export, args, replay=replay)
    resolution = resolve(session.plan, donors, dtype=args.dtype)
    for w in resolution.warnings:
        warn(w)
    summary = {"session": str(args.session), "donors": {n: str(d.path) for n, d in donors.items()},
               "fingerprints": check.status, "donor_check": check.line(),
               "tensors": len(resolution.sources), "changed_tensors": len(resolution.changed())}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.session}: {len(donors)} donor(s); {check.line()}; "
              f"{summary['changed_tensors']} of {summary['tensors']} tensors from donors other than the base")
    return 0


def register(sub) -> None:
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
    p.add_argument("--verify", action="store_true",
                   help="kept for old scripts: full content hashes are always checked where the session records them")
    p.add_argument("--probes", action="store_true",
                   help="re-run the recorded probes and report per-item differences (exit 1 if any)")
    from surgeon.cli.probe import add_trust_option

    add_trust_option(p)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    common_export_options(p)
    p.set_defaults(func=cmd_replay, dtype=None)  # None: the session's recipe dtype, else keep

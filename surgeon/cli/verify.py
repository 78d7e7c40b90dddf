"""`moe-surgeon verify`: re-check an export against its manifest (and, with --donors, its donors)."""

from __future__ import annotations

import json

from surgeon.cli.progress import StepPrinter
from surgeon.jobs import CancelToken, cancel_on_interrupt


def cmd_verify(args) -> int:
    from surgeon.features.verify import run_verify

    with cancel_on_interrupt(CancelToken()) as token:
        result = run_verify(args.out, donors=args.donors, allow_pickle=args.allow_pickle,
                            progress=None if args.json else StepPrinter("verify"), cancel=token)
    if args.json:
        print(json.dumps({"path": str(result.directory), "ok": result.ok, "problem": result.problem,
                          "shards": result.shards, "tensors": result.tensors,
                          "donor_tensors": result.donor_tensors, "converted": result.converted}, indent=2))
    elif result.ok:
        print(f"{result.directory}: verified: every byte of {result.shards} shard(s) and {result.tensors} tensors "
              "matches the manifest")
        if args.donors:
            print(f"  {result.donor_tensors} tensor(s) compared byte for byte with their donors' and equal"
                  + (f"; {result.converted} converted to another dtype, checked against the manifest only"
                     if result.converted else ""))
    else:
        print(f"moe-surgeon: verify: {result.problem}")
    return 0 if result.ok else 1


def register(sub) -> None:
    p = sub.add_parser("verify", help="re-check an export against its manifest, and with --donors against its donors")
    p.add_argument("out", metavar="OUT", help="an export directory (has moe-surgeon-manifest.json)")
    p.add_argument("--donors", action="store_true",
                   help="also compare every tensor with the donor bytes it was copied from")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

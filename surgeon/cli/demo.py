"""`moe-surgeon demo`: the built-in demo donors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from surgeon.errors import SurgeonError


def cmd_demo(args) -> int:
    from surgeon.core.donor import DEMO_ROOT

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


def register(sub) -> None:
    p = sub.add_parser("demo", help="print (or copy into DIR) the built-in demo donors")
    p.add_argument("dir", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

"""The `moe-surgeon` command line.

Every subcommand imports only what it needs: `inspect`, `export` and `replay` never import torch
or transformers unless a dtype conversion (or a pickle donor) requires it.
"""

from __future__ import annotations

import argparse
import os
import sys

from surgeon.errors import SurgeonError
from surgeon.jobs import Cancelled

SUBCOMMANDS = ("inspect", "export", "replay", "demo", "probe", "sweep", "distance", "routing", "compress", "mix", "gates")


# ---------------------------------------------------------------- parsers
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-surgeon", description="Mixture-of-Experts model surgery.")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each subcommand's parser lives beside its command; importing them imports no torch.
    from surgeon.cli import (
        compress,
        demo,
        distance,
        export,
        gates,
        inspect,
        mix,
        probe,
        routing,
        sweep,
    )

    for module in (inspect, export, probe, demo, distance, sweep, routing, compress, mix, gates):
        module.register(sub)
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
    except Cancelled:
        print("moe-surgeon: cancelled; what it had started to write was removed", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("moe-surgeon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

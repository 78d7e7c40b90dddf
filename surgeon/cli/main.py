"""The `moe-surgeon` command line.

Every subcommand imports only what it needs: `inspect`, `export` and `replay` never import torch
or transformers unless a dtype conversion (or a pickle donor) requires it.
"""

from __future__ import annotations

import argparse
import os
import sys

from surgeon.cli.quick_exit import finish
from surgeon.errors import SurgeonError
from surgeon.io.fs import error_line
from surgeon.jobs import Cancelled

# command -> the module in surgeon/cli/ whose register(sub) adds its parser (and runs it)
COMMANDS = {
    "inspect": "inspect", "export": "export", "replay": "export", "verify": "verify", "probe": "probe",
    "demo": "demo", "distance": "distance", "sweep": "sweep", "routing": "routing", "compress": "compress",
    "mix": "mix", "gates": "gates", "serve": "serve", "recipe": "recipe", "prune": "prune",
    "merge-experts": "merge_experts",
}
SUBCOMMANDS = tuple(COMMANDS)


# ---------------------------------------------------------------- parsers
class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error (argparse prints its usage block first),
    naming where the options are listed."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def printable(text: str) -> str:
    """`text` on one line, with control characters written as escapes: a path or a value the user
    gave may hold ANSI sequences or a NUL, which a terminal would act on rather than show."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser, or only `command`'s: a command starts without importing the
    modules (and the defaults they read from the features) of every other one."""
    import importlib

    parser = OneLineParser(prog="moe-surgeon", description="Mixture-of-Experts model surgery.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(f"surgeon.cli.{name}").register(sub)
    return parser


def build_tui_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moe-surgeon",
        description="Mixture-of-Experts model surgery. With no subcommand, opens the workbench "
        f"(subcommands: {', '.join(SUBCOMMANDS)}; see moe-surgeon SUBCOMMAND --help).",
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="donor checkpoints (default: the demo donors)")
    parser.add_argument("--session", metavar="FILE", help="open a saved session")
    return parser


def main(argv: list[str] | None = None) -> int:
    from surgeon.live.threads import configure_threads

    configure_threads()  # before anything imports torch: OpenMP reads its settings as it loads
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in SUBCOMMANDS:
            args = build_parser(argv[0]).parse_args(argv)
            return args.func(args)
        args = build_tui_parser().parse_args(argv)
        from screens.app import run_app

        return run_app(args.dirs, args.session)
    except SurgeonError as e:
        print("moe-surgeon: error: " + printable(error_line(e)), file=sys.stderr)
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
    except OSError as e:  # the last resort: a filesystem fault no engine boundary named is still one line
        print("moe-surgeon: error: " + printable(error_line(e)), file=sys.stderr)
        return 2


def entry() -> None:
    """The process's entry point (the `moe-surgeon` script, `python -m surgeon.cli`)."""
    finish(main())


if __name__ == "__main__":
    entry()

"""Print (or with --write, put into docs/families.md) the list of architectures, made from their
descriptions in surgeon/core/architectures.py: the page's list is never edited by hand."""

import argparse
import sys
from pathlib import Path

from surgeon.core.architectures import architecture_list_markdown

START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "families.md"


def with_list(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{architecture_list_markdown()}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the list inside docs/families.md")
    args = parser.parse_args()
    if not args.write:
        sys.stdout.write(architecture_list_markdown())
        return 0
    PAGE.write_text(with_list(PAGE.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

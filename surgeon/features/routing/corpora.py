"""The texts a routing probe reads: named corpora from built-in probe sets, .jsonl probe files or text files."""

from __future__ import annotations

from pathlib import Path

from surgeon.errors import SurgeonError

DEFAULT_CORPORA = ("arith", "reverse")  # the built-in demo domains: the CLI's default and the workbench's


def parse_corpus(arg: str) -> tuple[str, Path]:
    """NAME=FILE, or a bare set name or file (named after its stem)."""
    from surgeon.probes.data import resolve_set

    name, sep, where = arg.partition("=")
    if not sep:
        name, where = Path(arg).stem, arg
    if not name or not where:
        raise SurgeonError(f"--corpus {arg!r}: expected NAME=FILE")
    return name, resolve_set(where)


def corpus_texts(path: Path) -> list[str]:
    from surgeon.probes.data import load_items, load_text
    from surgeon.probes.prompts import item_text

    items = load_items(path) if path.suffix == ".jsonl" else load_text(path)
    return [item_text(i) for i in items]


def read_corpora(args, flag: str = "--corpus") -> dict[str, list[str]]:
    """name -> texts for every corpus argument (none: the default corpora); a name given twice is refused."""
    corpora: dict[str, list[str]] = {}
    for arg in args or DEFAULT_CORPORA:
        name, path = parse_corpus(arg)
        if name in corpora:
            raise SurgeonError(f"{flag} {arg!r}: corpus name {name!r} given twice")
        corpora[name] = corpus_texts(path)
    return corpora

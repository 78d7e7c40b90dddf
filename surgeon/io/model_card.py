"""The one model-card writer: the README.md every checkpoint moe-surgeon writes carries (export,
mix, compress). Each writer says what it did; the frame, the date and version line and the
provenance table of donors are written here, so the cards cannot drift apart.
"""

from __future__ import annotations

import time
from typing import Iterable

from surgeon import __version__

SESSION_FILE = "moe-surgeon-session.json"  # the session embedded in a checkpoint, which replays it
REPLAY_LINE = f"The session that made it is in `{SESSION_FILE}`; `moe-surgeon replay` rebuilds it."

# (heading, lines); a section without a heading continues the card as plain lines
Section = tuple[str | None, list[str]]


CARD_TAG = "moe-surgeon"  # the first tag of every card's front matter


def written_by_us(directory) -> bool:
    """Whether `directory` holds a checkpoint moe-surgeon wrote: its manifest, its embedded session, or
    a model card of ours. `--force` replaces only such a directory (nothing we did not write)."""
    from pathlib import Path

    from surgeon.io.manifest import MANIFEST_FILE

    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file() or (directory / SESSION_FILE).is_file():
        return True
    try:
        with open(directory / "README.md", encoding="utf-8", errors="replace") as f:
            head = f.read(200)
    except OSError:
        return False
    return head.startswith(f"---\ntags: [{CARD_TAG}")


def built_by() -> str:
    """The start of every card's first sentence; the writer says how it built the checkpoint."""
    return f"Built by moe-surgeon {__version__} on {time.strftime('%Y-%m-%d', time.gmtime())}"


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def provenance_table(donors: dict, base: str, percent: dict[str, float]) -> list[str]:
    """Where the weights came from: each donor (anything with path, model_type and fingerprint),
    which one is the base, and its share of the parameters in percent."""
    return table(
        ["name", "path", "model_type", "fingerprint", "share of parameters"],
        ([f"{name}{' (base)' if name == base else ''}", f"`{d.path}`", d.model_type, f"`{d.fingerprint}`",
          f"{percent.get(name, 0.0):.2f}%"] for name, d in donors.items()),
    )


def model_card(title: str, tags: list[str], summary: list[str], sections: Iterable[Section] = ()) -> str:
    """Front matter with `tags`, the title, the summary lines, then each section: a `## heading`
    between blank lines, or (heading None) its lines as they are."""
    lines = ["---", f"tags: [{', '.join(tags)}]", "---", f"# {title}", "", *summary]
    for heading, body in sections:
        if heading is not None:
            lines += ["", f"## {heading}", ""]
        lines += body
    return "\n".join(lines) + "\n"

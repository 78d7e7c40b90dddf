"""The files this process reads as sources (donor shards, configs, tokenizers), by real path: no write
of ours may replace one, and no directory we replace may hold one, however the path given reaches
it (a symlink to a donor's shard, a directory its shards link into, `..`). A write's own checks see
only the path; this is what they check it against."""

from __future__ import annotations

import os
from pathlib import Path

_SOURCES: dict[str, str] = {}  # real path -> what it is, for messages ("donor /m/A's model.safetensors")


def register_sources(paths, owner: str) -> None:
    """Remember `paths` (files of `owner`, e.g. "donor /m/A") as sources; links are followed."""
    for p in paths:
        try:
            real = os.path.realpath(p)
        except (OSError, ValueError):
            continue
        _SOURCES.setdefault(real, f"{owner}'s {Path(p).name}")


def source_at(path: str | os.PathLike) -> str | None:
    """What source file `path` is (after following links), or None."""
    try:
        return _SOURCES.get(os.path.realpath(path))
    except (OSError, ValueError):
        return None


def sources_under(directory: str | os.PathLike) -> list[str]:
    """The source files inside `directory` (after following links), as what they are."""
    try:
        root = os.path.realpath(directory)
    except (OSError, ValueError):
        return []
    prefix = root.rstrip(os.sep) + os.sep
    return [what for real, what in _SOURCES.items() if real.startswith(prefix)]

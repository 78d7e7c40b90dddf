"""The installed versions of Python distributions, as the records we write name them (an export's
manifest, a probe's result).

Read from each distribution's metadata file on sys.path, as `importlib.metadata.version` finds it
(the first match along sys.path; names compared normalised), without importing
`importlib.metadata`: that import (email, zipfile, socket, csv) and five lookups took 19-21 ms of a
0.4-0.5 s export on the 2-core machine the benches run on; this scan takes 1-3 ms. A name this scan cannot place (a zipped
egg, a finder of its own) is asked of `importlib.metadata` after all.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable

_SEPARATORS = re.compile(r"[-_.]+")
_METADATA_FILE = {"dist-info": "METADATA", "egg-info": "PKG-INFO"}


def _normalise(name: str) -> str:
    return _SEPARATORS.sub("_", name).lower()


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """{name: version} for each of `names` that is installed; an absent one is left out."""
    names = list(names)
    wanted = {_normalise(n) for n in names}
    found: dict[str, str | None] = {}  # None: the first metadata found has no Version header
    for entry in sys.path:
        if len(found) == len(wanted):
            break
        if not isinstance(entry, str):  # sys.path may hold bytes; importlib.metadata fails on them
            continue
        try:
            with os.scandir(entry or ".") as listing:
                for item in listing:
                    stem, _, kind = item.name.rpartition(".")
                    key = _normalise(stem.split("-", 1)[0]) if kind in _METADATA_FILE else None
                    if key in wanted and key not in found:
                        found[key] = _version_in(os.path.join(item.path, _METADATA_FILE[kind]))
        except OSError:  # a zip file, a directory gone or unreadable: importlib.metadata is asked below
            continue
    out = {}
    for name in names:
        version = found.get(_normalise(name))
        if version is None:
            from importlib import metadata

            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        if version:
            out[name] = version
    return out


def _version_in(path: str) -> str | None:
    """The Version header of a core metadata file (its headers end at the first empty line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    return None
                if line[:8].lower() == "version:":
                    return line[8:].strip() or None
    except OSError:
        return None
    return None

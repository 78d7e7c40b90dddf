"""Staged (atomic) directories: a checkpoint is written into a hidden sibling of its target and
renamed into place at the end, so an interrupted or cancelled write leaves nothing behind.

The hidden names carry the writer's pid, so the next write into the same parent can tell a killed
writer's leftovers (removed, whatever checkpoint they were for) from a live one's (left alone).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from surgeon.errors import SurgeonError
from surgeon.io.fs import check_free_space, fs_errors, os_error_line, remove_tree
from surgeon.io.model_card import written_by_us
from surgeon.io.process import pid_alive
from surgeon.io.sizes import human_bytes
from surgeon.io.sources import sources_under


def check_target(out: Path, sources: dict, force: bool) -> None:
    """Refuse a target inside or around a source checkpoint (`sources`: name -> anything with a
    `.path`), a file, or a non-empty directory unless `force`."""
    target = out.resolve()
    for name, d in sources.items():
        dp = d.path.resolve()
        if target == dp or dp in target.parents:
            raise SurgeonError(f"{out}: the export target is inside donor {name} ({d.path}); choose another directory")
        if target in dp.parents:
            raise SurgeonError(f"{out}: the export target contains donor {name} ({d.path}); choose another directory")
    inside = sources_under(out)
    if inside:
        raise SurgeonError(f"{out}: holds {inside[0]} (reached through a link), which this run reads; "
                           "choose another directory")
    with fs_errors(out, "look at the export target"):
        if out.exists():
            if not out.is_dir():
                raise SurgeonError(f"{out}: exists and is not a directory")
            if any(out.iterdir()):
                if not force:
                    raise SurgeonError(f"{out}: directory is not empty; pass --force to replace it")
                if not written_by_us(out):  # --force replaces what moe-surgeon wrote, nothing else
                    raise SurgeonError(f"{out}: not a checkpoint moe-surgeon wrote (no moe-surgeon manifest, "
                                       "session or model card), so --force will not replace it; choose another "
                                       "directory or empty this one")


STAGING = re.compile(r"^\.(?P<name>.+)\.moe-surgeon-(?P<kind>tmp|old)-(?P<pid>[0-9]+)$")
WRITE = "write the checkpoint"


def _stderr_warning(msg: str) -> None:
    print(f"moe-surgeon: warning: {msg}", file=sys.stderr)


@contextmanager
def staged_directory(out: Path, needed_bytes: int | None = None, warn: Callable[[str], None] | None = None):
    """A hidden sibling of `out` to write a checkpoint into: renamed into place when the block ends,
    removed when it raises, so an interrupted write leaves nothing (and the next write into the same
    parent removes what a killed one left, saying so through `warn`, stderr by default).
    `needed_bytes`: refused before anything is written when the filesystem has less free. An OSError
    a user can cause (read-only, full, file-size limit, a file in the way) becomes one SurgeonError
    line naming the path."""
    if needed_bytes is not None:
        check_free_space(out, needed_bytes, WRITE)
    with fs_errors(out, WRITE):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(out, warn)
        tmp = out.parent / f".{out.name}.moe-surgeon-tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            yield tmp
            swap_into_place(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith(str(tmp)):
                # name the file as the user will look for it, not by the staging name just removed
                e.filename = str(out) + e.filename[len(str(tmp)):]
            raise


def stale_leftovers(parent: Path, out_name: str | None = None) -> list[Path]:
    """The staging directories in `parent` whose writer is dead, whatever checkpoint they were for;
    this process's own only for `out_name` (another of its threads may be writing a sibling now)."""
    found = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        m = STAGING.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() and m["name"] == out_name or pid != os.getpid() and not pid_alive(pid):
            found.append(Path(entry.path))
    return sorted(found)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_leftovers(out: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """A killed export (SIGKILL, power loss) cannot clean up; the next write into the same parent
    does, and says what it removed in one line (and, in another, what it could not)."""
    warn = warn or _stderr_warning
    removed, failed, size = [], [], 0
    for p in stale_leftovers(out.parent, out.name):
        n = _tree_bytes(p)
        try:
            remove_tree(p)
        except OSError as e:
            failed.append(f"{p} ({e.strerror or e})")
            continue
        removed.append(p)
        size += n
    if removed:
        warn(f"removed {len(removed)} leftover staging director{'y' if len(removed) == 1 else 'ies'} of killed "
             f"writers ({human_bytes(size)}) in {out.parent}: {', '.join(p.name for p in removed)}")
    if failed:
        warn(f"could not remove leftover staging directories of killed writers; remove them by hand: "
             f"{', '.join(failed)}")
    return removed


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old non-empty `out` (--force) is moved aside first and removed
    after, and if it cannot be removed that is an error, never a silent hidden leftover."""
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.moe-surgeon-old-{os.getpid()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # the old output stays where it was
            raise
        try:
            remove_tree(old)
        except OSError as e:
            raise SurgeonError(f"{out}: written, but the old output moved aside to {old} could not be removed "
                               f"({os_error_line(e)}); remove it by hand") from e
    else:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)

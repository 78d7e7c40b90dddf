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
from surgeon.io.atomic import SHORTENED, short_name
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
NAME_MAX = 255  # bytes in one file name on every filesystem we write to


def staging_path(out: Path, kind: str, pid: int | None = None) -> Path:
    """The hidden sibling `.{name}.moe-surgeon-{kind}-{pid}` of `out`. A name long enough that the
    suffix would pass the filesystem's 255-byte limit is cut and given a hash of the whole, so a
    legal output name never fails on its staging name."""
    suffix = f".moe-surgeon-{kind}-{os.getpid() if pid is None else pid}"
    return out.parent / f".{short_name(out.name, NAME_MAX - 1 - len(suffix))}{suffix}"


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
        tmp = staging_path(out, "tmp")
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
        mine = out_name is not None and entry.name == staging_path(parent / out_name, m["kind"]).name
        if pid == os.getpid() and mine or pid != os.getpid() and not pid_alive(pid):
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
        if STAGING.match(p.name)["kind"] == "old":
            _put_back(p, warn)  # a user's earlier output, never ours to delete
            continue
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


def _put_back(old: Path, warn: Callable[[str], None]) -> None:
    """A `-old-` directory is an earlier output that a killed --force export had moved aside. Where
    its name is free again (the kill came before the new output took it), it goes back there;
    otherwise it stays, and the warning says where it is."""
    name = STAGING.match(old.name)["name"]
    home = old.parent / name
    if SHORTENED not in name and not home.exists():
        try:
            os.rename(old, home)
            warn(f"restored {home}, which a killed export had moved aside to {old.name}")
            return
        except OSError:
            pass
    warn(f"{old} holds an earlier output a killed export had moved aside; it is kept: remove it, or move it "
         "back, by hand")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old non-empty `out` (--force) is moved aside first and removed
    after, and if it cannot be removed that is an error, never a silent hidden leftover."""
    if out.exists() and any(out.iterdir()):
        old = staging_path(out, "old")
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

"""Staged (atomic) directories: a checkpoint is written into a hidden sibling of its target and
renamed into place at the end, so an interrupted or cancelled write leaves nothing behind.

The hidden names carry the writer's pid, so the next write to the same target can tell a killed
writer's leftovers (removed) from a live one's (left alone).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.process import pid_alive


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
    if out.exists():
        if not out.is_dir():
            raise SurgeonError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise SurgeonError(f"{out}: directory is not empty; pass --force to replace it")


@contextmanager
def staged_directory(out: Path):
    """A hidden sibling of `out` to write a checkpoint into: renamed into place when the block ends,
    removed when it raises, so an interrupted write leaves nothing (and the next write to `out`
    removes what a killed one left)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    tmp = out.parent / f".{out.name}.moe-surgeon-tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_leftovers(out: Path) -> None:
    """A killed export (SIGKILL, power loss) cannot clean up; the next export to it does."""
    for p in out.parent.glob(f".{out.name}.moe-surgeon-*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isascii() and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.moe-surgeon-old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)

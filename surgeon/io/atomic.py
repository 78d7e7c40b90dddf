"""Atomic writes: a reader sees the old file or the new one, never half of either.

An atomic write replaces the file at its path, so it must never be pointed at what is not an
ordinary file: a device (`--samples /dev/full` as root once left /dev/full a regular file), a FIFO,
a socket or a directory is refused with one line. A symlink is followed to its target, and the
target replaced, only when that target is a regular file (or not there yet), and a line says so:
the link stays a link.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.sources import source_at

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _warn(msg: str) -> None:
    print(f"moe-surgeon: warning: {msg}", file=sys.stderr)


def regular_target(path: Path, *, say: bool = True) -> Path:
    """Where an atomic write of `path` goes: `path` itself, or a symlink's target when that is a
    regular file or does not exist yet (said on stderr unless not `say`); SurgeonError for anything
    else, and for a file this run reads as a source (a donor's shard or config, however reached)."""
    if (source := source_at(path)) is not None:
        raise SurgeonError(f"{path}: is {source}, which this run reads; moe-surgeon never writes over a "
                           "donor's files; choose another path")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there: the write itself says what is wrong
        return path
    except OSError as e:
        raise SurgeonError(f"{path}: cannot look at it ({e.strerror})") from None
    target = path
    if stat.S_ISLNK(st.st_mode):
        target = path.resolve()
        try:
            st = os.stat(target)
        except FileNotFoundError:
            if say:
                _warn(f"{path} is a symlink: writing its target {target}")
            return target
        except OSError as e:
            raise SurgeonError(f"{path}: cannot follow the symlink ({e.strerror})") from None
    for test, kind in _KINDS:
        if test(st.st_mode):
            where = path if target == path else f"{path} (a symlink to {target})"
            raise SurgeonError(f"{where}: is {kind}, not a file; moe-surgeon replaces only regular files")
    if target != path and say:
        _warn(f"{path} is a symlink: writing its target {target}")
    return target


SHORTENED = "~"  # marks a name cut to fit, followed by a hash of the whole name


def short_name(name: str, room: int) -> str:
    """`name`, or when its UTF-8 bytes pass `room`, its start, SHORTENED and a hash of the whole."""
    if len(name.encode()) <= room:
        return name
    tag = SHORTENED + hashlib.sha256(name.encode()).hexdigest()[:12]
    head = name.encode()[:room - len(tag)].decode("utf-8", "ignore")
    return head + tag


def write_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """`fsync=False` for files that can be recomputed (caches): still never half-written, but a
    crash may lose the latest version."""
    path = regular_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp adds 8 characters: a name near the 255-byte limit would fail on its temporary name
    fd, tmp = tempfile.mkstemp(prefix=f".{short_name(path.name, 240)}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); a session is an ordinary document, so keep the
        # mode of the file it replaces, or the usual 0644.
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

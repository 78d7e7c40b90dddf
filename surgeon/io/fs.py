"""The filesystem boundary: OSErrors a user can cause (a read-only or full disk, a missing or
mistyped directory, a file-size limit) become one SurgeonError line with the path and what to do,
and a write that cannot fit is refused before it starts.

A write error from os.write carries no file name, so callers say which path they were writing.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.sizes import human_bytes

# errno -> what the user can do about it
FIXES = {
    errno.EACCES: "choose another directory or fix its permissions",
    errno.EPERM: "choose another directory or fix its permissions",
    errno.EROFS: "choose a directory on a writable filesystem",
    errno.ENOSPC: "free some space or choose another disk",
    errno.EDQUOT: "free some space or choose another disk",
    errno.EFBIG: "the filesystem or the file-size limit (ulimit -f) allows no file this large; "
                 "raise the limit or pass a smaller --max-shard-size",
    errno.ENOENT: "a directory on the way does not exist (or was removed meanwhile); check the path",
    errno.ENOTDIR: "part of the path is a file, not a directory; choose another path",
    errno.EEXIST: "something that is not a directory is in the way; choose another path",
    errno.EISDIR: "the path is a directory; name a file",
    errno.EXDEV: "a rename across filesystems is impossible; keep the target on one filesystem",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop; check the path",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}


def write_all(fd: int, data) -> None:
    """Write every byte of `data` to `fd`. One os.write may write fewer than it was given (at most
    about 2 GiB on Linux, or up to a file-size limit, where the next write then fails EFBIG); a
    caller that took one write for the whole would leave a file silently short."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def read_exact(fd: int, count: int, offset: int, path: str | os.PathLike) -> bytes:
    """`count` bytes of the file `path` (open as `fd`) from `offset`. One os.pread returns at most
    about 2 GiB on Linux, less than one fused expert tensor of Llama 4 Scout in bf16 (2.7 GB)."""
    pieces, done = [], 0
    while done < count:
        piece = os.pread(fd, count - done, offset + done)
        if not piece:
            raise SurgeonError(f"{path}: shorter than its header says (nothing at byte {offset + done})")
        pieces.append(piece)
        done += len(piece)
    return b"".join(pieces)  # one piece: that piece itself, not a copy


def os_error_line(e: OSError, path: str | os.PathLike | None = None, doing: str | None = None) -> str:
    """One line: the path (the error's own file name first, else `path`), what failed, and the fix."""
    where = e.filename if e.filename is not None else path
    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    reason = f"{e.strerror or e}" + (f" ({name})" if name else "")
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    fix = FIXES.get(e.errno)
    line = f"{where}: " if where is not None else ""
    line += f"cannot {doing}: " if doing else ""
    return line + reason + (f"; {fix}" if fix else "")


def error_line(e: BaseException) -> str:
    """Any failure as the one line a user is shown, the same in the CLI and every screen: an engine
    error's own message, a filesystem fault naming its path, running out of memory with what to try,
    and anything else (a bug) as its type and first line, never a traceback."""
    if isinstance(e, SurgeonError):
        return " ".join(str(e).split())
    if isinstance(e, OSError):
        return os_error_line(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, MemoryError) or "out of memory" in text:  # torch.cuda.OutOfMemoryError included
        return f"out of memory: {text}".rstrip(": ") + "; try fewer items (limit=N) or a smaller batch"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def fs_errors(path: str | os.PathLike, doing: str):
    """OSErrors of the families in FIXES raised in the block become a SurgeonError naming the path;
    others (a bug, a broken pipe) pass through unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in FIXES:
            raise
        raise SurgeonError(os_error_line(e, path, doing)) from e


def existing_ancestor(path: str | os.PathLike) -> Path:
    """The nearest path at or above `path` that exists (what a mkdir -p would start from)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_free_space(target: str | os.PathLike, needed: int, doing: str = "write") -> None:
    """Refuse before writing `needed` bytes next to `target` when its filesystem has less free."""
    anchor = existing_ancestor(Path(target).parent)
    if not anchor.is_dir():
        raise SurgeonError(f"{target}: {anchor} is a file, not a directory; choose another path")
    with fs_errors(anchor, "read its free space"):
        free = shutil.disk_usage(anchor).free
    if needed > free:
        raise SurgeonError(f"{target}: cannot {doing}: it needs {human_bytes(needed)} ({needed} bytes) but {anchor} "
                           f"has {human_bytes(free)} ({free} bytes) free; free some space or choose another disk")


def check_writable(path: str | os.PathLike, doing: str = "write") -> None:
    """Fail now, not after a long job, when `path` (a file to write later) cannot be created: its
    nearest existing directory is probed with a real temporary file, which is what root, a read-only
    mount or a file in the way actually decide (permission bits alone would not say)."""
    from surgeon.io.atomic import regular_target

    path = Path(path)
    if path.is_dir():
        raise SurgeonError(f"{path}: cannot {doing}: it is a directory; name a file")
    path = regular_target(path, say=False)  # a device, a FIFO: refused before the job, not after
    anchor = existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise SurgeonError(f"{path}: cannot {doing}: {anchor} is a file, not a directory; choose another path")
    with fs_errors(path, doing):
        fd, probe = tempfile.mkstemp(prefix=".moe-surgeon-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)


def remove_tree(path: str | os.PathLike) -> None:
    """rmtree that also removes what a read-only directory holds (an old export the user made
    read-only): it makes each such directory writable, as `rm -rf` by its owner would. Raises the
    OSError when something still cannot be removed."""
    def onexc(func, p, exc):
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
                shutil.rmtree(p)
            else:
                func(p)
        except FileNotFoundError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onexc)
    else:  # onerror passes (type, value, traceback) as the third argument, which onexc ignores
        shutil.rmtree(path, onerror=onexc)


def read_bounded(path: str | os.PathLike, what: str, limit: int, env: str) -> bytes:
    """A small input file's bytes (a session, a recipe), refused in one line when it is not a regular
    file (a FIFO would block the read forever, a device never ends: /dev/zero filled 22 GB) or is
    larger than `limit` bytes; `env` names the variable that raises the limit."""
    path = Path(path)
    limit = int(os.environ.get(env) or limit)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SurgeonError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise SurgeonError(os_error_line(e, path, f"read the {what}")) from None
    if not stat.S_ISREG(st.st_mode):
        raise SurgeonError(f"{path}: not a regular file, so not a {what} (a device, a FIFO or a directory)")
    if st.st_size > limit:
        raise SurgeonError(f"{path}: {human_bytes(st.st_size)}, more than a {what} may be ({human_bytes(limit)}; "
                           f"set {env} to raise it)")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SurgeonError(os_error_line(e, path, f"read the {what}")) from None
    if len(data) > limit:  # it grew while it was read
        raise SurgeonError(f"{path}: more than a {what} may be ({human_bytes(limit)}; set {env} to raise it)")
    return data

"""The autosave recovery file: every change of the workbench, written atomically.

One file per running workbench (`recovery-PID.json`) in the state directory. A clean quit
deletes it; a file whose process is gone is what a crash or a kill left behind, and the next
start that opens the same donors offers to restore it (its session names them: `donor_paths`).
Writes come from worker threads, so `RecoveryWriter` orders them: an older snapshot never
overwrites a newer one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.donor import resolve_path
from surgeon.core.session import Session, parse_session
from surgeon.errors import SurgeonError
from surgeon.io.atomic import write_atomic
from surgeon.io.process import pid_alive

ENV_DIR = "MOE_SURGEON_STATE_DIR"


def state_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "moe-surgeon"


@dataclass
class Recovered:
    """A recovery file read back: the session it holds, when it was written and for which session file."""

    path: Path
    saved_at: float
    session_path: str | None  # the session file the user was editing, if any
    session: Session


class RecoveryWriter:
    def __init__(self, directory: Path | None = None, pid: int | None = None):
        self.directory = Path(directory) if directory else state_dir()
        self.pid = os.getpid() if pid is None else pid
        self.path = self.directory / f"recovery-{self.pid}.json"
        self._lock = threading.Lock()
        self._written = -1

    def write(self, generation: int, session_json: dict, session_path: str | None) -> bool:
        """Write snapshot `generation` unless a newer one is already on disk."""
        payload = {"pid": self.pid, "saved_at": time.time(), "session_path": session_path, "session": session_json}
        data = (json.dumps(payload, indent=1) + "\n").encode()
        with self._lock:
            if generation <= self._written:
                return False
            write_atomic(self.path, data)
            self._written = generation
            return True

    def discard(self) -> None:
        with self._lock:
            self._written = 1 << 62  # a late write from a worker must not bring it back
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def donor_paths(path: Path) -> frozenset[Path] | None:
    """The resolved donor directories of a recovery file's session; None when it cannot be read.
    The autosave writes the session with no session file (absolute paths or demo:NAME), so the
    paths resolve without knowing where the user was."""
    try:
        data = json.loads(Path(path).read_bytes())
        base = Path(data["session_path"]).parent if data.get("session_path") else None
        return frozenset(resolve_path(d["path"], base).resolve() for d in data["session"]["donors"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, SurgeonError):
        return None


def orphans(directory: Path | None = None, *, own_pid: int | None = None,
            donors: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Recovery files left by workbenches that are no longer running, newest first. With `donors`,
    only those whose session has every one of them: the unsaved work of another donor set is not
    this start's to offer (it stays for the start that opens those donors)."""
    directory = Path(directory) if directory else state_dir()
    wanted = None if donors is None else {Path(d).resolve() for d in donors}
    own_pid = os.getpid() if own_pid is None else own_pid
    found = []
    for p in directory.glob("recovery-*.json"):
        pid = p.stem.split("-", 1)[1]
        if pid.isascii() and pid.isdigit() and int(pid) != own_pid and not pid_alive(int(pid)):
            if wanted is None or (wanted and wanted <= (donor_paths(p) or frozenset())):
                found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def load_recovery(path: Path) -> Recovered:
    try:
        data = json.loads(Path(path).read_bytes())
        session_json = data["session"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SurgeonError(f"{path}: unreadable recovery file ({e})") from None
    session = parse_session(session_json, str(path))
    return Recovered(Path(path), float(data.get("saved_at", 0)), data.get("session_path"), session)

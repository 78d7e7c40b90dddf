"""The background full-content hashing of the open donors, for the app.

A saved session can then prove its donors (replay checks them), while marking and browsing never
wait: a worker hashes shard by shard, yields to a job screen's running job (`background=True`), and
a new donor set or quitting stops it through its cancel token.
"""

from __future__ import annotations

import time

from textual import work
from textual.message import Message

from surgeon.errors import SurgeonError
from surgeon.jobs import Cancelled, CancelToken

from .app_loading import Failed


class Hashing(Message):
    """Progress of the background full-content hashing of the open donors; `done` at the end."""

    def __init__(self, text: str | None, done: dict[str, dict[str, str]] | None = None):
        super().__init__()
        self.text, self.done = text, done

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Hashing) and message.done is None and self.done is None


class HashingMixin:
    """SurgeonApp's hashing; state: `hash_token` (the running hash's), `hash_status` (the status
    line's "hashing donors 40%"), `recorded_hashes` (the open session's, to compare)."""

    def start_hashing(self) -> None:
        self.hash_token.cancel()  # a thread cannot be stopped from outside: it checks this token
        self.hash_token = CancelToken()
        self.hash_donors(dict(self.wb.donors), self.hash_token)

    def on_unmount(self) -> None:
        # Two 7B donors take minutes to read: quitting must not wait for that (what was hashed of
        # a file is lost; a later start hashes it again).
        self.hash_token.cancel()

    @work(thread=True, exit_on_error=False, group="hash", exclusive=True)
    def hash_donors(self, donors: dict, cancel: CancelToken) -> None:
        """Hash every open donor in full, in the background, so a saved session can prove its donors
        (replay checks them). Marking and browsing never wait for it; a donor hashed before costs a
        stat per shard. Progress shows on the status line only when hashing takes over a second."""
        started = time.perf_counter()
        total = sum(h.size for d in donors.values() for h in d.shards.values()) or 1
        before = 0
        done: dict[str, dict[str, str]] = {}
        for name, donor in donors.items():
            def progress(step, before=before):
                if time.perf_counter() - started > 1.0:
                    self.post_message(Hashing(f"hashing donors {100 * (before + step.done) / total:.0f}%"))
            try:
                done[name] = donor.full_hashes(progress=progress, cancel=cancel, background=True)
            except Cancelled:
                return
            except SurgeonError as e:
                self.post_message(Failed(f"Cannot hash donor {name}", str(e)))
            before += sum(h.size for h in donor.shards.values())
        self.post_message(Hashing(None, done=done))

    def on_hashing(self, message: Hashing) -> None:
        self.hash_status = message.text
        if message.done is not None:
            changed = [name for name, hashes in self.recorded_hashes.items()
                       if name in message.done and message.done[name] != hashes]
            if changed:
                self.notify(f"donor(s) {', '.join(changed)} changed since the session was saved: their bytes differ "
                            "from the session's full content hashes", title="Donors changed", severity="error",
                            timeout=15)
        self.refresh_status()

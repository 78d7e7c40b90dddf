"""One live hybrid for a process that runs job after job on it (the workbench): kept across jobs and
moved to each job's plan by hot-swap, so a run after a mark copies only the tensors whose source
changed. Built anew when the donors, the base, the device or the dtype differ, and let go after a
failure that may have left it half-swapped.

A job holds the hybrid for the whole job (`with keeper.use(...) as lease:`): getting it, moving it
to the job's plan and every forward pass, so a probe, a sweep, a routing run and a gate selection
never swap the one model under each other. A job that finds it held waits, says so through its
`note` ("waiting for the running probe…") and still honours its cancel token while it waits.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from surgeon.jobs import NEVER, CancelToken, Cancelled

WAIT_POLL_S = 0.1  # how often a waiting job looks at its cancel token


@dataclass
class Lease:
    """The live hybrid while a job holds it: `built` when it was materialised for this job, `swap`
    the SwapReport of moving it to the job's plan (None when the job moves it itself)."""

    hybrid: object
    built: bool
    swap: object = None

    @property
    def model(self):
        return self.hybrid.model


class HybridKeeper:
    def __init__(self) -> None:
        self.hybrid = None
        self._key: tuple | None = None
        self._use = threading.Lock()  # held by one job for the whole job (see use)
        self._holder: str | None = None  # what the holding job is ("probe", "routing", ...)
        self._owner: int | None = None  # the thread that holds it
        self.builds = 0  # hybrids materialised so far (a reuse builds none)

    @staticmethod
    def key(plan, donors: dict, device: str, dtype: str) -> tuple:
        return (tuple((n, str(d.path), d.fingerprint) for n, d in donors.items()), plan.base, device, dtype)

    @property
    def busy(self) -> str | None:
        """What the job holding the hybrid is, or None when no job holds it."""
        return self._holder

    @contextmanager
    def use(self, plan, donors: dict, device: str, dtype: str = "keep", *, job: str = "job",
            note: Callable[[str], None] | None = None, cancel: CancelToken = NEVER,
            swap: bool = True) -> Iterator[Lease]:
        """Hold the live hybrid for `donors`, `plan`'s base, `device` and `dtype` for the whole
        `with` block: built when there is none for them, else reused, and moved to `plan` by
        hot-swap (unless not `swap`: a sweep walks its own plans and puts the hybrid back).

        job: what this job is, for the note of a job that waits for it. While another job holds the
        hybrid this waits, notes "waiting for the running <job>…" and checks `cancel` between looks.
        A failure inside the block (or in the swap) drops the hybrid, since a swap may have stopped
        half-way; a cancel does not (jobs stop between batches, never inside a swap, and put the
        hybrid back on their plan).
        """
        say = note or (lambda text: None)
        self._acquire(job, say, cancel)
        try:
            hybrid, built = self._get(plan, donors, device, dtype, say)
            lease = Lease(hybrid, built, hybrid.apply(plan, dtype=dtype) if swap else None)
            yield lease
        except Cancelled:
            raise
        except BaseException:
            self.hybrid = self._key = None
            raise
        finally:
            self._holder = self._owner = None
            self._use.release()

    def _acquire(self, job: str, say: Callable[[str], None], cancel: CancelToken) -> None:
        if self._owner == threading.get_ident():  # would wait for itself for ever
            raise RuntimeError(f"the live hybrid is already held by this thread's {self._holder}")
        cancel.check()
        if not self._use.acquire(blocking=False):
            say(f"waiting for the running {self._holder or 'job'}…")
            while not self._use.acquire(timeout=WAIT_POLL_S):
                cancel.check()
            try:
                cancel.check()  # cancelled while it waited: nothing to do
            except Cancelled:
                self._use.release()
                raise
        self._holder, self._owner = job, threading.get_ident()

    def _get(self, plan, donors: dict, device: str, dtype: str, say: Callable[[str], None]) -> tuple[object, bool]:
        """(the live hybrid for these donors, base, device and dtype, whether it was built now);
        called with the use lock held."""
        key = self.key(plan, donors, device, dtype)
        if self.hybrid is not None and self._key == key:
            return self.hybrid, False
        from surgeon.live.hybrid import Hybrid

        self.hybrid = self._key = None  # the old model goes before a new one loads
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its tqdm bar would write over a terminal UI
        say(f"materialising the hybrid on {device} (the first run loads torch and transformers)…")
        self.hybrid = Hybrid.materialize(plan, donors, device=device, dtype=dtype)
        self._key = key
        self.builds += 1
        return self.hybrid, True

    def drop(self) -> None:
        """Forget the hybrid (the next job builds it anew); waits for another job that holds it."""
        if self._owner == threading.get_ident():
            self.hybrid = self._key = None
            return
        with self._use:
            self.hybrid = self._key = None

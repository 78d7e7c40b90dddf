"""One progress and cancellation protocol for every long job, on the command line and in the workbench.

A job is an engine function that takes `progress` and `cancel` keyword arguments:

- `progress(Step)` is called as work gets done (any callable; `None` means nobody is watching).
  The caller decides how often to draw: the CLI prints at most a few lines a second, a screen posts
  a message.
- `cancel` is a `CancelToken`. The job calls `cancel.check()` between units of work (a batch, a
  shard, a configuration, a training step), which raises `Cancelled`; the job then removes what it
  had started to write, so a cancelled job leaves nothing behind.

A workbench screen cancels with `token.cancel()` from its cancel key; the CLI cancels on the first
ctrl+c (`cancel_on_interrupt`), so an interrupted export is cleaned up like a cancelled one.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable


class Cancelled(Exception):
    """A job stopped because it was asked to; what it had started to write is gone."""


class CancelToken:
    """Set once, from any thread; read between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def reset(self) -> None:
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def __call__(self) -> bool:  # a token is also the `cancel()` predicate older code expects
        return self._event.is_set()


NEVER = CancelToken()  # for callers that never cancel; nothing may call NEVER.cancel()


@dataclass(frozen=True)
class Step:
    """Where a job is: `done` of `total` units (bytes, items, steps, configurations)."""

    done: int
    total: int
    unit: str = "items"
    label: str = ""
    detail: str = ""
    started: float = field(default_factory=time.perf_counter, compare=False)
    # Every value so far of a per-unit measurement (a training loss per step), so a renderer that
    # drops superseded steps (a screen's replaceable messages) still has the whole curve.
    series: tuple[float, ...] = field(default=(), compare=False)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def rate(self, now: float | None = None) -> float:
        """Units per second since the job started."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float:
        """Seconds left at the rate so far (0 before there is a rate)."""
        rate = self.rate(now)
        return (self.total - self.done) / rate if rate > 0 else 0.0


Progress = Callable[[Step], None]


def report(progress: Progress | None, step: Step) -> None:
    if progress is not None:
        progress(step)


class Meter:
    """Makes Steps for one job, all stamped with the job's start, so a renderer can show rate and ETA."""

    def __init__(self, progress: Progress | None, total: int, unit: str = "items", label: str = ""):
        self.progress, self.total, self.unit, self.label = progress, total, unit, label
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int | None = None, detail: str = "", series: tuple[float, ...] = ()) -> None:
        if total is not None:
            self.total = total
        if self.progress is not None:
            self.progress(Step(done, self.total, self.unit, self.label, detail, self.started, series))


@contextmanager
def cancel_on_interrupt(token: CancelToken):
    """The first ctrl+c cancels the job at its next check; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield token
        return

    def first(signum, frame):
        token.cancel()
        signal.signal(signal.SIGINT, previous)

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, first)
    try:
        yield token
    finally:
        signal.signal(signal.SIGINT, previous)


class Foreground:
    """Jobs someone is waiting for (a probe, a sweep, an export) while background work runs in the
    same process (the workbench's full content hash of its donors). The background work pauses
    while any foreground job runs: on a machine with few cores its threads would otherwise take the
    cores the probe's threads need, and the probe would wait on them at every parallel region."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self.waiting = 0  # background threads paused now: what a test or a status line can read

    @contextmanager
    def running(self):
        with self._changed:
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    @property
    def busy(self) -> bool:
        return self._running > 0

    def wait_idle(self, cancel: CancelToken = NEVER, poll: float = 0.25) -> None:
        """Return when no foreground job runs (at once when none does); a cancel is seen within `poll`
        seconds, so a paused hash still stops when the workbench quits."""
        with self._changed:
            if not self._running:
                return
            self.waiting += 1
            try:
                while self._running:
                    cancel.check()
                    self._changed.wait(poll)
            finally:
                self.waiting -= 1


FOREGROUND = Foreground()  # one per process: the workbench's jobs mark it, its background hash reads it

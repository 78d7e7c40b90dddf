"""One base for every screen that runs a long engine job: a thread worker, progress as messages,
one cancel token (`surgeon.jobs`), and one place where errors become text instead of tracebacks.

A screen calls `start_job(engine_function, ...)`; the function gets `progress=` and `cancel=` as the
command line gives them. The screen overrides the hooks it needs: `job_progress(step)`,
`job_finished(result)`, `job_failed(message)`, `job_cancelled()`. The cancel key calls `cancel_job()`,
which the engine honours at its next batch, shard or step, leaving nothing behind.
"""

from __future__ import annotations

from textual.message import Message
from textual.screen import ModalScreen, Screen

from surgeon.io.fs import error_line
from surgeon.jobs import FOREGROUND, Cancelled, CancelToken, Step


class JobStep(Message):
    """Progress of the running job; a newer one replaces an unhandled older one."""

    def __init__(self, step: Step):
        super().__init__()
        self.step = step

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobStep)


class JobEnded(Message):
    def __init__(self, result=None, error: str | None = None, cancelled: bool = False):
        super().__init__()
        self.result, self.error, self.cancelled = result, error, cancelled


class JobMixin:
    """The job machinery, for a Screen or a ModalScreen (handlers are found by name on the MRO)."""

    job_running: bool = False
    job_token: CancelToken | None = None
    job_queued: tuple | None = None  # (fn, args, kwargs) that restart_job holds until the running job ends

    def start_job(self, fn, *args, group: str = "job", **kwargs) -> None:
        token = self.job_token = CancelToken()
        self.job_running = True

        def work() -> None:
            try:
                # The workbench's background hash pauses meanwhile: it would take the cores this needs.
                with FOREGROUND.running():
                    result = fn(*args, progress=lambda step: self.post_message(JobStep(step)), cancel=token, **kwargs)
            except Cancelled:
                self.post_message(JobEnded(cancelled=True))
            except Exception as e:  # a user's mistake, a disk fault or a bug: a line in a dialog, never a traceback
                self.post_message(JobEnded(error=error_line(e)))
            else:
                self.post_message(JobEnded(result=result))

        self.run_worker(work, thread=True, exit_on_error=False, group=group)

    def restart_job(self, fn, *args, group: str = "job", **kwargs) -> None:
        """start_job, for a screen whose inputs changed: a running job is cancelled and this one starts
        when it has ended (a replaced job calls no job_cancelled); only the newest one waits."""
        if not self.job_running:
            self.start_job(fn, *args, group=group, **kwargs)
            return
        self.job_queued = (fn, args, {**kwargs, "group": group})
        self.cancel_job()

    def cancel_job(self) -> bool:
        """Ask the running job to stop; False when none is running."""
        if not self.job_running or self.job_token is None:
            return False
        self.job_token.cancel()
        return True

    def on_job_step(self, message: JobStep) -> None:
        self.job_progress(message.step)

    def on_job_ended(self, message: JobEnded) -> None:
        self.job_running = False
        queued, self.job_queued = self.job_queued, None
        if queued is not None:
            fn, args, kwargs = queued
            if not message.cancelled:  # it ended before it saw the cancel: its result still stands
                self._job_hook(message)
            self.start_job(fn, *args, **kwargs)
            return
        self._job_hook(message)

    def _job_hook(self, message: JobEnded) -> None:
        if message.cancelled:
            self.job_cancelled()
        elif message.error is not None:
            self.job_failed(message.error)
        else:
            self.job_finished(message.result)

    # hooks
    def job_progress(self, step: Step) -> None:
        pass

    def job_finished(self, result) -> None:
        pass

    def job_failed(self, message: str) -> None:
        self.notify(message, title="Error", severity="error", timeout=8)

    def job_cancelled(self) -> None:
        self.notify("cancelled; nothing was written", timeout=4)


class JobScreen(JobMixin, Screen):
    pass


class JobModal(JobMixin, ModalScreen):
    pass

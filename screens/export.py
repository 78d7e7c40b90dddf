"""Export dialog: output directory, dtype, shard size; a worker streams the hybrid to disk.

The worker posts progress (bytes, rate, ETA) as replaceable messages, so a fast export never
floods the queue. Cancel sets an event the engine polls between tensors; the engine then
removes its hidden temporary directory, so nothing partial is left behind.
"""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Select, Static

from surgeon.errors import SurgeonError
from surgeon.io.sizes import human_bytes, parse_size

from .dialogs import PathSuggester

DTYPES = ["keep", "bfloat16", "float16", "float32"]


class Progress(Message):
    def __init__(self, done: int, total: int, started: float):
        super().__init__()
        self.done, self.total, self.started = done, total, started

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Progress)


class Finished(Message):
    def __init__(self, result=None, error: str | None = None, cancelled: bool = False):
        super().__init__()
        self.result, self.error, self.cancelled = result, error, cancelled


def progress_text(done: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    return f"{human_bytes(done)} of {human_bytes(total)}  ·  {human_bytes(rate)}/s  ·  ETA {eta:.0f}s"


class ExportScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel / close", id="export.cancel")]

    def __init__(self):
        super().__init__()
        self.cancel_event = threading.Event()
        self.running = False

    def compose(self) -> ComposeResult:
        wb = self.app.wb
        default = f"hybrid-{self.app.labels.get(wb.base, 'base').replace('demo:', '')}"
        with Vertical(id="dialog"):
            yield Label("Export the hybrid checkpoint", id="dialog-title")
            with Horizontal(classes="form-row"):
                yield Label("Output directory")
                yield Input(default, id="export-out", suggester=PathSuggester(directories_only=True))
            with Horizontal(classes="form-row"):
                yield Label("dtype")
                yield Select([(d, d) for d in DTYPES], value="keep", allow_blank=False, id="export-dtype")
            with Horizontal(classes="form-row"):
                yield Label("Largest shard")
                yield Input("5GB", id="export-shard")
            yield Static("", classes="field-error", id="export-error")
            yield ProgressBar(total=100, show_eta=False, id="export-progress")
            yield Static("", id="export-stats")
            with Horizontal(id="buttons"):
                yield Button("Export", id="export-start", variant="primary")
                yield Button("Cancel", id="export-cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export-start":
            self.start()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.start()

    def start(self) -> None:
        if self.running:
            return

        out = self.query_one("#export-out", Input).value.strip()
        error = self.query_one("#export-error", Static)
        if not out:
            error.update("enter an output directory")
            return
        try:
            shard = parse_size(self.query_one("#export-shard", Input).value)
        except SurgeonError as e:
            error.update(str(e))
            return
        error.update("")
        self.running = True
        self.cancel_event.clear()
        self.query_one("#export-start", Button).disabled = True
        self.query_one("#export-stats", Static).update("resolving the plan…")
        wb = self.app.wb
        self.run_export(wb.plan(), dict(wb.donors), out, str(self.query_one("#export-dtype", Select).value), shard)

    @work(thread=True, exit_on_error=False, group="export")
    def run_export(self, plan, donors, out: str, dtype: str, shard: int) -> None:
        from surgeon.core.resolve import resolve
        from surgeon.core.session import make_session
        from surgeon.features.export import ExportCancelled, export_hybrid

        started = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= 0.05 or done >= total:
                last[0] = now
                self.post_message(Progress(done, total, started))

        try:
            resolution = resolve(plan, donors, dtype=dtype)
            result = export_hybrid(
                resolution, donors, out, dtype=dtype, max_shard_size=shard,
                session_json=make_session(plan, donors, None).to_json(),
                progress=progress, cancel=self.cancel_event.is_set,
            )
        except ExportCancelled:
            self.post_message(Finished(cancelled=True))
            return
        except (SurgeonError, OSError) as e:
            self.post_message(Finished(error=str(e)))
            return
        self.post_message(Finished(result=result))

    @on(Progress)
    def on_progress(self, message: Progress) -> None:
        bar = self.query_one("#export-progress", ProgressBar)
        bar.update(total=max(1, message.total), progress=message.done)
        self.query_one("#export-stats", Static).update(
            progress_text(message.done, message.total, time.perf_counter() - message.started))

    @on(Finished)
    def on_finished(self, message: Finished) -> None:
        self.running = False
        self.query_one("#export-start", Button).disabled = False
        if message.cancelled:
            self.query_one("#export-stats", Static).update("cancelled: nothing was written")
            self.app.notify("export cancelled; nothing was written", timeout=4)
            self.dismiss(None)
            return
        if message.error:
            self.query_one("#export-error", Static).update(message.error)
            self.query_one("#export-stats", Static).update("")
            return
        r = message.result
        record = {"path": str(r.path), "dtype": str(self.query_one("#export-dtype", Select).value),
                  "shards": len(r.shards), "tensors": r.tensors, "bytes": r.bytes,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.app.extras.setdefault("exports", []).append(record)
        self.app.workbench_changed()
        self.app.notify(f"exported {r.tensors} tensors ({human_bytes(r.bytes)}) to {r.path}", title="Export done", timeout=8)
        self.dismiss(None)

    def action_cancel(self) -> None:
        if self.running:
            self.cancel_event.set()
            self.query_one("#export-stats", Static).update("cancelling…")
        else:
            self.dismiss(None)

"""Export dialog: output directory, dtype, shard size; a job streams the hybrid to disk.

The dialog is a JobModal (screens/job.py): the engine's `run_export`, the same the command line
calls, runs in a worker and reports bytes as replaceable progress messages, so a fast export never
floods the queue. Cancel sets the job's token, which the engine checks between tensors; it then
removes its hidden temporary directory, so nothing partial is left behind.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, ProgressBar, Select, Static

from surgeon.errors import SurgeonError
from surgeon.io.dtypes import DTYPE_CHOICES as DTYPES
from surgeon.io.sizes import human_bytes, parse_size, step_text
from surgeon.jobs import Step

from .dialogs import PathSuggester
from .job import JobModal


class ExportScreen(JobModal):
    CSS_PATH = "export.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [Binding("escape", "cancel", "Cancel / close", id="export.cancel")]

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
        from surgeon.features.export import ExportRequest, run_export

        if self.job_running:
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
        self.query_one("#export-start", Button).disabled = True
        self.query_one("#export-stats", Static).update("resolving the plan…")
        wb = self.app.wb
        dtype = str(self.query_one("#export-dtype", Select).value)
        # The record goes into the app's session on this thread (job_finished), not from the worker.
        self.start_job(run_export, ExportRequest(wb.plan(), dict(wb.donors), out, dtype=dtype, max_shard_size=shard,
                                                     verify=True),
                       group="export")

    def job_progress(self, step: Step) -> None:
        self.query_one("#export-progress", ProgressBar).update(total=max(1, step.total), progress=step.done)
        self.query_one("#export-stats", Static).update(step_text(step))

    def job_finished(self, outcome) -> None:
        r = outcome.result
        self.app.records.exports.append(outcome.record)
        self.app.workbench_changed()
        check = outcome.verified
        if check is not None and not check.ok:
            self.app.notify(f"exported to {r.path}, but re-reading it found: {check.problem}", title="Export differs",
                            severity="error", timeout=15)
        else:
            self.app.notify(f"exported {r.tensors} tensors ({human_bytes(r.bytes)}) to {r.path}; verified: every "
                            "byte matches its manifest", title="Export done", timeout=8)
        self.dismiss(None)

    def job_failed(self, message: str) -> None:
        self.query_one("#export-start", Button).disabled = False
        self.query_one("#export-error", Static).update(message)
        self.query_one("#export-stats", Static).update("")

    def job_cancelled(self) -> None:
        self.app.notify("export cancelled; nothing was written", timeout=4)
        self.dismiss(None)

    def action_cancel(self) -> None:
        if self.cancel_job():
            self.query_one("#export-stats", Static).update("cancelling…")
        else:
            self.dismiss(None)

"""Sweep: the component-transfer grid (surgeon/features/sweep/) from the workbench.

Choose groups, the donor they come from and probes; r runs every configuration (every subset of
the groups) in a worker, and the table (configurations x probes, `cell_text` of the sweep report)
and a heatmap of deltas against the base fill in as configurations finish. o (or enter) on a
configuration opens it as the current plan in the grid.

The sweep runs on the app's one live hybrid (`app.hybrids`, surgeon/live/keeper.py), as the Probes,
Routing and Layer gates screens do: one materialised model, lent to one job at a time, so a probe
or routing run started during the sweep waits for it (and says so). The record is
kept in the session's extensions after every configuration, exactly where `moe-surgeon sweep
SESSION` stores it (`store_sweep`), so ctrl+s saves it, the CLI resumes it and `r` here resumes it
too. The run is a job (screens/job.py): escape cancels it at the next batch, and the
configurations finished before stay.
"""

from __future__ import annotations

import copy

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Label, ProgressBar, Static

from surgeon.errors import SurgeonError
from surgeon.io.fs import error_line
from surgeon.io.sizes import step_text
from surgeon.jobs import Cancelled, Step
from surgeon.probes import metric_of, short_label

from .dialogs import ErrorScreen
from .job import JobScreen
from .probes import session_view
from .widgets.keybar import KeyBar

SEPARATOR = ";"  # group SPECs and probe specs contain commas
DEFAULT_LIMIT = 50  # built-in probe sets are cut to this many items by default


class SweepProgress(Message):
    """An engine event, with a copy of the record when the event carries one."""

    def __init__(self, text: str, *, record: dict | None = None):
        super().__init__()
        self.text, self.record = text, record


# ---------------------------------------------------------------- display helpers
def split_field(text: str) -> list[str]:
    return [p.strip() for p in text.split(SEPARATOR) if p.strip()]


def default_probe_text(recorded: list) -> str:
    """The session's probes a sweep can run, else every built-in set cut to DEFAULT_LIMIT items."""
    from surgeon.features.sweep.runner import offered_probes

    return f"{SEPARATOR} ".join(offered_probes(recorded, DEFAULT_LIMIT))


def delta_text(delta: float | None, metric: str) -> Text:
    """One heatmap cell: points against the base on a green (better) / red (worse) background."""
    if delta is None:
        return Text(f"{'…':^8}", "dim")
    m = metric_of(metric)
    text = m.delta_text(delta, digits=3)
    scale = min(1.0, abs(delta) / 0.2) if m.proportion else min(1.0, abs(delta))  # 20 points: full colour
    better = m.better(delta)
    level = int(40 + 160 * scale)
    if delta == 0:
        colour = "grey30"
    elif better:
        colour = f"rgb(0,{level},0)"
    else:
        colour = f"rgb({level},0,0)"
    return Text(f"{text:^8}", f"bold white on {colour}")


def heatmap(analysis) -> Text:
    """Configurations x probes: the delta of each against the base, coloured."""
    out = Text()
    width = max([len(r.label) for r in analysis.rows if r.kind == "configuration"] + [13])
    out.append(f"{'Δ vs base ' + analysis.base:<{width}}", "bold")
    for n, _ in enumerate(analysis.probes):
        out.append(f" {'P' + str(n + 1):^8}", "bold")
    out.append("\n")
    for row in analysis.rows:
        if row.kind != "configuration":
            continue
        out.append(f"{row.label:<{width}}")
        for probe in analysis.probes:
            out.append(" ")
            out.append_text(delta_text(analysis.delta(row.mask, probe), analysis.metrics.get(probe, "accuracy")))
        out.append("\n")
    for n, probe in enumerate(analysis.probes):
        out.append(f"P{n + 1} {short_label(probe)}  ", "dim")
    return out


# ---------------------------------------------------------------- the screen
class SweepScreen(JobScreen):
    CSS_PATH = "sweep.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        Binding("escape", "back", "Back / cancel", id="sweep.back",
                tooltip="Cancel a running sweep (after the current configuration), else go back to the grid"),
        Binding("r", "run", "Run", id="sweep.run",
                tooltip="Run (or resume) the sweep: every subset of the groups from the donor"),
        Binding("o", "open_configuration", "Open as plan", id="sweep.open",
                tooltip="Make the highlighted configuration the current plan"),
        Binding("t", "focus_table", "Table", id="sweep.table", show=False, tooltip="Focus the results table"),
    ]

    def __init__(self):
        super().__init__()
        self.record: dict | None = None  # a copy of the shown sweep's record (the UI thread's own)
        self.analysis = None
        self.masks: list[int | None] = []  # per table row: the configuration's mask, None for a donor

    def compose(self) -> ComposeResult:
        yield Static("", id="sweep-title")
        with Vertical(id="sweep-form"):
            with Horizontal(classes="sweep-field"):
                yield Label("groups ", classes="sweep-label")
                yield Input(id="sweep-groups", compact=True,
                            placeholder="[NAME=]SPEC[+SPEC...]; ... e.g. router; attention; experts")
            with Horizontal(classes="sweep-field"):
                yield Label("donor  ", classes="sweep-label")
                yield Input(id="sweep-donor", compact=True, placeholder="donor name")
            with Horizontal(classes="sweep-field"):
                yield Label("probes ", classes="sweep-label")
                yield Input(id="sweep-probes", compact=True, placeholder="KIND:DATA[,key=value]; ...")
        with Horizontal(id="sweep-progress-row"):
            yield ProgressBar(total=100, show_eta=False, id="sweep-progress")
            yield Static("", id="sweep-stats", markup=False)
        yield DataTable(id="sweep-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="sweep-heatmap")
        yield KeyBar()

    def on_mount(self) -> None:
        wb = self.app.wb
        self.query_one("#sweep-table").border_title = "configurations x probes"
        self.query_one("#sweep-groups", Input).value = f"{SEPARATOR} ".join(("router", "attention", "experts"))
        if wb is not None:
            others = [n for n in wb.donors if n != wb.base]
            self.query_one("#sweep-donor", Input).value = others[0] if others else ""
        self.query_one("#sweep-probes", Input).value = default_probe_text(session_view(self.app).probes)
        self.query_one("#sweep-stats", Static).update("r runs every subset of the groups from the donor")
        self.refresh_title()
        self.query_one("#sweep-table").focus()

    @on(Input.Submitted)
    def on_field_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#sweep-table").focus()  # r runs, o opens: keys the fields would swallow

    def refresh_title(self) -> None:
        wb = self.app.wb
        title = Text("Sweep", "bold")
        if wb is not None:
            title.append(f"  base {wb.base} · every subset of the groups from the donor · o opens a configuration")
        self.query_one("#sweep-title", Static).update(title)

    def refresh_cells(self) -> None:  # the app calls this after every change of the workbench
        self.refresh_title()

    # ------------------------------------------------------------ the spec
    def build_spec(self):
        """The SweepSpec of the form, checked against the open donors (raises SurgeonError)."""
        from surgeon.features.sweep.runner import (
            SweepSpec,
            check_groups,
            check_probes,
            parse_group,
        )
        from surgeon.live.devices import default_device
        from surgeon.probes import parse_probe

        wb = self.app.wb
        groups = [parse_group(g) for g in split_field(self.query_one("#sweep-groups", Input).value)]
        donor = self.query_one("#sweep-donor", Input).value.strip()
        if donor not in wb.donors:
            raise SurgeonError(f"donor {donor!r} is not open (donors: {', '.join(wb.donors)})")
        if donor == wb.base:
            raise SurgeonError(f"donor {donor!r} is the base; choose another donor")
        probes = [parse_probe(p) for p in split_field(self.query_one("#sweep-probes", Input).value)]
        check_probes(probes)
        warnings = check_groups(groups, dict(wb.donors), wb.base, donor)
        return SweepSpec(wb.base, donor, groups, probes, device=default_device()), warnings

    # ------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self.job_running

    def action_run(self) -> None:
        from surgeon.features.sweep.runner import find_sweep

        wb = self.app.wb
        if self.running:
            self.notify("the sweep is already running (escape cancels)", timeout=3)
            return
        if wb is None:
            self.notify("nothing to sweep: no donors are open", severity="warning")
            return
        # The keeper lends the live hybrid to one job at a time (a probe started during the sweep
        # waits for it); a sweep asked for while the Probes screen runs is refused at once rather
        # than queued behind it.
        if self.app.kept_screen("probes").running:
            self.notify("the Probes screen is running; wait for it", severity="warning")
            return
        try:
            spec, warnings = self.build_spec()
        except SurgeonError as e:
            self.app.push_screen(ErrorScreen("Cannot run the sweep", str(e).replace("--", "")))
            return
        for w in warnings:
            self.notify(w, severity="warning", timeout=6)
        donors = dict(wb.donors)
        stored = find_sweep(session_view(self.app), spec.key(donors))
        self.query_one("#sweep-progress", ProgressBar).update(total=100, progress=0)
        self.query_one("#sweep-stats", Static).update("checking the probe data…")
        self.start_job(self.sweep_job, spec, donors, copy.deepcopy(stored) if stored else None, wb.plan(),
                       group="sweep")

    def sweep_job(self, spec, donors, stored, plan, *, progress, cancel) -> dict:
        """The sweep, on the job's thread; finished configurations reach the screen as they come."""
        from surgeon.features.sweep.runner import run_sweep

        def post(text: str) -> None:
            self.post_message(SweepProgress(text))

        def on_event(e) -> None:
            if e.kind == "swap":
                post(f"[{e.done}/{e.total}] {e.name}: swapped {e.swap.tensors} tensor(s)")
            elif e.record is not None:
                what = {"ceiling": f"ceiling {e.name} {short_label(e.probe)}", "configuration": f"{e.name} done",
                        "done": "done"}.get(e.kind, e.kind)
                self.post_message(SweepProgress(f"[{e.done}/{e.total}] {what}", record=copy.deepcopy(e.record)))

        try:
            from surgeon.features.probe import check_probe_data

            check_probe_data(spec.probes)  # bad probe data fails before any model loads
            cancel.check()
            # Held for the whole sweep: a probe or a routing run started meanwhile waits for it.
            # run_sweep walks its own plans and puts the hybrid back where it found it (swap=False);
            # a failure drops the hybrid (a swap may have stopped half-way), a cancel does not.
            with self.app.hybrids.use(plan, donors, spec.device, spec.dtype, job="sweep", note=post, cancel=cancel,
                                      swap=False) as lease:
                return copy.deepcopy(run_sweep(spec, donors, record=stored, hybrid=lease.hybrid, on_event=on_event,
                                               progress=progress, cancel=cancel))
        except Cancelled:  # between batches: run_sweep has put the hybrid back on its plan
            raise
        except BaseException as e:
            if not isinstance(e, Exception):
                raise
            raise SurgeonError(error_line(e)) from e

    def store(self, record: dict) -> None:
        """Keep `record` in the session (replacing the stored sweep with its id), mark it modified."""
        from surgeon.features.sweep.runner import store_sweep

        store_sweep(session_view(self.app, create=True), record)
        self.app.workbench_changed()  # modified + autosaved; ctrl+s writes the session file

    @on(SweepProgress)
    def on_sweep_progress(self, message: SweepProgress) -> None:
        if not self.running:
            return
        self.query_one("#sweep-stats", Static).update(message.text)
        if message.record is not None:
            self.store(message.record)
            self.show_record(message.record)

    def job_progress(self, step: Step) -> None:
        if not self.running:
            return
        self.query_one("#sweep-progress", ProgressBar).update(total=max(1, step.total), progress=step.done)
        self.query_one("#sweep-stats", Static).update(f"{step.detail}  ·  {step_text(step)}")

    def job_failed(self, message: str) -> None:
        self.query_one("#sweep-stats", Static).update("failed: the configurations finished before the failure are kept")
        self.app.push_screen(ErrorScreen("Cannot run the sweep", message))

    def job_cancelled(self) -> None:
        self.query_one("#sweep-stats", Static).update(
            "stopped: r resumes the sweep where it stopped" if self.record is not None else "cancelled")

    def job_finished(self, record: dict) -> None:
        self.store(record)
        self.show_record(record)
        self.query_one("#sweep-progress", ProgressBar).update(total=100, progress=100)
        self.query_one("#sweep-stats", Static).update(
            f"done: {len(record['configurations'])} configuration(s) · "
            "o opens the highlighted one · ctrl+s saves the sweep in the session")

    # ------------------------------------------------------------ views
    def show_record(self, record: dict) -> None:
        from surgeon.features.sweep.report import analyze, cell_text

        self.record = record
        self.analysis = a = analyze(record)
        table = self.query_one("#sweep-table", DataTable)
        row = table.cursor_row
        table.clear(columns=True)
        table.add_column("configuration", key="configuration")
        for p in a.probes:
            table.add_column(short_label(p), key=p)
        self.masks = []
        for r in a.rows:
            label = Text(r.label, "bold" if r.kind == "donor" else "")
            key = f"donor:{r.name}" if r.kind == "donor" else f"mask:{r.mask}"
            table.add_row(label, *(cell_text(r.cells.get(p)) for p in a.probes), key=key)
            self.masks.append(r.mask if r.kind == "configuration" else None)
        if a.rows:
            table.move_cursor(row=min(max(row, 0), len(a.rows) - 1))
        self.query_one("#sweep-heatmap", Static).update(heatmap(a))

    def action_focus_table(self) -> None:
        self.query_one("#sweep-table").focus()

    @on(DataTable.RowSelected, "#sweep-table")
    def on_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open_configuration()

    def action_open_configuration(self) -> None:
        from surgeon.features.sweep.runner import plan_for

        if self.record is None or not self.masks:
            self.notify("no sweep yet: press r", timeout=3)
            return
        row = self.query_one("#sweep-table", DataTable).cursor_row
        mask = self.masks[row] if 0 <= row < len(self.masks) else None
        if mask is None:
            self.notify("a donor's row is not a configuration; highlight a configuration", timeout=3)
            return
        try:
            self.app.wb.load_plan(plan_for(self.record, mask))
        except SurgeonError as e:
            self.app.push_screen(ErrorScreen("Cannot open the configuration", str(e)))
            return
        self.app.workbench_changed()
        self.notify(f"opened configuration {self.analysis.row(mask).label!r} as the current plan (u undoes)",
                    timeout=4)

    def on_unmount(self) -> None:
        self.cancel_job()

    def action_back(self) -> None:
        if self.cancel_job():
            self.query_one("#sweep-stats", Static).update("stopping after the current batch…")
        else:
            self.app.pop_screen()

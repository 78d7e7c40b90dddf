"""Probes: run quick benchmarks on the hybrid and its donors; results, a chart, and run history.

The screen is installed once (screens/screen_table.py), so the picked probes and the shown run
stay. Every run holds the app's one live hybrid (`app.hybrids`, surgeon/live/keeper.py) for the whole
run (a sweep, routing run or gate selection holding it is waited for, and the status line says so)
and applies the current plan to it first, which copies only the tensors whose source changed, so a
rerun after a mark costs the swap and the probes, not a reload. Torch and
transformers are imported in the worker only.

Results are recorded in the session by the engine's `record_probe_results`, the very function
`moe-surgeon probe SESSION` records with, so ctrl+s saves them as the CLI would and `replay
--probes` re-runs them. The history is derived from those records, so runs made by the CLI before
the session was opened are listed too. The run is a job (screens/job.py): progress in items, and
escape cancels it at the next batch.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.events import Resize
from textual.message import Message
from textual.widgets import DataTable, Input, ProgressBar, SelectionList, Static
from textual.widgets.selection_list import Selection

from surgeon.errors import SurgeonError
from surgeon.features.probe import default_specs, split_runs  # default_specs: screens/prune.py too
from surgeon.io.fs import error_line
from surgeon.io.sizes import human_bytes, step_text
from surgeon.jobs import Cancelled, Step
from surgeon.probes import PROBES, ProbeSpec, metric_of, parse_probe, short_label

from .dialogs import ErrorScreen
from .job import JobScreen
from .widgets.chart import Bar, BarGroup, ScoreChart
from .widgets.grid import donor_colour, donor_style
from .widgets.keybar import KeyBar

BATCH_SIZE = 16  # the CLI's default, so donor scores cached by either are shared
DTYPE = "keep"
TALL = 36  # rows from which the picker, chart and history get more room


class ProbeNote(Message):
    """A phase of the running job that counts no items (loading the model)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


def session_view(app, create: bool = False):
    """The session's probe specs, results and extensions as the app holds them (a
    core.session.SessionRecords, with the names of core.session.Session), so the engine records into
    them as into a session. The one place the probe and sweep screens reach into the app's session
    state; `create` is kept for callers: the records always exist, and a failed run adds nothing."""
    return app.records


# ---------------------------------------------------------------- display helpers (tested directly)
def ordered_rows(rows: list[dict]) -> list[dict]:
    """summarize() rows grouped by probe (first-seen order): hybrid rows first, then donors by name."""
    probes: list[str] = []
    for r in rows:
        if r["probe"] not in probes:
            probes.append(r["probe"])
    return sorted(rows, key=lambda r: (probes.index(r["probe"]), not r["model"].startswith("hybrid"), r["model"]))


def donor_of_row(row: dict) -> str | None:
    """The donor a row measures ("donor:B") or is compared with ("hybrid vs donor:B"), else None."""
    model = row["model"]
    return model.rsplit("donor:", 1)[1] if "donor:" in model else None


def probe_cell(row: dict) -> str:
    metric = metric_of(row["metric"])
    return short_label(row["probe"]) + ("" if metric.proportion else f" ({metric.label})")


def format_score(row: dict) -> str:
    return metric_of(row["metric"]).score_text(row["score"])


def format_ci(row: dict) -> str:
    return metric_of(row["metric"]).ci_text(*row["ci"])


def format_delta(vs: dict) -> str:
    from surgeon.probes.stats import significance_stars

    return f"{100 * vs['delta']:+.1f}{significance_stars(vs['mcnemar_p'])}"


def plan_text(record: dict | None) -> str:
    if record is None or "plan" not in record:
        return "-"
    return " ".join(f"{a['spec']}={a['donor']}" for a in record["plan"]) or "base only"


# ---------------------------------------------------------------- the screen
class ProbesScreen(JobScreen):
    CSS_PATH = "probes.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        Binding("escape", "back", "Back / cancel", id="probes.back",
                tooltip="Cancel a running probe run, else go back to the grid"),
        Binding("r", "run", "Run", id="probes.run",
                tooltip="Run the checked probes on the hybrid of the current marks and on every donor"),
        Binding("plus,insert", "focus_add", "Add probe", key_display="+", id="probes.add",
                tooltip="Type a probe KIND:DATA[,key=value...] to add to the list"),
        Binding("t", "focus_list", "Probe list", id="probes.list", show=False,
                tooltip="Focus the probe list (space checks a probe)"),
        Binding("H", "focus_history", "History", id="probes.history", show=False,
                tooltip="Focus the history of runs (the highlighted run is shown)"),
    ]

    def __init__(self):
        super().__init__()
        self.specs: list[ProbeSpec] = []
        self.last_swap = None  # SwapReport of the latest run's apply()
        self.runs: list[list[dict]] = []
        self.shown_run: int | None = None
        self.rows: list[dict] = []  # ordered summarize() rows of the shown run
        self.items_done = 0.0  # progress of the current run, for tests and the stats line
        self._results_seen: tuple[int, int] | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="probes-title")
        with Horizontal(id="probes-top"):
            with Vertical(id="probes-pick"):
                yield SelectionList[int](id="probe-list")
                yield Input(placeholder=f"+ add KIND:DATA[,key=value] ({' '.join(PROBES)})", id="probe-add",
                            compact=True)
                yield Static("", classes="field-error", id="probe-add-error", markup=False)
            with VerticalScroll(id="probe-chart-box"):
                yield ScoreChart(id="probe-chart")
        with Horizontal(id="probe-progress-row"):
            yield ProgressBar(total=100, show_eta=False, id="probe-progress")
            yield Static("", id="probe-stats", markup=False)
        yield DataTable(id="probe-results", cursor_type="row", zebra_stripes=True)
        yield Static("", id="probe-detail", markup=False)
        yield DataTable(id="probe-history", cursor_type="row")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#probe-chart-box").border_title = "H hybrid vs donors · ▓░ 95% CI"
        self.query_one("#probe-results").border_title = "results"
        self.query_one("#probe-history").border_title = "runs in this session"
        self.query_one("#probe-add-error").display = False
        history = self.query_one("#probe-history", DataTable)
        history.add_columns("#", "UTC", "plan", "probes", "hybrid")
        self.specs, _ = default_specs(session_view(self.app).probes)
        picker = self.query_one("#probe-list", SelectionList)
        # Every probe starts checked: r runs what the list shows, not just its first line.
        picker.add_options([self._selection(i, True) for i in range(len(self.specs))])
        self.query_one("#probe-stats", Static).update("space checks a probe · r runs the checked ones on the "
                                                      "hybrid and every donor")
        picker.focus()
        self.show_checked()
        self.refresh_all()

    def _selection(self, index: int, checked: bool) -> Selection:
        return Selection(self._prompt(index, checked), index, checked)

    def _prompt(self, index: int, checked: bool) -> Text:
        # The toggle's X is drawn for both states, told apart by colour only: the box says it in text.
        return Text(f"[{'x' if checked else ' '}] {short_label(self.specs[index].label)}")

    @on(SelectionList.SelectedChanged, "#probe-list")
    def show_checked(self) -> None:
        picker = self.query_one("#probe-list", SelectionList)
        selected = set(picker.selected)
        for i in range(picker.option_count):
            index = picker.get_option_at_index(i).value
            prompt = self._prompt(index, index in selected)
            if str(picker.get_option_at_index(i).prompt) != str(prompt):
                picker.replace_option_prompt_at_index(i, prompt)
        n = len(selected)
        runs = "space checks one" if n == 0 else f"r runs {'it' if n == 1 else f'these {n}'}"
        picker.border_title = f"{n} of {picker.option_count} checked · {runs}"

    # ------------------------------------------------------------ views
    def on_screen_resume(self) -> None:
        self.refresh_all()

    def on_resize(self, event: Resize) -> None:
        self.set_class(event.size.height >= TALL, "-tall")

    def refresh_cells(self) -> None:  # the app calls this after every change of the workbench
        self.refresh_title()

    def refresh_status(self) -> None:
        self.refresh_title()

    def refresh_all(self) -> None:
        self.refresh_title()
        results = session_view(self.app).results
        if self._results_seen != (id(results), len(results)):
            if self._results_seen is not None and id(results) != self._results_seen[0]:
                self._add_recorded_specs()  # another session was opened meanwhile
            self._results_seen = (id(results), len(results))
            self.refresh_history(select_last=True)

    def _add_recorded_specs(self) -> None:
        picker = self.query_one("#probe-list", SelectionList)
        recorded, n = default_specs(session_view(self.app).probes)
        for spec in recorded[:n]:
            if spec not in self.specs:
                self.specs.append(spec)
                picker.add_option(self._selection(len(self.specs) - 1, True))
                self.show_checked()

    def refresh_title(self) -> None:
        wb = self.app.wb
        title = Text()
        title.append("Probes", "bold")
        if wb is None:
            self.query_one("#probes-title", Static).update(title)
            return
        title.append(f"  hybrid: base {wb.base} + {wb.marks} marked part(s) · donors ")
        for name in wb.donors:
            title.append(f" {name} ", donor_style(wb, name))
            title.append(" ")
        if self.shown_run is not None and self.runs:
            hybrid = next((r for r in self.runs[self.shown_run] if r.get("model") == "hybrid" and "plan" in r), None)
            current = [{"spec": a.spec, "donor": a.donor} for a in wb.plan().assignments]
            if hybrid is not None and hybrid["plan"] != current:
                title.append("· shown run: other marks", "yellow")
        self.query_one("#probes-title", Static).update(title)

    def refresh_history(self, select_last: bool = False) -> None:
        table = self.query_one("#probe-history", DataTable)
        self.runs = split_runs(session_view(self.app).results)
        table.clear()
        for n, run in enumerate(self.runs):
            hybrid = [r for r in run if r.get("model") == "hybrid"]
            probes = list(dict.fromkeys(short_label(str(r.get("label", "?"))) for r in hybrid or run))
            scores = " ".join(format_score(r) for r in hybrid if "vs" not in r and "score" in r)
            when = str(run[0].get("time", ""))[5:16].replace("T", " ")
            plan = next((r for r in hybrid if "plan" in r), None)
            table.add_row(str(n + 1), when, plan_text(plan), ", ".join(probes), scores or "-", key=str(n))
        if not self.runs:
            self.show_run(None)
        elif select_last or self.shown_run is None or self.shown_run >= len(self.runs):
            table.move_cursor(row=len(self.runs) - 1)
            self.show_run(len(self.runs) - 1)
        else:
            table.move_cursor(row=self.shown_run)
            self.show_run(self.shown_run)

    def show_run(self, index: int | None) -> None:
        from surgeon.probes.run import summarize

        self.shown_run = index
        table = self.query_one("#probe-results", DataTable)
        table.clear(columns=True)
        self.rows = []
        if index is None:
            self.query_one("#probe-chart", ScoreChart).set_groups([], "no results yet: check probes (space), press r")
            self.query_one("#probe-detail", Static).update("")
            self.refresh_title()
            return
        try:
            self.rows = ordered_rows(summarize(self.runs[index]))
        except (KeyError, TypeError, ValueError, SurgeonError) as e:  # a hand-edited session
            self.query_one("#probe-detail", Static).update(f"run {index + 1} cannot be summarized: {e}")
            self.refresh_title()
            return
        donors = sorted({d for r in self.rows if r["model"].startswith("donor:") for d in [donor_of_row(r)]})
        table.add_column("model", key="model")
        table.add_column("probe", key="probe")
        table.add_column("n", key="n")
        table.add_column("score", key="score")
        table.add_column("95% CI", key="ci")
        for d in donors:
            table.add_column(f"Δ{d}", key=f"d:{d}")
        for r in self.rows:
            cells = [self._model_cell(r), probe_cell(r),
                     str(r["n"]), format_score(r), format_ci(r)]
            for d in donors:
                vs = r["vs"].get(f"donor:{d}") if r["model"] == "hybrid" else None
                cells.append(self._delta_cell(vs))
            table.add_row(*cells, key=f"{r['model']}|{r['probe']}")
        self.query_one("#probe-chart", ScoreChart).set_groups(self._chart_groups())
        self.show_detail(0)
        self.refresh_title()

    def _model_cell(self, row: dict) -> Text:
        wb = self.app.wb
        donor = donor_of_row(row)
        if row["model"] == "hybrid":
            return Text("hybrid", "bold")
        if row["model"].startswith("hybrid"):
            text = Text("hybrid vs ", "bold")
        else:
            text = Text()
        if wb is not None and donor in wb.donors:
            text.append(f" {donor} ", donor_style(wb, donor))
        else:
            text.append(f" {donor} ")
        return text

    @staticmethod
    def _delta_cell(vs: dict | None) -> Text:
        if vs is None:
            return Text("")
        text = format_delta(vs)
        if vs["mcnemar_p"] >= 0.05:
            return Text(text, "dim")
        return Text(text, "bold green" if vs["delta"] > 0 else "bold red")

    def _chart_groups(self) -> list[BarGroup]:
        wb = self.app.wb
        groups: dict[str, list[Bar]] = {}
        metrics: dict[str, str] = {}
        for r in self.rows:
            donor = donor_of_row(r)
            if r["model"] == "hybrid":
                tag, style = "H", Style(bold=True)
            else:
                colour = donor_colour(wb, donor) if wb is not None and donor in wb.donors else None
                tag, style = donor or "?", Style(color=colour)
            groups.setdefault(r["probe"], []).append(Bar(tag, style, r["score"], r["ci"][0], r["ci"][1]))
            metrics[r["probe"]] = r["metric"]
        return [BarGroup(short_label(p), metrics[p], tuple(bars)) for p, bars in groups.items()]

    def show_detail(self, index: int) -> None:
        detail = self.query_one("#probe-detail", Static)
        if not 0 <= index < len(self.rows):
            detail.update("")
            return
        r = self.rows[index]
        parts = []
        for name, v in r["vs"].items():
            parts.append(f"{name.split(':')[1]}: Δ{100 * v['delta']:+.1f} McNemar p={v['mcnemar_p']:.2g} "
                         f"z p={v['z_p']:.2g}")
        for name, e in r.get("extra", {}).items():
            parts.append(f"{name} {100 * e['score']:.1f}% [{100 * e['ci'][0]:.1f}, {100 * e['ci'][1]:.1f}]")
        if not parts:
            parts.append(f"{r['model']} · {r['probe']} · {metric_of(r['metric']).label} "
                         f"{format_score(r)} {format_ci(r)}")
        detail.update(" · ".join(parts))

    @on(DataTable.RowHighlighted, "#probe-results")
    def on_result_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row == event.data_table.cursor_row:  # not a stale event from before a rebuild
            self.show_detail(event.cursor_row)

    @on(DataTable.RowHighlighted, "#probe-history")
    def on_run_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row != event.data_table.cursor_row:
            return  # a stale event from before the history was rebuilt
        if event.cursor_row != self.shown_run and 0 <= event.cursor_row < len(self.runs):
            self.show_run(event.cursor_row)

    # ------------------------------------------------------------ picking probes
    @on(Input.Submitted, "#probe-add")
    def on_add(self, event: Input.Submitted) -> None:
        error = self.query_one("#probe-add-error", Static)
        text = event.value.strip()
        if not text:
            return
        try:
            spec = parse_probe(text)
        except SurgeonError as e:
            error.update(str(e).replace("--probe ", ""))
            error.display = True
            return
        error.display = False
        event.input.value = ""
        picker = self.query_one("#probe-list", SelectionList)
        if spec in self.specs:
            picker.select(self.specs.index(spec))
        else:
            self.specs.append(spec)
            picker.add_option(self._selection(len(self.specs) - 1, True))
            self.show_checked()
        picker.highlighted = self.specs.index(spec)
        picker.focus()

    def checked_specs(self) -> list[ProbeSpec]:
        return [self.specs[i] for i in sorted(self.query_one("#probe-list", SelectionList).selected)]

    def action_focus_add(self) -> None:
        self.query_one("#probe-add", Input).focus()

    def action_focus_list(self) -> None:
        self.query_one("#probe-list").focus()

    def action_focus_history(self) -> None:
        self.query_one("#probe-history").focus()

    # ------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self.job_running

    def action_run(self) -> None:
        wb = self.app.wb
        if self.running:
            self.notify("probes are already running (escape cancels)", timeout=3)
            return
        if wb is None:
            self.notify("nothing to probe: no donors are open", severity="warning")
            return
        specs = self.checked_specs()
        if not specs:
            self.notify("check at least one probe (space) first", severity="warning", timeout=4)
            return
        self.items_done = 0.0
        self.query_one("#probe-progress", ProgressBar).update(total=100, progress=0)
        self.query_one("#probe-stats", Static).update("checking the probe data…")
        self.start_job(self.probe_job, wb.plan(), dict(wb.donors), specs, group="probes")

    def note(self, text: str) -> None:
        self.post_message(ProbeNote(text))

    def probe_job(self, plan, donors, specs: list[ProbeSpec], *, progress, cancel):
        """The run, on the job's thread: the app's live hybrid moved to `plan`, then the probes."""
        from surgeon.features.probe import ProbeRequest, run_probe

        try:
            run = run_probe(ProbeRequest(plan, donors, specs, dtype=DTYPE, batch_size=BATCH_SIZE),
                            keeper=self.app.hybrids, progress=progress, cancel=cancel, note=self.note)
        except Cancelled:  # between batches, never inside a swap: the hybrid stays consistent
            raise
        except Exception as e:
            raise SurgeonError(error_line(e)) from e
        self.last_swap = run.swap
        return run

    @on(ProbeNote)
    def on_probe_note(self, message: ProbeNote) -> None:
        if self.running:
            self.query_one("#probe-stats", Static).update(message.text)

    def job_progress(self, step: Step) -> None:
        if not self.running:
            return
        self.items_done = step.done
        self.query_one("#probe-progress", ProgressBar).update(total=max(1, step.total), progress=step.done)
        self.query_one("#probe-stats", Static).update(f"{step.detail}  ·  {step_text(step)}")

    def job_cancelled(self) -> None:
        self.query_one("#probe-stats", Static).update("cancelled: nothing was recorded")
        self.notify("probe run cancelled; the session's results are unchanged", timeout=4)

    def job_failed(self, message: str) -> None:
        self.query_one("#probe-stats", Static).update("failed: nothing was recorded")
        self.app.push_screen(ErrorScreen("Cannot run the probes", message))

    def job_finished(self, run) -> None:
        from surgeon.probes.run import record_probe_results

        record_probe_results(session_view(self.app, create=True), run.specs, run.records)
        self.query_one("#probe-progress", ProgressBar).update(total=100, progress=100)
        swap = run.swap
        how = (f"materialised on {run.device}" if run.materialized else
               f"swapped {swap.tensors} tensor(s), {human_bytes(swap.bytes)}, into the live hybrid")
        self.query_one("#probe-stats", Static).update(f"done in {run.seconds:.1f}s · {how}")
        self.app.workbench_changed()  # modified + autosaved; ctrl+s writes the session file
        self.refresh_all()
        self.notify(f"{len(run.specs)} probe(s) measured; ctrl+s saves them in the session", timeout=4)

    def on_unmount(self) -> None:
        self.cancel_job()  # the app is closing: stop a run at its next batch

    def action_cancel(self) -> None:
        if self.cancel_job():
            self.query_one("#probe-stats", Static).update("cancelling after the current batch…")

    def action_back(self) -> None:
        if self.running:
            self.action_cancel()
        else:
            self.app.pop_screen()

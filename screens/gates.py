"""Layer gates: the Self-MoE gates of the current hybrid, and which of them to keep (docs/references.md).

The hybrid's gates come from the donors marked for the grid's `layer gate` column (a gate is a
plan component like any other), so the table lists, per decoder layer, the gate the hybrid has
(type, size, donor) or "no gate". A job (screens/job.py) runs
`surgeon.features.gates.run.select_hybrid` on calibration text: the per-layer logit-lens
perplexity without and with each gate (eq. 3 and 4) and the verdict (eq. 5), exactly what
`moe-surgeon gates select --dry-run` prints. It runs on the app's one live hybrid (`app.hybrids`,
surgeon/live/keeper.py), held for the whole selection: a probe or routing run holding it is waited
for (the status line says so), and selection only reads the model, so sharing it is safe. The
chart shows the change each gate makes; the table the numbers.

`a` applies the verdicts the grid's way: the dropped layers' `layer gate` cells are given to a
donor without a gate there (the base when it has none), as ONE undoable workbench change, so the
hybrid (and its export) loses exactly those gates; the donors' files are never touched.

The screen is installed once (like Routing), so the selection of a plan is kept while the marks
stay the same; it runs again when the marks, the donors or the calibration data change.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static

from surgeon.core.resolve import LayerGate
from surgeon.errors import SurgeonError
from surgeon.features.gates.workbench import drop_candidates, drop_gates, gated_donors, hybrid_gates
from surgeon.jobs import Cancelled, Step

from .dialogs import ErrorScreen, PathScreen
from .job import JobScreen
from .widgets.gate_chart import ChangeRow, GateChart, change_text
from .widgets.grid import donor_style
from .widgets.keybar import KeyBar

DEFAULT_CORPUS = "arith"  # the built-in set the `gates select` run docs/gates.md shows calibrates on
SEQ_LEN = 64  # `gates select` defaults, so the screen and the CLI give the same numbers
BATCH_SIZE = 16
DTYPE = "keep"  # as the Probes and Routing screens: all run on the app's one live hybrid
MIN_GAINS = (0.0, 0.01, 0.02, 0.05, 0.1)  # m cycles through them; verdicts only, no rerun
ADD_HINT = ("No open donor has layer gates. Add some with `moe-surgeon gates add OUT --base DIR "
            "--type vector --layers all`, train them (`moe-surgeon gates train OUT --data FILE`), "
            "then open OUT as a donor (d on the grid).")


class GatesNote(Message):
    """A line for the status while the job waits for the live hybrid or materialises it."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


# ---------------------------------------------------------------- display helpers
def corpus_label(corpus: str) -> str:
    return corpus if "/" not in corpus else Path(corpus).name


# ---------------------------------------------------------------- the calibration dialog
class CorpusScreen(PathScreen):
    """A built-in set's name or a file (text, or a prompt/answer .jsonl), as `gates select --data`."""

    def __init__(self, value: str):
        from surgeon.probes.data import builtin_sets

        self.builtin = list(builtin_sets())
        super().__init__(f"Calibration data: a built-in set ({', '.join(self.builtin)}) or a text or .jsonl file",
                         value)

    def on_input_submitted(self, event) -> None:
        event.prevent_default()  # not PathScreen's handler: a set's name is no path
        value = event.value.strip()
        if value in self.builtin:
            self.dismiss(value)
        elif Path(value).expanduser().is_file():
            self.dismiss(str(Path(value).expanduser().resolve()))
        else:
            self.query_one("#path-error", Static).update(
                f"{value or '(empty)'}: no such file, nor a built-in set ({', '.join(self.builtin)})")


# ---------------------------------------------------------------- the screen
class GatesScreen(JobScreen):
    CSS_PATH = "gates.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        Binding("escape", "back", "Back", id="gates.back"),
        Binding("r", "run", "Select", id="gates.run",
                tooltip="Measure every gate of the hybrid again: logit-lens perplexity without and with it"),
        Binding("f", "corpus", "Calibration", id="gates.corpus",
                tooltip="Choose the calibration data: a built-in set or a text or prompt/answer .jsonl file"),
        Binding("m", "min_gain", "Min gain", id="gates.min_gain",
                tooltip="Keep a gate only if it lowers the perplexity by 0, 1, 2, 5 or 10% (as --min-gain)"),
        Binding("a", "apply", "Apply", id="gates.apply",
                tooltip="Give the dropped layers' gates to a donor without gates there (one undo), back to the grid"),
    ]

    def __init__(self):
        super().__init__()
        self.corpus = DEFAULT_CORPUS
        self.min_gain = 0.0
        self.gates: dict[int, LayerGate] = {}
        self.problem: str | None = None  # why the hybrid's gates cannot be listed (an unresolvable plan)
        self.results: dict[tuple, tuple] = {}  # key -> (Selection, device, seconds), one per plan and corpus
        self.failures: dict[tuple, str] = {}  # key -> why it failed: not run again until r asks
        self.pending: tuple | None = None  # the key the job is measuring
        self.progress = ""

    def compose(self) -> ComposeResult:
        yield Static("", id="gates-title")
        yield Static("", id="gates-note")
        with VerticalScroll(id="gates-chart-box"):
            yield GateChart(id="gates-chart")
        yield DataTable(id="gates-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="gates-status", markup=False)
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#gates-chart-box").border_title = "change of the layer's logit-lens perplexity the gate makes"
        self.query_one("#gates-table", DataTable).focus()
        self.sync()

    def on_screen_resume(self) -> None:
        self.sync()

    # ------------------------------------------------------------ state
    def ident(self) -> tuple:
        """What a selection depends on: the donors (their bytes), the base and the marks."""
        wb = self.app.wb
        donors = tuple((n, str(d.path), d.fingerprint) for n, d in wb.donors.items())
        return donors, wb.base, tuple((a.spec, a.donor) for a in wb.plan().assignments)

    def key(self) -> tuple:
        return self.ident(), self.corpus

    def current(self):
        """(Selection with this min gain, device, seconds) measured for the hybrid as it is now, or None."""
        hit = self.results.get(self.key()) if self.app.wb is not None else None
        if hit is None:
            return None
        from surgeon.features.gates.select import with_min_gain  # torch: a selection was measured

        selection, device, seconds = hit
        return with_min_gain(selection, self.min_gain), device, seconds

    def sync(self) -> None:
        """List the hybrid's gates and measure them when this plan and corpus have no selection yet."""
        wb = self.app.wb
        if wb is None:
            return
        try:
            self.gates, self.problem = hybrid_gates(wb), None
        except SurgeonError as e:
            self.gates, self.problem = {}, str(e)
        key = self.key()
        if self.gates and key not in self.results and key not in self.failures and self.pending != key:
            self.start_run()
        self.show()

    def start_run(self) -> None:
        wb = self.app.wb
        self.pending = self.key()
        self.progress = "starting…"
        self.restart_job(self.run_selection, self.pending, wb.plan(), dict(wb.donors), self.corpus, group="gates")

    def run_selection(self, key: tuple, plan, donors: dict, corpus: str, *, progress, cancel):
        """The job: (key, Selection, device, seconds), or (key, None, why, 0) so that a failure is
        filed under the marks and data it was for."""
        from surgeon.io.fs import error_line

        started = time.perf_counter()
        try:
            from transformers.utils import logging as hf_logging

            from surgeon.features.gates.run import select_hybrid

            hf_logging.disable_progress_bar()  # its tqdm bar would write over the screen
            progress(Step(0, 1, label=f"reading {corpus_label(corpus)} (the first run loads torch)"))
            selection, device = select_hybrid(plan, donors, corpus, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                                              dtype=DTYPE, keeper=self.app.hybrids, note=self.note,
                                              progress=progress, cancel=cancel)
        except Cancelled:
            raise
        except Exception as e:  # a dialog, never a traceback on screen
            return key, None, error_line(e), 0.0
        return key, selection, device, time.perf_counter() - started

    def note(self, text: str) -> None:
        self.post_message(GatesNote(text))

    @on(GatesNote)
    def on_gates_note(self, message: GatesNote) -> None:
        if self.pending is not None:
            self.progress = message.text
            self.show_status()

    def job_progress(self, step: Step) -> None:
        if self.pending is None:
            return
        self.progress = (f"measuring every gate: {step.done} of {step.total} calibration sequences"
                         if step.label == "select" else f"{step.label}…")
        self.show_status()

    def job_finished(self, result) -> None:
        key, selection, device_or_error, seconds = result
        if key != self.pending:
            return  # a run for marks or data that have changed since
        self.pending = None
        self.progress = ""
        if selection is None:
            self.failures[key] = device_or_error
            self.show()
            self.app.push_screen(ErrorScreen("Cannot select the layer gates", device_or_error))
            return
        self.results[key] = (selection, device_or_error, seconds)
        self.show()

    def on_unmount(self) -> None:
        self.cancel_job()

    # ------------------------------------------------------------ the view
    def show(self) -> None:
        wb = self.app.wb
        title = Text()
        title.append("Layer gates", "bold")
        if wb is not None:
            title.append(f"  hybrid: base {wb.base} + {wb.marks} marked part(s) · calibration "
                         f"{corpus_label(self.corpus)} · min gain {100 * self.min_gain:g}%")
        self.query_one("#gates-title", Static).update(title)
        note = self.query_one("#gates-note", Static)
        box = self.query_one("#gates-chart-box")
        table = self.query_one("#gates-table", DataTable)
        gated = gated_donors(wb) if wb is not None else {}
        table.display = bool(gated) and self.problem is None
        box.display = table.display and bool(self.gates)
        if wb is None:
            note.update("no donors are open")
        elif not gated:
            note.update(ADD_HINT)
        elif self.problem is not None:
            note.update(f"the marks do not resolve: {self.problem}")
        elif not self.gates:
            from surgeon.core.plan import format_ranges

            have = "; ".join(f"{n} in layer(s) {format_ranges(ls)}" for n, ls in gated.items())
            note.update(f"The hybrid has no layer gates. Donors with gates: {have}. Give the grid's layer gate "
                        "column to one of them (c paints the column) to take its gates.")
        else:
            note.update(self.verdict_text())
        if table.display:
            self.fill_table()
        if box.display:
            self.fill_chart()
        self.show_status()

    def verdict_text(self) -> Text:
        from surgeon.core.plan import format_ranges

        cur = self.current()
        if cur is None:
            failure = self.failures.get(self.key())
            if failure is not None:
                return Text(f"the selection failed: {failure} (f chooses other data, r tries again)", "red")
            return Text("measuring the gates…", "dim")
        sel, device, _ = cur
        text = Text(f"per-layer logit-lens perplexity on {sel.tokens} calibration tokens ({device}, {DTYPE}): ")
        text.append(f"keep {format_ranges(sel.kept) or 'none'}", "bold green")
        text.append(" · ")
        text.append(f"drop {format_ranges(sel.dropped) or 'none'}", "bold red")
        if sel.dropped:
            candidates = drop_candidates(self.app.wb, sel.dropped)
            if candidates:
                text.append(f" · a gives the dropped gates to donor {candidates[0]}, which has none there")
            else:
                text.append(" · every open donor has gates there: open one without to drop them", "yellow")
        return text

    def fill_table(self) -> None:
        wb = self.app.wb
        table = self.query_one("#gates-table", DataTable)
        row = table.cursor_row
        table.clear(columns=True)
        for title in ("layer", "gate", "parameters", "from", "without gate", "with gate", "change", "verdict"):
            table.add_column(title, key=title)
        cur = self.current()
        measured = {r.layer: r for r in cur[0].layers} if cur is not None else {}
        for layer in range(wb.index.num_layers):
            info = self.gates.get(layer)
            if info is None:
                table.add_row(str(layer), Text("no gate", "dim"), "", "", "", "", "", "", key=str(layer))
                continue
            donor = Text(f" {info.donor} ", donor_style(wb, info.donor))
            donor.append(f" {self.app.labels.get(info.donor, info.donor)}")
            r = measured.get(layer)
            numbers = ["…", "…", "", ""] if r is None else [
                f"{r.ppl_without:.4f}", f"{r.ppl_with:.4f}", change_text(r.change),
                Text("keep", "bold green") if r.keep else Text("drop", "bold red")]
            table.add_row(str(layer), info.gate_type, f"{info.parameters:,}", donor, *numbers, key=str(layer))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    def fill_chart(self) -> None:
        cur = self.current()
        chart = self.query_one(GateChart)
        if cur is None:
            chart.set_rows([], "measuring the gates…" if self.pending else "no selection yet: r runs it")
            return
        chart.set_rows([ChangeRow(f"layer {r.layer}", r.change, r.keep) for r in cur[0].layers])

    def show_status(self) -> None:
        cur = self.current()
        if self.progress:
            text = self.progress
        elif cur is not None:
            text = f"measured in {cur[2]:.1f}s on {cur[1]} · r measures again · f other calibration data"
        else:
            text = ""
        self.query_one("#gates-status", Static).update(text)

    # ------------------------------------------------------------ keys
    def action_run(self) -> None:
        if self.app.wb is None:
            return
        self.sync()
        if not self.gates:
            self.app.notify("the hybrid has no layer gates to measure", severity="warning", timeout=4)
            return
        self.results.pop(self.key(), None)
        self.failures.pop(self.key(), None)
        self.start_run()
        self.show()

    def action_corpus(self) -> None:
        def chosen(value: str | None) -> None:
            if value and value != self.corpus:
                self.corpus = value
                self.sync()

        self.app.push_screen(CorpusScreen(self.corpus), chosen)

    def action_min_gain(self) -> None:
        i = MIN_GAINS.index(self.min_gain) if self.min_gain in MIN_GAINS else -1
        self.min_gain = MIN_GAINS[(i + 1) % len(MIN_GAINS)]
        self.show()

    def action_apply(self) -> None:
        from surgeon.core.plan import format_ranges

        if self.app.wb is None:
            return
        cur = self.current()
        if cur is None:
            why = "it is still running" if self.pending else "run it first (r)"
            self.app.notify(f"no selection for the current marks: {why}", severity="warning", timeout=4)
            return
        dropped = cur[0].dropped
        if not dropped:
            self.app.notify("every gate lowers its layer's perplexity: nothing to drop", timeout=4)
            return
        try:
            donor = drop_gates(self.app.wb, dropped)
        except SurgeonError as e:
            self.app.notify(str(e), title="Cannot drop the gates", severity="error", timeout=8)
            return
        self.app.workbench_changed()
        if self.app.screen is self:
            self.app.pop_screen()
        self.app.notify(f"the layer gate of layer(s) {format_ranges(dropped)} now comes from donor {donor}, "
                        "which has none there; u undoes it", title=f"{len(dropped)} gate(s) dropped", timeout=6)

    def action_back(self) -> None:
        self.app.pop_screen()

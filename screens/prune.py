"""Prune or merge to N: from the Routing screen, make the shown donor smaller and see what it cost.

The preview is the record `moe-surgeon prune` would write (surgeon.features.prune.trial): the
experts each MoE layer keeps, chosen from the frequency, gate weight and REAP score the Routing
screen already measured on its corpora, so it changes as N and the criterion change, with no new
pass. Merging compares what the experts compute on shared tokens, which the routing pass does not
keep: its preview runs the merge command's measuring pass once (a job), then clusters per N.

r writes the smaller model to scratch space and probes it beside the original (the probes checked on
the Probes screen, per item: delta, items lost and gained, McNemar p); e exports it with the
commands' writer; ctrl+s here saves the pruning as a session of its own, as `prune --save-session`
does, which `moe-surgeon replay S --export DIR` rebuilds byte for byte, with the trial's probe
results when the exported choice is the one tried (extensions["prune_probes"]: the comparison and
every per-item record, the smaller model as `pruned`/`merged`, the original as `donor:A`). The workbench's own session
is what ctrl+s saves everywhere else.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Label, Static

from surgeon.errors import SurgeonError
from surgeon.io.fs import error_line
from surgeon.jobs import Cancelled

from .dialogs import ErrorScreen, PathScreen
from .job import JobScreen
from .widgets.keybar import KeyBar

BATCH_SIZE = 32  # the Routing screen's: the saliency it measured is what `--batch-size 32` measures
PROBE_BATCH = 16  # the Probes screen's, so the original's scores come from the cache it filled
SALIENCY_CYCLE = ("frequency", "gate", "reap")  # the Routing screen's S
OPERATIONS = ("prune", "merge")


def next_saliency(metric: str) -> str:
    """The heatmap layer after `metric` in frequency -> gate -> REAP (from another metric: frequency)."""
    if metric not in SALIENCY_CYCLE:
        return SALIENCY_CYCLE[0]
    return SALIENCY_CYCLE[(SALIENCY_CYCLE.index(metric) + 1) % len(SALIENCY_CYCLE)]


def criteria(operation: str) -> tuple[str, ...]:
    from surgeon.features.prune.cluster import WEIGHTS
    from surgeon.features.prune.saliency import CRITERIA

    return CRITERIA if operation == "prune" else WEIGHTS


def parse_n(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SurgeonError(f"N {text.strip()!r}: expected a whole number of experts per layer") from None


def preview_rows(record: dict) -> list[tuple[str, str, str]]:
    """(layer, what stays, what goes) per MoE layer of a prune or merge record, original indices."""
    from surgeon.core.plan import format_ranges

    if record["operation"] == "merge":
        rows = []
        for layer, clusters in record["clusters"].items():
            merged = " ".join(f"{i}={'+'.join(map(str, c))}" for i, c in enumerate(clusters) if len(c) > 1)
            rows.append((layer, merged or "-", format_ranges([c[0] for c in clusters if len(c) == 1]) or "-"))
        return rows
    return [(layer, format_ranges(kept), format_ranges(record["pruned"][layer]) or "-")
            for layer, kept in record["kept"].items()]


def open_prune(routing) -> None:
    """From the Routing screen: the dialog for the shown donor with the routing measured for it."""
    app = routing.app
    model = routing.model
    if model is None or app.wb is None:
        return
    if model not in app.wb.donors:
        app.notify("pruning works on a donor's files: show a donor (m), or export the hybrid (e on the grid) "
                   "and open the export as a donor", title="Cannot prune the hybrid", severity="warning", timeout=8)
        return
    ident, stats, error = routing.results.get(model, (None, None, None))
    if ident != routing.idents.get(model) or stats is None:
        app.notify(error or f"the routing of {routing.label(model)} is still being measured", severity="warning",
                   timeout=5)
        return
    donor = app.wb.donors[model]
    label = app.labels.get(model, model)
    spec = label if label.startswith("demo:") else str(donor.path)
    app.open_screen("prune", model, donor, spec, routing.label(model), stats)


class PruneScreen(JobScreen):
    DEFAULT_CSS = """
    PruneScreen #prune-title { height: auto; padding: 0 1; }
    PruneScreen .form-row { height: 1; margin: 0 1; }
    PruneScreen .form-row Label { width: auto; padding: 0 1 0 0; }
    PruneScreen #prune-n { width: 8; border: none; height: 1; padding: 0; }
    PruneScreen #prune-by { width: 1fr; padding: 0 0 0 2; }
    PruneScreen #prune-error { height: auto; margin: 0 1; }
    PruneScreen #prune-preview { height: 1fr; }
    PruneScreen #prune-status { height: auto; padding: 0 1; color: $text-muted; }
    PruneScreen #prune-results { height: auto; max-height: 10; }
    """
    BINDINGS = [
        Binding("escape", "back", "Back / cancel", id="prune.back"),
        Binding("n", "focus_n", "N", id="prune.n", tooltip="Type the number of experts each MoE layer keeps"),
        Binding("b", "next_by", "Criterion", id="prune.by",
                tooltip="Prune by REAP, frequency, gate weight or at random; merge weighting by frequency, REAP "
                        "or uniformly"),
        Binding("o", "next_operation", "Prune/merge", id="prune.operation",
                tooltip="Drop the least salient experts, or merge experts that compute alike (HC-SMoE)"),
        Binding("r", "try", "Try", id="prune.try",
                tooltip="Build the smaller model and run the checked probes on it and on the original"),
        Binding("e", "export", "Export", id="prune.export", tooltip="Write the smaller model to a directory"),
        # The app leaves ctrl+s to this screen (SurgeonApp.check_action): here it saves the pruning.
        Binding("ctrl+s", "save_own_session", "Save as session", id="prune.save",
                tooltip="Save the exported pruning or merging as a session that `moe-surgeon replay` rebuilds"),
    ]

    def __init__(self, name: str, donor, spec: str, label: str, stats: dict):
        super().__init__()
        self.donor_name, self.donor, self.spec, self.label, self.stats = name, donor, spec, label, stats
        self.operation = "prune"
        self.by = {"prune": "reap" if all(s.reap_sum is not None for s in stats.values()) else "frequency",
                   "merge": "frequency"}
        self.n = max(1, self.num_experts() // 2)
        self.record: dict | None = None
        self.measured = None  # trial.MergeMeasure, once the merge pass ran
        self.comparison: list[dict] = []
        self.tried = None  # (record, specs, probe records) of the last trial: ctrl+s records them with it
        self.exported = None  # (record, ExportResult) of the last export: what ctrl+s records
        self.scratch: Path | None = None
        self.trials = 0

    def num_experts(self) -> int:
        return next(iter(self.stats.values())).num_experts

    def compose(self) -> ComposeResult:
        yield Static("", id="prune-title")
        with Horizontal(classes="form-row"):
            yield Label("experts per layer (n)")
            yield Input(str(self.n), id="prune-n", compact=True)
            yield Static("", id="prune-by", markup=False)
        yield Static("", classes="field-error", id="prune-error", markup=False)
        yield DataTable(id="prune-preview", cursor_type="row", zebra_stripes=True)
        yield Static("", id="prune-status", markup=False)
        yield DataTable(id="prune-results", cursor_type="row")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#prune-results", DataTable).border_title = "the smaller model vs the original, per item"
        self.query_one("#prune-preview", DataTable).focus()
        self.show_status("n sets N · b the criterion · o prune or merge · r tries it · e exports")
        self.refresh_preview()

    def on_unmount(self) -> None:
        self.cancel_job()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # ------------------------------------------------------------ the preview
    def refresh_title(self) -> None:
        title = Text()
        verb = "Prune" if self.operation == "prune" else "Merge"
        title.append(f"{verb} {self.label} to {self.n} of {self.num_experts()} experts per MoE layer", "bold")
        how = (f"by {self.by['prune']}" if self.operation == "prune"
               else f"clusters of alike outputs, members weighted by {self.by['merge']}")
        title.append(f"  {how} · calibration: {', '.join(self.stats)}")
        self.query_one("#prune-title", Static).update(title)
        self.query_one("#prune-by", Static).update(f"by {self.by[self.operation]} (b)  ·  {self.operation} (o)")

    def refresh_preview(self) -> None:
        from surgeon.features.prune.trial import merge_choice, prune_choice

        self.refresh_title()
        self.record = None
        error = ""
        try:
            if self.operation == "prune":
                self.record = prune_choice(self.donor, self.spec, self.stats, self.n, self.by["prune"],
                                           batch_size=BATCH_SIZE, device=self.device())
            elif self.measured is None:
                self.measure_merge()
            else:
                self.record = merge_choice(self.donor, self.spec, self.measured, self.n, self.by["merge"],
                                           batch_size=BATCH_SIZE)
        except SurgeonError as e:
            error = str(e)
        except Exception as e:  # a dialog line, never a traceback
            error = error_line(e)
        self.query_one("#prune-error", Static).update(error)
        self.show_preview()

    def device(self) -> str:
        from surgeon.live.devices import default_device

        return str(default_device())

    def show_preview(self) -> None:
        table = self.query_one("#prune-preview", DataTable)
        table.clear(columns=True)
        if self.operation == "prune":
            table.add_columns("layer", "kept", "pruned")
        else:
            table.add_columns("layer", "merged (new=old+old)", "kept alone")
        if self.record is not None:
            for layer, stays, goes in preview_rows(self.record):
                table.add_row(layer, stays, goes, key=layer)

    def preview(self) -> list[tuple[str, str, str]]:
        """What the preview table shows, row by row (tests read it)."""
        table = self.query_one("#prune-preview", DataTable)
        return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]

    @on(Input.Submitted, "#prune-n")
    def on_n(self, event: Input.Submitted) -> None:
        try:
            self.n = parse_n(event.value)
        except SurgeonError as e:
            self.query_one("#prune-error", Static).update(str(e))
            return
        self.query_one("#prune-preview", DataTable).focus()
        self.refresh_preview()

    def action_focus_n(self) -> None:
        self.query_one("#prune-n", Input).focus()

    def action_next_by(self) -> None:
        choices = criteria(self.operation)
        current = self.by[self.operation]
        self.by[self.operation] = choices[(choices.index(current) + 1) % len(choices)]
        self.refresh_preview()

    def action_next_operation(self) -> None:
        if self.job_running:
            self.notify("a job is running (escape cancels it)", timeout=3)
            return
        self.operation = OPERATIONS[(OPERATIONS.index(self.operation) + 1) % len(OPERATIONS)]
        self.comparison = []
        self.show_results()
        self.refresh_preview()

    # ------------------------------------------------------------ jobs
    def measure_merge(self) -> None:
        if self.job_running:
            return
        from surgeon.features.prune.trial import measure_for_merge

        self.show_status(f"measuring how alike {self.label}'s experts compute, on {', '.join(self.stats)}…")
        self.start_job(self._job, "measure", measure_for_merge, self.donor, tuple(self.stats),
                       batch_size=BATCH_SIZE, device=self.device(), group="prune")

    def _job(self, kind: str, fn, *args, progress, cancel, **kwargs):
        try:
            return kind, fn(*args, progress=progress, cancel=cancel, **kwargs)
        except (Cancelled, SurgeonError):
            raise
        except Exception as e:  # a dialog line, never a traceback
            raise SurgeonError(error_line(e)) from None

    def checked_specs(self) -> list:
        """The probes checked on the Probes screen; all of them while it has not been opened."""
        if self.app.is_screen_installed("probes"):
            return self.app.get_screen("probes").checked_specs()
        from .probes import default_specs

        return default_specs(self.app.records.probes)[0]

    def action_try(self) -> None:
        if self.job_running:
            self.notify("a job is running (escape cancels it)", timeout=3)
            return
        if self.record is None:
            self.notify("nothing to try: " + (str(self.query_one("#prune-error", Static).render()) or "no choice yet"),
                        severity="warning", timeout=5)
            return
        specs = self.checked_specs()
        if not specs:
            self.notify("check at least one probe on the Probes screen first", severity="warning", timeout=5)
            return
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="moe-surgeon-trial-"))
        self.trials += 1
        self.show_status(f"building the smaller model, then {len(specs)} probe(s) on it and on the original…")
        self.start_job(self._job, "try", try_smaller, self.donor, self.record, self.scratch / f"trial-{self.trials}",
                       list(specs), group="prune")

    def action_export(self) -> None:
        if self.job_running:
            self.notify("a job is running (escape cancels it)", timeout=3)
            return
        if self.record is None:
            self.notify("nothing to export yet", severity="warning", timeout=4)
            return
        record = dict(self.record)
        default = f"{self.label.split()[0]}-{self.operation}d-{self.n}"

        def chosen(path: str | None) -> None:
            if not path:
                return
            from surgeon.features.prune.write import write_smaller

            self.show_status(f"writing {path}…")
            self.start_job(self._job, "export", export_smaller, write_smaller, self.donor, record, path,
                           group="prune")

        self.app.push_screen(PathScreen("Export the smaller model to (a new directory)", default), chosen)

    def action_save_own_session(self) -> None:
        """ctrl+s on this screen: the exported pruning as a session of its own (prune_session)."""
        if self.exported is None:
            self.app.notify("export the smaller model first (e): the session records the export", severity="warning",
                            timeout=5)
            return
        record, written = self.exported
        # The probe results go with it when this very choice was tried (r): same record, same writer, same bytes.
        probes = self.tried[1:] if self.tried is not None and self.tried[0] == record else None

        def chosen(path: str | None) -> None:
            if not path:
                return
            from surgeon.features.prune.session import save_prune_session

            self.show_status(f"saving {path} (full content hashes of {self.label}'s files)…")
            self.start_job(self._job, "session", save_session, save_prune_session, record, self.donor, path,
                           written, probes, group="prune")

        self.app.push_screen(PathScreen(f"Save this {self.operation} as a session", f"{self.operation}-session.json"),
                             chosen)

    def job_progress(self, step) -> None:
        from surgeon.io.sizes import step_text

        self.show_status(f"{step.label}: {step.detail + ' · ' if step.detail else ''}{step_text(step)}")

    def job_finished(self, result) -> None:
        kind, value = result
        if kind == "measure":
            self.measured = value
            self.show_status("measured; n, b change the clusters without a new pass")
            self.refresh_preview()
        elif kind == "try":
            self.tried = value[:3]
            self.comparison = value[3]
            self.show_results()
            self.show_status("tried: e exports this model · ctrl+s after the export saves it as a session")
        elif kind == "export":
            self.exported = value
            written = value[1]
            self.show_status(f"wrote {written.path}: {written.tensors} tensors in {len(written.shards)} file(s) · "
                             "ctrl+s saves this as a session that `moe-surgeon replay` rebuilds")
            self.app.notify(f"exported {written.path}", timeout=4)
        elif kind == "session":
            path, probed = value
            self.show_status(f"saved {path}" + (" with the probe results of the trial" if probed else
                                                " (this choice was not tried: no probe results)")
                             + f": `moe-surgeon replay {path} --export DIR` rebuilds the model")
            self.app.notify(f"saved {path}", timeout=4)

    def job_failed(self, message: str) -> None:
        self.show_status(f"failed: {message}")
        self.app.push_screen(ErrorScreen("Cannot " + ("measure the experts" if self.measured is None and
                                                      self.operation == "merge" else "make the smaller model"),
                                         message))

    def job_cancelled(self) -> None:
        self.show_status("cancelled; nothing was written")

    def show_status(self, text: str) -> None:
        self.query_one("#prune-status", Static).update(text)

    def show_results(self) -> None:
        from surgeon.probes import metric_of
        from surgeon.probes.stats import significance_stars

        table = self.query_one("#prune-results", DataTable)
        table.clear(columns=True)
        if not self.comparison:
            return
        table.add_columns("probe", "n", "smaller", "95% CI", "original", "Δ", "lost", "gained", "McNemar p")
        for row in self.comparison:
            metric = metric_of(row["metric"])
            delta = row.get("delta")
            cells = [row["probe"], str(row["n"]), metric.score_text(row["score"]), metric.ci_text(*row["ci"]),
                     "-" if row["original"] is None else metric.score_text(row["original"])]
            if delta is None:
                cells += ["", "", "", ""]
            else:
                p = row["mcnemar_p"]
                style = "dim" if p >= 0.05 else ("bold green" if delta > 0 else "bold red")
                cells += [Text(f"{100 * delta:+.1f}{significance_stars(p)}", style), str(row["lost"]),
                          str(row["gained"]), f"{p:.2g}"]
            table.add_row(*cells)

    def action_back(self) -> None:
        if not self.cancel_job():
            self.app.pop_screen()


# ---------------------------------------------------------------- job bodies (engine calls only)
def try_smaller(donor, record: dict, directory: Path, specs, *, progress, cancel):
    """(the record tried, its specs, the probe records, the per-probe comparison with the original)."""
    from surgeon.features.prune.trial import comparison, probe_trial, write_trial

    trial = write_trial(donor, record, directory, cancel=cancel)
    run = probe_trial(trial, donor, specs, batch_size=PROBE_BATCH, progress=progress, cancel=cancel)
    return record, specs, run.records, comparison(run.records)


def export_smaller(write_smaller, donor, record: dict, path: str, *, progress, cancel):
    written, _ = write_smaller(donor, record, Path(path).expanduser().absolute(),
                               max_shard_size=record["max_shard_size"], progress=progress, cancel=cancel)
    return record, written


def save_session(save_prune_session, record: dict, donor, path: str, written, probes, *, progress, cancel):
    save_prune_session(record, donor, path, written, probes=probes, progress=progress, cancel=cancel)
    return path, probes is not None

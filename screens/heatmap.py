"""Routing: which experts the donors and the hybrid use, per corpus, as a layers x experts heatmap.

The screen is installed once (like Probes), so routing measured for a donor is kept for the app's
life; the hybrid is measured again whenever the marks changed since. One job (screens/job.py)
holds the app's one live hybrid (`app.hybrids`, surgeon/live/keeper.py: the model the Probes screen
ran on, not a second one) for the whole job and runs `surgeon.features.routing.run.probe_live` for
each model on the built-in demo corpora: the hybrid as the marks make it, a donor by swapping the
whole hybrid to it and back (or, when it cannot be swapped in, on a model of its own). A probe or
sweep holding the hybrid is waited for, and the status line says so. One message is posted per
model, so the first heatmap shows as soon as its model is done; marks changed meanwhile replace
the job.

Keys switch the corpus (d), the model (m), the metric (t) and a difference (x: another model on
this corpus, then this model on another corpus); s saves what is shown as SVG, PNG, CSV or JSON.
The two selection actions turn what the heatmap shows into marks, as one undoable step: u takes
from a donor the N experts it uses most on the shown corpus, c the N experts whose weights moved
furthest from the base's (lowest cosine similarity). Both are `moe-surgeon routing --take-used /
--take-changed` on the command line.
"""

from __future__ import annotations

import re

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from surgeon.errors import SurgeonError
from surgeon.features.routing.corpora import DEFAULT_CORPORA
from surgeon.features.routing.view import METRIC_NAMES
from surgeon.jobs import Cancelled

from .dialogs import ErrorScreen, PathScreen
from .job import JobScreen
from .widgets.heatmap import HeatmapGrid
from .widgets.keybar import KeyBar

METRICS = ("frequency", "top1", "mean_prob")  # importance needs every expert recomputed: CLI only
BATCH_SIZE = 32  # the CLI's default
DTYPE = "keep"  # as the Probes screen: both run on the app's one live hybrid (keyed by device and dtype)
HYBRID = "hybrid"


class RoutingProbed(Message):
    """One model's routing on every corpus, or why it has none (a dense donor, say)."""

    def __init__(self, model: str, ident: tuple, stats: dict | None, error: str | None = None):
        super().__init__()
        self.model, self.ident, self.stats, self.error = model, ident, stats, error


class RoutingNote(Message):
    """A line for the status while the job waits for the live hybrid or materialises it."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


class SimilarityReady(Message):
    def __init__(self, key: tuple, similarity: dict | None, error: str | None, then):
        super().__init__()
        self.key, self.similarity, self.error, self.then = key, similarity, error, then


# ---------------------------------------------------------------- pure helpers (tested directly)
def parse_take(n_text: str, layers_text: str) -> tuple[int, tuple[int, ...] | None]:
    """The take dialog's fields: N, and layers as the CLI's --layers (empty: every MoE layer)."""
    from surgeon.core.plan import parse_layers

    try:
        n = int(n_text.strip())
    except ValueError:
        raise SurgeonError(f"N {n_text.strip()!r}: expected a whole number of experts per layer") from None
    if n < 1:
        raise SurgeonError(f"N {n}: take at least one expert per layer")
    layers = layers_text.strip()
    return n, (parse_layers(layers, flag="layers") if layers else None)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def colour_legend(view) -> Text:
    """`lo ▇▇▇▇ hi` in the view's palette: what a colour means."""
    import numpy as np

    from surgeon.features.routing.view import hex_colour, palette_rgb

    lo, hi = view.colour_range()
    steps = np.linspace(lo, hi, 16)
    fmt = view.value_format()
    text = Text(fmt.format(lo) + " ")
    for rgb in palette_rgb(steps, lo, hi, diverging=view.is_difference):
        text.append("█", hex_colour(rgb))
    text.append(" " + fmt.format(hi))
    return text


# ---------------------------------------------------------------- the take dialog
class TakeScreen(ModalScreen):
    """Ask for N and layers; `check(n, layers)` computes the selection or raises SurgeonError,
    which is shown in the dialog. Returns check's result, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, prompt: str, check, n: int = 2):
        super().__init__()
        self.prompt = prompt
        self.check = check
        self.n = n

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.prompt, id="dialog-title", markup=False)  # a Static wraps a long prompt
            with Horizontal(classes="form-row"):
                yield Label("experts per layer")
                yield Input(str(self.n), id="take-n")
            with Horizontal(classes="form-row"):
                yield Label("layers")
                yield Input("", placeholder="every MoE layer, or e.g. 0-3,8", id="take-layers")
            yield Static("", classes="field-error", id="take-error", markup=False)
            yield Static("enter: mark them · escape: cancel · u undoes it on the grid", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#take-n", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            n, layers = parse_take(self.query_one("#take-n", Input).value, self.query_one("#take-layers", Input).value)
            result = self.check(n, layers)
        except SurgeonError as e:
            self.query_one("#take-error", Static).update(str(e))
            return
        self.dismiss(result)

    def action_cancel(self) -> None:
        self.dismiss(None)


# ---------------------------------------------------------------- the screen
class RoutingScreen(JobScreen):
    CSS_PATH = "heatmap.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        Binding("escape", "back", "Back", id="routing.back"),
        Binding("d", "next_domain", "Corpus", id="routing.domain", tooltip="Show the next corpus (domain)"),
        Binding("m", "next_model", "Model", id="routing.model",
                tooltip="Show the next model: every donor, then the hybrid of the current marks"),
        Binding("t", "next_metric", "Metric", id="routing.metric",
                tooltip="Activation frequency, top-1 share, mean router probability"),
        Binding("x", "next_difference", "Difference", id="routing.diff",
                tooltip="Subtract another model on this corpus, then this model on another corpus; off at the end"),
        Binding("s", "save_view", "Save view", id="routing.save",
                tooltip="Save what is shown as .svg or .png (for papers) or .csv or .json (the numbers)"),
        Binding("u", "take_used", "Take most used", id="routing.take_used",
                tooltip="Mark from the shown donor the N experts it uses most on this corpus, in layers L"),
        Binding("c", "take_changed", "Take most changed", id="routing.take_changed",
                tooltip="Mark from the shown donor the N experts whose weights moved furthest from the base's"),
        Binding("S", "next_saliency", "Saliency", id="routing.saliency",
                tooltip="Show what pruning reads: activation frequency, mean gate weight, REAP score"),
        Binding("p", "prune", "Prune/merge to N", id="routing.prune",
                tooltip="Preview, try and export the shown donor pruned or merged to N experts per layer"),
    ]

    def __init__(self):
        super().__init__()
        self.domains = list(DEFAULT_CORPORA)  # as `moe-surgeon routing` defaults to
        self.corpora: dict | None = None  # name -> texts, read once by the worker
        self.results: dict[str, tuple] = {}  # model -> (ident, stats or None, error or None)
        self.idents: dict[str, tuple] = {}  # model -> what it is now (donor fingerprint, hybrid plan)
        self.similarities: dict[tuple, dict] = {}
        self.models: list[str] = []
        self.model: str | None = None
        self.domain = self.domains[0]
        self.metric = METRICS[0]
        self.diff: tuple[str, str] | None = None  # ("model", name) or ("domain", name)
        self.progress = ""
        self.tokenizer = None  # the base's, set by the job: decodes the tokens an expert takes
        self.probing: list[tuple] = []  # (model, ident) the running job measures

    def compose(self) -> ComposeResult:
        yield Static("", id="routing-title")
        yield Static("", id="routing-legend")
        yield HeatmapGrid(id="routing-grid")
        yield Static("", id="routing-cell", markup=False)
        yield Static("", id="routing-status", markup=False)
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one(HeatmapGrid).focus()
        self.sync_models()

    def on_screen_resume(self) -> None:
        self.sync_models()

    # ------------------------------------------------------------ which models, and probing them
    def _ident(self, model: str) -> tuple:
        wb = self.app.wb
        if model == HYBRID:
            donors = tuple((n, str(d.path), d.fingerprint) for n, d in wb.donors.items())
            return (HYBRID, donors, wb.base, tuple((a.spec, a.donor) for a in wb.plan().assignments))
        d = wb.donors[model]
        return ("donor", str(d.path), d.fingerprint)

    def sync_models(self) -> None:
        """Match the models to the workbench and probe what is missing or out of date."""
        wb = self.app.wb
        if wb is None:
            return
        self.models = [*wb.donors, HYBRID]
        self.idents = {m: self._ident(m) for m in self.models}
        if self.model not in self.models:
            self.model = self.app.brush_donor() or self.models[0]
        if self.diff and self.diff[0] == "model" and self.diff[1] not in self.models:
            self.diff = None
        todo = [m for m in self.models if self.results.get(m, (None,))[0] != self.idents[m]]
        todo.sort(key=lambda m: m != self.model)  # the one on screen first
        wanted = [(m, self.idents[m]) for m in todo]
        if todo and not (self.job_running and wanted == self.probing):  # the running job already does it
            self.probing = wanted
            self.restart_job(self.probe_models, wanted, dict(wb.donors), wb.plan(), group="routing")
        self.show()

    def label(self, model: str) -> str:
        if model == HYBRID:
            return "the hybrid"
        return f"{model} ({self.app.labels.get(model, model)})"

    def probe_models(self, todo: list[tuple], donors: dict, plan, *, progress, cancel) -> None:
        """The job (surgeon.jobs): each model's routing on every corpus, one message per model as it is
        done, so the first heatmap shows before the last model is probed. The app's live hybrid is
        held for the whole job (a probe started meanwhile waits for it) and left on `plan`."""
        from surgeon.io.fs import error_line

        try:
            from transformers.utils import logging as hf_logging

            from surgeon.features.routing.corpora import read_corpora
            from surgeon.features.routing.run import LiveSwapFailed, probe_live
            from surgeon.live.devices import default_device
            from surgeon.probes.scoring import load_tokenizer

            hf_logging.disable_progress_bar()  # its tqdm bar would write over the screen
            if self.corpora is None:
                self.corpora = read_corpora(self.domains)
            tokenizer = self.tokenizer = load_tokenizer(donors[plan.base].path)  # as the CLI: all read the same tokens
            device = default_device()
            with self.app.hybrids.use(plan, donors, device, DTYPE, job="routing run", note=self.note,
                                      cancel=cancel) as lease:
                for i, (model, ident) in enumerate(todo):
                    label = (f"probing {self.label(model)} on {', '.join(self.corpora)} on {device} "
                             f"({i + 1} of {len(todo)})")
                    try:
                        stats = probe_live(lease.hybrid, plan, self.corpora, tokenizer=tokenizer,
                                           donor=None if model == HYBRID else model, device=device, dtype=DTYPE,
                                           batch_size=BATCH_SIZE, progress=progress, cancel=cancel, label=label,
                                           reap="auto")  # the REAP layer (S) and pruning (p) read it
                    except LiveSwapFailed:
                        raise  # the shared hybrid may be half-swapped: the keeper lets it go
                    except SurgeonError as e:  # this model has no routing to show (a dense donor, say)
                        self.post_message(RoutingProbed(model, ident, None, str(e)))
                        continue
                    self.post_message(RoutingProbed(model, ident, stats))
        except (Cancelled, SurgeonError):
            raise
        except Exception as e:  # a dialog, never a traceback on screen
            raise SurgeonError(error_line(e)) from None

    def note(self, text: str) -> None:
        self.post_message(RoutingNote(text))

    @on(RoutingNote)
    def on_routing_note(self, message: RoutingNote) -> None:
        if self.job_running:
            self.progress = message.text
            self.show_status()

    def job_progress(self, step) -> None:
        self.progress = f"{step.label}… {step.done} of {step.total} sequences"
        self.show_status()

    def job_finished(self, result) -> None:
        self.progress = ""
        self.show_status()

    def job_cancelled(self) -> None:
        self.job_finished(None)

    def job_failed(self, message: str) -> None:
        self.progress = f"failed: {message}"
        self.show_status()
        self.app.push_screen(ErrorScreen("Cannot measure routing", message))

    def on_unmount(self) -> None:
        self.cancel_job()

    @on(RoutingProbed)
    def on_probed(self, message: RoutingProbed) -> None:
        if self.idents.get(message.model) != message.ident:
            return  # measured for marks or donors that have changed since
        self.results[message.model] = (message.ident, message.stats, message.error)
        self.show()

    # ------------------------------------------------------------ the view
    def stats_of(self, model: str, domain: str):
        """(RoutingStats, None) when measured; (None, why not) otherwise."""
        ident, stats, error = self.results.get(model, (None, None, None))
        if ident != self.idents.get(model):
            return None, f"probing {self.label(model)}…"
        if stats is None:
            return None, f"{self.label(model)}: {error}"
        return stats[domain], None

    def current_view(self):
        """(RoutingView, None), or (None, why there is none yet)."""
        from surgeon.features.routing.view import difference_view, stats_view

        if self.model is None:
            return None, "no donors are open"
        a, why = self.stats_of(self.model, self.domain)
        if a is None:
            return None, why
        try:
            if self.diff is None:
                return stats_view(a, self.metric, self.label(self.model), self.domain), None
            kind, other = self.diff
            model, domain = (other, self.domain) if kind == "model" else (self.model, other)
            b, why = self.stats_of(model, domain)
            if b is None:
                return None, why
            return difference_view(a, b, self.metric, (self.label(self.model), self.domain),
                                   (self.label(model), domain)), None
        except SurgeonError as e:
            return None, str(e)

    def show(self) -> None:
        view, why = self.current_view()
        title = Text()
        title.append("Routing  ", "bold")
        title.append(view.title if view is not None else f"{METRIC_NAMES[self.metric]} of "
                     f"{self.label(self.model or '?')} on {self.domain}")
        self.query_one("#routing-title", Static).update(title)
        legend = Text()
        if view is not None:
            legend = colour_legend(view)
            legend.append(f"   {len(view.layers)} MoE layers x {view.num_experts} experts, top-{view.top_k}", "dim")
        self.query_one("#routing-legend", Static).update(legend)
        self.query_one(HeatmapGrid).set_view(view, why or "")
        self.show_cell()
        self.show_status()

    def show_status(self) -> None:
        done = sum(1 for m in self.models if self.results.get(m, (None,))[0] == self.idents.get(m))
        text = self.progress or f"{done} of {len(self.models)} models probed on {', '.join(self.domains)}"
        self.query_one("#routing-status", Static).update(text)

    def show_cell(self) -> None:
        grid = self.query_one(HeatmapGrid)
        view = grid.view
        cell = self.query_one("#routing-cell", Static)
        if view is None:
            cell.update("")
            return
        r, c = grid.cursor
        layer = view.layers[r]
        text = f"layer {layer} · expert {c} · {view.metric} {view.value_format().format(view.values[r, c])}"
        if view.is_difference:
            from surgeon.features.routing.view import metric_values

            kind, other = self.diff
            a, _ = self.stats_of(self.model, self.domain)
            b, _ = self.stats_of(*((other, self.domain) if kind == "model" else (self.model, other)))
            va, vb = metric_values(a, view.metric)[r, c], metric_values(b, view.metric)[r, c]
            names = (view.a.domain, view.b.domain) if kind == "domain" else (view.a.model, view.b.model)
            text += f" = {va:.2f} ({names[0]}) minus {vb:.2f} ({names[1]})"
        else:
            stats, _ = self.stats_of(self.model, self.domain)
            li = stats.layer_index(layer)
            top = int(stats.top1_counts[li].argmax())
            text += f" · layer {layer}: entropy {stats.entropy[li]:.3f}, top expert e{top} ({stats.top1[li].max():.0%} of tokens)"
            if self.tokenizer is not None and stats.counts[li, c] > 0:  # what the expert does, from the trace
                from surgeon.features.routing.probe import expert_tokens

                tops = expert_tokens(stats, self.tokenizer, layer, c, n=6, examples=0)
                text += "\ntakes " + ", ".join(f"{t['token']!r} x{t['count']} ({t['share']:.0%})" for t in tops)
        cell.update(text)

    @on(HeatmapGrid.CursorMoved)
    def on_cursor(self, event: HeatmapGrid.CursorMoved) -> None:
        self.show_cell()

    # ------------------------------------------------------------ switching
    def action_next_domain(self) -> None:
        self.domain = self.domains[(self.domains.index(self.domain) + 1) % len(self.domains)]
        if self.diff == ("domain", self.domain):
            self.diff = None
        self.show()

    def action_next_model(self) -> None:
        if not self.models:
            return
        self.model = self.models[(self.models.index(self.model) + 1) % len(self.models)] \
            if self.model in self.models else self.models[0]
        if self.diff == ("model", self.model):
            self.diff = None
        self.show()

    def action_next_metric(self) -> None:
        i = METRICS.index(self.metric) if self.metric in METRICS else -1  # from a saliency layer: the first
        self.metric = METRICS[(i + 1) % len(METRICS)]
        self.show()

    def action_next_saliency(self) -> None:
        from .prune import next_saliency

        self.metric = next_saliency(self.metric)
        self.show()

    def action_prune(self) -> None:
        from .prune import open_prune

        open_prune(self)

    def difference_choices(self) -> list[tuple[str, str]]:
        return ([("model", m) for m in self.models if m != self.model]
                + [("domain", d) for d in self.domains if d != self.domain])

    def action_next_difference(self) -> None:
        choices = self.difference_choices()
        if self.diff is None:
            self.diff = choices[0] if choices else None
        else:
            i = choices.index(self.diff) if self.diff in choices else len(choices) - 1
            self.diff = choices[i + 1] if i + 1 < len(choices) else None
        self.show()

    # ------------------------------------------------------------ saving
    def default_file(self, view) -> str:
        name = f"{self.model}-{self.domain}"
        if self.diff is not None:
            name += f"-minus-{self.diff[1]}"
        return f"routing-{slug(name)}-{self.metric}.svg"

    def action_save_view(self) -> None:
        view, why = self.current_view()
        if view is None:
            self.app.notify(f"nothing to save yet: {why}", severity="warning", timeout=4)
            return

        def chosen(path: str | None) -> None:
            if not path:
                return
            from surgeon.features.routing.view import save_view

            try:
                fmt = save_view(view, path)
            except SurgeonError as e:
                self.app.push_screen(ErrorScreen("Cannot save the view", str(e)))
                return
            self.app.notify(f"saved {path} ({fmt})", timeout=4)

        self.app.push_screen(PathScreen("Save the view as (.svg .png .csv .json)", self.default_file(view)), chosen)

    # ------------------------------------------------------------ selection actions
    def take_donor(self) -> str | None:
        """The shown model when it is a donor; for the hybrid, the brush donor (what 1-9 last chose)."""
        return self.model if self.model in self.app.wb.donors else self.app.brush_donor()

    def action_take_used(self) -> None:
        from surgeon.features.routing.probe import most_used

        donor = self.take_donor()
        if donor is None:
            return
        stats, why = self.stats_of(donor, self.domain)
        if stats is None:
            self.app.notify(f"cannot rank {self.label(donor)}'s experts yet: {why}", severity="warning", timeout=4)
            return
        what = f"it uses most on {self.domain}"
        self.app.push_screen(
            TakeScreen(f"Take from donor {self.label(donor)} the N experts {what}, in layers L",
                       lambda n, layers: most_used(stats, n, layers)),
            lambda chosen: chosen and self.apply_selection(donor, chosen, f"experts {what}"))

    def action_take_changed(self) -> None:
        wb = self.app.wb
        donor = self.take_donor()
        if donor is None:
            return
        if donor == wb.base:
            self.app.notify(f"donor {donor} is the base: show another donor (m) to take what it changed",
                            severity="warning", timeout=5)
            return
        moe = sorted(wb.donors[wb.base].anatomy.experts_per_layer)

        def check(n: int, layers):
            for layer in layers or ():
                if layer not in moe:
                    raise SurgeonError(f"layer {layer}: not an MoE layer (MoE layers: {', '.join(map(str, moe))})")
            return n, layers

        def chosen(picked) -> None:
            if picked:
                n, layers = picked
                self.with_similarity(donor, lambda sim: self._take_changed(donor, sim, n, layers))

        self.app.push_screen(TakeScreen(f"Take from donor {self.label(donor)} the N experts whose weights changed "
                                        f"most from the base {wb.base}'s, in layers L", check), chosen)

    def _take_changed(self, donor: str, similarity: dict, n: int, layers) -> None:
        from surgeon.features.routing.probe import most_changed

        try:
            chosen = most_changed(similarity, n, layers)
        except SurgeonError as e:
            self.app.notify(str(e), title="Cannot take", severity="error", timeout=8)
            return
        self.apply_selection(donor, chosen, "experts that changed most (lowest cosine to the base)")

    def with_similarity(self, donor: str, then) -> None:
        wb = self.app.wb
        key = (self._ident(wb.base), self._ident(donor))
        if key in self.similarities:
            then(self.similarities[key])
            return
        self.progress = f"comparing the expert weights of {self.label(donor)} with the base's…"
        self.show_status()
        self.compute_similarity(key, wb.donors[wb.base], wb.donors[donor], then)

    @work(thread=True, exit_on_error=False, group="similarity")
    def compute_similarity(self, key: tuple, base, donor, then) -> None:
        from surgeon.features.routing.probe import expert_similarity

        from surgeon.io.fs import error_line

        try:
            self.post_message(SimilarityReady(key, expert_similarity(base, donor), None, then))
        except Exception as e:
            self.post_message(SimilarityReady(key, None, error_line(e), then))

    @on(SimilarityReady)
    def on_similarity(self, message: SimilarityReady) -> None:
        self.progress = ""
        self.show_status()
        if message.error:
            self.app.push_screen(ErrorScreen("Cannot compare the experts", message.error))
            return
        self.similarities[message.key] = message.similarity
        message.then(message.similarity)

    def apply_selection(self, donor: str, chosen: dict[int, tuple[int, ...]], what: str) -> None:
        """Give the chosen experts to `donor` as ONE workbench change (one undo), then back to the grid."""
        from surgeon.core.anatomy import Part

        wb = self.app.wb
        parts = [Part("expert", layer, e) for layer, experts in sorted(chosen.items()) for e in experts]
        try:
            changed = wb.set_parts(parts, donor)
        except SurgeonError as e:
            self.app.notify(str(e), title="Cannot mark", severity="error", timeout=8)
            return
        if not changed:
            self.app.notify(f"those {len(parts)} experts already come from donor {donor}", timeout=4)
            return
        self.app.workbench_changed()
        if self.app.screen is self:
            self.app.pop_screen()
        layers = ", ".join(f"{layer}: {','.join(map(str, es))}" for layer, es in sorted(chosen.items()))
        self.app.notify(f"donor {donor} gives the {what} (layer: experts {layers}); u undoes it",
                        title=f"{len(parts)} experts marked", timeout=6)

    def action_back(self) -> None:
        self.app.pop_screen()

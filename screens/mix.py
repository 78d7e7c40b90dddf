"""Mix: turn the open dense donors into the experts of an MoE (Lee, Wynter and Ganti 2024: moetify), from a form.

The form is `moe-surgeon mix` as fields: base, experts (donor letters in order; a letter may
repeat), router mode, always-on donor, output architecture, seed, the prompts file of the hidden
router, and router training (file, steps, learning rate, batch size, template). The grid's marks
become the mix's component transfers (`--take`): attention, norms and embeddings from any donor.

Building is a job (screens/job.py) running the engine's `build_on_workbench` (surgeon.features.mix):
its Steps show the router-training loss step by step (a sparkline and a progress bar), then the
bytes written. Escape cancels at the next step; the engine removes its temporary directory, so
nothing partial is left. When it is done the app opens the export as the workbench's base (see
surgeon/features/mix/workbench.py), so the grid, Probes and Routing work on the mix like on any
MoE checkpoint, and ctrl+s records the mix step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, ProgressBar, Sparkline, Static

from surgeon.core.architectures import MIX_ARCH_CHOICES
from surgeon.core.donor import Donor
from surgeon.errors import SurgeonError
from surgeon.features.mix.workbench import MixState, dense_problem
from surgeon.io.sizes import human_bytes
from surgeon.jobs import Cancelled, Step

from .job import JobScreen
from .mix_state import CLI_TRAIN, DEMO_MIX, DEMO_TRAIN, is_demo, shown_path
from .widgets.keybar import KeyBar

ARCHS = tuple(MIX_ARCH_CHOICES)
# (field id, label, hint): one line each, in this order.
FIELDS = [
    ("base", "base", "attention, norms, embeddings (and the grid's marks)"),
    ("experts", "experts", "donor letters, expert 0 first; may repeat"),
    ("router", "router", "uniform · noisy:K · hidden[:K] · random[:K]"),
    ("always", "always-on", "a donor every token also gets, or empty"),
    ("arch", "arch", " · ".join(ARCHS)),
    ("seed", "seed", "of the noisy/random router and of training"),
    ("prompts", "prompts", "router hidden: JSON, expert -> prompts"),
    ("train", "train on", "trains the routers only; empty: no training"),
]
TRAIN_FIELDS = [("steps", "steps", 7), ("lr", "lr", 9), ("batch", "batch", 5), ("template", "template", 6)]


@dataclass
class MixSource:
    """What the form mixes: dense donors by name, their labels, the base and the grid's marks,
    and a mix to fill the form from (the one on screen, or one a session records)."""

    donors: dict[str, Donor]
    labels: dict[str, str]
    base: str
    assignments: list
    prefill: MixState | None = None


def mix_source(app) -> MixSource | str:
    """The app's donors as a MixSource, or why they cannot be mixed."""
    if app.mix is not None:  # mix again: from the dense donors of the mix on screen
        mix = app.mix
        return MixSource(dict(mix.donors), dict(app.labels), mix.plan.base, list(mix.plan.assignments), mix)
    wb = app.wb
    if wb is None:
        return "nothing to mix: no donors are open"
    problem = dense_problem(wb.donors)
    if problem:
        return problem
    return MixSource(dict(wb.donors), dict(app.labels), wb.base, list(wb.plan().assignments), app.mix_pending)


def form_defaults(source: MixSource) -> dict[str, str]:
    mix = source.prefill
    if mix is not None:
        plan, settings = mix.plan, mix.settings
        train = settings.train
        return {
            "base": plan.base, "experts": " ".join(plan.experts), "router": plan.router.label,
            "always": plan.always_on or "", "arch": mix.layout.output.model_type, "seed": str(plan.seed),
            "prompts": shown_path(settings.prompts_file) if settings.prompts_file else "",
            "train": shown_path(train.data) if train else "",
            "steps": str(train.steps if train else CLI_TRAIN["steps"]),
            "lr": f"{train.lr if train else CLI_TRAIN['lr']:g}",
            "batch": str(train.batch_size if train else CLI_TRAIN["batch_size"]),
            "template": train.template if train else "raw", "out": "",
        }
    demo = is_demo(source.donors)
    t = DEMO_TRAIN if demo else CLI_TRAIN
    others = [n for n in source.donors if n != source.base]
    return {
        "base": source.base, "experts": " ".join(others or [source.base]), "router": "uniform", "always": "",
        "arch": "auto", "seed": "0", "prompts": shown_path(DEMO_MIX / "prompts.json") if demo else "",
        "train": shown_path(DEMO_MIX / "train.jsonl") if demo else "",
        "steps": str(t["steps"]), "lr": f"{t['lr']:g}", "batch": str(t["batch_size"]), "template": "raw", "out": "",
    }


def _form_message(e: Exception) -> str:
    """Engine messages name CLI options (--steps); the form names its fields (steps)."""
    return re.sub(r"--(train-batch-size|train-template)\b", lambda m: {"train-batch-size": "batch",
                  "train-template": "template"}[m.group(1)], str(e)).replace("--", "")


def read_form(values: dict[str, str], source: MixSource):
    """(MixPlan, MixSettings, out or None) from the form's fields; SurgeonError names the field at fault."""
    from surgeon.features.mix.build import MixSettings
    from surgeon.features.mix.plan import MixPlan, parse_prompts, parse_router
    from surgeon.features.mix.router_train import TrainSpec

    donors = source.donors

    def donor(field: str, text: str) -> str:
        name = text.strip().upper()
        if name not in donors:
            raise SurgeonError(f"{field} {text.strip()!r}: not an open donor ({', '.join(donors)})")
        return name

    def number(field: str, kind):
        text = values[field].strip()
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise SurgeonError(f"{field} {text!r}: expected {what}") from None

    base = donor("base", values["base"])
    experts = [donor("experts", t) for t in values["experts"].replace(",", " ").split()]
    if not experts:
        raise SurgeonError("experts: name at least one donor, e.g. B C")
    try:
        router = parse_router(values["router"].strip() or "uniform")
    except SurgeonError as e:
        raise SurgeonError(_form_message(e)) from None
    always = donor("always-on", values["always"]) if values["always"].strip() else None
    arch = values["arch"].strip() or "auto"
    if arch not in ARCHS:
        raise SurgeonError(f"arch {arch!r}: one of {', '.join(ARCHS)}")
    seed = number("seed", int)
    plan = MixPlan(base, experts, router, always, list(source.assignments), arch, seed)
    prompts = values["prompts"].strip()
    if router.mode == "hidden":  # the prompts field is read by the hidden router only
        if not prompts:
            raise SurgeonError("router hidden: give each expert's prompts as a JSON file in the prompts field")
        plan.prompts = parse_prompts(str(Path(prompts).expanduser()), experts, donors)
    train = None
    data = values["train"].strip()
    if data:
        path = Path(data).expanduser()
        if not path.is_file():
            raise SurgeonError(f"train on {data}: no such file")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise SurgeonError(f"train on {data}: cannot read ({e.strerror})") from None
        template = values["template"].strip() or "raw"
        train = TrainSpec(str(path.resolve()), number("steps", int), number("lr", float), number("batch", int),
                          seed, template)
        try:
            train.check()
        except SurgeonError as e:
            raise SurgeonError(_form_message(e)) from None
    settings = MixSettings(train=train, prompts_file=str(Path(prompts).expanduser().resolve())
                           if router.mode == "hidden" else None)
    return plan, settings, values["out"].strip() or None


# ---------------------------------------------------------------- the job
class MixPhase(Message):
    """What the job is doing before it has steps to count (loading torch, building the live mix)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MixPhase)


def _failure(e: Exception) -> SurgeonError:
    """Anything the engine did not phrase itself still ends as one line in the form, never a traceback."""
    from surgeon.io.fs import error_line

    return SurgeonError(error_line(e))


# ---------------------------------------------------------------- the screen
class MixScreen(JobScreen):
    CSS_PATH = "mix.tcss"  # its own rules; the shared ones are in app.tcss
    BINDINGS = [
        Binding("escape", "back", "Back / cancel", id="mix.back",
                tooltip="Cancel a running build (at the next step), else go back to the grid"),
        Binding("ctrl+b", "build", "Build", id="mix.build", priority=True,
                tooltip="Build the mix (enter in any field does too) and open it as the base"),
    ]

    def __init__(self, source: MixSource):
        super().__init__()
        self.source = source
        self.losses: tuple[float, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static("", id="mix-title")
        with Vertical(id="mix-form"):
            for key, label, hint in FIELDS:
                with Horizontal(classes="mix-field"):
                    yield Label(label, classes="mix-label")
                    yield Input(id=f"mix-{key}", compact=True)
                    yield Static(hint, classes="mix-hint", markup=False)
            with Horizontal(classes="mix-field"):
                yield Label("", classes="mix-label")
                for key, label, width in TRAIN_FIELDS:
                    yield Label(f"{label} ", classes="mix-sublabel")
                    yield Input(id=f"mix-{key}", compact=True, classes=f"mix-w{width}")
            with Horizontal(classes="mix-field"):
                yield Label("output", classes="mix-label")
                yield Input(id="mix-out", compact=True, placeholder="empty: a folder named by the settings' hash")
        yield Static("", id="mix-transfers", markup=False)
        yield Static("", id="mix-error", classes="field-error", markup=False)
        with Horizontal(id="mix-progress-row"):
            yield ProgressBar(total=100, show_eta=False, id="mix-progress")
            yield Static("", id="mix-stats", markup=False)
        with Horizontal(id="mix-loss-row"):
            yield Label("loss ", id="mix-loss-label")
            yield Sparkline([], id="mix-loss")
            yield Static("", id="mix-loss-range", markup=False)
        yield KeyBar()

    def on_mount(self) -> None:
        source = self.source
        title = Text("Mix dense donors into an MoE", "bold")
        title.append(": expert e at layer l is donor e's MLP at layer l\n")
        for name, d in source.donors.items():
            title.append(f" {name} ", "bold reverse")
            title.append(f" {source.labels.get(name, d.path.name)}  ")
        self.query_one("#mix-title", Static).update(title)
        for key, value in form_defaults(source).items():
            self.query_one(f"#mix-{key}", Input).value = value
        transfers = ", ".join(f"{a.spec}={a.donor}" for a in source.assignments)
        self.query_one("#mix-transfers", Static).update(
            f"component transfers (the grid's marks): {transfers}" if transfers else
            "component transfers: none, so attention, norms and embeddings come from the base "
            "(mark the grid to take them from other donors)")
        self.query_one("#mix-loss-row").display = False
        self.query_one("#mix-stats", Static).update("enter or ctrl+b builds the mix")
        self.query_one("#mix-experts", Input).focus()

    def values(self) -> dict[str, str]:
        return {i.id.removeprefix("mix-"): i.value for i in self.query(Input)}

    # ------------------------------------------------------------ building
    @on(Input.Submitted)
    def on_submitted(self, event: Input.Submitted) -> None:
        self.action_build()

    def action_build(self) -> None:
        if self.job_running:
            self.notify("the mix is already building (escape cancels)", timeout=3)
            return
        error = self.query_one("#mix-error", Static)
        try:
            plan, settings, out = read_form(self.values(), self.source)
        except SurgeonError as e:
            error.update(str(e))
            return
        error.update("")
        self.losses = ()
        self.query_one("#mix-progress", ProgressBar).update(total=100, progress=0)
        self.query_one("#mix-loss", Sparkline).data = []
        self.query_one("#mix-loss-range", Static).update("")
        self.query_one("#mix-loss-row").display = settings.train is not None
        self.query_one("#mix-stats", Static).update("resolving the mix…")
        self.start_job(self.build, plan, settings, out, dict(self.source.donors), self.app.session_path,
                       group="mix")

    def build(self, plan, settings, out: str | None, donors: dict, session_path: str | None, *, progress, cancel):
        """The job, in a worker thread: the engine's workbench build, with the phases before it has steps."""
        from surgeon.features.mix.workbench import build_on_workbench

        try:
            if plan.router.mode == "hidden" or settings.train is not None:
                self.post_message(MixPhase("loading torch and transformers…"))
                from transformers.utils import logging as hf_logging

                from surgeon.live.devices import default_device

                hf_logging.disable_progress_bar()  # its tqdm bar would write over the screen
                settings.device = default_device()
            if settings.train is not None:
                self.post_message(MixPhase(f"building the live mix on {settings.device} to train its routers…"))
            return build_on_workbench(plan, donors, out, settings, session_path=session_path,
                                      progress=progress, cancel=cancel)
        except (Cancelled, SurgeonError):
            raise
        except Exception as e:
            raise _failure(e) from None

    @on(MixPhase)
    def on_phase(self, message: MixPhase) -> None:
        if self.job_running:
            self.query_one("#mix-stats", Static).update(message.text)

    def job_progress(self, step: Step) -> None:
        if not self.job_running:
            return
        bar = self.query_one("#mix-progress", ProgressBar)
        stats = self.query_one("#mix-stats", Static)
        bar.update(total=max(1, step.total), progress=step.done)
        if step.unit == "bytes":
            stats.update(f"writing the mix: {human_bytes(step.done)} of {human_bytes(step.total)}")
        elif step.unit == "layers":
            stats.update(f"measuring the hidden-state routers: layer {step.done} of {step.total}")
        else:
            self.show_training(step)

    def show_training(self, step: Step) -> None:
        self.losses = step.series
        self.query_one("#mix-loss", Sparkline).data = list(step.series)
        first, last = step.series[0], step.series[-1]
        self.query_one("#mix-loss-range", Static).update(f" {first:.4f} → {last:.4f}")
        self.query_one("#mix-stats", Static).update(
            f"training the routers: step {step.done} of {step.total} · loss {last:.4f} · "
            f"{step.rate():.1f} steps/s · ETA {step.eta():.0f}s")

    def job_cancelled(self) -> None:
        self.query_one("#mix-stats", Static).update("cancelled: nothing was written")
        self.notify("mix cancelled; nothing was written", timeout=4)

    def job_failed(self, message: str) -> None:
        self.query_one("#mix-stats", Static).update("failed: nothing was written")
        self.query_one("#mix-error", Static).update(message or "failed")

    def job_finished(self, result) -> None:
        state, mix, built = result
        self.query_one("#mix-progress", ProgressBar).update(total=100, progress=100)
        if built.outcome.losses:  # every step's loss, whichever progress messages were superseded
            self.losses = tuple(built.outcome.losses)
            self.query_one("#mix-loss", Sparkline).data = list(self.losses)
        layout, export = built.layout, built.export
        self.query_one("#mix-stats", Static).update(f"done in {built.seconds:.1f}s: {export.path}")
        for warning in layout.warnings:
            self.notify(warning, title="Mix", severity="warning", timeout=8)
        self.app.open_mix(state, mix, built.session.exports[-1])
        if self.app.screen is self:
            self.app.pop_screen()
        self.app.notify(
            f"mixed {layout.num_experts} experts × {layout.num_layers} layers into a {layout.output.model_type} "
            f"at {export.path} ({human_bytes(export.bytes)}, {built.seconds:.1f}s); it is donor "
            f"{state.name}, the base", title="Mix built", timeout=8)

    def action_back(self) -> None:
        if self.cancel_job():
            self.query_one("#mix-stats", Static).update("cancelling at the next step…")
        else:
            self.app.pop_screen()

    def on_unmount(self) -> None:
        self.cancel_job()  # the app is closing: stop training at its next step

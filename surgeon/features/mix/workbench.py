"""A mix on the workbench: what the app keeps about an MoE mixed from dense donors, and how a
session that records one is opened again. No UI here (the screens and the tests call it).

After a mix is built the workbench's base is the mix's export, opened as donor M, and the dense
donors it was made from stay open beside it under the names the mix session gives them, so
probes compare the mix with each of them and the letters match `moe-surgeon mix`.

The session then records *how the mix was made* (extensions["mix"], written by `make_mix_session`,
exactly as `moe-surgeon mix --session` does), so `replay` rebuilds it. That holds while the
workbench is just the mix: M as the base, unmarked, beside its donors. Once parts of M are marked,
or the base or the donors change, the session records an ordinary hybrid whose base is the export
directory instead (`MixState.matches`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.donor import Donor
from surgeon.core.workbench import Workbench
from surgeon.errors import SurgeonError
from surgeon.features.mix.build import EXTENSION, MixSettings, RouterOutcome
from surgeon.features.mix.plan import DENSE_TYPES, MixLayout
from surgeon.jobs import NEVER, CancelToken, Progress

MIX_NAME = "M"  # the mix's donor name on the workbench, when free


class MixWorkbench(Workbench):
    """A workbench whose base is a mix: an expert still taken from the base is shown under the
    dense donor it came from (layer 0's experts read `B×1 C×1`), so the grid shows the experts as
    donors. Only the display changes: the state, the plan and the tallies still say "the base"."""

    def __init__(self, donors: dict[str, Donor], base: str, origins: dict[int, str]):
        super().__init__(donors, base)
        self.mix_name = base
        self.origins = origins  # expert index -> dense donor name

    def cell_donors(self, cell) -> list[tuple[str, int]]:
        donors = super().cell_donors(cell)
        experts = [p for p in self.parts(cell) if p.kind == "expert"]
        if not experts or self.base != self.mix_name:
            return donors
        shown = Counter(self.origins.get(p.expert, self.base) if self.state[p] == self.base else self.state[p]
                        for p in experts)
        return list(shown.items())  # in expert order


@dataclass
class MixState:
    """A built (or recorded) mix: enough to write its session step and to fill the form again."""

    name: str  # its donor name on the workbench
    layout: MixLayout
    settings: MixSettings
    outcome: RouterOutcome
    donors: dict[str, Donor]  # the dense donors the mix uses, by their names in the mix session
    export: Path | None  # None: recorded in a session whose export is missing

    @property
    def plan(self):
        return self.layout.plan

    def workbench(self, mix: Donor) -> MixWorkbench:
        return MixWorkbench({self.name: mix, **self.donors}, self.name, dict(enumerate(self.plan.experts)))

    def matches(self, wb) -> bool:
        """The workbench is the mix itself, so its session is the mix's recipe."""
        return (self.export is not None and wb is not None and wb.base == self.name and wb.marks == 0
                and set(wb.donors) == {self.name, *self.donors})

    def session(self, session_path):
        from surgeon.features.mix.build import make_mix_session

        return make_mix_session(self.layout, self.donors, self.settings, self.outcome, session_path)

    def experts_text(self, labels: dict[str, str]) -> str:
        return ", ".join(f"expert {e} = {n} {labels.get(n, self.donors[n].path.name)}"
                         for e, n in enumerate(self.plan.experts))

    def summary(self) -> str:
        text = f"router {self.plan.router.label}, top-{self.layout.top_k}"
        if self.plan.always_on:
            text += f", always-on {self.plan.always_on}"
        losses = self.outcome.losses
        if losses:
            text += f"; routers trained {len(losses)} steps, loss {losses[0]:.3f} → {losses[-1]:.3f}"
        return text


def new_name(taken) -> str:
    if MIX_NAME not in taken:
        return MIX_NAME
    return next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in taken)


def dense_problem(donors: dict[str, Donor]) -> str | None:
    """Why these donors cannot be mixed into an MoE, or None when they can."""
    if not donors:
        return "no donors are open"
    for name, d in donors.items():
        if d.model_type not in DENSE_TYPES:
            return (f"mixing needs dense {', '.join(DENSE_TYPES)} donors; donor {name} is {d.model_type} "
                    f"(open dense checkpoints: moe-surgeon demo:dense-base demo:dense-arith demo:dense-reverse)")
    types = {d.model_type for d in donors.values()}
    if len(types) > 1:
        return f"mixing needs donors of one architecture; these are {', '.join(sorted(types))}"
    return None


# ---------------------------------------------------------------- where a mix is written by default
def cache_root() -> Path:
    return Path(os.environ.get("MOE_SURGEON_CACHE", Path.home() / ".cache" / "moe-surgeon"))


def settings_hash(plan, donors: dict[str, Donor], settings: MixSettings) -> str:
    """A short hash of everything that decides the mix's bytes: the default output folder's name."""
    from surgeon.features.mix.router_train import file_sha256

    train = settings.train
    key = {
        "donors": {n: donors[n].fingerprint for n in plan.donor_names()},
        "base": plan.base, "experts": plan.experts, "router": plan.router.label, "always_on": plan.always_on,
        "assignments": [(a.spec, a.donor) for a in plan.assignments], "arch": plan.arch, "seed": plan.seed,
        "dtype": settings.dtype,
        "prompts": file_sha256(settings.prompts_file) if settings.prompts_file else None,
        "train": None if train is None else [file_sha256(train.data), train.steps, train.lr, train.batch_size,
                                             train.seed, train.template, settings.device],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def default_out(session_path: str | None, digest: str) -> Path:
    """Beside the session file when there is one (it travels with it), else in the cache."""
    parent = Path(session_path).resolve().parent if session_path else cache_root() / "mixes"
    return parent / f"mix-{digest}"


def build_on_workbench(plan, donors: dict[str, Donor], out, settings: MixSettings, *, session_path=None,
                       progress: Progress | None = None, cancel: CancelToken = NEVER):
    """`build_mix` as the workbench runs it: with no `out`, into the folder the settings name (so a
    rebuild of the same mix replaces it); then the export opened as a donor.
    Returns (MixState, the mix as a Donor, the MixBuild)."""
    from surgeon.core.donor import open_donor
    from surgeon.features.mix.build import build_mix

    force = out is None
    target = default_out(session_path, settings_hash(plan, donors, settings)) if out is None else out
    built = build_mix(plan, donors, target, settings, force=force, progress=progress, cancel=cancel)
    mix = open_donor(built.export.path)
    used = {n: donors[n] for n in plan.donor_names()}
    return MixState(new_name(used), built.layout, settings, built.outcome, used, built.export.path), mix, built


# ---------------------------------------------------------------- a session that records a mix
def _export_of(session, session_path) -> Path | None:
    """The newest export of the mix the session records that is still on disk."""
    base = Path(session_path).resolve().parent
    for record in reversed(session.exports):
        if record.kind != "mix" or not record.path:
            continue
        path = Path(record.path)
        for candidate in ([path] if path.is_absolute() else [base / path, Path.cwd() / path]):
            if (candidate / "config.json").is_file():
                return candidate
    return None


def routers_on_disk_digest(layout: MixLayout, mix: Donor) -> str:
    """sha256 of the export's router tensors as stored: what the session's routers_sha256 says."""
    digest = hashlib.sha256()
    for name in layout.routers:
        info = mix.tensors.get(name)
        if info is None:
            raise SurgeonError(f"{mix.path}: no tensor {name}; not the mix the session records")
        with open(info.file, "rb") as f:
            f.seek(info.start)
            digest.update(f.read(info.end - info.start))
    return "sha256:" + digest.hexdigest()


def restore_mix(session, session_path, donors: dict[str, Donor]) -> tuple[MixState, Donor | None, str | None]:
    """The mix a session records, and its export opened as a donor when it is on disk and is that
    mix; else None and a note saying why (the form can build it again)."""
    from surgeon.core.donor import open_donor
    from surgeon.features.mix.build import plan_from_session
    from surgeon.features.mix.plan import resolve_mix

    ext = session.extensions[EXTENSION]
    plan, settings = plan_from_session(session, session_path, donors)
    layout = resolve_mix(plan, donors, dtype=settings.dtype)
    train = ext.get("train") or {}
    outcome = RouterOutcome(None, str(ext.get("routers_sha256", "")), train.get("losses"), ext.get("compute") or {})
    used = {n: donors[n] for n in plan.donor_names()}
    state = MixState(new_name(used), layout, settings, outcome, used, None)
    export = _export_of(session, session_path)
    if export is None:
        return state, None, "the session records a mix whose export is not on disk: press M to build it again"
    mix = open_donor(export)
    if mix.model_type != layout.output.model_type or routers_on_disk_digest(layout, mix) != outcome.digest:
        return state, None, (f"{export} is not the mix the session records (its routers differ): "
                             "press M to build it again")
    state.export = export
    return state, mix, None

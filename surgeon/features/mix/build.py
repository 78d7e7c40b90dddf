"""Build a mix end to end, and keep it as a session step that replays.

plan -> layout (mix.resolve_mix) -> routers (seeded noise, or measured / trained on the live mix)
-> streaming export (export.py). The session keeps the ordinary dense plan (the component
transfers) plus `extensions["mix"]`:

  experts        donor names, one per expert, in order (a donor may repeat)
  always_on      a donor name or null
  router         {"mode", "top_k"}  (top_k null: the mode's default)
  seed, arch     the noise seed; the output architecture as resolved (mixtral or qwen2_moe)
  dtype, max_shard_size
  compute        {"device", "dtype", "threads", "torch"}: where routers were measured or trained
  prompts        {"path", "sha256"} of the hidden-mode prompts file, or null
  train          {"data", "sha256", "steps", "lr", "batch_size", "seed", "template", "losses"} or null
  routers_sha256 the routers exactly as written; a replay recomputes them and compares

Paths are stored relative to the session file when there is one, so a session travels with its data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.core.donor import Donor
from surgeon.errors import SurgeonError
from surgeon.features.mix.plan import (
    ROUTER_MODES,
    MixLayout,
    MixPlan,
    RouterSpec,
    initial_routers,
    parse_prompts,
    resolve_mix,
    routers_digest,
)
from surgeon.features.mix.router_train import TrainSpec, file_sha256
from surgeon.jobs import NEVER, CancelToken, Progress

EXTENSION = "mix"


@dataclass
class MixSettings:
    dtype: str = "keep"
    max_shard_size: int = 5 * 10**9
    device: str = "cpu"
    compute_dtype: str = "float32"
    threads: int | None = None  # torch threads while measuring/training routers (None: as is)
    train: TrainSpec | None = None
    prompts_file: str | None = None


@dataclass
class RouterOutcome:
    routers: dict | None
    digest: str
    losses: list[float] | None = None
    compute: dict = field(default_factory=dict)


def needs_model(layout: MixLayout, settings: MixSettings) -> bool:
    return layout.plan.router.mode == "hidden" or settings.train is not None


def compute_routers(layout: MixLayout, donors: dict[str, Donor], settings: MixSettings, *,
                    progress: Progress | None = None, cancel: CancelToken = NEVER) -> RouterOutcome:
    """Initial routers by mode; with hidden mode or training, on a live mix built for the purpose."""
    routers = initial_routers(layout)
    if not needs_model(layout, settings):
        return RouterOutcome(routers, routers_digest(layout, routers))
    import torch

    from surgeon.features.mix.live import materialize_mix
    from surgeon.features.mix.plan import hidden_routers
    from surgeon.features.mix.router_train import train_routers
    from surgeon.probes.scoring import load_tokenizer

    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        live = materialize_mix(layout, donors, routers, device=settings.device, dtype=settings.compute_dtype,
                               cancel=cancel)
        tokenizer = load_tokenizer(donors[layout.plan.base].path)
        if layout.plan.router.mode == "hidden":
            hidden_routers(layout, live.model, tokenizer, live.view, progress=progress, cancel=cancel)
        losses = None
        if settings.train is not None:
            losses = train_routers(live, tokenizer, settings.train, progress=progress, cancel=cancel)
        routers = live.routers()
        compute = {"device": settings.device, "dtype": settings.compute_dtype, "threads": torch.get_num_threads(),
                   "torch": torch.__version__}
    finally:
        torch.set_num_threads(threads)
    return RouterOutcome(routers, routers_digest(layout, routers), losses, compute)


# ---------------------------------------------------------------- the session step
def _stored_path(path: str, session_dir: Path | None) -> str:
    p = Path(path).resolve()
    if session_dir is not None:
        try:
            return os.path.relpath(p, session_dir.resolve())
        except ValueError:
            pass
    return str(p)


def mix_extension(layout: MixLayout, settings: MixSettings, outcome: RouterOutcome,
                  session_dir: Path | None) -> dict:
    plan = layout.plan
    ext = {
        "experts": list(plan.experts),
        "always_on": plan.always_on,
        "router": {"mode": plan.router.mode, "top_k": plan.router.top_k},
        "seed": plan.seed,
        "arch": layout.output.model_type,
        "dtype": settings.dtype,
        "max_shard_size": settings.max_shard_size,
        "compute": outcome.compute or None,
        "prompts": None,
        "train": None,
        "routers_sha256": outcome.digest,
    }
    if settings.prompts_file:
        ext["prompts"] = {"path": _stored_path(settings.prompts_file, session_dir),
                          "sha256": file_sha256(settings.prompts_file)}
    if settings.train is not None:
        t = settings.train
        ext["train"] = {"data": _stored_path(t.data, session_dir), "sha256": file_sha256(t.data),
                        "steps": t.steps, "lr": t.lr, "batch_size": t.batch_size, "seed": t.seed,
                        "template": t.template, "losses": outcome.losses or []}
    return ext


def make_mix_session(layout: MixLayout, donors: dict[str, Donor], settings: MixSettings, outcome: RouterOutcome,
                     session_path: str | os.PathLike | None):
    from surgeon.core.session import make_session

    used = {n: donors[n] for n in layout.plan.donor_names()}
    session = make_session(layout.plan.dense_plan, used, session_path)
    session_dir = Path(session_path).resolve().parent if session_path else None
    session.extensions[EXTENSION] = mix_extension(layout, settings, outcome, session_dir)
    return session


def _field(ext: dict, key: str, kind: type, origin: str):
    value = ext.get(key)
    if not isinstance(value, kind):
        raise SurgeonError(f"{origin}: invalid session: field extensions/mix/{key}: expected a {kind.__name__}")
    return value


def _data_file(entry: dict, key: str, session_dir: Path, origin: str, what: str) -> str:
    path = session_dir / entry[key]
    if not path.is_file():
        raise SurgeonError(f"{origin}: the {what} file {path} is missing")
    if file_sha256(path) != entry.get("sha256"):
        raise SurgeonError(f"{origin}: the {what} file {path} changed since the session was saved (sha256 differs)")
    return str(path)


def plan_from_session(session, session_path, donors: dict[str, Donor]) -> tuple[MixPlan, MixSettings]:
    """The mix a session records, with its data files checked against their recorded hashes."""
    origin = str(session_path)
    ext = session.extensions.get(EXTENSION)
    if not isinstance(ext, dict):
        raise SurgeonError(f"{origin}: the session records no mix")
    experts = _field(ext, "experts", list, origin)
    names = {d.name for d in session.donors}
    for e in experts + ([ext.get("always_on")] if ext.get("always_on") else []):
        if e not in names:
            raise SurgeonError(f"{origin}: invalid session: field extensions/mix/experts: no donor named {e!r}")
    router = _field(ext, "router", dict, origin)
    spec = RouterSpec(str(router.get("mode")), router.get("top_k"))
    if spec.mode not in ROUTER_MODES or not (spec.top_k is None or isinstance(spec.top_k, int)):
        raise SurgeonError(f"{origin}: invalid session: field extensions/mix/router: {router}")
    session_dir = Path(session_path).resolve().parent
    settings = MixSettings(dtype=ext.get("dtype", "keep"), max_shard_size=int(ext.get("max_shard_size", 5 * 10**9)))
    compute = ext.get("compute") or {}
    settings.device = compute.get("device", "cpu")
    settings.compute_dtype = compute.get("dtype", "float32")
    settings.threads = compute.get("threads")
    plan = MixPlan(session.plan.base, experts, spec, ext.get("always_on"), list(session.plan.assignments),
                   ext.get("arch", "auto"), int(ext.get("seed", 0)))
    if ext.get("prompts"):
        settings.prompts_file = _data_file(ext["prompts"], "path", session_dir, origin, "prompts")
        plan.prompts = parse_prompts(settings.prompts_file, experts, donors)
    t = ext.get("train")
    if t:
        data = _data_file(t, "data", session_dir, origin, "router training")
        settings.train = TrainSpec(data, int(t["steps"]), float(t["lr"]), int(t["batch_size"]), int(t["seed"]),
                                   t.get("template", "raw"))
    return plan, settings


@dataclass
class MixBuild:
    layout: MixLayout
    outcome: RouterOutcome
    export: object  # export.ExportResult
    session: object  # session.Session, with the export recorded
    seconds: float = 0.0  # the whole build: routers (init, training) and export


def build_mix(plan: MixPlan, donors: dict[str, Donor], out, settings: MixSettings, *,
              session_path=None, force: bool = False, fsync: bool = False,
              progress: Progress | None = None, cancel: CancelToken = NEVER) -> MixBuild:
    """Resolve, make the routers, write the export (with its model card, loss curve and session).

    The one mix job of the command line and the workbench: it reports Steps as it goes (the hidden
    routers by layer, router training by step with its loss curve, the export by bytes; tell them
    apart by `Step.unit`) and stops at the next layer, step or tensor once `cancel` is set,
    leaving nothing behind."""
    import time

    from surgeon.core.session import ExportRecord, now_utc
    from surgeon.features.mix.export import (
        TRAINING_CSV,
        export_mix,
        loss_csv,
        mix_model_card,
    )

    started = time.perf_counter()
    layout = resolve_mix(plan, donors, dtype=settings.dtype)
    if settings.train is not None:
        settings.train.check()
    outcome = compute_routers(layout, donors, settings, progress=progress, cancel=cancel)
    session = make_mix_session(layout, donors, settings, outcome, session_path)
    embedded = make_mix_session(layout, donors, settings, outcome, None).to_json()
    training = embedded["extensions"][EXTENSION]["train"]
    if training is not None:
        training = {**training, "device": settings.device}
    extra = {TRAINING_CSV: loss_csv(outcome.losses)} if outcome.losses else {}
    result = export_mix(layout, donors, outcome.routers, out, max_shard_size=settings.max_shard_size, force=force,
                        card=mix_model_card(layout, donors, training), session_json=embedded, extra_files=extra,
                        progress=progress, cancel=cancel, fsync=fsync)
    session.exports.append(ExportRecord(
        path=str(result.path), kind="mix", dtype=settings.dtype, max_shard_size=settings.max_shard_size,
        shards=len(result.shards), tensors=result.tensors, bytes=result.bytes, time=now_utc(),
        extra={"routers_sha256": outcome.digest},
    ))
    return MixBuild(layout, outcome, result, session, time.perf_counter() - started)

"""`run_routing`: the routing analysis of a checkpoint or a session's hybrid, as one job.

Every check that needs no weights runs first (a bad corpus, --domain, --diff or --save fails in
a second); then the target, and for drift each other model, is probed on the same tokens
(`probe_hybrid` for a plan over donors), and the figures the command line prints or saves are
assembled in `RoutingResult.report`. The workbench's Routing screen measures on the app's live
hybrid instead (`probe_live`, the hybrid held through live/keeper.py); both measure a model they
hold with `probe_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.features.routing.corpora import read_corpora
from surgeon.jobs import NEVER


@dataclass(frozen=True)
class RoutingRequest:
    """What `moe-surgeon routing` was asked; the flags' names and defaults."""

    target: str  # a checkpoint directory, demo:NAME, or a session file
    corpora: tuple[str, ...] = ()  # NAME=FILE; none: DEFAULT_CORPORA
    q: float = 25.0
    metric: str = "frequency"
    experts: tuple[str, ...] = ()  # LAYER:EXPERT
    importance: bool = False
    against: tuple[str, ...] = ()
    drift: bool = False
    similarity: str | None = None
    take_used: int | None = None
    take_changed: int | None = None
    domain: str | None = None
    layers: str | None = None
    max_tokens: int | None = None
    save: tuple[str, ...] = ()
    view: str | None = None
    diff: tuple[str, str] | None = None
    device: str | None = None
    dtype: str = "keep"
    batch_size: int = 32
    allow_pickle: bool = False


@dataclass
class RoutingResult:
    report: dict  # plain JSON: what --json prints
    stats: dict = field(default_factory=dict)  # corpus -> RoutingStats of the target
    similarity: dict | None = None  # layer -> [E, E] cosine matrix
    takes: list[str] = field(default_factory=list)  # --take SPECs
    view: object | None = None  # the RoutingView --save wrote


def parse_expert(arg: str) -> tuple[int, int]:
    layer, sep, expert = arg.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), int(expert)
    except ValueError:
        raise SurgeonError(f"--expert {arg!r}: expected LAYER:EXPERT, e.g. 2:5") from None


def require_moe(donor) -> None:
    if not donor.anatomy.experts_per_layer:
        raise SurgeonError(f"{donor.path}: {donor.model_type} has no routed experts; routing analysis needs an MoE model")


def load_model(donor, device: str, dtype: str):
    """One donor's model, loaded as a hybrid is (one copy in memory, straight from its files); a
    pickle-only donor (--allow-pickle) through transformers, which reads its .bin files."""
    from surgeon.core.plan import Plan
    from surgeon.live.hybrid import Hybrid

    if donor.pickled:
        from surgeon.live.loader import load_model as from_pretrained

        return from_pretrained(donor.path, device=device, dtype=dtype, gates=False)
    return Hybrid.materialize(Plan("D"), {"D": donor}, device=device, dtype=dtype).model


def probe_model(model, tokenizer, corpora: dict[str, list[str]], *, progress=None, cancel=NEVER,
                label: str = "routing", **kw) -> dict:
    """`probe_domains` on a model the caller holds (a checkpoint's, a fresh hybrid's or the app's live
    one); `kw` as probe_domains. reap="auto": REAP's score too where the family's expert outputs can
    be read (the workbench's heatmap shows it beside frequency; it costs the same pass). The probe's
    hooks and expert wrappers are gone when this returns or raises, so the model can be shared."""
    from surgeon.features.routing.probe import probe_domains

    if kw.get("reap") == "auto":
        from surgeon.features.routing.expert_outputs import readable
        from surgeon.features.routing.probe import moe_layers

        layers = moe_layers(model)
        kw["reap"] = bool(layers) and all(readable(getattr(m.mlp, "experts", None)) for m in layers)
    return probe_domains(model, tokenizer, corpora, progress=progress, cancel=cancel, label=label, **kw)


def probe_hybrid(plan, donors: dict, corpora: dict[str, list[str]], *, tokenizer, device: str, dtype: str = "keep",
                 progress=None, cancel=NEVER, label: str = "routing", **kw) -> dict:
    """The routing of `plan`'s hybrid (a donor alone is `Plan(name)`) on every corpus, on a model
    materialised for this call and let go after (the command line; the workbench reads the app's
    live hybrid with `probe_live`); `kw` as probe_model."""
    from surgeon.live.hybrid import Hybrid

    cancel.check()
    model = Hybrid.materialize(plan, donors, device=device, dtype=dtype).model
    try:
        return probe_model(model, tokenizer, corpora, progress=progress, cancel=cancel, label=label, **kw)
    finally:
        del model


class LiveSwapFailed(SurgeonError):
    """Moving the shared live hybrid between plans failed: it may hold tensors of two plans, so the
    job ends (and its keeper lets the hybrid go) instead of going on to the next model."""


# What a config may differ in and still give the same model: where and with what it was saved.
SAVED_AS = ("_name_or_path", "transformers_version")


def swaps_in(base, donor) -> bool:
    """Whether a live hybrid of `base` swapped to the whole of `donor` (`Plan(donor)`) is the donor's
    own model: the same family, the same tensors (names, shapes, dtypes) and the same config but
    for where it was saved. The config counts here (unlike for a probe score): a donor with another
    top-k or router setting in its config routes differently on the same weights."""
    if donor.pickled or base.pickled or base.model_type != donor.model_type:
        return False

    def tensors(d):
        return {n: (tuple(t.shape), t.dtype) for n, t in d.tensors.items()}

    def config(d):
        return {k: v for k, v in d.config.items() if k not in SAVED_AS}

    return tensors(base) == tensors(donor) and config(base) == config(donor)


def probe_live(hybrid, plan, corpora: dict[str, list[str]], *, tokenizer, donor: str | None = None,
               device: str, dtype: str = "keep", progress=None, cancel=NEVER, label: str = "routing",
               **kw) -> dict:
    """The routing on the live `hybrid` (the app's, which the caller holds: live.keeper's `use`) of
    `plan`'s hybrid (donor None) or of donor `donor` alone. A donor that swaps in whole (`swaps_in`)
    is read from the hybrid swapped to it, and the hybrid is swapped back to `plan` afterwards, also
    after a failure or a cancel; any other donor (a dense one, another config) from a model of its
    own, materialised for this call (probe_hybrid). `kw` as probe_model. A failed swap raises
    LiveSwapFailed, never a plain SurgeonError that a caller would take for one model's failure."""
    from surgeon.core.plan import Plan

    cancel.check()
    if donor is None:
        _swap(hybrid, plan, dtype, "the plan")
        return probe_model(hybrid.model, tokenizer, corpora, progress=progress, cancel=cancel, label=label, **kw)
    if not swaps_in(hybrid.donors[plan.base], hybrid.donors[donor]):
        return probe_hybrid(Plan(donor), hybrid.donors, corpora, tokenizer=tokenizer, device=device, dtype=dtype,
                            progress=progress, cancel=cancel, label=label, **kw)
    _swap(hybrid, Plan(donor), dtype, f"donor {donor}")
    try:
        return probe_model(hybrid.model, tokenizer, corpora, progress=progress, cancel=cancel, label=label, **kw)
    finally:
        _swap(hybrid, plan, dtype, "the plan")


def _swap(hybrid, plan, dtype: str, what: str) -> None:
    if hybrid.resolution.plan == plan:
        return
    try:
        hybrid.apply(plan, dtype=dtype)  # all or nothing (Hybrid.apply puts back what it had copied)
    except Exception as e:
        from surgeon.io.fs import error_line

        raise LiveSwapFailed(f"swapping the live hybrid to {what}: {error_line(e)}") from e


def run_routing(request: RoutingRequest, progress=None, cancel=NEVER) -> RoutingResult:
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import parse_layers
    from surgeon.core.session import open_target
    from surgeon.features.routing.view import FORMATS

    r = request
    if not 0 < r.q <= 100:
        raise SurgeonError(f"--q {r.q}: expected a percentage in (0, 100]")
    experts_asked = [parse_expert(e) for e in r.experts]
    layers = parse_layers(r.layers)
    session, donors, plan = open_target(r.target, "analyse", allow_pickle=r.allow_pickle)
    base = donors[plan.base]
    require_moe(base)
    if r.take_changed and not r.similarity:
        raise SurgeonError("--take-changed needs --similarity DIR (the donor whose changed experts to take)")
    if r.take_used and session is not None:
        raise SurgeonError("--take-used needs a checkpoint directory as target (a hybrid is not one donor)")
    if r.drift and session is None:
        raise SurgeonError("--drift compares a session's hybrid with its donors; for a directory use --against DIR")
    against = [open_donor(a, allow_pickle=r.allow_pickle) for a in r.against]
    for d in against:
        require_moe(d)
    sim_donor = open_donor(r.similarity, allow_pickle=r.allow_pickle) if r.similarity else None
    probe_needed = bool(r.corpora or not r.similarity or experts_asked or r.take_used or r.drift
                        or against or r.save or r.diff)
    corpora = read_corpora(r.corpora) if probe_needed else {}
    if r.domain and r.domain not in corpora:
        raise SurgeonError(f"--domain {r.domain!r}: no such corpus (corpora: {', '.join(corpora) or 'none'})")
    if r.view and r.view not in corpora:
        raise SurgeonError(f"--view {r.view!r}: no such corpus (corpora: {', '.join(corpora) or 'none'})")
    target_label = r.target if session is None else f"the hybrid of {r.target}"
    model_labels = {"target": target_label, **{a: a for a in r.against}}  # --diff name -> what a view calls it
    if r.drift:
        model_labels.update({ref.name: ref.path for ref in session.donors})
    diff_kind = _diff_kind(r.diff, corpora, list(model_labels)) if r.diff else None
    for f in r.save:  # refused before any model loads
        if Path(f).suffix.lower() not in FORMATS:
            raise SurgeonError(f"--save {f}: unknown format {Path(f).suffix or '(none)'!r}; use {', '.join(FORMATS)}")

    result = RoutingResult({"target": r.target, "model_type": base.model_type, "q": r.q})
    report = result.report
    if probe_needed:
        from surgeon.features.routing.probe import common_experts

        stats, drift, theirs, tokenizer = _probe(r, session, donors, base, against, corpora, progress, cancel)
        result.stats = stats
        first = next(iter(stats.values()))
        common = common_experts({n: s.frequency for n, s in stats.items()}, r.q / 100)
        report.update(layers=first.layers, num_experts=first.num_experts, top_k=first.top_k,
                      domains={n: s.summary() for n, s in stats.items()},
                      common={str(l): c for l, c in zip(first.layers, common)})
        if drift:
            report["drift"] = drift
        if experts_asked:
            report["experts"] = what_experts_do(stats, tokenizer, experts_asked)
        if r.save or r.diff:
            from surgeon.features.routing.view import save_view

            result.view = _view(r, stats, theirs, diff_kind, model_labels)
            report["view"] = result.view.title
            report["saved"] = [{"path": f, "format": save_view(result.view, f)} for f in r.save]
    if sim_donor is not None:
        from surgeon.features.routing.probe import expert_similarity

        require_moe(sim_donor)
        if sim_donor.model_type != base.model_type:
            raise SurgeonError(f"{sim_donor.path} is {sim_donor.model_type}, {base.path} is {base.model_type}")
        cancel.check()
        result.similarity = expert_similarity(base, sim_donor)
        report["similarity"] = {"donor": r.similarity,
                                "matrices": {str(l): m.round(6).tolist() for l, m in result.similarity.items()}}
    if r.take_used:
        from surgeon.features.routing.probe import take_most_used

        domain = r.domain or next(iter(result.stats))
        result.takes += [f"{a.spec}={r.target}" for a in take_most_used(result.stats[domain], r.take_used, "T", layers)]
    if r.take_changed:
        from surgeon.features.routing.probe import take_most_changed

        result.takes += [f"{a.spec}={r.similarity}"
                         for a in take_most_changed(result.similarity, r.take_changed, "T", layers)]
    if result.takes:
        report["takes"] = result.takes
    return result


def _diff_kind(pair, corpora, models) -> str:
    """`--diff A B` names two corpora or two models; which, checked before any model loads."""
    if all(x in corpora for x in pair):
        return "domain"
    if all(x in models for x in pair):
        return "model"
    raise SurgeonError(f"--diff {pair[0]} {pair[1]}: expected two corpora ({', '.join(corpora)}) or two models "
                       f"({', '.join(models)})")


def _view(r: RoutingRequest, stats, theirs, diff_kind, labels):
    """The heatmap view --save writes: the target on one corpus, or a difference of two."""
    from surgeon.features.routing.view import difference_view, stats_view

    domain = r.view or r.domain or next(iter(stats))
    if diff_kind is None:
        return stats_view(stats[domain], r.metric, labels["target"], domain)
    a, b = r.diff
    if diff_kind == "domain":
        return difference_view(stats[a], stats[b], r.metric, (labels["target"], a), (labels["target"], b))
    models = {"target": stats, **theirs}
    return difference_view(models[a][domain], models[b][domain], r.metric, (labels[a], domain), (labels[b], domain))


def _probe(r: RoutingRequest, session, donors, base, against, corpora, progress, cancel):
    """Probe the target (and, for drift, each other model on the same tokens)."""
    import torch

    from surgeon.features.routing.probe import probe_domains, routing_drift
    from surgeon.live.devices import check_device, default_device
    from surgeon.probes.scoring import load_tokenizer

    device = str(check_device(r.device or default_device()))
    tokenizer = load_tokenizer(base.path)
    kw = dict(batch_size=r.batch_size, max_tokens=r.max_tokens, importance=r.importance,
              progress=progress, cancel=cancel)
    others = list(zip(r.against, against))  # (name for --diff, donor)
    if r.drift:
        others += list(donors.items())
    keep = bool(others)
    try:
        if session is not None:
            stats = probe_hybrid(session.plan, donors, corpora, tokenizer=tokenizer, device=device, dtype=r.dtype,
                                 keep_probs=keep, **kw)
        else:
            cancel.check()
            model = load_model(base, device, r.dtype)
            stats = probe_domains(model, tokenizer, corpora, keep_probs=keep, **kw)
            del model
        drift, by_name = [], {}
        for other_name, other in others:
            cancel.check()
            model = load_model(other, device, r.dtype)
            theirs = by_name[other_name] = probe_domains(model, tokenizer, corpora, keep_probs=True,
                                                         label=f"routing {other_name}", **kw)
            del model
            for name in corpora:
                d = routing_drift(stats[name], theirs[name])
                drift.append({"against": str(other.path), "corpus": name, "layers": d["layers"],
                              "token_jsd": [round(float(v), 6) for v in d["token_jsd"]],
                              "usage_jsd": [round(float(v), 6) for v in d["usage_jsd"]]})
    except torch.cuda.OutOfMemoryError:
        raise SurgeonError(f"out of GPU memory on {device}; try --device cpu or a smaller --batch-size") from None
    for s in [*stats.values(), *(t for theirs in by_name.values() for t in theirs.values())]:
        s.probs = None  # only drift needed them
    return stats, drift, by_name, tokenizer


def what_experts_do(stats, tokenizer, asked) -> list[dict]:
    """Per asked expert and corpus: its frequency, importance, top tokens in context and co-firing."""
    from surgeon.features.routing.probe import cofiring, expert_tokens

    out = []
    for layer, expert in asked:
        first = next(iter(stats.values()))
        if not 0 <= expert < first.num_experts:
            raise SurgeonError(f"--expert {layer}:{expert}: expert out of range (0-{first.num_experts - 1})")
        first.layer_index(layer)
        for name, s in stats.items():
            co = cofiring(s, layer, expert)
            imp = s.importance
            out.append({
                "layer": layer, "expert": expert, "corpus": name,
                "frequency": round(float(s.frequency[s.layer_index(layer), expert]), 6),
                "importance": None if imp is None else round(float(imp[s.layer_index(layer), expert]), 6),
                "top_tokens": expert_tokens(s, tokenizer, layer, expert),
                "cofire_same_layer": [round(float(v), 6) for v in co["same_layer"]],
                "cofire_next_layer": None if co["next_layer"] is None else [round(float(v), 6) for v in co["next_layer"]],
            })
    return out

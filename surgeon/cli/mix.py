"""`moe-surgeon mix`: build an MoE from dense donors (their MLPs become the experts); see surgeon/features/mix/plan.py."""

from __future__ import annotations

import json
import sys

from surgeon.core.architectures import MIX_ARCH_CHOICES
from surgeon.errors import SurgeonError
from surgeon.io.dtypes import CASTS

COMPUTE_DTYPES = sorted(CASTS, key=lambda d: d != "float32")  # float32 first: the default


def register(sub) -> None:
    from surgeon.cli.options import common_export_options
    from surgeon.features.mix.router_train import TEMPLATES, TrainSpec

    p = sub.add_parser(
        "mix", help="build an MoE from dense donors (their MLPs become the experts)",
        description="Mix dense llama/mistral/qwen2 donors into a Mixtral or Qwen2-MoE: layer l's expert e is "
        "donor e's MLP at layer l; everything else comes from --base (or --take). See docs/mix.md.")
    p.add_argument("out")
    p.add_argument("--base", required=True, help="the donor attention, norms and embeddings come from")
    p.add_argument("--expert", action="append", default=[], metavar="DIR", required=True,
                   help="a donor whose MLPs become expert N (in order); repeatable, may repeat a donor")
    p.add_argument("--router", default="uniform", metavar="MODE",
                   help="uniform (gate-less, every expert at 1/N; default), noisy:K, hidden[:K], random[:K]")
    p.add_argument("--prompts", metavar="FILE", help="JSON: expert (index, donor name or path) -> positive prompts, "
                   "or {positive, negative}; for --router hidden")
    p.add_argument("--always-on", metavar="DIR", help="a donor whose MLP is added to every token's output")
    p.add_argument("--take", action="append", default=[], metavar="SPEC=DIR",
                   help="take attention/norms/embedding/final_norm/lm_head[@layers] from DIR; later wins")
    p.add_argument("--arch", default="auto", choices=MIX_ARCH_CHOICES,
                   help="output architecture (auto: Mixtral for llama/mistral, Qwen2-MoE for qwen2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noisy/random router and of router training")
    p.add_argument("--train", metavar="FILE", help="train only the routers on FILE (jsonl or text)")
    p.add_argument("--steps", type=int, default=TrainSpec.steps, help=f"router training steps (default {TrainSpec.steps})")
    p.add_argument("--lr", type=float, default=TrainSpec.lr,
                   help="router learning rate, constant (default 1e-3)")
    p.add_argument("--train-batch-size", type=int, default=TrainSpec.batch_size)
    p.add_argument("--train-template", default=TrainSpec.template, choices=TEMPLATES,
                   help="how prompt/answer items become text (raw: side by side, qa: Question:/Answer:)")
    p.add_argument("--device", help="where hidden-state init and training run: cpu, cuda, cuda:N "
                   "(default: cuda when present)")
    p.add_argument("--compute-dtype", default="float32", choices=COMPUTE_DTYPES,
                   help="dtype of the live mix used for hidden-state init and training (default float32)")
    p.add_argument("--threads", type=int, help="torch CPU threads for init/training (recorded, so replays match)")
    p.add_argument("--session", metavar="FILE", help="also save the mix as a session file that replay rebuilds")
    common_export_options(p)
    p.set_defaults(func=cmd_mix)


def _open_donors(args):
    from surgeon.core.donor import DonorsByPath
    from surgeon.core.plan import parse_take

    opened = DonorsByPath(allow_pickle=args.allow_pickle)
    base = opened.name_for(args.base)
    experts = [opened.name_for(e) for e in args.expert]
    always_on = opened.name_for(args.always_on) if args.always_on else None
    assignments = [parse_take(take, opened.name_for) for take in args.take]
    return base, experts, always_on, assignments, opened.donors


def _settings(args, device_default):
    from surgeon.features.mix.build import MixSettings
    from surgeon.features.mix.router_train import TrainSpec
    from surgeon.io.sizes import parse_size

    train = None
    if args.train:
        train = TrainSpec(args.train, args.steps, args.lr, args.train_batch_size, args.seed, args.train_template)
        train.check()
    return MixSettings(dtype=args.dtype, max_shard_size=parse_size(args.max_shard_size), device=device_default,
                       compute_dtype=args.compute_dtype, threads=args.threads, train=train, prompts_file=args.prompts)


def cmd_mix(args) -> int:
    from surgeon.features.mix.plan import MixPlan, parse_prompts, parse_router

    router = parse_router(args.router)
    if args.prompts and router.mode != "hidden":
        raise SurgeonError(f"--prompts: only --router hidden reads prompts (router is {router.label})")
    if router.mode == "hidden" and not args.prompts:
        raise SurgeonError("--router hidden: give each expert's prompts with --prompts FILE")
    base, experts, always_on, assignments, donors = _open_donors(args)
    plan = MixPlan(base, experts, router, always_on, assignments, args.arch, args.seed)
    if args.prompts:
        plan.prompts = parse_prompts(args.prompts, experts, donors)
    device = args.device
    if device is None and (router.mode == "hidden" or args.train):
        from surgeon.live.devices import default_device

        device = default_device()
    settings = _settings(args, device or "cpu")
    return _build_and_report(plan, donors, args.out, settings, args, session_path=args.session)


def _build_and_report(plan, donors, out, settings, args, *, session_path=None, recorded_digest=None) -> int:
    from surgeon.cli.options import out_of_memory_is_an_error
    from surgeon.cli.progress import StepPrinter, warn
    from surgeon.core.session import save_session
    from surgeon.features.mix.build import build_mix
    from surgeon.io.sizes import human_bytes
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    with out_of_memory_is_an_error(settings.device), cancel_on_interrupt(CancelToken()) as token:
        built = build_mix(plan, donors, out, settings, session_path=session_path, force=args.force, fsync=args.fsync,
                          progress=StepPrinter("mix"), cancel=token)
    layout, result, outcome = built.layout, built.export, built.outcome
    for w in layout.warnings:
        warn(w)
    if session_path:
        save_session(built.session, session_path)
    matches = recorded_digest is None or recorded_digest == outcome.digest
    record = {
        "path": str(result.path), "arch": layout.output.model_type, "layers": layout.num_layers,
        "experts": [{"index": e, "donor": n, "path": str(donors[n].path)} for e, n in enumerate(plan.experts)],
        "always_on": plan.always_on, "router": plan.router.label, "top_k": layout.top_k, "seed": plan.seed,
        "tensors": result.tensors, "bytes": result.bytes, "shards": len(result.shards), "seconds": built.seconds, "export_seconds": result.seconds,
        "routers_sha256": outcome.digest, "losses": outcome.losses,
    }
    if recorded_digest is not None:
        record["routers_match_recording"] = matches
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"mixed {layout.num_experts} experts x {layout.num_layers} layers into a {layout.output.model_type} "
              f"(router {plan.router.label}, top-{layout.top_k}) at {result.path} in {built.seconds:.2f}s")
        print(f"  {result.tensors} tensors, {human_bytes(result.bytes)} in {len(result.shards)} shard(s)")
        for e, n in enumerate(plan.experts):
            print(f"  expert {e}  {n}  {donors[n].path}")
        if plan.always_on:
            print(f"  always-on  {plan.always_on}  {donors[plan.always_on].path}")
        if outcome.losses:
            print(f"  router training: {len(outcome.losses)} steps, loss {outcome.losses[0]:.4f} -> "
                  f"{outcome.losses[-1]:.4f} (every step in {result.path / 'router-training.csv'})")
    if not matches:
        warn(f"the routers differ from the session's (sha256 {outcome.digest[:23]} vs {recorded_digest[:23]}); "
              "router init or training ran with another device, thread count or torch version")
        return 1
    return 0


def replay_mix(session, donors, args, check) -> int:
    """`moe-surgeon replay SESSION --export OUT` for a session whose step is a mix."""
    from surgeon.features.mix.build import EXTENSION, plan_from_session

    if args.probes:
        raise SurgeonError(f"{args.session}: replay --probes: a mix session records no probes; "
                           "probe its export with `moe-surgeon probe DIR`")
    plan, settings = plan_from_session(session, args.session, donors)
    if args.device:
        settings.device = args.device
    ext = session.extensions[EXTENSION]
    if not args.export:
        from surgeon.features.mix.plan import resolve_mix

        layout = resolve_mix(plan, donors, dtype=settings.dtype)
        summary = {"session": str(args.session), "mix": True, "arch": layout.output.model_type,
                   "experts": plan.experts, "router": plan.router.label, "tensors": len(layout.tensors),
                   "fingerprints": check.status, "donor_check": check.line()}
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"{args.session}: a mix of {len(plan.experts)} experts into a {layout.output.model_type} "
                  f"(router {plan.router.label}), {len(layout.tensors)} tensors; {check.line()}; "
                  "add --export OUT to rebuild it")
        return 0
    print(f"moe-surgeon: {check.line()}", file=sys.stderr)
    return _build_and_report(plan, donors, args.export, settings, args, recorded_digest=ext.get("routers_sha256"))

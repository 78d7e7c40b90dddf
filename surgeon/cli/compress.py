"""`moe-surgeon compress`: Tucker-compress chosen experts into a compact dense checkpoint (seed 002).

The engine is `compress.py` (the method is in its docstring); this file parses, chooses the
experts (all, `--experts`, or the common experts of `--common` corpora via routing.py), prints
the reconstruction errors and writes the checkpoint. torch and transformers are imported only
inside the command, so `moe-surgeon --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from surgeon.cli.options import DTYPES
from surgeon.errors import SurgeonError


def register(sub) -> None:
    p = sub.add_parser(
        "compress", help="Tucker-compress chosen experts into a compact dense FFN checkpoint",
        description="Per MoE layer, stack the chosen experts' gate/up/down matrices, decompose each stack by "
        "a truncated HOSVD (Tucker), report the relative reconstruction error per layer and projection, and "
        "write a dense checkpoint (mixtral -> mistral, qwen2_moe -> qwen2, qwen3_moe -> qwen3, olmoe -> "
        "one-expert olmoe) whose FFN of intermediate size --rank comes from the decomposition; attention, "
        "norms, embeddings and lm_head are copied unchanged.",
    )
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("source", help="an MoE checkpoint directory or demo:NAME")
    p.add_argument("--rank", type=int, help="intermediate size of the dense FFN, and the Tucker rank of the "
                   "intermediate mode (default: the experts' intermediate size)")
    p.add_argument("--hidden-rank", type=int, help="Tucker rank of the hidden mode (default: full)")
    p.add_argument("--expert-rank", type=int, help="Tucker rank of the expert mode (default: full; more than "
                   "a layer's chosen experts means full)")
    p.add_argument("--experts", action="append", default=[], metavar="[LAYERS:]EXPERTS",
                   help="which experts to stack, e.g. 1,5 (every layer) or 0-3:1,5,7; repeatable, later wins "
                   "(default: every expert)")
    p.add_argument("--common", nargs="*", metavar="CORPUS",
                   help="stack the common experts: those in the top --q%% by activation frequency on every "
                   "corpus (NAME=FILE, a built-in probe set or a file; none given: arith reverse)")
    p.add_argument("--q", type=float, default=25.0, help="--common: the top Q%% per corpus (default 25)")
    p.add_argument("--max-tokens", type=int, help="--common: read at most this many tokens per corpus")
    p.add_argument("--device", help="where the decomposition (and --common's probe) runs: cpu, cuda or cuda:N "
                   "(default: cuda when present)")
    p.add_argument("--dtype", default="keep", choices=DTYPES, help="dtype of the written weights (default: "
                   "the source's)")
    p.add_argument("--batch-size", type=int, default=32, help="--common: sequences per forward pass")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--check", action="store_true",
                   help="load the written checkpoint with transformers and run a forward pass")
    p.add_argument("--allow-pickle", action="store_true", help="load a pickle-only source with weights_only=True")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compress)


def _common_choice(args, donor, device) -> tuple[dict, dict]:
    """Per MoE layer, the experts common to every corpus (routing.common_experts)."""
    from surgeon.cli.routing import (
        DEFAULT_CORPORA,
        corpus_texts,
        load_model,
        parse_corpus,
    )
    from surgeon.features.routing.probe import common_experts, probe_domains
    from surgeon.probes.scoring import load_tokenizer

    corpora = {}
    for arg in args.common or DEFAULT_CORPORA:
        name, path = parse_corpus(arg)
        if name in corpora:
            raise SurgeonError(f"--common {arg!r}: corpus name {name!r} given twice")
        corpora[name] = corpus_texts(path)
    from transformers.utils import logging

    logging.disable_progress_bar()  # a loading bar between the lines of a report is noise
    tokenizer = load_tokenizer(donor.path)
    model = load_model(donor.path, device, "keep")
    stats = probe_domains(model, tokenizer, corpora, batch_size=args.batch_size, max_tokens=args.max_tokens)
    del model
    first = next(iter(stats.values()))
    common = common_experts({n: s.frequency for n, s in stats.items()}, args.q / 100)
    chosen = {}
    for layer, experts in zip(first.layers, common):
        if not experts:
            raise SurgeonError(f"--common: layer {layer} has no expert in the top {args.q:g}% of every corpus "
                               f"({', '.join(corpora)}); raise --q or choose with --experts")
        chosen[layer] = tuple(experts)
    info = {"corpora": list(corpora), "q": args.q, "tokens": {n: s.tokens for n, s in stats.items()}}
    return chosen, info


def _progress(done: int, total: int) -> None:
    print(f"\rdecomposing: layer {done} of {total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _check_load(path) -> dict:
    """Load the written checkpoint with transformers and run it on a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar for loading a few tensors is noise in a report
    model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
    model.eval()
    problems = [f"{k} {v[0]}" for k, v in info.items() if v]
    if problems:
        raise SurgeonError(f"{path}: transformers loads it with {problems[0]}")
    ids = torch.arange(1, min(9, model.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise SurgeonError(f"{path}: the written model gives non-finite logits")
    return {"class": type(model).__name__, "tokens": int(ids.shape[1]), "logits_finite": True}


def cmd_compress(args) -> int:
    from surgeon.core.donor import open_donor
    from surgeon.features.compress import check_ranks, check_source, parse_expert_choice
    from surgeon.features.export import check_target
    from surgeon.io.sizes import parse_size

    # Every check that needs no weights runs before torch is imported or anything slow starts.
    if args.experts and args.common is not None:
        raise SurgeonError("--experts and --common both choose the experts; give one")
    if args.common is not None and not 0 < args.q <= 100:
        raise SurgeonError(f"--q {args.q}: expected a percentage in (0, 100]")
    max_shard = parse_size(args.max_shard_size)
    donor = open_donor(args.source, allow_pickle=args.allow_pickle)
    target = check_source(donor)
    ranks = check_ranks(donor, args.rank, args.hidden_rank, args.expert_rank)
    chosen = parse_expert_choice(args.experts, donor)
    check_target(Path(args.out).absolute(), {"source": donor}, args.force)

    import torch

    from surgeon.features.compress import (
        compress,
        error_rows,
        ffn_parameters,
        full_sizes,
        write_compact,
    )
    from surgeon.live.hybrid import check_device, default_device

    device = str(check_device(args.device or default_device()))
    report: dict = {"source": args.source, "path": str(donor.path), "model_type": donor.model_type,
                    "fingerprint": donor.fingerprint, "device": device}
    if args.common is not None:
        chosen, report["common"] = _common_choice(args, donor, device)
        report["chosen_by"] = f"--common {' '.join(report['common']['corpora'])} --q {args.q:g}"
    else:
        report["chosen_by"] = " ".join(f"--experts {e}" for e in args.experts) or "all experts"
    try:
        results = compress(donor, chosen, rank=ranks[0], hidden_rank=ranks[1], expert_rank=ranks[2], device=device,
                           progress=_progress if sys.stderr.isatty() else None)
    except torch.cuda.OutOfMemoryError:
        raise SurgeonError(f"out of GPU memory on {device}; try --device cpu") from None
    inter, hidden = full_sizes(donor)
    before, after = ffn_parameters(donor, results)
    report.update(
        expert_shape={"intermediate": inter, "hidden": hidden},
        ranks={"intermediate": ranks[0], "hidden": ranks[1], "expert": ranks[2]},
        layers=error_rows(results),
        mean_error={k: float(f"{sum(r.errors[k] for r in results) / len(results):.6g}")
                    for k in ("gate", "up", "down", "all")},
        ffn_parameters={"experts_before": before, "after": after},
        target_note=target.note or None,
    )
    written = write_compact(donor, results, args.out, dtype=args.dtype, force=args.force,
                            max_shard_size=max_shard, report=report)
    report["written"] = written
    report["model_parameters"] = {"before": donor.num_parameters, "after": written["parameters"]}
    if args.check:
        report["check"] = _check_load(written["path"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(args, donor, report)
    return 0


def _print_text(args, donor, r) -> None:
    from surgeon.core.plan import format_ranges
    from surgeon.io.sizes import human_bytes

    w, rk, shape = r["written"], r["ranks"], r["expert_shape"]
    moe = len(donor.anatomy.experts_per_layer)
    print(f"compress {args.source} ({r['model_type']}, {moe} MoE layers x {donor.anatomy.num_experts} experts of "
          f"{shape['intermediate']} x {shape['hidden']}) on {r['device']}")
    print(f"  experts: {r['chosen_by']}; Tucker ranks: intermediate {rk['intermediate']}, hidden {rk['hidden']}, "
          f"expert {rk['expert'] or 'full'}")
    if "common" in r:
        c = r["common"]
        print("  common experts from " + ", ".join(f"{n} ({c['tokens'][n]} tokens)" for n in c["corpora"]))
    print("relative reconstruction error ||X - X^|| / ||X|| of the stacked experts")
    print(f"  {'layer':>5}  {'experts':<12}{'gate':>11}{'up':>11}{'down':>11}{'all':>11}")
    for row in r["layers"]:
        e = row["error"]
        print(f"  {row['layer']:>5}  {format_ranges(row['experts']):<12}"
              + "".join(f"{e[k]:>11.3e}" for k in ("gate", "up", "down", "all")))
    m = r["mean_error"]
    print(f"  {'mean':>5}  {'':<12}" + "".join(f"{m[k]:>11.3e}" for k in ("gate", "up", "down", "all")))
    f, p = r["ffn_parameters"], r["model_parameters"]
    print(f"FFN parameters {f['experts_before']:,} (every expert) -> {f['after']:,} "
          f"({100 * f['after'] / max(f['experts_before'], 1):.2f}%); model {p['before']:,} -> {p['after']:,}")
    print(f"wrote {w['path']}: {w['model_type']} ({w['architecture']}), intermediate size {w['intermediate_size']}, "
          f"{w['dtype']}, {len(w['files'])} file(s), {human_bytes(w['bytes'])}")
    if r.get("target_note"):
        print(f"  note: {r['target_note']}")
    if "check" in r:
        c = r["check"]
        print(f"  check: transformers loads it as {c['class']}; a forward pass on {c['tokens']} tokens gives "
              "finite logits")
    sys.stdout.flush()

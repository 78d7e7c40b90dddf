"""`moe-surgeon inspect`: what a checkpoint is, from its headers."""

from __future__ import annotations

import json

from surgeon.cli.progress import warn
from surgeon.cli.quick_exit import leave_quickly
from surgeon.io.sizes import human_bytes


def inspect_summary(donor, verify: bool = False) -> dict:
    from surgeon.core.anatomy import parameters_by_kind
    from surgeon.core.resolve import storage

    anatomy = donor.anatomy
    summary = {
        "path": str(donor.path),
        "model_type": donor.model_type,
        "architecture_known": anatomy.known,
        "architectures": donor.config.get("architectures", []),
        "layers": anatomy.num_layers,
        "experts_per_layer": {str(k): v for k, v in anatomy.experts_per_layer.items()},
        "experts": anatomy.num_experts,
        "experts_fused": any(p.fused for p in anatomy.distinct_parts),
        "mixers": {str(k): v for k, v in anatomy.mixers.items()},
        "storage": storage(donor),
        "tied_embeddings": donor.tied_embeddings,
        "dtype": donor.dtype,
        "tensors": len(donor.tensors),
        "parameters": donor.num_parameters,
        "parameters_by_kind": parameters_by_kind(anatomy, donor.numel),
        "bytes": donor.total_bytes,
        "shards": len(donor.shards),
        "fingerprint": donor.fingerprint,
        "unclassified": anatomy.unclassified,
    }
    if verify:
        summary["content_hash"] = donor.content_hash()
    return summary


def cmd_inspect(args) -> int:
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import format_ranges

    donor = open_donor(args.dir, allow_pickle=args.allow_pickle)
    s = inspect_summary(donor, verify=args.verify)
    leave_quickly()  # only prints from here on
    if not s["architecture_known"]:
        warn(f"{donor.path}: model_type {donor.model_type!r} has no architecture table; components inferred from names")
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    experts = sorted(set(s["experts_per_layer"].values()))
    moe_layers = len(s["experts_per_layer"])
    print(f"{s['path']}")
    print(f"  architecture  {s['model_type']} ({', '.join(s['architectures']) or 'no architectures field'})")
    print(f"  layers        {s['layers']}" + (f" ({moe_layers} MoE)" if moe_layers and moe_layers != s["layers"] else ""))
    fused = " (fused: one tensor holds a layer's experts, expert axis first)" if s["experts_fused"] else ""
    print(f"  experts       {', '.join(map(str, experts)) or 'none (dense)'} per layer{fused}")
    by_mixer: dict[str, list[int]] = {}
    for layer, mixer in s["mixers"].items():
        by_mixer.setdefault(mixer, []).append(int(layer))
    for mixer, layers in by_mixer.items():
        print(f"  mixers        {mixer} attention on layers {format_ranges(layers)}, full attention elsewhere")
    print(f"  dtype         {s['dtype']}" + ("" if s["storage"] == "unquantized" else f", stored {s['storage']}"))
    # Quantized storage counts elements as stored (an FP8 byte is one weight, an MXFP4 byte two, and
    # scales are elements too): not the model's parameter count, so it is not called that.
    counted, note = ("parameters", "") if s["storage"] == "unquantized" else ("elements", " as stored")
    print(f"  {counted:<14}{s['parameters']:,}{note} in {s['tensors']} tensors, {human_bytes(s['bytes'])} "
          f"in {s['shards']} shard(s)")
    for kind, n in sorted(s["parameters_by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"    {kind:<14}{n:>16,}  {100 * n / max(1, s['parameters']):5.1f}%")
    if s["tied_embeddings"]:
        print("  lm_head       tied to the embedding")
    print(f"  fingerprint   {s['fingerprint']}")
    if "content_hash" in s:
        print(f"  content hash  {s['content_hash']}")
    if s["unclassified"]:
        print(f"  unclassified  {len(s['unclassified'])} tensor(s), always taken from the base:")
        for n in s["unclassified"]:
            print(f"    {n}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="architecture, layers, experts, parameters and fingerprint of a checkpoint")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="also hash every byte of the weights")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_inspect)

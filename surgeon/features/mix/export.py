"""Write a mix as a checkpoint, shard by shard, with the memory of one tensor at most.

Expert, attention and embedding tensors move as byte ranges from the donors' files
(copy_file_range, as export.py does); a folded Mixtral expert is two ranges back to back (gate
and up rows) or its down columns interleaved row by row, read with pread; only a dtype cast or the
exact doubling of a Qwen2-MoE shared expert's down_proj goes through torch. Routers and zero
tensors are synthesised. The directory is written beside its target and renamed into place, so
an interrupted mix leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from surgeon.core.donor import Donor
from surgeon.errors import SurgeonError
from surgeon.features.export import converted_bytes
from surgeon.features.mix.plan import MixLayout, MixTensor, router_bytes
from surgeon.io.dtypes import DTYPE_SIZES
from surgeon.io.fs import read_exact, write_all
from surgeon.io.model_card import (
    REPLAY_LINE,
    SESSION_FILE,
    built_by,
    model_card,
    provenance_table,
    table,
)
from surgeon.io.shards import (
    ExportResult,
    copy_range,
    shard_file_names,
    split_into_shards,
    write_index,
    write_shard,
)
from surgeon.io.staged import check_target, staged_directory
from surgeon.jobs import NEVER, CancelToken, Meter, Progress

TRAINING_CSV = "router-training.csv"


def nbytes(t: MixTensor) -> int:
    return math.prod(t.shape) * DTYPE_SIZES[t.dtype]


def plan_shards(layout: MixLayout, max_shard_size: int) -> list[list[str]]:
    return split_into_shards(((name, nbytes(t)) for name, t in layout.tensors.items()), max_shard_size)


class _Sources:
    """Open file descriptors of the donors' shards, one per file, for the whole export."""

    def __init__(self, donors: dict[str, Donor]):
        self.donors = donors
        self.fds: dict[str, int] = {}

    def fd(self, donor: Donor, tensor: str) -> int | None:
        if tensor in donor.pickled:
            return None
        file = donor.tensors[tensor].file
        if file not in self.fds:
            self.fds[file] = os.open(file, os.O_RDONLY)
        return self.fds[file]

    def raw(self, src) -> bytes:
        """One part's bytes in the output dtype (a conversion goes through torch)."""
        donor = self.donors[src.donor]
        fd = self.fd(donor, src.tensor)
        if src.converts or fd is None:
            return converted_bytes(donor, src.tensor, src.src_dtype, src.dtype, fd).tobytes()
        info = donor.tensors[src.tensor]
        return read_exact(fd, info.nbytes, info.start, info.file)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _write_tensor(t: MixTensor, sources: _Sources, dst: int, routers: dict | None) -> None:
    if t.kind == "zeros" or (t.kind == "router" and routers is None):
        _write_zeros(dst, nbytes(t))
    elif t.kind == "router":
        write_all(dst, router_bytes(routers[t.name], t.dtype))
    elif t.kind in ("copy", "concat") and t.axis == 0:
        for src in t.parts:  # row-major: rows concatenated are ranges back to back
            donor = sources.donors[src.donor]
            fd = sources.fd(donor, src.tensor)
            if src.converts or fd is None:
                write_all(dst, sources.raw(src))
            else:
                info = donor.tensors[src.tensor]
                copy_range(fd, dst, info.start, info.nbytes)
    elif t.kind == "concat":
        import numpy as np

        rows = t.shape[0]
        blocks = [np.frombuffer(sources.raw(s), dtype=np.uint8).reshape(rows, -1) for s in t.parts]
        write_all(dst, np.concatenate(blocks, axis=1).tobytes())
    elif t.kind == "double":
        write_all(dst, _doubled(t, sources.raw(t.parts[0])))
    else:
        raise SurgeonError(f"tensor {t.name}: unknown kind {t.kind!r}")


def _doubled(t: MixTensor, data: bytes) -> bytes:
    import torch

    from surgeon.live.dtypes import TORCH_DTYPES

    x = torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[t.dtype]) * 2
    if not bool(torch.isfinite(x).all()):
        raise SurgeonError(f"tensor {t.name}: doubling the always-on expert's down_proj overflows {t.dtype}")
    return x.view(torch.uint8).numpy().tobytes()


def _write_zeros(dst: int, n: int) -> None:
    chunk = bytes(min(n, 1 << 24))
    while n > 0:
        write_all(dst, chunk[:n])
        n -= min(n, len(chunk))


def export_mix(
    layout: MixLayout,
    donors: dict[str, Donor],
    routers: dict | None,
    out: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    card: str = "",
    session_json: dict | None = None,
    extra_files: dict[str, str] | None = None,
    progress: Progress | None = None,
    cancel: CancelToken = NEVER,
    fsync: bool = False,
) -> ExportResult:
    """Write the mix to `out`; `routers` are float32 weights by name (None: all zero, uniform).

    Reports bytes written as Steps; `cancel` stops it before the next tensor, and the staged
    directory is removed, so nothing is left behind."""
    out = Path(out).absolute()
    check_target(out, donors, force)
    started = time.perf_counter()
    shards = plan_shards(layout, max_shard_size)
    total = sum(nbytes(t) for t in layout.tensors.values())
    names = shard_file_names(len(shards))
    sources = _Sources(donors)
    meter = Meter(progress, total, "bytes", "mix")
    done = 0

    def write_tensor(n: str, dst: int) -> None:
        nonlocal done
        cancel.check()
        _write_tensor(layout.tensors[n], sources, dst, routers)
        done += nbytes(layout.tensors[n])
        meter(done)

    try:
        with staged_directory(out) as tmp:
            weight_map = {}
            for shard_name, members in zip(names, shards):
                entries = [(n, layout.tensors[n].dtype, layout.tensors[n].shape) for n in members]
                write_shard(tmp / shard_name, entries, {"format": "pt"}, write_tensor, fsync=fsync)
                weight_map.update(dict.fromkeys(members, shard_name))
            write_index(tmp, names, weight_map, total)
            base = donors[layout.plan.base]
            for f in base.side_files():
                if f.name != "config.json":
                    shutil.copyfile(f, tmp / f.name)
            (tmp / "config.json").write_text(json.dumps(layout.config, indent=2) + "\n")
            (tmp / "README.md").write_text(card or mix_model_card(layout, donors))
            if session_json is not None:
                (tmp / SESSION_FILE).write_text(json.dumps(session_json, indent=2) + "\n")
            for fname, text in (extra_files or {}).items():
                (tmp / fname).write_text(text)
    finally:
        sources.close()
    return ExportResult(out, names, len(layout.tensors), total, time.perf_counter() - started)


def loss_csv(losses: list[float]) -> str:
    return "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses))


def mix_model_card(layout: MixLayout, donors: dict[str, Donor], training: dict | None = None) -> str:
    """How the mix was built, for whoever finds the checkpoint later."""
    plan = layout.plan
    out = layout.output
    params = layout.parameters_by_donor()
    total = (sum(params.values()) + layout.synthesised_parameters()) or 1
    routing = {
        "uniform": "gate-less: router weights are zero and every expert is used, so each gets weight "
                   f"exactly 1/{layout.num_experts} (moetify's Gate-less MoE)",
        "noisy": f"noisy top-{layout.top_k}: router weights are seeded white noise N(0, 0.02^2), seed {plan.seed} "
                 "(moetify's Noisy MoE)",
        "random": f"random top-{layout.top_k}: router weights are seeded N(0, 1), seed {plan.seed}",
        "hidden": f"hidden top-{layout.top_k}: router row e at layer l is the normalised mean "
                  "post_attention_layernorm output of expert e's prompts at layer l, measured on this mix",
    }[plan.router.mode]
    summary = [
        f"{built_by()} as a "
        f"`{out.class_name}` ({layout.num_layers} layers, {layout.num_experts} experts per layer, top-{layout.top_k}); "
        "plain `transformers` loads it with `AutoModelForCausalLM.from_pretrained`. Layer l's expert e is "
        "donor e's MLP at layer l, copied unchanged.",
        "",
        ("Routing as initialised (the routers were then trained, see below): " if training else "Routing: ")
        + f"{routing}. The router reads the output of post_attention_layernorm; the kept weights "
        "are renormalised to sum to 1.",
    ]
    experts = table(["expert", "donor", "path", "fingerprint"],
                    ([str(e), name, f"`{donors[name].path}`", f"`{donors[name].fingerprint}`"]
                     for e, name in enumerate(plan.experts)))
    if plan.always_on:
        d = donors[plan.always_on]
        how = ("the shared expert (its gate is zero, so sigmoid gives 0.5, and its down_proj is doubled, "
               "so it adds exactly the donor's MLP)" if out.shared_expert else
               "folded into every routed expert (expert e's neurons are the always-on MLP's followed by "
               "e's own), since Mixtral has no shared expert")
        experts += ["", f"Always-on expert: donor {plan.always_on} (`{d.path}`), realised as {how}. "
                    "The MLP output is A(x) + sum of w_e E_e(x) over the kept experts."]
    percent = {name: 100.0 * params.get(name, 0) / total for name in plan.donor_names()}
    sections = [
        ("Experts", experts),
        ("Donors", provenance_table({n: donors[n] for n in plan.donor_names()}, plan.base, percent)),
        ("Everything but the MLPs", [f"From base {plan.base}" + ("." if not plan.assignments else ", then (later lines win):"),
                                     *(f"- `{a.spec}` from donor {a.donor}" for a in plan.assignments)]),
    ]
    if training:
        losses = training.get("losses") or []
        lines = [f"Only the routers were trained: {training['steps']} steps, batch {training['batch_size']}, "
                 f"AdamW at a constant learning rate {training['lr']}, seed {training['seed']}, on "
                 f"`{training['data']}` (sha256 {training['sha256'][:16]}...) on {training['device']}."]
        if losses:
            lines.append(f"Loss {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {len(losses)}; every step is in "
                         f"`{TRAINING_CSV}`.")
        sections.append(("Router training", lines))
    sections.append((None, ["", REPLAY_LINE, *(f"> Note: {w}" for w in layout.warnings)]))
    return model_card("Mixture of experts mixed from dense donors by moe-surgeon", ["moe-surgeon", "moe", "merge"],
                      summary, sections)

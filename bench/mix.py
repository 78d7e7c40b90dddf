"""Benchmark: `moe-surgeon mix` of three synthetic dense llama donors (~0.5 GB bf16 each) into a
Mixtral (~1.1 GB), written in 500 MB shards.

Each figure is a whole process measured in this one run:
  (a) peak RSS of the mix (gate-less router: no torch import at all) against the goal
      peak RSS <= largest output shard + 512 MB
  (b) the same with a noisy router (imports torch to draw the seeded noise) and with an
      always-on expert folded into every expert (Mixtral: down columns interleaved row by row)
  (c) wall time as a ratio to `cp -r` of as many bytes (timed on the donors)
  (d) with --naive: transformers loads the three donors, builds the Mixtral and saves it
Run: python bench/mix.py [--work DIR] [--small] [--naive]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import timed  # noqa: E402
from synthetic import dir_bytes, write_bf16_shards  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD = "500MB"

NAIVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
base, *experts, out = sys.argv[1:]
models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16) for p in [base] + experts]
c = models[0].config.to_dict()
for k in ("architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp"):
    c.pop(k, None)
mix = MixtralForCausalLM(MixtralConfig(**c, num_local_experts=len(experts), num_experts_per_tok=len(experts))).to(torch.bfloat16)
sd, src = mix.state_dict(), models[0].state_dict()
with torch.no_grad():
    for k, v in sd.items():
        if k in src:
            v.copy_(src[k])
        elif k.endswith("gate.weight"):
            v.zero_()
    for l, layer in enumerate(mix.model.layers):
        for e, m in enumerate(models[1:]):
            mlp = m.model.layers[l].mlp
            layer.mlp.experts.gate_up_proj[e].copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            layer.mlp.experts.down_proj[e].copy_(mlp.down_proj.weight)
mix.save_pretrained(out, max_shard_size="500MB")
"""


def llama_tensors(hidden: int, inter: int, layers: int, vocab: int):
    yield "model.embed_tokens.weight", (vocab, hidden)
    for l in range(layers):
        p = f"model.layers.{l}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight", (hidden, hidden)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_dense_donor(path: Path, seed: int, *, hidden=1024, inter=2816, layers=16, vocab=32000,
                      shard_bytes=400 * 10**6) -> Path:
    """A sharded bf16 llama checkpoint of small random values, written without torch."""
    write_bf16_shards(path, list(llama_tensors(hidden, inter, layers, vocab)), seed, shard_bytes)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def largest_shard(out: Path) -> int:
    return max(p.stat().st_size for p in out.glob("*.safetensors"))


def main() -> None:
    if sys.argv[1:2] == ["--write-donor"]:
        write_dense_donor(Path(sys.argv[2]), int(sys.argv[3]), layers=int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    ap.add_argument("--small", action="store_true", help="4 layers, for a quick check")
    ap.add_argument("--naive", action="store_true", help="also time transformers loading and saving")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-surgeon-bench-mix-"))
    work.mkdir(parents=True, exist_ok=True)
    layers = 4 if args.small else 16
    try:
        donors = [work / n for n in ("base", "e1", "e2")]
        for seed, p in enumerate(donors):
            if not (p / "config.json").exists():
                # In a child process: a forked child's peak RSS starts from its parent's, so the
                # parent must stay small for the RSS figures below to mean anything.
                subprocess.run([sys.executable, __file__, "--write-donor", str(p), str(seed), str(layers)], check=True)
        size = sum(dir_bytes(p) for p in donors)
        print(f"donors: 3 x {dir_bytes(donors[0]) / 1e9:.2f} GB bf16 llama, {layers} layers")
        exe = [sys.executable, "-m", "surgeon.cli", "mix"]
        common = ["--base", str(donors[0]), "--expert", str(donors[1]), "--expert", str(donors[2]),
                  "--max-shard-size", SHARD]
        shutil.rmtree(work / "cp", ignore_errors=True)
        os.mkdir(work / "cp")
        cp, _ = timed(["cp", "-r", *map(str, donors), str(work / "cp")])
        shutil.rmtree(work / "cp")
        rows = []
        for label, extra in (("gate-less", []), ("noisy:1", ["--router", "noisy:1"]),
                             ("always-on fold", ["--always-on", str(donors[0])])):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss = timed(exe + [str(out), *common, *extra])
            shard = largest_shard(out)
            rows.append((label, wall, rss, shard, dir_bytes(out)))
            shutil.rmtree(out)
        for label, wall, rss, shard, total in rows:
            goal = shard / 2**20 + 512
            verdict = "ok" if rss <= goal else "OVER"
            same_bytes = cp * total / size  # cp -r's time for as many bytes as the mix writes
            print(f"{label:15s} peak RSS {rss:7.1f} MB  goal <= largest shard {shard / 2**20:.0f} MB + 512 MB "
                  f"= {goal:.0f} MB  [{verdict}]   wall {wall:6.2f} s = {wall / same_bytes:5.2f} x cp -r of as "
                  f"many bytes; output {total / 1e9:.2f} GB")
        if args.naive:
            out = work / "naive"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss = timed([sys.executable, "-c", NAIVE, *map(str, donors), str(out)])
            print(f"naive (transformers load + save_pretrained): {wall:.2f} s = {wall / rows[0][1]:.1f} x the mix, "
                  f"peak RSS {rss:.0f} MB = {rss / rows[0][2]:.0f} x the mix")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

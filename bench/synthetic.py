"""Synthetic OLMoE-shaped checkpoints with the real tensor count, written without torch.

Real OLMoE-1B-7B has 16 layers x 64 experts (3,000+ tensors); we keep that count and scale the
hidden size down so a donor is about 1-2 GB in bf16. Weights are random bytes: benchmarks of
byte movement do not care what the numbers mean, and writing them takes seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from surgeon.io.safetensors_file import encode_header


def olmoe_config(hidden: int, inter: int, layers: int, experts: int, vocab: int) -> dict:
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": experts, "num_experts_per_tok": 8, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "pad_token_id": 1, "eos_token_id": 50279, "dtype": "bfloat16", "norm_topk_prob": False,
    }


def olmoe_tensors(hidden: int, inter: int, layers: int, experts: int, vocab: int):
    yield "model.embed_tokens.weight", (vocab, hidden)
    for l in range(layers):
        p = f"model.layers.{l}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight", (hidden, hidden)
        yield p + "self_attn.q_norm.weight", (hidden,)
        yield p + "self_attn.k_norm.weight", (hidden,)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate.weight", (experts, hidden)
        for e in range(experts):
            yield p + f"mlp.experts.{e}.gate_proj.weight", (inter, hidden)
            yield p + f"mlp.experts.{e}.up_proj.weight", (inter, hidden)
            yield p + f"mlp.experts.{e}.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_donor(path: Path, seed: int, *, hidden=640, inter=320, layers=16, experts=64, vocab=50304,
                shard_bytes=700 * 10**6) -> Path:
    """Write a sharded bf16 checkpoint; values are small random bf16 numbers (finite)."""
    write_bf16_shards(path, list(olmoe_tensors(hidden, inter, layers, experts, vocab)), seed, shard_bytes)
    (path / "config.json").write_text(json.dumps(olmoe_config(hidden, inter, layers, experts, vocab), indent=1))
    return path


def write_bf16_shards(path: Path, entries: list, seed: int, shard_bytes: int) -> None:
    """Shards and index of (name, shape) entries, small random bf16 values, written without torch."""
    import numpy as np  # here: bench/scale.py's parent imports this module and must stay small

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, size = [[]], 0
    for name, shape in entries:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, members in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, _ = encode_header([(n, "BF16", s) for n, s in members], {"format": "pt"})
        with open(path / fname, "wb") as f:
            f.write(header)
            for n, shape in members:
                # bf16 is the top half of a float32: small normal floats, never NaN.
                vals = (rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02).view(np.uint32)
                f.write((vals >> 16).astype(np.uint16).tobytes())
                weight_map[n] = fname
    total = sum(2 * int(np.prod(s)) for _, s in entries)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def dir_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in Path(path).rglob("*") if p.is_file())


if __name__ == "__main__":
    import sys

    write_donor(Path(sys.argv[1]), int(sys.argv[2]), **({"layers": 4} if "--small" in sys.argv else {}))

"""`inspect` and the workbench's launch on donors of the true shape of the MoEs people hold.

Each donor has the tensor names, shapes, dtypes and shard layout of a real release and no data:
the shards are sparse files (a header, then a hole the size of the tensors), so a 700 GB donor uses
a few megabytes of disk. Start-up reads headers only, so what it costs depends on the number of
tensors and shards, which these donors have in full.

How they are made: the config fields below are those of each release's published config.json.
transformers builds the model on the meta device (no memory), and its own reverse conversion
(`revert_weight_conversion`, what save_pretrained applies) gives the on-disk names and shapes;
then the storage format of the release is applied: DeepSeek-V3's FP8 (`float8_e4m3fn` weights with
a float32 `weight_scale_inv` per 128x128 block, plus its multi-token-prediction layer 61), and
gpt-oss's MXFP4 experts (`*_blocks` [.., 16] uint8 and `*_scales` uint8). Shards are cut at the
release's shard size, so DeepSeek-V3 has 163 of them.

    python bench/true_shapes.py [--models deepseek_v3,gpt_oss,...] [--runs 3]

Prints, per model: tensors and shards per donor, `moe-surgeon inspect` wall time (whole process),
and the workbench on a pair: launch to first grid and the peak RSS of that process, and the
first frame of a layer with experts (its tensor table holds every tensor of the layer). With
--distances, also the distance job that fills that table's Δ column: when every tensor shows a
figure, and when the last exact one comes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from copy_timing import as_installed  # noqa: E402
from tui import launch_to_ready  # noqa: E402

from surgeon.io.dtypes import DTYPE_SIZES  # noqa: E402
from surgeon.io.safetensors_file import encode_header  # noqa: E402

WORK = ROOT / "bench" / "_work" / "true_shapes"
GB = 10**9

# The published config.json fields that decide tensor names and shapes (and the shard size the
# release was cut at). Llama 4 Scout ships as a vision-language model; this is its text model,
# named as transformers' Llama4ForCausalLM names it.
MODELS = {
    "deepseek_v3": dict(
        label="DeepSeek-V3 (FP8)", shard=4.3 * GB, fp8=True, mtp=1,
        config=dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
                    first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4, num_nextn_predict_layers=1,
                    tie_word_embeddings=False,
                    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]})),
    "gpt_oss": dict(
        label="gpt-oss-120b (MXFP4 experts)", shard=4.6 * GB, mxfp4=True,
        config=dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                    num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                    num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
                    tie_word_embeddings=False,
                    quantization_config={"quant_method": "mxfp4",
                                         "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                    "model.embed_tokens", "lm_head"]})),
    "qwen3_moe": dict(
        label="Qwen3-235B-A22B", shard=4.0 * GB,
        config=dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                    moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                    head_dim=128, num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False)),
    "glm4_moe": dict(
        label="GLM-4.5", shard=5.0 * GB,
        config=dict(model_type="glm4_moe", vocab_size=151552, hidden_size=5120, intermediate_size=12288,
                    moe_intermediate_size=1536, num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8,
                    head_dim=128, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
                    first_k_dense_replace=3, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
                    tie_word_embeddings=False)),
    "llama4_text": dict(
        label="Llama-4-Scout-17B-16E (text model)", shard=5.0 * GB,
        config=dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                    intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
                    num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
                    interleave_moe_layer_step=1, tie_word_embeddings=False)),
}
TORCH_TO_ST = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float16": "F16"}


def disk_tensors(spec: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) as the release stores them."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    transformers.logging.set_verbosity_error()
    cfg = dict(spec["config"])
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = revert_weight_conversion(model, model.state_dict())
    out = {n: ("BF16" if t.dtype == torch.bfloat16 else TORCH_TO_ST[str(t.dtype)], tuple(t.shape))
           for n, t in state.items() if not n.endswith(("inv_freq",))}
    if spec.get("mtp"):
        out.update(_mtp_layer(out, spec["config"]))
    if spec.get("fp8"):
        out = _fp8(out)
    if spec.get("mxfp4"):
        out = _mxfp4(out)
    return out


def _mtp_layer(tensors: dict, cfg: dict) -> dict:
    """DeepSeek-V3's multi-token-prediction layer after the last decoder layer: a copy of an MoE
    layer plus its own embedding, two norms, a projection and a head."""
    last, n, h = cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"], cfg["hidden_size"]
    prefix = f"model.layers.{last}."
    out = {f"model.layers.{n}." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    emb = tensors["model.embed_tokens.weight"]
    out.update({f"model.layers.{n}.embed_tokens.weight": emb, f"model.layers.{n}.enorm.weight": ("BF16", (h,)),
                f"model.layers.{n}.hnorm.weight": ("BF16", (h,)), f"model.layers.{n}.eh_proj.weight": ("BF16", (h, 2 * h)),
                f"model.layers.{n}.shared_head.norm.weight": ("BF16", (h,)),
                f"model.layers.{n}.shared_head.head.weight": emb})
    return out


def _fp8(tensors: dict) -> dict:
    """Every linear weight of the decoder layers in float8_e4m3fn with a float32 scale per 128x128 block."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        quantized = (len(shape) == 2 and name.startswith("model.layers.") and name.endswith("proj.weight"))
        if quantized:
            out[name] = ("F8_E4M3", shape)
            out[name + "_scale_inv"] = ("F32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
        else:
            out[name] = (dtype, shape)
    return out


def _mxfp4(tensors: dict) -> dict:
    """gpt-oss's experts in MXFP4: per expert and output row, blocks of 32 values as 16 bytes and a scale."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        if ".mlp.experts." in name and not name.endswith("_bias") and len(shape) == 3:
            e, k, n = shape  # [E, in, out] live; the release stores [E, out, in / 32, 16]
            out[name + "_blocks"] = ("U8", (e, n, k // 32, 16))
            out[name + "_scales"] = ("U8", (e, n, k // 32))
        else:
            out[name] = (dtype, shape)
    return out


def write_donor(path: Path, spec: dict) -> tuple[int, int]:
    """Write the donor's config, index and sparse shards; (tensors, shards)."""
    if (path / "config.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        return len(index["weight_map"]), len(set(index["weight_map"].values()))
    tensors = disk_tensors(spec)
    path.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name in sorted(tensors, key=_layer_order):
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if current and size + nbytes > spec["shard"]:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, members in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, _ = encode_header([(n, *tensors[n]) for n in members], {"format": "pt"})
        data = sum(math.prod(tensors[n][1]) * DTYPE_SIZES[tensors[n][0]] for n in members)
        with open(path / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + data)  # a hole: no disk used for the data
        weight_map.update(dict.fromkeys(members, file))
        total += data
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = dict(spec["config"])
    config["architectures"] = [{"llama4_text": "Llama4ForCausalLM"}.get(config["model_type"], "")]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return len(tensors), len(shards)


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1, name)


def inspect_time(path: Path, runs: int, env: dict | None = None) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "surgeon.cli", "inspect", str(path)], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def workbench_ready(paths: list[Path], runs: int, env: dict | None = None) -> tuple[float, int]:
    times, peaks = launch_to_ready(paths, runs, WORK, env)
    return statistics.median(times), max(peaks)


def layer_open(paths: list[Path]) -> tuple[int, float, float, float, int, float]:
    """The layer screen on the pair (bench/tui.py, in a child of its own): the layer's tensors, the
    median seconds to its first frame and of a mark's handler there (40 marks), the longest of
    Python's full collections during those marks and how many there were, and the longest of those
    that ran once the app was idle."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tui.py"), "--layer-open", *map(str, paths)],
                         check=True, capture_output=True, text=True).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    collections = measured["collections"]
    return (measured["tensors"], statistics.median(measured["seconds"]), statistics.median(measured["marks"]),
            max(collections, default=0.0), len(collections), max(measured["idle_collections"], default=0.0))


def layer_distances(pair: list[Path]) -> dict:
    """The layer screen's distance job on the first layer with experts, run as the screen runs it
    (`tensor_distances`, an empty cache): seconds until every tensor shows a figure (an estimate for a
    large one), seconds to the last exact figure, and the layer's bytes per donor. The shards are
    holes, so no disk is read: this times the arithmetic and the page cache (a first run makes a
    zeroed page for every page it reads, which on a machine whose memory is full of cache means
    reclaiming another first)."""
    import tempfile

    from surgeon.core.donor import open_donor
    from surgeon.features.distance import DistanceCache, tensor_distances

    base, other = (open_donor(str(p)) for p in pair)
    layer = min(base.anatomy.experts_per_layer)
    names = [n for n in base.ordered_names if base.anatomy.parts.get(n) and base.anatomy.parts[n].layer == layer]
    with tempfile.TemporaryDirectory() as cache_dir:
        t0, shown, seen = time.perf_counter(), None, set()
        for found in tensor_distances(base, {"B": other}, names, DistanceCache(Path(cache_dir))):
            seen.add(found.name)
            if shown is None and len(seen) == len(names):
                shown = time.perf_counter() - t0
        exact = time.perf_counter() - t0
    size = sum(base.tensors[n].end - base.tensors[n].start for n in names)
    return {"layer": layer, "tensors": len(names), "bytes": size, "shown": shown, "exact": exact}


def cold(tag: str) -> dict:
    """An empty cache directory: the first time a donor is ever opened (headers parsed, not read
    back from surgeon/io/header_cache.py). The page cache stays warm: these donors are sparse."""
    folder = WORK / "cold-cache" / f"{tag}-{time.time_ns()}"
    return {"MOE_SURGEON_CACHE": str(folder)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--distances", action="store_true",
                        help="also time the distance job of a layer with experts (the layer screen's Δ columns)")
    parser.add_argument("--make", help=argparse.SUPPRESS)  # write one model's pair (in a child process)
    parser.add_argument("--distances-of", help=argparse.SUPPRESS)  # layer_distances, in a child process
    args = parser.parse_args()
    as_installed()
    if args.make:
        for i in range(2):
            write_donor(WORK / args.make / f"donor{i}", MODELS[args.make])
        return 0
    if args.distances_of:
        pair = [WORK / args.distances_of / f"donor{i}" for i in range(2)]
        print(json.dumps([layer_distances(pair) for _ in range(2)]))
        return 0
    print(f"{'model':<38}{'tensors':>9}{'shards':>8}{'inspect first/again':>21}{'workbench first/again':>23}"
          f"{'peak RSS':>10}{'layer / a mark':>25}")
    for key in args.models.split(","):
        spec = MODELS[key]
        pair = [WORK / key / f"donor{i}" for i in range(2)]
        # Made in a child: this process must never hold torch, or every process it forks would
        # start from that memory and report it as its own peak (ru_maxrss survives exec).
        subprocess.run([sys.executable, __file__, "--make", key], check=True)
        counts = [write_donor(p, spec) for p in pair]  # read back from the index
        # Each first-time run gets its own empty cache, so each one parses every header.
        first = statistics.median(inspect_time(pair[0], 1, cold("inspect")) for _ in range(args.runs))
        seconds = inspect_time(pair[0], args.runs)
        cold_runs = [workbench_ready(pair, 1, cold("workbench")) for _ in range(args.runs)]
        ready_first, rss_first = statistics.median(t for t, _ in cold_runs), max(r for _, r in cold_runs)
        ready, rss = workbench_ready(pair, args.runs)
        in_layer, opened, mark, pause, pauses, idle_pause = layer_open(pair)
        tensors, shards = counts[0]
        print(f"{spec['label']:<38}{tensors:>9,}{shards:>8}{first:>11.2f} / {seconds:.2f} s"
              f"{ready_first:>13.2f} / {ready:.2f} s{max(rss, rss_first):>7} MiB{opened:>7.2f} s / {1000 * mark:.0f} ms"
              f" ({in_layer:,}; {pauses} full collections in 40 marks, the longest {1000 * pause:.0f} ms;"
              f" once idle {1000 * idle_pause:.0f} ms)")
        if args.distances:
            out = subprocess.run([sys.executable, __file__, "--distances-of", key], check=True,
                                 capture_output=True, text=True).stdout
            first, again = json.loads(out.strip().splitlines()[-1])
            print(f"  distances of layer {first['layer']} ({first['tensors']:,} tensors, {first['bytes'] / 1e9:.1f} GB a "
                  f"donor): every tensor shows a figure after {first['shown']:.1f} s (estimates for the large ones), the "
                  f"exact figures after {first['exact']:.1f} s; run again at once {again['shown']:.1f} s and "
                  f"{again['exact']:.1f} s (the first run also fills the page cache with the shards' pages)")
    print("first: an empty moe-surgeon cache each run (headers parsed); again: headers read back from the "
          "cache (both medians of --runs)")
    print("layer / a mark: opening the first layer with experts to its first frame, and a mark's handler there "
          "(bench/tui.py; the layer's tensors in brackets, and Python's full collections during 40 marks)")
    print("goals (DeepSeek-V3): inspect < 1 s, workbench ready on a pair < 2 s with < 300 MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark at real size: a true-shape OLMoE-1B-7B pair end to end, each step a whole process.

Makes two seeded checkpoints with OLMoE-1B-7B's shapes (16 layers, 64 experts of intermediate 1024,
top-8, hidden 2048, 16 heads, vocab 50304, bf16, one tensor per expert as transformers 5 saves
them: about 13.8 GB each), streamed tensor by tensor (never a model in memory), or takes two
existing directories (--donors A B). Then, each step in a process of its own, wall time and peak
RSS (the parent never imports torch, so a child's peak RSS is its own):

  inspect                         moe-surgeon inspect A
  workbench                       the app on A and B (Pilot) to the grid's first frame      budget 300 MB
  export attention / experts@0-7  moe-surgeon export ... against `cp -r` of the same bytes  budget 64 MB
  prune --ratio 0.5 --by random   moe-surgeon prune: its export, kept experts as byte ranges    budget 64 MB
                                  (random: no saliency pass, which loads the model like routing)
  materialise                     Hybrid.materialize(A) against reading the bytes once    budget model + 1.5 GB
  hot-swap                        all attention, then experts@0-7 from B: GB/s against a plain
                                  tensor copy of the same bytes; RSS growth beyond the swapped bytes
  probe                           (the same process, on the swapped hybrid) one MC batch (items/s,
                                  tokens/s) and one EM batch (items/s, generated tokens/s)
  routing                         moe-surgeon routing over 2,000 tokens; and in one process, the routing
                                  probe against a plain forward over the same tokens (goal <= 1.2x)
  sweep                           moe-surgeon sweep, 2 groups, 20 items
Reads and copies start from a dropped page cache where the bench may drop it (root), so `cp -r`,
`cat` and the tool read the same disk; `cp -r` and the exports run in --repeats rounds, the order
flipped every round, every run after a sync, and each export's ratio is to its round's `cp -r`
(min / median / max). Everything it made is deleted at the end. --scale F scales hidden and
intermediate sizes by F (a quick try: --scale 0.125 is ~1 GB a donor); the full size needs ~28 GB
of free disk.
Run: python bench/scale.py [--scale F] [--device cpu|cuda|auto] [--donors A B] [--work DIR] [--keep-cache]
                           [--repeats N]
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from copy_timing import as_installed, copy_seconds, paired, ratios, read_back, spread, sync
from synthetic import dir_bytes, olmoe_config, olmoe_tensors, write_bf16_shards

DEMO_TOKENIZER = ROOT.parent / "surgeon" / "demo" / "data" / "base"
LAYERS, EXPERTS, VOCAB, HIDDEN, INTER = 16, 64, 50304, 2048, 1024
BATCH = 16
# rounds after the first swap, each a swap back and again, then a plain copy of the same bytes: one
# copy of 34 MB takes a few milliseconds, which this machine's other work moves by tens of percent
SWAP_ROUNDS = 15


def make_donor(path: Path, seed: int, scale: float) -> None:
    """A true-shape (or scaled) OLMoE donor with a small char tokenizer (probes need one; its ids
    are a subset of the vocabulary, which is all a byte-movement and throughput bench needs)."""
    hidden = max(64, int(HIDDEN * scale) // 64 * 64)  # 16 heads of an even head_dim
    inter = max(16, int(INTER * scale) // 16 * 16)
    write_bf16_shards(path, list(olmoe_tensors(hidden, inter, LAYERS, EXPERTS, VOCAB)), seed, 5 * 10**9)
    config = olmoe_config(hidden, inter, LAYERS, EXPERTS, VOCAB)
    config.update(max_position_embeddings=4096, rope_theta=10000.0, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_TOKENIZER / f, path / f)


# ---- child steps: each runs in its own process (python bench/scale.py --step NAME A B) ----

def _rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _materialize(a: str, b: str, device: str):
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan
    from surgeon.live.hybrid import Hybrid

    donors = {"A": open_donor(a), "B": open_donor(b)}
    t0 = time.perf_counter()
    hybrid = Hybrid.materialize(Plan("A"), donors, device=device)
    sync(device)
    return hybrid, time.perf_counter() - t0


def step_materialize(a, b, device) -> dict:
    # transformers' model code is imported inside materialize() (seconds on a small CPU): timed
    # apart, so the rest is the build and the fill the goal is about.
    t0 = time.perf_counter()
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    imports = time.perf_counter() - t0
    _, seconds = _materialize(a, b, device)
    return {"seconds": seconds, "imports": imports}


def hybrid_on_cpu(hybrid) -> bool:
    return all(p.device.type == "cpu" for p in hybrid.model.parameters())


@contextmanager
def torch_threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def swaps(hybrid, device) -> dict:
    """The first swap of all attention, then of experts@0-7, from B (B's bytes as the page cache has
    them), then SWAP_ROUNDS rounds each of a swap back to the previous plan and again (the again
    timed) and, in the same round, a plain copy of the same bytes into the same live tensors: a
    ratio is one round's swap over that round's copy, so a spell of load elsewhere hits both."""
    import torch

    from surgeon.core.plan import Plan, parse_spec

    out = {}
    plan = Plan("A")
    for label, spec in (("attention", "attention"), ("experts@0-7", "experts@0-7")):
        before_plan = plan
        plan = Plan("A", [*plan.assignments, parse_spec(spec, "B")])
        old = dict(hybrid.resolution.sources)
        before = _rss_mb()
        first = hybrid.apply(plan)  # B's bytes as the page cache has them (mostly from disk)
        grown = _rss_mb() - before
        names = [n for n, s in hybrid.resolution.sources.items() if s.donor != old[n].donor]
        # The baseline: the same bytes as plain tensors already in memory (on the GPU, in its
        # memory) copied into the same live tensors, which already hold them after the swap; in
        # groups of at most 512 MB so it holds no second copy of a large swap (kept for every
        # round when one group holds them all, made again each round otherwise).
        groups, group, size = [], [], 0
        for i, n in enumerate(names):
            group.append(n)
            size += hybrid.donors["B"].tensors[hybrid.resolution.sources[n].tensor].nbytes
            if size >= 512 * 2**20 or i + 1 == len(names):
                groups.append(group)
                group, size = [], 0

        def sources_of(group):
            views = [hybrid.live_view(m) for m in group]
            # on the live tensors' device: on a GPU the baseline is a device-to-device copy
            sources = [hybrid.reader.read("B", hybrid.resolution.sources[m].tensor).to(v.device, copy=True)
                       for m, v in zip(group, views)]
            for m in group:
                hybrid.reader.release("B", hybrid.resolution.sources[m].tensor)
            return views, sources

        kept = sources_of(groups[0]) if len(groups) == 1 else None
        # On the CPU the copy runs on torch's threads, which this process, as the tool does, lets
        # sleep between parallel regions (surgeon/live/threads.py): each of many small copies then
        # pays a wake-up, and one thread can copy faster. The baseline is the faster of the two.
        ways = {"threads": torch.get_num_threads()} | ({"one thread": 1} if hybrid_on_cpu(hybrid) else {})
        swap, copy = [], {way: [] for way in ways}
        for _ in range(SWAP_ROUNDS):
            hybrid.apply(before_plan)
            swap.append(hybrid.apply(plan).seconds)  # B's bytes just read: from the page cache where they fit
            for way, threads in ways.items():
                seconds = 0.0
                for g in groups:
                    views, sources = kept or sources_of(g)
                    with torch_threads(threads):
                        seconds += copy_seconds(views, sources, device)
                    del views, sources
                copy[way].append(seconds)
        del kept
        best = [min(c) for c in zip(*copy.values())]
        gb = first.bytes / 1e9
        out[label] = {"tensors": first.tensors, "GB": gb, "swap_s": first.seconds, "swap_GBps": gb / first.seconds,
                      "rounds": SWAP_ROUNDS, "swap_rounds_s": swap, "copy_rounds_s": copy,
                      "warm_GBps": gb / statistics.median(swap), "copy_GBps": gb / statistics.median(best),
                      "copy_ways_GBps": {way: gb / statistics.median(c) for way, c in copy.items()},
                      "ratios": ratios(swap, best), "rss_growth_MB": grown, "swapped_MB": first.bytes / 2**20}
    return out


def probes(hybrid, a, device) -> dict:
    from surgeon.probes import parse_probe
    from surgeon.probes.prompts import max_new_tokens
    from surgeon.probes.run import evaluate, load_probe_data
    from surgeon.probes.scoring import load_tokenizer

    tok = load_tokenizer(a)
    out = {}
    for kind, data_set in (("mc", "arith_mc"), ("em", "arith")):
        spec = parse_probe(f"{kind}:{data_set},limit={BATCH}")
        data = load_probe_data(spec)
        t0 = time.perf_counter()
        evaluate(hybrid.model, tok, spec, data, batch_size=BATCH)
        sync(device)
        seconds = time.perf_counter() - t0
        if kind == "mc":  # tokens scored: context and every choice (what a naive scorer would feed)
            tokens = sum(len(tok(ctx + " " + c, add_special_tokens=False)["input_ids"])
                         for ctx, i in zip(data.contexts(), data.items) for c in i.choices)
        else:  # tokens generated: at most max_new_tokens per item (random weights rarely stop early, and
            # their ids beyond the small char tokenizer decode to nothing, so the outputs cannot be counted)
            tokens = len(data.items) * max_new_tokens(data.template, spec.max_new_tokens)
        out[kind] = {"items": len(data.items), "seconds": seconds, "items_per_s": len(data.items) / seconds,
                     "tokens_per_s": tokens / seconds}
    return out


def step_workbench(a, b, device) -> dict:
    """The workbench on both donors, driven by Pilot, from process start to the grid's first frame
    (the app's ready hook writes the time and quits)."""
    import asyncio

    started = time.time()
    sys.path.insert(0, str(ROOT.parent))
    from screens.app import READY_FILE_ENV, SurgeonApp

    with tempfile.TemporaryDirectory() as state:
        ready = Path(state) / "ready"
        os.environ[READY_FILE_ENV] = str(ready)

        async def run() -> None:
            app = SurgeonApp([a, b], None, state_dir=Path(state), offer_recovery=False)
            async with app.run_test(size=(160, 50)) as pilot:
                while not ready.exists():
                    await pilot.pause(0.02)

        asyncio.run(run())
        return {"seconds": float(ready.read_text()) - started}


def step_routing(a, b, device) -> dict:
    """The routing probe against a plain forward pass over the same 2,000 tokens of the arith corpus,
    in the same right-padded batches of 32 (what `moe-surgeon routing` runs), on the materialised
    model; interleaved, best of 3 each, so load from elsewhere hits both alike."""
    import torch

    from surgeon.features.routing.corpora import read_corpora
    from surgeon.features.routing.probe import _sequences, padded_batch, probe_routing
    from surgeon.probes.scoring import load_tokenizer

    hybrid, _ = _materialize(a, b, device)
    model, tok = hybrid.model, load_tokenizer(a)
    texts = read_corpora(["arith"])["arith"]
    seqs = _sequences(tok, texts, 4096, 2000)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def plain() -> None:
        with torch.no_grad():
            for s in range(0, len(seqs), 32):
                ids, mask = padded_batch(seqs[s:s + 32], pad)
                model(ids.to(device), attention_mask=mask.to(device), use_cache=False)
        sync(device)

    def probe() -> None:
        probe_routing(model, tok, texts, batch_size=32, max_tokens=2000)
        sync(device)

    best = {"plain": float("inf"), "probe": float("inf")}
    for _ in range(3):
        for name, fn in (("plain", plain), ("probe", probe)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {**best, "tokens": sum(len(x) for x in seqs)}


def step_live(a, b, device) -> dict:
    """Hot-swaps, then probes on the swapped hybrid: one materialisation (each reads 13.8 GB) for both."""
    hybrid, _ = _materialize(a, b, device)
    return {"swap": swaps(hybrid, device), "probe": probes(hybrid, a, device)}


STEPS = {"materialize": step_materialize, "live": step_live, "workbench": step_workbench, "routing": step_routing}


# ---- the parent: never imports torch ----

def timed(cmd: list[str], env=None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one child process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)  # wait4: this child's own peak RSS
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read().decode()


def prune_step(exe: list[str], a: str, work: Path, env: dict, row, cp_gbps: float) -> None:
    """`moe-surgeon prune` as a whole process, measured as the exports are: half of every layer's
    experts kept (--by random reads no corpus, so the process is the pruned export alone: headers,
    choice, kept experts and sliced router rows as byte ranges of the original), from a dropped page
    cache where possible. Peak RSS against the export budget; its write rate against `cp -r`'s."""
    out = work / "out"
    drop_caches()
    wall, rss, _ = timed(exe + ["prune", str(out), "--base", a, "--ratio", "0.5", "--by", "random"], env)
    written = dir_bytes(out)
    shutil.rmtree(out)
    row("prune --ratio 0.5 (random)", f"{wall:6.2f} s  {rss:7.0f} MB   {written / 1e9:.2f} GB written at "
        f"{written / 1e9 / wall:.2f} GB/s (cp -r {cp_gbps:.2f} GB/s)   (budget 64 MB)")


KEEP_CACHE = False


def drop_caches() -> bool:
    """Empty the page cache, so a read and a load both start from the disk (root on Linux only)."""
    if KEEP_CACHE:
        return False
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="hidden and intermediate sizes times F")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    ap.add_argument("--donors", nargs=2, metavar=("A", "B"), help="two existing checkpoint directories")
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="never drop the page cache (a small --scale whose donors it holds, or a throttled disk)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of `cp -r` and the exports, paired (default 3)")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        from surgeon.live.threads import configure_threads

        configure_threads()  # as the command line and the workbench do, before torch loads
        print(json.dumps(STEPS[args.step](*args.paths, args.device)))
        return
    as_installed()
    device = args.device or ("cuda" if shutil.which("nvidia-smi") else "cpu")
    global KEEP_CACHE
    KEEP_CACHE = args.keep_cache
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-surgeon-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MOE_SURGEON_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    exe = [sys.executable, "-m", "surgeon.cli"]
    me = [sys.executable, str(Path(__file__).resolve())]
    rows: list[tuple[str, str]] = []

    def row(name: str, text: str) -> None:
        rows.append((name, text))
        print(f"{name:28s} {text}", flush=True)

    try:
        if args.donors:
            a, b = (str(Path(p).resolve()) for p in args.donors)
        else:
            a, b = str(work / "A"), str(work / "B")
            for seed, p in ((0, a), (1, b)):
                t0 = time.perf_counter()
                # In a child: the parent must stay small for the children's peak RSS to be theirs.
                code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import scale; " \
                       f"scale.make_donor(__import__('pathlib').Path({p!r}), {seed}, {args.scale})"
                subprocess.run([sys.executable, "-c", code], check=True)
                row(f"make donor {seed}", f"{dir_bytes(Path(p)) / 1e9:6.2f} GB in {time.perf_counter() - t0:6.1f} s")
        size = dir_bytes(Path(a))
        print(f"donors: {size / 1e9:.2f} GB each; device {device}", flush=True)
        if args.keep_cache or os.geteuid() != 0:  # else each step starts from a dropped page cache
            read_back([a, b])  # in the page cache as a read leaves them, as a user's donors are

        wall, rss, _ = timed(exe + ["inspect", a], env)
        row("inspect", f"{wall:6.2f} s  {rss:7.0f} MB")
        wall, rss, out = timed(me + ["--step", "workbench", a, b], env)
        ready = json.loads(out.splitlines()[-1])["seconds"]
        row("workbench to grid ready", f"{ready:6.2f} s  {rss:7.0f} MB   (Pilot; budget 300 MB)")
        # `cp -r` and the exports in rounds, the order flipped every round (this disk's speed drifts by
        # 2x within minutes); each run starts from the same state: earlier writes flushed, the page
        # cache dropped where the bench may. A ratio is an export over the `cp -r` of its round.
        def timed_run(cmd: list[str], out: Path, peaks: list | None = None):
            def once() -> float:
                drop_caches()
                seconds, rss, _ = timed(cmd, env)
                if peaks is not None:
                    peaks.append(rss)
                shutil.rmtree(out)
                return seconds
            return once

        peaks: dict[str, list] = {"attention": [], "experts@0-7": []}
        cps, exports = paired(timed_run(["cp", "-r", a, str(work / "cp")], work / "cp"), {
            take: timed_run(exe + ["export", str(work / "out"), "--base", a, "--take", f"{take}={b}"], work / "out",
                            peaks[take]) for take in peaks}, args.repeats)
        cp = statistics.median(cps)
        row("cp -r of one donor", f"{cp:6.2f} s  ({size / 1e9 / cp:.2f} GB/s; min / median / max {spread(cps)} s "
            f"over {args.repeats} rounds)")
        for take, walls in exports.items():
            row(f"export {take} from B", f"{statistics.median(walls):6.2f} s  {max(peaks[take]):7.0f} MB   "
                f"{spread(ratios(walls, cps))}x cp -r (min / median / max; budget 64 MB)")
        prune_step(exe, a, work, env, row, size / 1e9 / cp)

        cold = drop_caches()
        state = "cold: page cache dropped" if cold else "page cache as it is (--keep-cache, or not root)"
        read, _, _ = timed(["sh", "-c", f"cat {a}/*.safetensors > /dev/null"])
        row("read the bytes once (cat)", f"{read:6.2f} s  ({size / 1e9 / read:.2f} GB/s; {state})")
        drop_caches()
        wall, rss, out = timed(me + ["--step", "materialize", "--device", device, a, b], env)
        done = json.loads(out.splitlines()[-1])
        inner = done["seconds"]
        row("materialise (process)", f"{wall:6.2f} s  {rss:7.0f} MB   materialize() {inner:.2f} s = "
            f"{inner / read:.2f}x the read, {inner / (2 * read + 1):.2f}x the goal of 2x the read + 1 s "
            f"(transformers' model code imported before it: {done['imports']:.2f} s)   "
            f"(budget {size / 2**20 + 1536:.0f} MB on CPU)")

        wall, rss, out = timed(me + ["--step", "live", "--device", device, a, b], env)
        live = json.loads(out.splitlines()[-1])
        for label, r in live["swap"].items():
            row(f"hot-swap {label}", f"{r['tensors']} tensors {r['GB']:.3f} GB in {r['swap_s']:.3f} s = "
                f"{r['swap_GBps']:.2f} GB/s (B read as cached); then {r['rounds']} rounds: swap "
                f"{r['warm_GBps']:.2f} GB/s, plain copy {r['copy_GBps']:.2f} GB/s (medians; "
                + ", ".join(f"{way} {v:.2f}" for way, v in r["copy_ways_GBps"].items())
                + f" GB/s); swap / the faster copy "
                f"{spread(r['ratios'])}x (min / median / max of the rounds; goal <= 1.5x); "
                f"RSS +{r['rss_growth_MB']:.0f} MB (budget: nothing beyond the swapped tensors, which are already in place)")
        for kind, r in live["probe"].items():
            unit = "tokens scored/s" if kind == "mc" else "tokens generated/s (at most)"
            row(f"{kind} batch of {r['items']}", f"{r['seconds']:6.2f} s  {r['items_per_s']:.2f} items/s  "
                f"{r['tokens_per_s']:.0f} {unit}")
        row("  swap + probe process", f"{wall:6.2f} s  {rss:7.0f} MB   (materialise, swaps, probes)")

        wall, rss, _ = timed(exe + ["routing", a, "--corpus", "arith", "--max-tokens", "2000", "--device", device,
                                    "--json"], env)
        row("routing, 2,000 tokens", f"{wall:6.2f} s  {rss:7.0f} MB   (the command, whole process)")
        wall, rss, out = timed(me + ["--step", "routing", "--device", device, a, b], env)
        r = json.loads(out.splitlines()[-1])
        row("  routing probe vs forward", f"{r['probe']:6.2f} s against {r['plain']:.2f} s for a plain forward over "
            f"the same {r['tokens']} tokens = {r['probe'] / r['plain']:.2f}x (goal <= 1.2x; best of 3 each)")

        wall, rss, _ = timed(exe + ["sweep", str(work / "sweep.json"), "--base", a, "--donor", b, "--group",
                                    "attention", "--group", "experts@0-7", "--probe", "mc:arith_mc,limit=20",
                                    "--device", device, "--json"], env)
        row("sweep, 2 groups, 20 items", f"{wall:6.2f} s  {rss:7.0f} MB")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        else:  # a given --work keeps nothing this run made (and never the --donors given)
            for name in ("cp", "out", "cache", "sweep.json") + (() if args.donors else ("A", "B")):
                p = work / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

"""Benchmark: start-up to the first scored item of `moe-surgeon probe`, in parts.

Runs the real command line (`python -m surgeon.cli probe DIR --probe em:arith`) in a fresh process
and takes the time of each part from inside it, without changing what it runs: an import hook
notes when torch, transformers and its model code (`transformers.modeling_utils`) begin and finish
importing and wraps `Hybrid.materialize` and the tokenizer's load, and the progress printer notes
the first step that scored an item.

  import       process start to the model load: interpreter, imports (torch's shown apart), donors,
               probe data
  load         `Hybrid.materialize`, in two: the import of transformers' model code
               (`transformers.modeling_utils` and all it imports, when it happens there) and the rest,
               building the empty model and filling it from the files
  first batch  the load's end to the first progress step with an item scored (the tokenizer's load,
               shown apart, is in it)
  whole        the process, start to exit, as the parent sees it

--cold drops the checkpoint's files from the page cache before each run (posix_fadvise DONTNEED,
which needs no privileges), as after a reboot or for a model last read long ago.

Models: the demo OLMoE (`demo:arith`, 4 layers, bf16) and a SmolLM2-135M-shaped llama with random
float32 weights (30 layers, hidden 576, vocab 49,152; 538 MB), made once under bench/_work; the
demo's tokenizer fits its vocabulary. Its outputs are noise: only the times mean anything.

--floor also times fresh processes that only import: the interpreter, torch, and transformers' model
code, the least any probe through transformers' model classes can start in.

Run: python bench/startup.py [--repeat 5] [--model demo|llama135m|DIR ...] [--probe SPEC] [--before REV] [--cold]
                             [--floor]
     python bench/probe.py --startup [the same options]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from copy_timing import drop_from_page_cache

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work"
TIMES_ENV = "BENCH_STARTUP_TIMES"  # where the child writes its part times
SPAWNED_ENV = "BENCH_STARTUP_SPAWNED"  # time.time() just before the parent started the child


def make_llama135m(out: Path = WORK / "llama135m") -> Path:
    """A SmolLM2-135M-shaped llama checkpoint (random float32 weights), made once."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgeon.core.donor import open_donor

    demo = open_donor("demo:arith").path
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- inside the child
def _instrument(times: dict) -> None:
    """Note import ends of torch/transformers, wrap Hybrid.materialize when its module loads, and
    note the first scored progress step: all without importing anything the CLI would not."""
    import importlib.abc
    import importlib.util

    watched = {"torch", "transformers", "transformers.modeling_utils", "surgeon.live.hybrid",
               "surgeon.probes.scoring"}

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in watched:
                return None
            watched.discard(name)
            times[f"{name} import began"] = time.time()
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                if watched:
                    sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                times[f"{name} imported"] = time.time()
                if name == "surgeon.live.hybrid":
                    _wrap_materialize(module.Hybrid, times)
                if name == "surgeon.probes.scoring":
                    _wrap_tokenizer(module, times)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())

    from surgeon.cli.progress import StepPrinter

    call = StepPrinter.__call__

    def noted(self, step):
        if step.done > 0 and "first item" not in times:
            times["first item"] = time.time()
        if step.finished:
            times["finished"] = time.time()
        return call(self, step)

    StepPrinter.__call__ = noted


def _wrap_materialize(cls, times: dict) -> None:
    materialize = cls.materialize.__func__

    def timed(klass, *args, **kwargs):
        times.setdefault("load began", time.time())
        try:
            return materialize(klass, *args, **kwargs)
        finally:
            times.setdefault("load ended", time.time())

    cls.materialize = classmethod(timed)


def _wrap_tokenizer(module, times: dict) -> None:
    load = module.load_tokenizer

    def timed(*args, **kwargs):
        began = time.time()
        try:
            return load(*args, **kwargs)
        finally:
            times.setdefault("tokenizer", time.time() - began)

    module.load_tokenizer = timed


def child(argv: list[str]) -> int:
    times: dict = {"spawned": float(os.environ[SPAWNED_ENV])}
    _instrument(times)
    from surgeon.cli.main import main

    try:
        return main(argv)
    finally:
        times["exit"] = time.time()
        Path(os.environ[TIMES_ENV]).write_text(json.dumps(times))


# ---------------------------------------------------------------- the parent
def run_timed(argv: list[str], env: dict | None = None) -> dict:
    """Run `moe-surgeon ARGV` in a fresh process; the part times in seconds, and `whole`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        env = {**(os.environ if env is None else env), TIMES_ENV: str(out)}
        t0 = env[SPAWNED_ENV] = repr(time.time())
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_line = proc.stderr.readline()
        silent = time.perf_counter() - started  # until the user sees a first line
        stdout, stderr = proc.communicate()
        whole = time.perf_counter() - started
        stderr = first_line + stderr
        if proc.returncode != 0:
            raise SystemExit(f"moe-surgeon {' '.join(argv)} failed ({proc.returncode}):\n{stderr[-2000:]}")
        t = json.loads(out.read_text())
    t0 = float(t0)

    def at(key):
        return t[key] - t0 if key in t else None

    parts = {"start": at("load began"), "torch import": None, "transformers import": None,
             "model code import": None, "fill": None, "tokenizer": t.get("tokenizer"),
             "load": t["load ended"] - t["load began"], "first batch": t["first item"] - t["load ended"],
             "to first item": at("first item"), "probe": t["finished"] - t["load ended"], "whole": whole,
             "silent": silent, "stderr": stderr}
    for lib in ("torch", "transformers"):
        if f"{lib} imported" in t:
            parts[f"{lib} import"] = t[f"{lib} imported"] - t[f"{lib} import began"]
    parts["transformers in load"] = t.get("transformers import began", 0) >= t["load began"]
    # transformers' model code: from the first of its imports inside the load to modeling_utils' end
    code = [t[k] for k in ("transformers import began", "transformers.modeling_utils import began") if k in t]
    if "transformers.modeling_utils imported" in t and code and min(code) >= t["load began"]:
        parts["model code import"] = t["transformers.modeling_utils imported"] - min(code)
        parts["fill"] = parts["load"] - parts["model code import"]
    return parts


def _models(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        if name == "demo":
            out["demo OLMoE (demo:arith)"] = "demo:arith"
        elif name == "llama135m":
            out["SmolLM2-135M-shaped llama, f32"] = str(make_llama135m())
        else:
            out[name] = name
    return out


def report(label: str, runs: list[dict]) -> None:
    def fig(key):
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            return "   -"
        return f"{min(values):6.2f} / {statistics.median(values):6.2f}"

    where = "inside load" if runs[0]["transformers in load"] else "before load"
    print(f"{label}  ({len(runs)} runs; seconds, best / median)")
    for key, text in (("start", "import (interpreter, imports, donors, data)"),
                      ("torch import", "  of which torch's import"),
                      ("load", "load (Hybrid.materialize)"),
                      ("model code import", "  transformers' model code import"),
                      ("transformers import", f"    of which `import transformers` ({where})"),
                      ("fill", "  build the empty model, fill it from the files"),
                      ("first batch", "first batch"),
                      ("tokenizer", "  of which the tokenizer's load"),
                      ("to first item", "process start to first scored item"),
                      ("silent", "process start to its first line on stderr"),
                      ("probe", "probe (load's end to last item)"),
                      ("whole", "whole process")):
        print(f"  {text:<50}{fig(key)}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", action="append", default=None, help="demo, llama135m, or a checkpoint DIR")
    ap.add_argument("--probe", default="mc:arith_mc,limit=64")
    ap.add_argument("--before", metavar="REV", help="also run the code of git revision REV (git archive into a "
                    "temporary folder, first on PYTHONPATH), interleaved with the working tree's")
    ap.add_argument("--cold", action="store_true", help="drop the checkpoint's files from the page cache before each run")
    ap.add_argument("--floor", action="store_true", help="also time, in fresh processes, the imports any probe "
                    "through transformers' model classes pays: the interpreter, torch, transformers' model code")
    args = ap.parse_args(argv)
    from copy_timing import as_installed

    as_installed()
    models = _models(args.model or ["demo", "llama135m"])
    codes = {"now": None}
    with tempfile.TemporaryDirectory() as old:
        if args.before:
            archive = subprocess.run(["git", "archive", args.before], cwd=ROOT.parent, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
            codes = {f"before ({args.before})": old, **codes}
        runs: dict[tuple, list[dict]] = {(c, m): [] for c in codes for m in models}
        floors: dict[str, list[float]] = {label: [] for label in FLOOR} if args.floor else {}
        for _ in range(args.repeat):  # interleaved: a busy spell of the machine hits every case alike
            for label, code_line in FLOOR.items() if args.floor else ():
                floors[label].append(process_seconds(code_line))
            for label, target in models.items():
                for code, path in codes.items():
                    env = dict(os.environ)
                    if path:
                        env["PYTHONPATH"] = os.pathsep.join([path, *filter(None, [env.get("PYTHONPATH")])])
                    if args.cold:
                        drop_from_page_cache(target)
                    runs[code, label].append(run_timed(["probe", target, "--probe", args.probe], env))
    print(f"moe-surgeon probe DIR --probe {args.probe}, on the CPU ({os.cpu_count()} cores), "
          f"{'files dropped from the page cache before each run' if args.cold else 'files in the page cache'}, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    for (code, label), rs in runs.items():
        report(f"{label}, {code}", rs)
    if floors:
        print(f"the floor: fresh processes that only import, timed from inside ({args.repeat} runs; seconds, "
              "best / median)")
        for label, values in floors.items():
            print(f"  {label:<50}{min(values):6.2f} / {statistics.median(values):6.2f}")
    return 0


FLOOR = {
    "python -c pass (the whole process)": None,
    "import torch": "import torch",
    "import torch, transformers.modeling_utils": "import torch, transformers.modeling_utils",
    "  and the model class (llama)": "import torch, transformers.models.llama.modeling_llama",
}


def process_seconds(code: str | None) -> float:
    """The whole of `python -c pass`, or the time `code` takes to run in a fresh process, from inside
    it (a process that imported torch takes a while to exit, which no user waits for)."""
    if code is None:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return time.perf_counter() - started
    timed = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", timed], check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    sys.exit(main())

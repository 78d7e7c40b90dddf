"""Start-up: each command imports the libraries its work needs and no others (a heavy import is
seconds the user waits through for nothing), and `probe` says what it loads before the first wait.

Each test runs the real command line in a fresh interpreter and reads its `sys.modules` at the end:
what a module imports at its top is checked by tests/test_layering.py; what a command imports when
it runs is checked here."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs `main(ARGS)` (or, with --each-help, every subcommand's --help in turn) and writes on stderr a
# line "ADDED {command: [exit code, top-level packages it added to sys.modules]}".
RUN = r"""
import contextlib, io, json, sys
from surgeon.cli.main import SUBCOMMANDS, main

def run(argv):
    before = set(sys.modules)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if "--help" in argv else contextlib.nullcontext():
            rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, sorted({m.split(".")[0] for m in set(sys.modules) - before})

argv = sys.argv[1:]
if argv == ["--each-help"]:
    added = {" ".join(a): run(a) for a in [["--help"]] + [[c, "--help"] for c in SUBCOMMANDS]}
else:
    added = {" ".join(argv): run(argv)}
sys.stderr.write("\nADDED " + json.dumps(added) + "\n")
"""

# Libraries no command needs before it has a model to run: the model stack, lm-eval and its data
# sets, the workbench.
MODEL_STACK = {"torch", "transformers", "safetensors", "accelerate"}
NEVER_NATIVE = {"lm_eval", "datasets", "evaluate", "textual", "screens"}


def run(*args, importtime=False):
    flags = ["-X", "importtime"] if importtime else []
    r = subprocess.run([sys.executable, *flags, "-c", RUN, *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    found = [line for line in r.stderr.splitlines() if line.startswith("ADDED ")]
    assert found, r.stderr[-3000:]
    return r, {cmd: (rc, set(mods)) for cmd, (rc, mods) in json.loads(found[-1][len("ADDED "):]).items()}


def test_help_of_every_command_imports_no_model_stack_lm_eval_or_workbench():
    _, added = run("--each-help")
    assert len(added) > 10  # every subcommand ran
    for cmd, (rc, mods) in added.items():
        assert rc == 0, cmd
        assert not mods & (MODEL_STACK | NEVER_NATIVE), (cmd, sorted(mods & (MODEL_STACK | NEVER_NATIVE)))


def test_inspect_and_the_probe_list_import_no_model_stack():
    for args in (["inspect", "demo:arith"], ["probe", "--list"]):
        _, added = run(*args)
        (rc, mods), = added.values()
        assert rc == 0, args
        assert not mods & (MODEL_STACK | NEVER_NATIVE), (args, sorted(mods & (MODEL_STACK | NEVER_NATIVE)))


def test_a_native_probe_never_imports_lm_eval_and_says_what_it_loads_before_torch_imports():
    r, added = run("probe", "demo:arith", "--probe", "mc:arith_mc,limit=4", "--device", "cpu", importtime=True)
    (rc, mods), = added.values()
    assert rc == 0, r.stderr[-3000:]
    assert "torch" in mods  # it did load a model
    assert "transformers" not in mods  # on our own forward: the demo donors are OLMoE (live/native_model.py)
    assert not mods & NEVER_NATIVE, sorted(mods & NEVER_NATIVE)
    lines = r.stderr.splitlines()
    loading = [i for i, line in enumerate(lines) if line.startswith("probe: loading arith (")]
    assert len(loading) == 1 and lines[loading[0]].endswith(")…"), r.stderr[-3000:]
    # -X importtime writes a line as each module finishes importing: the first of torch's comes
    # after the loading line, so the user reads what loads before the seconds of torch's import.
    torch_lines = [i for i, line in enumerate(lines) if re.match(r"import time:.*\|\s*torch(\.|$)", line)]
    assert torch_lines and loading[0] < torch_lines[0]
    # and then items are counted
    assert any(re.match(r"probe: .*items.*ETA", line) for line in lines[loading[0] + 1:])


def test_the_probe_reads_ahead_exactly_the_bytes_the_plan_takes_without_importing_torch():
    """`prefetch` (surgeon/live/loader.py) asks the kernel for the byte ranges materialising a plan
    reads, each donor's from its own file, from a thread, before torch is imported."""
    code = r"""
import json, sys
from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.live.loader import prefetch, prefetch_ranges
donors = {"A": open_donor("demo:arith"), "B": open_donor("demo:reverse")}
plan = Plan("A", [parse_spec("attention", "B")])
ranges = prefetch_ranges(plan, donors)
thread = prefetch(plan, donors)
thread.join(30)
files = {name: str(d.tensors[next(iter(d.tensors))].file) for name, d in donors.items()}
attention = sum(t.nbytes for n, t in donors["B"].tensors.items() if ".self_attn." in n)
print(json.dumps({"ranges": ranges, "files": files, "alive": thread.is_alive(), "torch": "torch" in sys.modules,
                  "attention_B": attention}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert not out["torch"] and not out["alive"]
    ranges = out["ranges"]
    assert set(ranges) == set(out["files"].values())  # the base's file and B's, for its attention
    for spans in ranges.values():
        assert spans == sorted(spans) and all(a < b for a, b in spans)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # merged: no overlaps
    from_b = sum(b - a for a, b in ranges[out["files"]["B"]])
    assert out["attention_B"] <= from_b < out["attention_B"] + 2 ** 20 * len(ranges[out["files"]["B"]])


def test_an_export_imports_no_model_stack_and_not_importlib_metadata(tmp_path):
    """An export of a small checkpoint is mostly fixed cost: importlib.metadata (email, zipfile,
    socket) and concurrent.futures were 25 ms of a 0.5 s export of 0.94 GB. The versions its
    manifest names come from surgeon/io/versions.py; its hashes are taken as it writes, in this thread."""
    _, added = run("export", "--base", "demo:arith", "--take", "attention=demo:reverse", tmp_path / "out")
    (rc, mods), = added.values()
    assert rc == 0
    assert (tmp_path / "out" / "moe-surgeon-manifest.json").is_file()
    assert not mods & (MODEL_STACK | NEVER_NATIVE | {"email", "zipfile", "concurrent"}), sorted(mods)

"""Hostile inputs, end to end: each attack that was tried on the tool (the "trust under attack"
review) run through the CLI, and each must end in one clear line and a non-zero exit with nothing
outside the command's output changed. The workspace (donors, sessions, the user's files) is hashed
before and after every attack.

Where a case needs more than a command line to prove (the served websocket, the probe score
cache, a FIFO that must not block), its own test says so in depth:
  serve token and Origin           test_serve.py
  donor edited, mtime set back     test_content_hash.py, and here through replay
  stale donor probe scores         test_probes.py (measured_again), test_task_code.py (digest)
  --force, links, special files    test_export.py, test_atomic_writes.py, test_fs_faults.py
  task code (!function)            test_task_code.py
  unbounded reads                  test_bounded_inputs.py, test_task_code.py
  index.json outside the donor     test_headers.py
  verify: relative paths, config   test_verify.py
  --workers beyond the cores       test_sweep_ray.py
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

TASKS = Path(__file__).parent / "data" / "lmeval_tasks"


def assert_one_line_error(r, *words) -> None:
    """A non-zero exit whose error is one line (progress lines before it are allowed) naming `words`."""
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    for w in words:
        assert str(w) in errors[0], (w, errors[0])


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every file under root (links as their target text, special files as their kind), but `skip`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for f in filenames:
            p = Path(dirpath, f)
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "special"
    return out


@pytest.fixture
def ws(donors_of, tmp_path, run_cli):
    """Two donors copied into a workspace, a session of a hybrid of them, and a user directory."""
    a, b = (Path(shutil.copytree(d, tmp_path / f"d{i}")) for i, d in enumerate(donors_of("olmoe", 2)))
    session = tmp_path / "s.json"
    r = run_cli("export", tmp_path / "first", "--base", a, "--take", f"experts={b}", "--save-session", session)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(tmp_path / "first")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file\n")
    return {"root": tmp_path, "a": a, "b": b, "session": session, "mine": mine}


def _alias_bomb(ws) -> Path:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    p = ws["root"] / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nmerge_method: passthrough\n")
    return p


def _outside_index(ws) -> Path:
    d = Path(shutil.copytree(ws["a"], ws["root"] / "escape"))
    from safetensors import safe_open

    with safe_open(d / "model.safetensors", "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
    index["weight_map"][names[0]] = "../../../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _function_task(ws) -> Path:
    folder = ws["root"] / "task"
    folder.mkdir()
    for f in ("arc_tiny_train.jsonl", "arc_tiny_test.jsonl"):
        shutil.copy(TASKS / f, folder / f)
    (folder / "utils.py").write_text(f"open({str(folder / 'ran')!r}, 'w')\ndef p(d):\n    return d\n")
    text = (TASKS / "arc_tiny.yaml").read_text().replace("task: arc_tiny", "task: hostile")
    (folder / "t.yaml").write_text(text + "process_docs: !function utils.p\n")
    return folder / "t.yaml"


def _edited_donor(ws) -> None:
    """Bytes of a donor shard changed in place and its mtime set back, as `dd conv=notrunc; touch -r`."""
    from surgeon.core.donor import SAMPLE_BLOCKS, SAMPLE_BYTES, open_donor

    shard = ws["b"] / "model.safetensors"
    st = shard.stat()
    step = (st.st_size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
    at = SAMPLE_BYTES + (step - SAMPLE_BYTES) // 2  # between the first two sampled blocks
    assert step - SAMPLE_BYTES >= 64
    fingerprint = open_donor(ws["b"]).fingerprint
    with open(shard, "r+b") as f:
        f.seek(at)
        old = f.read(8)
        f.seek(at)
        f.write(bytes(x ^ 1 for x in old))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_donor(ws["b"]).fingerprint == fingerprint  # only the full hashes can tell


def _link_to_donor_config(ws) -> Path:
    link = ws["root"] / "session-link.json"
    link.symlink_to(ws["a"] / "config.json")
    return link


# name -> (prepare(ws) -> argv, words the one line must hold)
ATTACKS = {
    "session is /dev/zero": (lambda ws: ["replay", "/dev/zero"], ["/dev/zero", "not a regular file"]),
    "session is a FIFO": (lambda ws: (os.mkfifo(ws["root"] / "fifo.json"), ["replay", ws["root"] / "fifo.json"])[1],
                          ["fifo.json", "not a regular file"]),
    "recipe alias bomb": (lambda ws: ["recipe", "import", _alias_bomb(ws), "--out", ws["root"] / "r.json"],
                          ["bomb.yaml", "aliases expand"]),
    "index points outside the donor": (lambda ws: ["inspect", _outside_index(ws)], ["etc/passwd"]),
    "--force onto a user's directory": (lambda ws: ["export", ws["mine"], "--base", ws["a"], "--force"],
                                        ["mine", "will not replace it"]),
    "session written through a link to a donor file": (
        lambda ws: ["export", ws["root"] / "out", "--base", ws["a"], "--save-session", _link_to_donor_config(ws)],
        ["which this run reads"]),
    "samples to a device": (lambda ws: ["probe", ws["session"], "--probe", "em:arith,limit=2", "--samples",
                                        "/dev/null", "--device", "cpu"], ["/dev/null"]),
    "task YAML with !function, untrusted": (
        lambda ws: ["probe", ws["session"], "--probe", f"lmeval:{_function_task(ws)}", "--device", "cpu"],
        ["--trust-task-code", "utils.p"]),
    "donor edited in place, mtime set back": (lambda ws: (_edited_donor(ws), ["replay", ws["session"]])[1],
                                              ["model.safetensors", "full content hash differs"]),
    "control characters in a path": (lambda ws: ["inspect", ws["root"] / "x\x1b]0;owned\x07"], ["\\x1b]0;owned\\x07"]),
    "a probe option twice": (lambda ws: ["probe", ws["session"], "--probe", "em:arith,limit=2,limit=900"],
                             ["limit is given twice"]),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_hostile_input_is_one_line_and_changes_nothing(ws, run_cli, name):
    if "task YAML" in name:
        pytest.importorskip("lm_eval")
    prepare, words = ATTACKS[name]
    argv = prepare(ws)
    before = snapshot(ws["root"], ws["root"] / "out")
    r = run_cli(*argv)
    assert_one_line_error(r, *words)
    assert "verified" not in r.stdout
    assert snapshot(ws["root"], ws["root"] / "out") == before
    assert not (ws["root"] / "out").exists() and not (ws["root"] / "task" / "ran").exists()

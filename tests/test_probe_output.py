"""What `moe-surgeon probe` hands back: per-item samples (lm-eval's --log_samples fields), per-item
outcomes in --json, a table with every metric and the checkpoint's own name, progress in items."""

import json
import os
import shutil

import pytest

from surgeon.probes.data import PROBES_ROOT

LM_EVAL_FIELDS = {"doc_id", "prompt", "target", "arguments", "resps", "filtered_resps"}
ARC = [
    {"id": "q1", "question": "ab", "choices": {"text": ["cd", "ef", "gh"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "q2", "question": "1+2", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
    {"id": "q3", "question": "xyz", "choices": {"text": ["zyx", "x", "yy"], "label": ["A", "B", "C"]}, "answerKey": "C"},
    {"id": "q4", "question": "k", "choices": {"text": ["a", "bb"], "label": ["A", "B"]}, "answerKey": "A"},
]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_record(lines):
    """Sample lines grouped per (model, probe, vs), in file order."""
    groups = {}
    for line in lines:
        groups.setdefault((line["model"], line["probe"], line.get("vs")), []).append(line)
    return groups


def test_samples_and_json_give_the_same_per_item_outcomes_under_the_checkpoints_name(cli, tmp_path):
    out = tmp_path / "deep" / "samples.jsonl"  # a missing directory on the way is made
    r = cli("probe", "demo:arith", "--probe", "mc:arith_mc,limit=8", "--probe", "em:arith,limit=4",
            "--probe", "ppl:arith,limit=3", "--device", "cpu", "--samples", out, "--json")
    assert r.returncode == 0, r.stderr
    # progress on a stderr that is no terminal: plain lines in items, with rate and ETA
    progress = [line for line in r.stderr.splitlines() if line.startswith("probe:")]
    # first a line while the model loads (seconds of imports and reading in which nothing is counted)
    assert progress[0] == "probe: loading arith (949.98 KB)…"
    progress = progress[1:]
    assert progress and all("items" in line and "ETA" in line for line in progress)
    assert any("items/s" in line and "arith mc:arith_mc" in line for line in progress)
    assert not any("hybrid" in line for line in progress)  # one checkpoint is called by its name
    assert len(progress) == len(set(progress))  # no line printed twice

    rows = json.loads(r.stdout)["results"]
    assert [row["model"] for row in rows] == ["arith"] * 3  # the directory's name, not "hybrid"
    lines = read_jsonl(out)
    assert len(lines) == 8 + 4 + 3
    groups = by_record(lines)
    assert list(groups) == [("arith", row["probe"], None) for row in rows]
    for row in rows:
        items = groups["arith", row["probe"], None]
        assert len(row["ids"]) == len(row["outcomes"]) == row["n"] == len(items)
        assert [line["outcome"] for line in items] == row["outcomes"]
    mc, em, ppl = (groups["arith", row["probe"], None] for row in rows)
    for line in mc:
        assert LM_EVAL_FIELDS | {"acc", "acc_norm"} <= set(line)
        assert line["acc"] == line["outcome"]
    assert [line["acc_norm"] for line in mc] == rows[0]["extra"]["acc_norm"]["outcomes"]
    for line in em:
        assert LM_EVAL_FIELDS | {"exact_match"} <= set(line)
        assert line["exact_match"] == line["outcome"]
    # Laid out as lm-eval's --log_samples: doc_id is the 0-based place in the file (the demo sets' ids
    # are line numbers), resps per request then per repeat, and one line per filter, naming it.
    for items, row in zip((mc, em, ppl), rows):
        assert [line["id"] for line in items] == row["ids"]
        assert [line["doc_id"] for line in items] == [int(i) - 1 for i in row["ids"]]
    assert all(len(r) == 1 and len(r[0]) == 2 and isinstance(r[0][1], bool) for line in mc for r in line["resps"])
    assert all(line["filter"] == "none" and line["filtered_resps"] == [r[0] for r in line["resps"]] for line in mc)
    assert all(line["filter"] == "exact" and isinstance(line["resps"][0][0], str) for line in em)
    # a kind that gives no samples: the item and its outcome only
    assert [set(line) for line in ppl] == [{"model", "probe", "doc_id", "id", "outcome"}] * 3
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary left


def test_table_shows_every_metric_by_lm_evals_name_the_files_name_and_the_checkpoints_name(cli, tmp_path):
    data = tmp_path / "a-rather-long-directory-name-for-the-probe-set"
    data.mkdir()
    shutil.copy(PROBES_ROOT / "arith_mc.jsonl", data / "arith_mc.jsonl")
    label = f"mc:{data / 'arith_mc.jsonl'},limit=6,seed=3"
    assert len(label) > 60
    r = cli("probe", "demo:arith", "--probe", label, "--device", "cpu", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert str(data) not in r.stdout and "…" not in r.stdout  # the file's name, not its long path
    rows = [[cell.strip() for cell in line.split("│")] for line in r.stdout.splitlines() if "│" in line]
    assert rows[0][:2] == ["arith", "mc:arith_mc.jsonl,limit=6,seed=3 (acc)"]  # the primary metric as lm-eval names it
    extras = {row[1]: row for row in rows[1:] if row[0] == ""}  # every extra metric on a row of its own
    assert len(extras) == len(rows) - 1 and extras["acc_norm"][2] == "6" and extras["acc_norm"][3].endswith("%")
    assert "hybrid" not in r.stdout


@pytest.fixture
def session(donors_of, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))  # donors measured here, not cached elsewhere
    a, b = donors_of("olmoe", 2)
    s = tmp_path / "s.json"
    r = run_cli("export", tmp_path / "out", "--base", a, "--take", f"experts={b}", "--save-session", s)
    assert r.returncode == 0, r.stderr
    arc = tmp_path / "arc.jsonl"
    arc.write_text("".join(json.dumps(row) + "\n" for row in ARC))
    return s, f"mc:{arc}"


def test_a_session_keeps_hybrid_and_no_samples_and_cached_donors_keep_their_samples(session, tmp_path, run_cli):
    s, probe = session
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    r = run_cli("probe", s, "--probe", probe, "--device", "cpu", "--samples", first, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [row["model"] for row in rows] == ["hybrid", "donor:A", "donor:B"]
    assert set(rows[0]["extra"]["acc_norm"]["vs"]) == {"donor:A", "donor:B"}  # acc_norm compared too
    saved = json.loads(s.read_text())["results"]
    assert [x["model"] for x in saved] == ["hybrid", "donor:A", "donor:B"]
    assert not any("samples" in x for x in saved)  # large, and the samples file has them
    lines = read_jsonl(first)
    assert len(lines) == 3 * len(ARC)
    groups = by_record(lines)
    assert list(groups) == [(m, rows[0]["probe"], None) for m in ("hybrid", "donor:A", "donor:B")]
    for row in rows:
        items = groups[row["model"], row["probe"], None]
        assert [line["outcome"] for line in items] == row["outcomes"]
        assert all(LM_EVAL_FIELDS | {"acc", "acc_norm"} <= set(line) for line in items)

    # the donors' scores now come from the cache, and their samples with them
    r = run_cli("probe", s, "--probe", probe, "--device", "cpu", "--samples", second, "--no-save")
    assert r.returncode == 0, r.stderr
    again = by_record(read_jsonl(second))
    for name in ("donor:A", "donor:B"):
        cached = again[name, rows[0]["probe"], None]
        assert all(line.pop("cached") is True for line in cached)
        assert cached == groups[name, rows[0]["probe"], None]
    assert not any("cached" in line for line in again["hybrid", rows[0]["probe"], None])


def test_a_per_donor_probe_writes_its_items_and_outcomes_per_donor(session, tmp_path, run_cli):
    s, probe = session
    out = tmp_path / "kl.jsonl"
    r = run_cli("probe", s, "--probe", probe.replace("mc:", "kl:") + ",limit=3", "--device", "cpu",
                "--samples", out, "--json", "--no-save")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    groups = by_record(read_jsonl(out))
    assert [(m, vs) for m, _, vs in groups] == [("hybrid", "donor:A"), ("hybrid", "donor:B")]
    for row, items in zip(rows, groups.values()):
        assert [line["outcome"] for line in items] == row["outcomes"]
        assert [line["doc_id"] for line in items] == row["ids"]


def _is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("where", ["directory", "file in the way", "read-only directory"])
def test_a_bad_samples_path_is_one_line_before_anything_runs(run_cli, tmp_path, where):
    if where == "directory":
        path = tmp_path
    elif where == "file in the way":
        (tmp_path / "f").write_text("x")
        path = tmp_path / "f" / "samples.jsonl"
    else:
        if _is_root():
            pytest.skip("root writes into a read-only directory")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        path = locked / "samples.jsonl"
    r = run_cli("probe", "demo:arith", "--probe", "mc:arith_mc,limit=2", "--device", "cpu", "--samples", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    message = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and str(path) in message[0] and "samples" in message[0]
    assert "items" not in r.stderr  # refused before any model was loaded or measured


def test_a_directory_as_samples_file_through_the_console_entry_point(cli, tmp_path):
    r = cli("probe", "demo:arith", "--probe", "mc:arith_mc,limit=2", "--device", "cpu", "--samples", tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(tmp_path) in r.stderr

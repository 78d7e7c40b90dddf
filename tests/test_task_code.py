"""lm-eval task YAMLs that carry code (a `!function`, a dataset's trust_remote_code, a template that
reaches Python) run it only with --trust-task-code, and a session that ran such a task asks for the
flag again on replay. Task YAMLs and probe files are read bounded: a FIFO or an oversized file is one
line, never a hang or a full read."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from surgeon.errors import SurgeonError
from surgeon.probes import ProbeSpec
from surgeon.probes import lmeval as probe

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lmeval_tasks"


def task_folder(tmp_path: Path, extra: str = "", name: str = "t.yaml") -> Path:
    """arc_tiny's YAML and data copied into tmp_path, with `extra` YAML lines appended."""
    for f in ("arc_tiny_train.jsonl", "arc_tiny_test.jsonl"):
        shutil.copy(TASKS / f, tmp_path / f)
    text = (TASKS / "arc_tiny.yaml").read_text().replace("task: arc_tiny", f"task: {Path(name).stem}_task")
    (tmp_path / name).write_text(text + extra)
    return tmp_path / name


def marker_module(folder: Path) -> Path:
    """utils.py whose import leaves a marker file: proof that the task's Python ran."""
    marker = folder / "ran.txt"
    (folder / "utils.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n\n"
        "def process_docs(dataset):\n    return dataset\n")
    return marker


def test_a_function_tag_runs_only_when_trusted(tmp_path):
    yaml_path = task_folder(tmp_path, "process_docs: !function utils.process_docs\n")
    marker = marker_module(tmp_path)
    with pytest.raises(SurgeonError) as err:
        probe.load_task(ProbeSpec("lmeval", str(yaml_path)))
    text = str(err.value)
    assert "\n" not in text and "--trust-task-code" in text and "utils.process_docs" in text
    assert not marker.exists()  # refused before anything was imported
    loaded = probe.load_task(ProbeSpec("lmeval", str(yaml_path), trust_code=True))
    assert loaded.docs > 0 and marker.exists()


def test_code_in_an_included_file_or_a_dataset_script_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("process_docs: !function utils.process_docs\n")
    marker = marker_module(tmp_path)
    child = task_folder(tmp_path, "include: base.yaml\n")
    with pytest.raises(SurgeonError, match=r"base\.yaml.*--trust-task-code"):
        probe.load_task(ProbeSpec("lmeval", str(child)))
    assert not marker.exists()

    remote = task_folder(tmp_path, "", name="r.yaml")
    remote.write_text(remote.read_text().replace("dataset_kwargs:\n", "dataset_kwargs:\n  trust_remote_code: true\n"))
    with pytest.raises(SurgeonError, match="trust_remote_code.*--trust-task-code"):
        probe.load_task(ProbeSpec("lmeval", str(remote)))


def test_a_template_cannot_reach_python(tmp_path):
    marker = tmp_path / "shell.txt"
    yaml_path = task_folder(tmp_path)
    escape = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    yaml_path.write_text(yaml_path.read_text().replace('doc_to_text: "Question: {{question}}\\nAnswer:"',
                                                       f'doc_to_text: "{escape}"'))
    with pytest.raises(SurgeonError):
        probe.load_task(ProbeSpec("lmeval", str(yaml_path)))
    assert not marker.exists()


def test_task_yamls_are_read_bounded(tmp_path, monkeypatch):
    big = task_folder(tmp_path, "# " + "x" * 5000 + "\n")
    monkeypatch.setenv("MOE_SURGEON_MAX_TASK_BYTES", "2000")
    with pytest.raises(SurgeonError, match="MOE_SURGEON_MAX_TASK_BYTES"):
        probe.load_task(ProbeSpec("lmeval", str(big)))
    monkeypatch.delenv("MOE_SURGEON_MAX_TASK_BYTES")
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
             f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bombed = task_folder(tmp_path, "\n".join(bomb) + "\n", name="bomb.yaml")
    with pytest.raises(SurgeonError, match="aliases expand"):
        probe.load_task(ProbeSpec("lmeval", str(bombed)))


@pytest.fixture
def session(donors_of, tmp_path, run_cli):
    a, b = donors_of("olmoe", 2)
    s = tmp_path / "s.json"
    assert run_cli("export", tmp_path / "out", "--base", a, "--take", f"experts={b}",
                   "--save-session", s).returncode == 0
    return s


def test_a_session_that_ran_task_code_asks_for_the_flag_again_on_replay(session, tmp_path, run_cli, monkeypatch):
    # scikit-learn, which lm-eval's metrics import on first use, sets this at import: not ours to leak
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "True")
    folder = tmp_path / "task"
    folder.mkdir()
    yaml_path = task_folder(folder, "process_docs: !function utils.process_docs\n")
    marker = marker_module(folder)
    r = run_cli("probe", session, "--probe", f"lmeval:{yaml_path},first=2", "--device", "cpu", "--no-donors")
    assert r.returncode != 0 and "--trust-task-code" in r.stderr and not marker.exists()
    r = run_cli("probe", session, "--probe", f"lmeval:{yaml_path},first=2", "--device", "cpu", "--no-donors",
                "--trust-task-code")
    assert r.returncode == 0, r.stderr
    saved = json.loads(session.read_text())
    assert saved["trust_task_code"] is True
    assert all("trust" not in json.dumps(p) for p in saved["probes"])  # a probe string never grants it
    marker.unlink()
    r = run_cli("replay", session, "--probes", "--device", "cpu")
    assert r.returncode != 0 and "--trust-task-code" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    r = run_cli("replay", session, "--probes", "--device", "cpu", "--trust-task-code")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 per-item difference(s)" in r.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_an_oversized_probe_file_is_refused_without_reading_it(session, tmp_path, run_cli):
    import subprocess

    fifo = tmp_path / "items.jsonl"
    os.mkfifo(fifo)
    try:  # nobody writes: a reader that opened it would wait forever
        r = subprocess.run([sys.executable, "-m", "surgeon.cli", "probe", str(session), "--probe", f"mc:{fifo}",
                            "--device", "cpu"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("probe blocked on a FIFO")
    assert r.returncode != 0 and "not a regular file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n" * 3000)
    r = run_cli("probe", session, "--probe", f"mc:{big}", "--device", "cpu",
                env={"MOE_SURGEON_MAX_PROBE_BYTES": "1000"})
    assert r.returncode != 0 and "MOE_SURGEON_MAX_PROBE_BYTES" in r.stderr


def test_the_donor_score_key_of_a_task_follows_its_documents_and_code(tmp_path):
    """What the score cache keys a task by: stable for the same files, new when a document or the
    code a trusted task runs changes."""
    yaml_path = task_folder(tmp_path, "process_docs: !function utils.process_docs\n")
    marker_module(tmp_path)
    spec = ProbeSpec("lmeval", str(yaml_path), trust_code=True)

    def digest() -> str:
        return probe.content_digest(probe.load_task(spec))

    first = digest()
    assert digest() == first
    data = tmp_path / "arc_tiny_test.jsonl"
    data.write_text(data.read_text().replace("closest to the sun", "nearest the sun"))
    edited = digest()
    assert edited != first
    utils = tmp_path / "utils.py"
    utils.write_text(utils.read_text() + "\n# a helper changed\n")
    assert digest() != edited


@pytest.mark.parametrize("extra, message", [
    ("num_fewshot: two\n", "lm-eval cannot use task"),  # found by fuzzing: a TypeError escaped
])
def test_a_config_value_lm_eval_trips_on_is_one_line(tmp_path, extra, message):
    yaml_path = task_folder(tmp_path)
    yaml_path.write_text(yaml_path.read_text().replace("num_fewshot: 2\n", "") + extra)
    with pytest.raises(SurgeonError, match=message) as err:
        probe.load_task(ProbeSpec("lmeval", str(yaml_path)))
    assert "\n" not in str(err.value)


def test_a_data_file_that_is_a_device_is_refused_before_datasets_reads_it(tmp_path):
    yaml_path = task_folder(tmp_path)
    yaml_path.write_text(yaml_path.read_text().replace("test: arc_tiny_test.jsonl", "test: /dev/zero"))
    with pytest.raises(SurgeonError, match="/dev/zero is not a regular file"):
        probe.load_task(ProbeSpec("lmeval", str(yaml_path)))


@pytest.mark.parametrize("value", ["true", "1.5"])
def test_a_metric_list_that_is_not_a_list_is_one_line(tmp_path, value):
    """Found by fuzzing: iterating `metric_list: true` escaped as a TypeError."""
    yaml_path = task_folder(tmp_path)
    text = yaml_path.read_text()
    yaml_path.write_text(text[:text.index("metric_list:")] + f"metric_list: {value}\nmetadata:\n  version: 1.0\n")
    with pytest.raises(SurgeonError, match="metric_list is a list of metrics"):
        probe.load_task(ProbeSpec("lmeval", str(yaml_path)))

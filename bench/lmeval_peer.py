"""lm-evaluation-harness as the peer of the comparison: its task files, its command, its samples.

The task YAMLs copy lm-eval 0.4.13's own arc_challenge, boolq (super_glue) and gsm8k configs field
for field; only the dataset lines differ (`dataset_path: json` over the generated files), and the
task names carry a `bench_` prefix so they never shadow the registry's tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The fields of lm-eval 0.4.13's configs, minus dataset_path/dataset_name (the real data's).
ARC = """\
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{question}}\\nAnswer:"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

BOOLQ = """\
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
should_decontaminate: true
doc_to_decontamination_query: passage
metric_list:
  - metric: acc
metadata:
  version: 2.0
"""

GSM8K = """\
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "(?s).*#### "
      - "\\\\.$"
generation_kwargs:
  until:
    - "Question:"
    - "</s>"
    - "<|im_end|>"
  do_sample: false
  temperature: 0.0
repeats: 1
num_fewshot: 5
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
      - function: "take_first"
metadata:
  version: 3.0
"""

# task -> (lm-eval task name, config body, the split evaluated)
TASKS = {
    "arc": ("bench_arc_challenge", ARC, "test"),
    "boolq": ("bench_boolq", BOOLQ, "validation"),
    "gsm8k": ("bench_gsm8k", GSM8K, "test"),
}


def write_tasks(folder: Path, files: dict) -> dict[str, Path]:
    """One YAML per task in `folder` (lm-eval's --include_path); `files` maps task -> ItemFiles."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for task, (name, body, split) in TASKS.items():
        data = {"train": str(files[task].fewshot_lmeval.resolve()), split: str(files[task].lmeval.resolve())}
        head = (f"task: {name}\ndataset_path: json\ndataset_name: null\n"
                f"dataset_kwargs:\n  data_files: {json.dumps(data)}\n")
        path = folder / f"{name}.yaml"
        path.write_text(head + body, encoding="utf-8")
        out[task] = path
    return out


def offline_env(work: Path) -> dict[str, str]:
    """What both tools run under: nothing from the hub, and datasets' cache inside the scratch
    folder. Thread settings are left alone, so each tool gets torch's default."""
    env = dict(os.environ)
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(work / "hf-datasets"),
               PYTHONUNBUFFERED="1")
    return env


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    returncode: int
    log: Path
    load: float  # the 1-minute load average as the run ended: other work on a shared machine skews times


def run_measured(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> Run:
    """Run `cmd` to completion; wall time and the child's own peak RSS (os.wait4's rusage: only
    that process, not ours, and not the page cache)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen so
    return Run(seconds, usage.ru_maxrss / 1024, proc.returncode, log, os.getloadavg()[0])


def lmeval_command(model: Path, task_name: str, tasks_dir: Path, shots: int, limit: int, out: Path,
                   batch_size: int = 8) -> list[str]:
    return [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model},dtype=float32", "--tasks", task_name,
            "--include_path", str(tasks_dir), "--batch_size", str(batch_size), "--num_fewshot", str(shots),
            "--limit", str(limit), "--log_samples", "--output_path", str(out), "--device", "cpu"]


def metric_name(metric: str, filter_key: str) -> str:
    """One name per per-item value across both tools: "acc", "acc_norm", and for GSM8K the filter
    ("strict-match", "flexible-extract"), exact match being the only metric there."""
    if filter_key in ("", "none"):
        return metric
    return filter_key if metric == "exact_match" else f"{metric},{filter_key}"


def read_lmeval_samples(out: Path) -> dict[int, dict]:
    """doc_id -> {"metrics": {name: value}, "lls": [per-choice loglik], "text": generated text}."""
    found = sorted(out.rglob("samples_*.jsonl"))
    if not found:
        raise RuntimeError(f"lm-eval wrote no samples file under {out}")
    docs: dict[int, dict] = {}
    for line in found[-1].read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        doc = docs.setdefault(int(s["doc_id"]), {"metrics": {}, "lls": [], "text": None})
        for m in s["metrics"]:
            doc["metrics"][metric_name(m, s.get("filter", "none"))] = float(s[m])
        if s.get("filter", "none") == "none":
            doc["lls"] = numbers(s["filtered_resps"])
        if doc["text"] is None:
            doc["text"] = first_text(s["resps"])
    return docs


def numbers(nested) -> list[float]:
    """The floats in a nested list, in order; lm-eval writes them as strings ("-3.2", "False")."""
    out = []
    stack = [nested]
    while stack:
        x = stack.pop(0)
        if isinstance(x, (list, tuple)):
            stack[0:0] = list(x)
        elif isinstance(x, bool) or x in ("True", "False"):
            continue
        elif isinstance(x, (int, float)):
            out.append(float(x))
        elif isinstance(x, str):
            try:
                out.append(float(x))
            except ValueError:
                pass
    return out


def first_text(nested) -> str | None:
    while isinstance(nested, (list, tuple)) and nested:
        nested = nested[0]
    return nested if isinstance(nested, str) else None

"""The lmeval probe kind gives lm-eval's own per-item results: the same model object run through
lm-eval's HFLM and evaluator (with --log_samples) scores every document the same."""

import json
import sys
from pathlib import Path

import pytest
from tiny_models import make_donor, save_char_tokenizer

from surgeon.errors import SurgeonError
from surgeon.probes import ProbeSpec
from surgeon.probes import lmeval as probe  # imports lm_eval only when a task loads
from surgeon.probes.data import Item, subset

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = Path(__file__).parent / "data" / "lmeval_tasks"
ARC, GSM = TASKS / "arc_tiny.yaml", TASKS / "gsm_tiny.yaml"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny llama with room for k-shot prompts of a character tokenizer (one token a character)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("lmeval-model")
    save_char_tokenizer(make_donor(path, "llama", seed=1, max_position_embeddings=1024))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def spec(data, **kw):
    return ProbeSpec("lmeval", str(data), **kw)


def run_probe(lm, s, batch_size=4):
    model, tok = lm
    task = probe.load_task(s)
    return task, probe.run(model, tok, s, task, [], "", batch_size=batch_size)


def absolute_copy(yaml_path: Path, tmp_path: Path, data_dir: Path | None = None) -> Path:
    """The task YAML as lm-eval itself needs it: data files by absolute path (it reads relative
    ones from the working directory)."""
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str((data_dir or yaml_path.parent) / v) for k, v in files.items()}
    out = tmp_path / "ref" / yaml_path.name
    out.parent.mkdir(exist_ok=True)
    out.write_text(yaml.safe_dump(cfg))
    return out


def lm_eval_samples(lm, yaml_path, tmp_path, *, data_dir=None, **kwargs) -> dict:
    """lm-eval's own run: HFLM on the same model object, simple_evaluate with log_samples.
    Returns {(doc_id, filter): logged sample}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = lm
    ref = absolute_copy(yaml_path, tmp_path, data_dir)
    name = ref.stem
    if "samples" in kwargs:
        kwargs["samples"] = {name: kwargs["samples"]}
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=[name],
                              task_manager=TaskManager(include_path=str(ref.parent), include_defaults=False),
                              log_samples=True, bootstrap_iters=0, **kwargs)
    return {(s["doc_id"], s["filter"]): s for s in results["samples"][name]}


def assert_same_as_lm_eval(ours, theirs, metrics):
    """Per document: the same prompts, responses within float noise, the same metric values."""
    assert {doc_id for doc_id, _ in theirs} == {s["doc_id"] for s in ours.samples}
    assert ours.ids == [str(s["doc_id"]) for s in ours.samples]
    for sample in ours.samples:
        for (doc_id, filt), ref in theirs.items():
            if doc_id != sample["doc_id"]:
                continue
            assert sample["arguments"] == [list(a) if isinstance(a, tuple) else a for a in
                                           json.loads(json.dumps(ref["arguments"]))]
            for mine, want in zip(sample["resps"], ref["resps"]):
                for m, w in zip(mine, want):
                    if isinstance(w, (list, tuple)):  # (loglikelihood, is_greedy)
                        assert m[0] == pytest.approx(w[0], abs=1e-4) and m[1] == w[1]
                    else:
                        assert m == w
            for metric in metrics:
                name = metric if filt == "none" else f"{metric},{filt}"
                assert sample[name] == ref[metric], (doc_id, name)
                pos = ours.ids.index(str(doc_id))
                values = ours.outcomes if name == ours.metric else ours.extra[name]
                assert values[pos] == float(ref[metric])


def test_multiple_choice_k_shot_equals_lm_evals_own_run_item_for_item(lm, tmp_path):
    task, out = run_probe(lm, spec(ARC))  # the YAML's num_fewshot: 2
    assert len(task) == 6 and out.metric == "acc" and set(out.extra) == {"acc_norm"}
    assert all("\n\nQuestion: " in s["arguments"][0][0] for s in out.samples)  # two exemplars each
    assert_same_as_lm_eval(out, lm_eval_samples(lm, ARC, tmp_path), ["acc", "acc_norm"])

    # The donors of a hybrid are measured with the same task object: the same exemplars again.
    again = probe.run(*lm, spec(ARC), task, [], "", batch_size=2)
    assert [s["arguments"] for s in again.samples] == [s["arguments"] for s in out.samples]
    assert again.outcomes == out.outcomes and again.extra == out.extra


def test_shots_and_first_mean_lm_evals_num_fewshot_and_limit(lm, tmp_path):
    _, out = run_probe(lm, spec(ARC, shots=0, first=4))
    assert out.ids == ["0", "1", "2", "3"]
    assert all(s["arguments"][0][0].startswith("Question: ") and "\n\n" not in s["arguments"][0][0]
               for s in out.samples)
    assert_same_as_lm_eval(out, lm_eval_samples(lm, ARC, tmp_path, num_fewshot=0, limit=4), ["acc", "acc_norm"])


def test_limit_is_our_seeded_subset_and_equals_lm_evals_samples(lm, tmp_path):
    s = spec(ARC, limit=3, seed=5, shots=1)
    task, out = run_probe(lm, s)
    chosen = [int(it.id) for it in subset([Item(str(i)) for i in range(6)], 3, 5)]
    assert task.indices == chosen and out.ids == [str(i) for i in chosen]
    theirs = lm_eval_samples(lm, ARC, tmp_path, num_fewshot=1, samples=chosen)
    assert_same_as_lm_eval(out, theirs, ["acc", "acc_norm"])


def test_generation_with_filters_equals_lm_eval_and_scores_a_right_answer(lm, tmp_path):
    _, first = run_probe(lm, spec(GSM))
    assert first.metric == "exact_match,strict-match" and set(first.extra) == {"exact_match,flexible-extract"}
    assert first.outputs == [s["resps"][0][0] for s in first.samples]
    # Make some gold answers what the model says, so exact match is 1 somewhere: the test
    # documents are not exemplars (those come from the train file), so the prompts stay the same.
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm_tiny_train.jsonl").write_text((TASKS / "gsm_tiny_train.jsonl").read_text())
    rows = [json.loads(line) for line in (TASKS / "gsm_tiny_test.jsonl").read_text().splitlines()]
    for row, sample in zip(rows, first.samples):
        said = sample["filtered_resps"]["flexible-extract"][0]
        if sample["doc_id"] % 2 == 0 and said != "[invalid]":
            row["answer"] = f"so\n#### {said}"
    (data / "gsm_tiny_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = data / "gsm_tiny.yaml"
    local.write_text(GSM.read_text())  # relative data files, read from the YAML's folder
    _, out = run_probe(lm, spec(local))
    assert out.outputs == first.outputs
    assert_same_as_lm_eval(out, lm_eval_samples(lm, local, tmp_path), ["exact_match"])
    assert any(v == 1.0 for v in out.extra["exact_match,flexible-extract"])


def test_metric_for_reads_lm_eval_metric_names():
    assert probe.metric_for("acc").proportion and probe.metric_for("acc_norm").proportion
    m = probe.metric_for("exact_match,strict-match")
    assert m.name == "exact_match,strict-match" and m.proportion and m.higher_is_better
    assert not probe.metric_for("word_perplexity").higher_is_better
    assert not probe.metric_for("f1").proportion


def one_line_error(s) -> str:
    with pytest.raises(SurgeonError) as e:
        probe.load_task(s)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line_naming_what_to_fix(tmp_path):
    for data in TASKS.glob("*.jsonl"):  # the variants below sit in tmp_path, beside their data
        (tmp_path / data.name).write_text(data.read_text())
    assert "no such task YAML" in one_line_error(spec(tmp_path / "missing.yaml"))
    hub = tmp_path / "hub.yaml"
    hub.write_text(ARC.read_text().replace("dataset_path: json", "dataset_path: someone/not_here")
                   .replace("task: arc_tiny", "task: hub_task"))
    msg = one_line_error(spec(hub))
    assert "hub_task" in msg and "someone/not_here" in msg and "dataset_path: json" in msg
    gone = tmp_path / "gone.yaml"
    gone.write_text(ARC.read_text().replace("arc_tiny_test.jsonl", "nowhere.jsonl"))
    assert str(tmp_path / "nowhere.jsonl") in one_line_error(spec(gone))  # looked for beside the YAML
    sampled = tmp_path / "sampled.yaml"
    sampled.write_text(GSM.read_text().replace("do_sample: false", "do_sample: true")
                       .replace("temperature: 0.0", "temperature: 0.7"))
    assert "greedy" in one_line_error(spec(sampled))
    assert "first= and limit=" in one_line_error(spec(ARC, first=2, limit=2))
    assert "does not apply" in one_line_error(spec(ARC, max_new_tokens=5))
    assert "shots" in one_line_error(spec(ARC, shots=9))  # 4 exemplars in the train file


@pytest.mark.slow
def test_registry_names_unknown_task_and_dataset_not_on_disk():
    assert "not an lm-eval task" in one_line_error(spec("no_such_task_xyz"))
    msg = one_line_error(spec("arc_easy"))  # registered, but its dataset is on the hub
    assert "arc_easy" in msg and "allenai/ai2_arc" in msg and "data_files" in msg


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    assert "pip install 'moe-surgeon[lmeval]'" in one_line_error(spec(ARC))

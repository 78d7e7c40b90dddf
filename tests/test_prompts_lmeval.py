"""The prompts we build are lm-evaluation-harness's: literal expected strings for ARC, BoolQ and GSM8K
(0-shot and k-shot, both exemplar orders), and, where lm_eval is installed, the very strings its own
tasks build from the same files (configs in tests/data/lmeval/, copied from lm-eval 0.4.13)."""

import json
import os
from pathlib import Path

import pytest

from surgeon.errors import SurgeonError
from surgeon.probes import parse_probe
from surgeon.probes.prompts import answer_sep, max_new_tokens, stop_sequences
from surgeon.probes.run import load_probe_data

DATA = Path(__file__).parent / "data"
ARC, ARC_TRAIN = DATA / "arc.jsonl", DATA / "arc_train.jsonl"
BOOLQ, BOOLQ_TRAIN = DATA / "boolq.jsonl", DATA / "boolq_train.jsonl"
GSM8K, GSM8K_TRAIN = DATA / "gsm8k.jsonl", DATA / "gsm8k_train.jsonl"

ARC_Q1 = "Question: Which gas do plants take in from the air to make food?\nAnswer:"
ARC_Q2 = "Question: What causes day and night on Earth?\nAnswer:"
ARC_Q3 = "Question: Which state of matter has a fixed shape?\nAnswer:"
SUN = "The Sun is the star at the centre of the Solar System.\nQuestion: is the sun a star?\nAnswer:"
WHALE = "Whales are large marine mammals that breathe air.\nQuestion: is a whale a fish?\nAnswer:"
MUFFINS = ("Question: A baker makes 24 muffins and sells half of them in the morning. How many muffins are left?"
           "\nAnswer:")
PENCILS = "Question: A school buys 30 boxes of pencils with 40 pencils in each box. How many pencils does it buy?\nAnswer:"
TOM = "Question: Tom has $5 and spends $7. How much money does he owe?\nAnswer:"
TOM_SOLVED = TOM + " He is short 7 - 5 = <<7-5=2>>2 dollars, so he owes 2.\n#### 2\n\n"


def contexts(text: str) -> list[str]:
    return load_probe_data(parse_probe(text)).contexts()


# ---------------------------------------------------------------- literal prompts
def test_arc_zero_shot_prompts_and_continuations():
    data = load_probe_data(parse_probe(f"mc:{ARC},first=2"))
    assert data.contexts() == [ARC_Q1, ARC_Q2]
    assert [answer_sep(data.template) + c for c in data.items[0].choices] == \
        [" oxygen", " carbon dioxide", " nitrogen", " helium"]


def test_boolq_prompt_has_the_passage_first_and_a_question_mark():
    assert contexts(f"mc:{BOOLQ}") == [SUN, WHALE]


def test_gsm8k_zero_shot_prompt_and_generation_defaults():
    data = load_probe_data(parse_probe(f"em:{GSM8K},first=1"))
    assert data.contexts() == [MUFFINS]
    assert stop_sequences(data.template) == ("Question:", "</s>", "<|im_end|>")  # lm-eval's gsm8k until
    assert max_new_tokens(data.template) == 256  # lm-eval's max_gen_toks


def test_k_shot_from_the_evaluated_file_in_lmeval_order():
    # Random(1234).sample(pool, k + 1) for each item in turn, the item itself removed.
    assert contexts(f"mc:{ARC},shots=2,first=1") == [
        ARC_Q2 + " Earth's rotation\n\n" + ARC_Q3 + " solid\n\n" + ARC_Q1]
    assert contexts(f"mc:{BOOLQ},shots=1") == [WHALE + " no\n\n" + SUN, SUN + " yes\n\n" + WHALE]


def test_k_shot_from_a_fewshot_file_in_lmeval_order():
    assert contexts(f"mc:{ARC},shots=1,fewshot={ARC_TRAIN},first=2") == [
        "Question: Ice melting is an example of a change in what?\nAnswer: state\n\n" + ARC_Q1,
        "Question: Which tool measures temperature?\nAnswer: thermometer\n\n" + ARC_Q2]
    assert contexts(f"em:{GSM8K},shots=1,fewshot={GSM8K_TRAIN},first=2") == [
        "Question: A shirt costs $1,500 cents. How many dollars is that?\n"
        "Answer: That is 1500 / 100 = <<1500/100=15>>15 dollars.\n#### 15\n\n" + MUFFINS,
        "Question: Ann has 3 apples and buys 4 more. How many apples does she have?\n"
        "Answer: She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7\n\n" + PENCILS]


def test_fixed_order_gives_every_item_the_same_exemplars():
    assert contexts(f"em:{GSM8K},shots=1,fewshot_order=fixed,first=2") == [TOM_SOLVED + MUFFINS, TOM_SOLVED + PENCILS]
    fixed = contexts(f"mc:{ARC},shots=1,fewshot={ARC_TRAIN},fewshot_order=fixed,first=2")
    assert fixed == ["Question: Ice melting is an example of a change in what?\nAnswer: state\n\n" + q
                     for q in (ARC_Q1, ARC_Q2)]


def test_until_and_max_new_tokens_options():
    spec = parse_probe(f"em:{GSM8K},until=\\n\\n|Question:,max_new_tokens=32")
    data = load_probe_data(spec)
    assert stop_sequences(data.template, spec.until) == ("\n\n", "Question:")
    assert max_new_tokens(data.template, spec.max_new_tokens) == 32
    qa = load_probe_data(parse_probe(f"em:{DATA / 'custom_qa.jsonl'},question=q,answer=a"))
    assert stop_sequences(qa.template) == ("\n\n", "Question:") and max_new_tokens(qa.template) == 256
    raw = load_probe_data(parse_probe("em:arith,limit=2"))
    assert stop_sequences(raw.template) == ("\n",) and max_new_tokens(raw.template) == 16


@pytest.mark.parametrize("probe, needle", [
    (f"mc:{BOOLQ},shots=2", r"boolq\.jsonl: shots=2 needs 3 items .* the file has 2"),
    (f"mc:{BOOLQ},shots=5,fewshot={BOOLQ_TRAIN}", r"boolq_train\.jsonl: shots=5 needs 5 exemplars; the few-shot file has 4"),
    (f"mc:{ARC},shots=1,fewshot_order=fixed", r"arc\.jsonl: shots=1 with fewshot_order=fixed needs 1 items .* 0 left"),
])
def test_shots_that_cannot_be_honoured_are_an_error_not_zero_shot(probe, needle):
    with pytest.raises(SurgeonError, match=needle):
        load_probe_data(parse_probe(probe))


# ---------------------------------------------------------------- lm-eval's own builds
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (our probe, lm-eval config, shots, few-shot file or None (then: the evaluated file), first N or None)
CASES = [
    ("mc", "arc_challenge", ARC, 0, None, None),
    ("mc", "arc_challenge", ARC, 2, None, None),
    ("mc", "arc_challenge", ARC, 2, ARC_TRAIN, None),
    ("mc", "arc_challenge", ARC, 1, None, 2),
    ("mc", "boolq", BOOLQ, 0, None, None),
    ("mc", "boolq", BOOLQ, 1, None, None),
    ("mc", "boolq", BOOLQ, 2, BOOLQ_TRAIN, None),
    ("em", "gsm8k", GSM8K, 0, None, None),
    ("em", "gsm8k", GSM8K, 2, None, None),
    ("em", "gsm8k", GSM8K, 3, GSM8K_TRAIN, 2),
    # A record repeated: every copy equal to the evaluated one is dropped, and lm-eval draws again
    # when too few are left.
    ("em", "gsm8k", DATA / "gsm8k_dups.jsonl", 2, None, None),
]


def _lmeval_rows(path: Path, config: str) -> list[dict]:
    """The file's records in lm-eval's field names (its BoolQ has an int "label", ours a bool "answer")."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if config == "boolq":
        rows = [{"passage": r["passage"], "question": r["question"], "label": int(r["answer"])} for r in rows]
    return rows


def _write_task(tmp: Path, n: int, config: str, test: Path, pool: Path | None) -> str:
    import yaml

    task = yaml.safe_load((DATA / "lmeval" / f"{config}.yaml").read_text())
    name = f"{task['task']}_{n}"
    files = {"test": tmp / f"{name}_test.jsonl"}
    if pool is not None:
        files["train"] = tmp / f"{name}_train.jsonl"
    for split, src in (("test", test), ("train", pool)):
        if split in files:
            files[split].write_text("".join(json.dumps(r) + "\n" for r in _lmeval_rows(src, config)))
    task.update(task=name, dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()}}, test_split="test")
    # Exemplars from the evaluated split: lm-eval then draws k + 1 and drops the evaluated document,
    # which it does only when the few-shot split is the test split.
    task["fewshot_split"] = "train" if pool is not None else "test"
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return name


@pytest.fixture(scope="module")
def lmeval_requests(tmp_path_factory):
    """lm-eval's requests per case: {case index: {doc index: [arguments, ...]}}, as simple_evaluate
    configures a task (num_fewshot, fewshot seed 1234) and builds its requests."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lmeval_tasks")
    names = [_write_task(tmp, n, config, test, pool) for n, (_, config, test, _, pool, _) in enumerate(CASES)]
    tasks = TaskManager(include_path=str(tmp), include_defaults=False).load(names)["tasks"]
    out = {}
    for n, (name, case) in enumerate(zip(names, CASES)):
        task = tasks[name]
        task.set_config(key="num_fewshot", value=case[3])
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=case[5], rank=0, world_size=1)
        per_doc: dict[int, list] = {}
        for inst in task.instances:
            per_doc.setdefault(inst.doc_id, []).append(inst.arguments)
        out[n] = per_doc
    return out


@pytest.mark.parametrize("n", range(len(CASES)),
                         ids=[f"{c[1]}-{c[3]}shot{'-fewshot' if c[4] else ''}{f'-first{c[5]}' if c[5] else ''}"
                              for c in CASES])
def test_our_requests_are_lmevals(lmeval_requests, n):
    kind, _, test, shots, pool, first = CASES[n]
    probe = f"{kind}:{test},shots={shots}" + (f",fewshot={pool}" if pool else "") + (f",first={first}" if first else "")
    spec = parse_probe(probe)
    data = load_probe_data(spec)
    theirs = lmeval_requests[n]
    assert sorted(theirs) == list(range(len(data.items)))
    for doc_id, (item, ctx) in enumerate(zip(data.items, data.contexts())):
        if kind == "mc":
            assert theirs[doc_id] == [(ctx, answer_sep(data.template) + c) for c in item.choices]
        else:
            ((their_ctx, kwargs),) = theirs[doc_id]
            assert their_ctx == ctx
            assert tuple(kwargs["until"]) == stop_sequences(data.template, spec.until)


def test_our_default_generation_length_is_lmevals():
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    default = HFLM.max_gen_toks.fget(None)  # a constant property in 0.4.13
    assert max_new_tokens(load_probe_data(parse_probe(f"em:{GSM8K}")).template) == default

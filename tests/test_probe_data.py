"""Probe files in their native formats become Items; bad files fail with file, line and field."""

import json
from pathlib import Path

import pytest

from surgeon.errors import SurgeonError
from surgeon.probes.data import (
    BOOLQ_CHOICES,
    Item,
    builtin_sets,
    load_items,
    load_text,
    read_probe_file,
    resolve_set,
    subset,
)

DATA = Path(__file__).parent / "data"


def write_jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---- each format


def test_gsm8k_gold_is_the_number_after_the_marks_without_commas():
    items = load_items(DATA / "gsm8k.jsonl", fmt="gsm8k")
    assert [it.answer for it in items] == ["12", "1200", "2"]
    assert [it.id for it in items] == ["1", "2", "4"]  # line numbers; the blank line 3 is skipped
    first = items[0]
    assert first.kind == "exact" and first.choices is None
    assert first.question.startswith("A baker makes 24 muffins")
    assert first.solution.endswith("#### 12")  # the worked answer, for k-shot exemplars


def test_arc_letter_and_digit_answer_keys_give_the_index_of_the_gold_choice():
    items = load_items(DATA / "arc.jsonl", fmt="arc")
    assert [it.id for it in items] == ["Mercury_7001", "Mercury_7002", "Mercury_7003"]
    assert [it.answer for it in items] == [1, 0, 2]
    assert items[0].choices == ("oxygen", "carbon dioxide", "nitrogen", "helium")
    assert items[1].choices[items[1].answer] == "Earth's rotation"
    assert all(it.kind == "mc" for it in items)


def test_arc_in_ai2_original_nesting():
    items = load_items(DATA / "arc_ai2.jsonl", fmt="arc")
    assert [it.question for it in items] == [
        "Which organ pumps blood through the body?", "Water boils at sea level at about which temperature?"]
    assert [it.choices[it.answer] for it in items] == ["heart", "100 degrees Celsius"]


def test_boolq_is_a_two_choice_item_with_the_passage_as_context():
    yes, no = load_items(DATA / "boolq.jsonl", fmt="boolq")
    assert BOOLQ_CHOICES == ("no", "yes")
    assert yes.choices == no.choices == BOOLQ_CHOICES
    assert (yes.answer, no.answer) == (1, 0)
    assert yes.context == "The Sun is the star at the centre of the Solar System."
    assert yes.question == "is the sun a star?"  # lm-eval's prompt asks "{question}?"
    assert yes.kind == "mc"


def test_demo_prompt_answer_is_exact_match():
    items = load_items(DATA / "demo.jsonl", fmt="demo")
    assert items == [Item("1", question="12+7=", answer="19"), Item("2", question="reverse abc:", answer="cba")]
    assert items[0].kind == "exact"


def test_demo_multiple_choice_files_use_the_arc_format():
    items = load_items(DATA / "demo_mc.jsonl")
    assert [(it.id, it.choices[it.answer]) for it in items] == [("mc1", "7"), ("mc2", "yx")]


def test_generic_jsonl_with_a_field_mapping():
    items = load_items(DATA / "custom_qa.jsonl", fmt="jsonl", fields={"question": "q", "answer": "a", "id": "n"})
    assert [(it.id, it.question, it.answer) for it in items] == [
        ("1", "Capital of France?", "Paris"), ("2", "Largest planet?", "Jupiter"), ("3", "Two plus two?", "4")]
    assert all(it.kind == "exact" for it in items)


def test_generic_jsonl_multiple_choice_by_index():
    a, b = load_items(DATA / "generic_mc.jsonl", fmt="jsonl")
    assert (a.id, a.choices, a.answer, a.context) == ("10", ("3", "4", "5"), 1, "Numbers:")
    assert (b.id, b.answer, b.context) == ("11", 2, "")


def test_a_mapping_renames_fields_of_a_native_format(tmp_path):
    p = write_jsonl(tmp_path / "boolq_renamed.jsonl",
                    {"q": "is ice cold", "passage": "Ice is frozen water.", "label": True})
    (item,) = load_items(p, fields={"question": "q", "answer": "label"})  # detected through the mapping
    assert (item.question, item.answer, item.choices) == ("is ice cold?", 1, BOOLQ_CHOICES)


def test_boolq_in_lmevals_shape_reads_with_answer_mapped_to_its_int_label(tmp_path):
    p = write_jsonl(tmp_path / "boolq_lmeval.jsonl",
                    {"question": "is ice cold", "passage": "Ice is frozen water.", "label": 1},
                    {"question": "is fire cold", "passage": "Fire is hot.", "label": 0})
    assert [it.answer for it in load_items(p, fields={"answer": "label"})] == [1, 0]
    bad = write_jsonl(tmp_path / "bad_label.jsonl", {"question": "q", "passage": "p", "label": 2})
    with pytest.raises(SurgeonError, match=r"bad_label\.jsonl:1: field 'label' is 2, expected true/false or 0/1"):
        load_items(bad, fmt="boolq", fields={"answer": "label"})


def test_read_probe_file_keeps_the_format_and_each_record():
    read = read_probe_file(DATA / "boolq.jsonl")
    assert read.fmt == "boolq" and read.items == load_items(DATA / "boolq.jsonl")
    assert [json.loads(d)["title"] for d in read.docs] == ["Sun", "Whale"]


# ---- detection


@pytest.mark.parametrize("name, fmt", [
    ("gsm8k", "gsm8k"), ("arc", "arc"), ("arc_ai2", "arc"), ("boolq", "boolq"), ("demo", "demo"),
    ("demo_mc", "arc"), ("generic_mc", "jsonl"), ("corpus", "text"),
])
def test_format_is_detected_from_the_fields(name, fmt):
    path = DATA / f"{name}.jsonl"
    assert load_items(path) == load_items(path, fmt=fmt)


def test_question_answer_without_marks_is_plain_exact_match(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", {"question": "Capital of Italy?", "answer": "Rome"})
    assert load_items(p) == [Item("1", question="Capital of Italy?", answer="Rome")]


def test_undetectable_fields_ask_for_a_format_or_mapping():
    with pytest.raises(SurgeonError, match=r"custom_qa\.jsonl: cannot tell the probe format from the fields a, n, q"):
        load_items(DATA / "custom_qa.jsonl")


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(SurgeonError, match=r"demo\.jsonl: unknown probe format 'mmlu'; known: gsm8k, arc"):
        load_items(DATA / "demo.jsonl", fmt="mmlu")


# ---- plain text


def test_text_file_splits_at_blank_lines():
    items = load_text(DATA / "corpus.txt")
    assert [it.id for it in items] == ["1", "2", "3"]
    assert items[0].text == "The first paragraph of a small corpus.\nIt spans two lines."
    assert items[2].text == "The third and last paragraph."
    assert all(it.kind == "text" and it.question == "" for it in items)


def test_text_jsonl():
    items = load_text(DATA / "corpus.jsonl")
    assert [it.text for it in items] == ["One document for perplexity.", "Another document, with a comma."]


def test_blank_text_file(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text("\n  \n\n")
    with pytest.raises(SurgeonError, match=r"blank\.txt: no text"):
        load_text(p)


def test_text_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SurgeonError, match=r"latin1\.txt: not UTF-8 text"):
        load_text(p)


def test_text_jsonl_without_a_text_field_names_it(tmp_path):
    p = write_jsonl(tmp_path / "docs.jsonl", {"text": "fine"}, {"body": "no text field"})
    with pytest.raises(SurgeonError, match=r"docs\.jsonl:2: field 'text' is missing"):
        load_text(p)


# ---- subsets


def test_subset_is_seeded_deterministic_and_keeps_file_order():
    items = [Item(str(i), question=f"q{i}", answer=str(i)) for i in range(2000)]
    a = subset(items, 500, seed=0)
    assert len(a) == 500 and len({it.id for it in a}) == 500
    assert a == subset(items, 500, seed=0)
    assert [int(it.id) for it in a] == sorted(int(it.id) for it in a)  # original order
    assert a != subset(items, 500, seed=1)
    # Spread over the whole file, not a prefix.
    assert min(int(it.id) for it in a) < 100 and max(int(it.id) for it in a) > 1900


def test_subset_does_not_depend_on_file_order_and_nests():
    items = [Item(f"x{i}", question="q", answer="a") for i in range(300)]
    ids = {it.id for it in subset(items, 50, seed=7)}
    assert {it.id for it in subset(items[::-1], 50, seed=7)} == ids
    assert {it.id for it in subset(items, 20, seed=7)} <= ids


def test_subset_pinned_choice():
    # The choice is part of what a session records: it must not change between versions.
    items = [Item(str(i)) for i in range(10)]
    assert [it.id for it in subset(items, 3, seed=0)] == ["4", "7", "9"]


def test_subset_larger_than_the_set_or_none_returns_all():
    items = load_items(DATA / "arc.jsonl")
    assert subset(items, 500, seed=3) == items
    assert subset(items, None, seed=3) == items
    assert subset(items, 3, seed=3) == items


def test_subset_limit_must_be_positive():
    with pytest.raises(SurgeonError, match="limit must be at least 1, got 0"):
        subset(load_items(DATA / "arc.jsonl"), 0, seed=0)


# ---- built-in sets


def test_builtin_sets_are_the_jsonl_files_of_a_folder(tmp_path):
    for name in ("b_set", "a_set"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (tmp_path / "notes.txt").write_text("not a probe set")
    assert builtin_sets(tmp_path) == {"a_set": tmp_path / "a_set.jsonl", "b_set": tmp_path / "b_set.jsonl"}
    assert builtin_sets(tmp_path / "missing") == {}


def test_builtin_sets_default_folder_is_inside_the_package():
    import surgeon
    for name, path in builtin_sets().items():
        assert path.parent == Path(surgeon.__file__).parent / "demo" / "probes"
        assert path.stem == name


def test_resolve_set_by_name_or_path(tmp_path):
    (tmp_path / "arith.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert resolve_set("arith", root=tmp_path) == tmp_path / "arith.jsonl"
    assert resolve_set(str(DATA / "demo.jsonl"), root=tmp_path) == DATA / "demo.jsonl"
    with pytest.raises(SurgeonError, match=r"nope: neither a probe file nor a built-in probe set \(arith\)"):
        resolve_set("nope", root=tmp_path)


# ---- bad input: one line naming the file, the line and the field


BAD = [
    ("gsm8k", [{"question": "q", "answer": "42"}], r"bad\.jsonl:1: field 'answer' has no '#### <number>' final answer"),
    ("gsm8k", [{"question": "q", "answer": "so 4 ####  "}], r"bad\.jsonl:1: field 'answer' has nothing after '####'"),
    ("gsm8k", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}], r"bad\.jsonl:2: field 'question' is missing"),
    ("gsm8k", [{"question": 7, "answer": "#### 2"}], r"bad\.jsonl:1: field 'question' is 7, expected str"),
    ("arc", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}],
     r"bad\.jsonl:1: field 'answerKey' is 'E', not among the labels A, B"),
    ("arc", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "A"}],
     r"bad\.jsonl:1: field 'answerKey' is 'A', not among the labels 1, 2"),
    ("arc", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}],
     r"bad\.jsonl:1: field 'choices' needs equally long, non-empty 'text' and 'label' lists"),
    ("arc", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}], r"bad\.jsonl:1: field 'answerKey' is missing"),
    ("arc", [{"question": "q", "answerKey": "A"}], r"bad\.jsonl:1: field 'choices' is missing"),
    ("arc", [{"question": {"stem": "q"}, "answerKey": "A"}],
     r"bad\.jsonl:1: field 'question' is a dict without a 'stem' string and a 'choices' list"),
    ("boolq", [{"question": "q", "passage": "p", "answer": "yes"}],
     r"bad\.jsonl:1: field 'answer' is \"yes\", expected bool or int"),
    ("boolq", [{"question": "q", "answer": True}], r"bad\.jsonl:1: field 'passage' is missing"),
    ("demo", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}], r"bad\.jsonl:2: field 'answer' is missing"),
    ("demo", [{"answer": "2"}], r"bad\.jsonl:1: field 'prompt' is missing"),
    ("jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}], r"bad\.jsonl:1: field 'answer' is 2, not an index into 2 choices"),
    ("jsonl", [{"question": "q", "choices": ["a", "b"], "answer": True}], r"bad\.jsonl:1: field 'answer' is true, expected int"),
    ("jsonl", [{"question": "q", "choices": [], "answer": 0}], r"bad\.jsonl:1: field 'choices' must be a non-empty list of strings"),
    ("jsonl", [{"question": "q", "answer": "a", "id": "x"}, {"question": "r", "answer": "b", "id": "x"}],
     r"bad\.jsonl:2: id 'x' repeats line 1"),
    (None, ['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "2+2=", "answer": "4"'], r"bad\.jsonl:2: not JSON \("),
    (None, ['["a", "list"]'], r"bad\.jsonl:1: expected a JSON object, got list"),
    (None, ["", "  "], r"bad\.jsonl: no items"),
]


@pytest.mark.parametrize("fmt, records, match", BAD)
def test_bad_input_names_file_line_and_field(tmp_path, fmt, records, match):
    p = write_jsonl(tmp_path / "bad.jsonl", *records)
    with pytest.raises(SurgeonError, match=match) as e:
        load_items(p, fmt=fmt)
    assert "\n" not in str(e.value)
    assert str(p) in str(e.value)


def test_a_mapped_field_is_named_as_the_file_names_it():
    with pytest.raises(SurgeonError, match=r"custom_qa\.jsonl:1: field 'question_text' is missing"):
        load_items(DATA / "custom_qa.jsonl", fmt="jsonl", fields={"question": "question_text", "answer": "a"})


def test_missing_file(tmp_path):
    with pytest.raises(SurgeonError, match=r"nothere\.jsonl: no such probe file"):
        load_items(tmp_path / "nothere.jsonl")
    with pytest.raises(SurgeonError, match=r"nothere\.txt: no such text file"):
        load_text(tmp_path / "nothere.txt")
    with pytest.raises(SurgeonError, match="not a regular file"):
        load_items(tmp_path)  # a directory is not a probe file


def test_jsonl_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"prompt": "caf\xe9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(SurgeonError, match=r"latin1\.jsonl: not UTF-8 text"):
        load_items(p)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes('{"prompt": "1+1=", "answer": "2"}\n'.encode("utf-8-sig"))
    assert load_items(p) == [Item("1", question="1+1=", answer="2")]

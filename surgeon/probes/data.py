"""Probe data: local files in their native formats, read into one Item type.

Formats (`fmt`), detected from the first record's fields when not given:
  gsm8k  {"question", "answer": "... #### 42"}            exact match, gold "42" (commas dropped)
  arc    {"id"?, "question", "choices": {"text", "label"}, "answerKey"}   multiple choice
         (AI2's original nesting, "question": {"stem", "choices": [{"text", "label"}]}, works too)
  boolq  {"question", "passage", "answer": true/false}     multiple choice over ("no", "yes"); the
         question gets lm-eval's "?" (its prompt is "{passage}\nQuestion: {question}?\nAnswer:")
  demo   {"prompt", "answer"}                             exact match (the built-in sets)
  text   {"text"}                                         plain text, for perplexity
  jsonl  any jsonl whose fields are Item's: question, answer, choices (then answer is an index),
         context, solution, id
`fields` maps a format's field name to the file's, e.g. {"question": "q", "answer": "a"}.
The readers keep what lm-evaluation-harness's arc_challenge, boolq and gsm8k tasks read, so the
prompts built from these items are that harness's (see prompts.py).

Choices are stored without a leading space: the multiple-choice probe joins prompt and choice
with one space, as lm-evaluation-harness's target_delimiter does. Item ids are the record's "id"
where it has one, else its line number, so per-item outcomes stay keyed across subsets.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.fs import read_bounded
from surgeon.io.yaml_file import excerpt

PROBES_ROOT = Path(__file__).parent.parent / "demo" / "probes"
BOOLQ_CHOICES = ("no", "yes")
# GSM8K's and ARC's test sets are about a megabyte, a perplexity corpus some hundreds; a probe file
# is held in memory whole, so far past that is a mistake (/dev/zero, a checkpoint) to refuse.
MAX_PROBE_BYTES = 2**30
PROBE_BYTES_ENV = "MOE_SURGEON_MAX_PROBE_BYTES"


def _read_probe_bytes(path: Path) -> bytes:
    """A probe file's bytes: only a regular file (a FIFO would block, a device never ends) under the cap."""
    return read_bounded(path, "probe", MAX_PROBE_BYTES, PROBE_BYTES_ENV)


@dataclass(frozen=True)
class Item:
    """One probe item; which fields are set says which probe can score it (see `kind`).

    multiple choice: question (+ context), choices, answer = index of the gold choice.
    exact match: question (+ context), answer = the gold string; solution = a worked answer
    for k-shot exemplars (GSM8K). perplexity: text.
    """

    id: str
    question: str = ""
    answer: str | int | None = None
    choices: tuple[str, ...] | None = None
    context: str = ""
    solution: str = ""
    text: str = ""

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "mc"
        return "text" if self.answer is None else "exact"


class _Record:
    """One jsonl line: fields looked up by the format's names, errors naming the file's names."""

    def __init__(self, path: Path, line: int, data: dict, fields: dict[str, str]):
        self.path, self.line, self.data, self.fields = path, line, data, fields

    def error(self, name: str, problem: str) -> SurgeonError:
        return SurgeonError(f"{self.path}:{self.line}: field {self.fields.get(name, name)!r} {problem}")

    def has(self, name: str) -> bool:
        return self.fields.get(name, name) in self.data

    def get(self, name: str, kind: type | tuple[type, ...] = str, default=None):
        if not self.has(name):
            return default
        value = self.data[self.fields.get(name, name)]
        # bool is an int in Python; a true/false where a number or string belongs is a mistake.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            expected = " or ".join(t.__name__ for t in _types(kind))
            raise self.error(name, f"is {json.dumps(value)[:40]}, expected {expected}")
        return value

    def need(self, name: str, kind: type | tuple[type, ...] = str):
        if not self.has(name):
            raise self.error(name, "is missing")
        return self.get(name, kind)

    def id(self) -> str:
        return str(self.get("id", (str, int), self.line))


def _types(kind) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _gsm8k(r: _Record) -> Item:
    solution = r.need("answer")
    if "####" not in solution:
        raise r.error("answer", "has no '#### <number>' final answer")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise r.error("answer", "has nothing after '####'")
    return Item(r.id(), question=r.need("question"), answer=gold, solution=solution)


def _arc(r: _Record) -> Item:
    question = r.need("question", (str, dict))
    if isinstance(question, dict):  # AI2's original files nest the stem and choices
        stem, listed = question.get("stem"), question.get("choices")
        if not isinstance(stem, str) or not isinstance(listed, list):
            raise r.error("question", "is a dict without a 'stem' string and a 'choices' list")
        texts = [c.get("text") if isinstance(c, dict) else None for c in listed]
        labels = [c.get("label") if isinstance(c, dict) else None for c in listed]
    else:
        stem, choices = question, r.need("choices", dict)
        texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
        raise r.error("choices", "needs equally long, non-empty 'text' and 'label' lists")
    if not all(isinstance(t, str) for t in texts):
        raise r.error("choices", "has a choice text that is not a string")
    labels = [str(label) for label in labels]
    key = str(r.need("answerKey", (str, int)))
    if key not in labels:
        raise r.error("answerKey", f"is {excerpt(repr(key), 40)}, not among the labels {excerpt(', '.join(labels), 80)}")
    return Item(r.id(), question=stem, answer=labels.index(key), choices=tuple(texts))


def _boolq(r: _Record) -> Item:
    gold = r.need("answer", (bool, int))  # true/false, or lm-eval's 0/1 "label" mapped as answer=label
    if gold not in (0, 1):
        raise r.error("answer", f"is {gold}, expected true/false or 0/1")
    return Item(r.id(), question=r.need("question") + "?", answer=int(gold), choices=BOOLQ_CHOICES,
                context=r.need("passage"))


def _jsonl(r: _Record) -> Item:
    question, choices = r.need("question"), r.get("choices", list)
    if choices is None:
        answer = str(r.need("answer", (str, int)))
    else:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise r.error("choices", "must be a non-empty list of strings")
        answer = r.need("answer", int)
        if not 0 <= answer < len(choices):
            raise r.error("answer", f"is {answer}, not an index into {len(choices)} choices")
        choices = tuple(choices)
    return Item(r.id(), question=question, answer=answer, choices=choices,
                context=r.get("context", default=""), solution=r.get("solution", default=""))


def _text(r: _Record) -> Item:
    return Item(r.id(), text=r.need("text"))


PARSERS = {"gsm8k": _gsm8k, "arc": _arc, "boolq": _boolq, "demo": _jsonl, "text": _text, "jsonl": _jsonl}
# Named formats that are the generic reader with other field names.
_DEFAULT_FIELDS = {"demo": {"question": "prompt"}}


def _detect(path: Path, data: dict, fields: dict[str, str]) -> str:
    # The names the first record offers, seen through the user's mapping.
    names = set(data) | {want for want, have in fields.items() if have in data}
    answer = data.get(fields.get("answer", "answer"))
    if "answerKey" in names:
        return "arc"
    # lm-eval's BoolQ has a 0/1 "label" where the native file has true/false (mapped as answer=label)
    if "passage" in names and (isinstance(answer, bool) or (answer in (0, 1) and "choices" not in names)):
        return "boolq"
    if "question" in names and isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    if "prompt" in names and "question" not in names:
        return "demo"
    if "question" in names:
        return "jsonl"
    if "text" in names:
        return "text"
    raise SurgeonError(
        f"{path}: cannot tell the probe format from the fields {excerpt(', '.join(sorted(data))) or '(none)'}; "
        f"name one ({', '.join(PARSERS)}) or map the fields, e.g. question=q,answer=a"
    )


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    raw = _read_probe_bytes(path)
    records = []
    try:
        # Lines as a text file gives them (\n, \r\n, \r), not str.splitlines, which also cuts at
        # U+2028 and the like inside a JSON string.
        with io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SurgeonError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(data, dict):
                    raise SurgeonError(f"{path}:{n}: expected a JSON object, got {type(data).__name__}")
                records.append((n, data))
    except UnicodeDecodeError:
        raise SurgeonError(f"{path}: not UTF-8 text") from None
    if not records:
        raise SurgeonError(f"{path}: no items")
    return records


@dataclass(frozen=True)
class ProbeFile:
    """A probe file read: its format, its items in file order, and per item its record as canonical
    JSON (lm-eval tells a few-shot exemplar from the evaluated document by comparing whole records)."""

    fmt: str
    items: list[Item]
    docs: list[str]


def read_probe_file(path, fmt: str | None = None, fields=None) -> ProbeFile:
    """Every item of a jsonl probe file, in file order, with the format it was read in.
    `fields`: a dict or (format's name, file's name) pairs."""
    path, fields = Path(path), dict(fields or {})
    records = _read_jsonl(path)
    fmt = fmt or _detect(path, records[0][1], fields)
    if fmt not in PARSERS:
        raise SurgeonError(f"{path}: unknown probe format {excerpt(repr(fmt), 60)}; known: {', '.join(PARSERS)}")
    fields = {**_DEFAULT_FIELDS.get(fmt, {}), **fields}
    items, lines = [], {}
    for n, data in records:
        item = PARSERS[fmt](_Record(path, n, data, fields))
        if item.id in lines:
            raise SurgeonError(f"{path}:{n}: id {excerpt(repr(item.id), 80)} repeats line {lines[item.id]}")
        lines[item.id] = n
        items.append(item)
    return ProbeFile(fmt, items, [json.dumps(data, sort_keys=True) for _, data in records])


def load_items(path, fmt: str | None = None, fields=None) -> list[Item]:
    """Every item of a jsonl probe file, in file order."""
    return read_probe_file(path, fmt, fields).items


def load_text(path) -> list[Item]:
    """Text items for perplexity: a jsonl with a "text" field, or UTF-8 text split at blank lines
    (ids are paragraph numbers) so that per-item losses can be bootstrapped."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_items(path, fmt="text")
    if not path.exists():
        raise SurgeonError(f"{path}: no such text file")
    raw = _read_probe_bytes(path)
    try:
        content = raw.decode("utf-8-sig")
        content = content.replace("\r\n", "\n").replace("\r", "\n")  # as read_text reads newlines
    except UnicodeDecodeError:
        raise SurgeonError(f"{path}: not UTF-8 text") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
    if not paragraphs:
        raise SurgeonError(f"{path}: no text")
    return [Item(str(i), text=p) for i, p in enumerate(paragraphs, 1)]


def subset(items: list[Item], limit: int | None, seed: int = 0) -> list[Item]:
    """`limit` items chosen by `seed`, in their original order; all items when limit is None or
    at least their number.

    Items are ranked by a hash of (seed, id) rather than by an RNG, so the choice never changes
    with numpy or Python versions, does not depend on file order, and a smaller limit picks a
    subset of a larger one with the same seed.
    """
    if limit is not None and limit < 1:
        raise SurgeonError(f"subset: limit must be at least 1, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    rank = {it.id: hashlib.sha256(f"{seed}:{it.id}".encode()).digest() for it in items}
    chosen = set(sorted(rank, key=rank.__getitem__)[:limit])
    return [it for it in items if it.id in chosen]


def builtin_sets(root: Path = PROBES_ROOT) -> dict[str, Path]:
    """The probe sets that ship with the package: file stem -> path."""
    return {p.stem: p for p in sorted(Path(root).glob("*.jsonl"))}


def resolve_set(name_or_path: str, root: Path = PROBES_ROOT) -> Path:
    """A built-in probe set's name, or a path to a probe file."""
    sets = builtin_sets(root)
    if name_or_path in sets:
        return sets[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():  # a directory, a FIFO, a device: named as what it is, never opened
        raise SurgeonError(f"{path}: not a regular file, so not a probe file (a device, a FIFO or a directory)")
    raise SurgeonError(
        f"{name_or_path}: neither a probe file nor a built-in probe set ({', '.join(sets) or 'none installed'})"
    )

"""Deterministic benchmark items for the lm-eval comparison, made from text that ships with Python.

No real benchmark data is reachable offline, so the items imitate ARC, BoolQ and GSM8K in their
native file formats: questions about the standard library's own docstrings (read with `ast`, never
imported: some stdlib modules act on import) and templated arithmetic word problems. What matters
for the comparison is that both tools read the same realistic prompts (short questions, long
passages, worked answers), not that the questions are famous.

Every choice comes from `random.Random(seed)` over a sorted source list, so a file is the same on
every run of the same Python. Files hold at least the requested number of items and runs take the
first N (lm-eval's --limit, our first=), so a small run reads a prefix of the full one.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SEED = 15  # the number: any fixed value would do
LETTERS = "ABCD"
# Modules with side effects or no prose worth asking about.
SKIP_MODULES = {"antigravity", "this", "__future__", "__hello__", "__phello__"}


@dataclass(frozen=True)
class Doc:
    module: str
    name: str  # "" for the module's own docstring
    text: str


def _clean(docstring: str) -> str:
    """Docstring prose as one line: doctest and indented code lines dropped, whitespace collapsed."""
    kept = [line for line in docstring.splitlines()
            if not line.lstrip().startswith((">>>", "...")) and not line.startswith("    ")]
    return re.sub(r"\s+", " ", " ".join(kept)).strip()


def _summary(text: str) -> str:
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return first.strip()


def stdlib_docs() -> list[Doc]:
    """Docstrings of the standard library's public modules and their public top-level names."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py"))
    docs = []
    for path in files:
        module = path.parent.name if path.name == "__init__.py" else path.stem
        if module.startswith("_") or module in SKIP_MODULES or "test" in module or "-" in module:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node, name in [(tree, "")] + [(n, n.name) for n in tree.body
                                           if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            if name.startswith("_"):
                continue
            text = _clean(ast.get_docstring(node) or "")
            if len(text.split()) >= 4:
                docs.append(Doc(module, name, text))
    return docs


# ---------------------------------------------------------------- ARC-style multiple choice
def _mc_record(rnd: random.Random, question: str, right: str, wrong: list[str], n: int) -> dict:
    choices = [right] + rnd.sample(wrong, 3)
    rnd.shuffle(choices)
    return {"id": f"bench-arc-{n:04d}", "question": question,
            "choices": {"text": choices, "label": list(LETTERS)}, "answerKey": LETTERS[choices.index(right)]}


def _arc_candidates(docs: list[Doc], rnd: random.Random):
    """Questions of three shapes, interleaved: which module, which function, a sum."""
    modules = sorted({d.module for d in docs})
    by_module: dict[str, list[Doc]] = {}
    for d in docs:
        if d.name:
            by_module.setdefault(d.module, []).append(d)
    module_docs = [d for d in docs if not d.name and len(_summary(d.text).split()) <= 25]
    function_docs = [d for d in docs if d.name and len(by_module[d.module]) >= 4
                     and len(_summary(d.text).split()) <= 25]
    rnd.shuffle(module_docs)
    rnd.shuffle(function_docs)
    for k in range(10**6):
        shape = k % 3
        if shape == 0 and module_docs:
            d = module_docs.pop()
            yield (f'Which Python standard library module is documented as "{_summary(d.text)}"?',
                   d.module, [m for m in modules if m != d.module])
        elif shape == 1 and function_docs:
            d = function_docs.pop()
            others = sorted({o.name for o in by_module[d.module] if o.name != d.name})
            if len(others) >= 3:
                yield (f'In the Python module {d.module}, which name is documented as "{_summary(d.text)}"?',
                       d.name, others)
        else:
            a, b = rnd.randint(11, 99), rnd.randint(11, 99)
            total = a + b
            wrong = sorted({total + delta for delta in (-10, -2, -1, 1, 2, 10)} - {total})
            yield f"What is {a} plus {b}?", str(total), [str(w) for w in wrong]


def arc_items(n: int, seed: int = SEED, docs: list[Doc] | None = None) -> list[dict]:
    rnd = random.Random(seed)
    seen, out = set(), []
    for question, right, wrong in _arc_candidates(docs or stdlib_docs(), rnd):
        if question in seen:
            continue
        seen.add(question)
        out.append(_mc_record(rnd, question, right, wrong, len(out)))
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} ARC-style items could be made, {n} asked")


# ---------------------------------------------------------------- BoolQ-style passages
def _passages(docs: list[Doc]) -> list[tuple[str, str]]:
    """(module, passage of 120-200 words): a module's docstrings joined until long enough."""
    by_module: dict[str, list[str]] = {}
    for d in docs:
        by_module.setdefault(d.module, []).append(d.text)
    out = []
    for module in sorted(by_module):
        words = " ".join(by_module[module]).split()
        # Several passages from a long module, each cut at a sentence end where one is near.
        for start in range(0, len(words) - 120, 200):
            chunk = words[start:start + 200]
            end = max((i for i, w in enumerate(chunk) if i >= 119 and w.endswith(".")), default=len(chunk) - 1)
            out.append((module, " ".join(chunk[:end + 1])))
    return out


def _content_words(text: str) -> list[str]:
    return sorted({w.lower() for w in re.findall(r"[A-Za-z]{7,}", text)})


def boolq_items(n: int, seed: int = SEED, docs: list[Doc] | None = None) -> list[dict]:
    rnd = random.Random(seed)
    passages = _passages(docs or stdlib_docs())
    rnd.shuffle(passages)
    modules = sorted({m for m, _ in passages})
    out = []
    for k in range(n):
        module, passage = passages[k % len(passages)]
        answer = rnd.random() < 0.5
        if k % 2 == 0:
            named = module if answer else rnd.choice([m for m in modules if m != module])
            question = f"is this text from the documentation of the python {named} module"
        else:
            mine = _content_words(passage)
            other = _content_words(passages[(k * 7 + 1) % len(passages)][1])
            absent = [w for w in other if w not in passage.lower()]
            if not absent:
                answer = True
            word = rnd.choice(mine) if answer else rnd.choice(absent)
            question = f"does the passage use the word {word}"
        out.append({"question": question, "passage": passage, "answer": answer})
    return out


# ---------------------------------------------------------------- GSM8K-style word problems
NAMES = ["Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]


def _gsm8k_problem(rnd: random.Random) -> tuple[str, list[str], int]:
    """(question, worked steps with GSM8K's <<calc>> notes, answer) from one of four templates."""
    who, thing = rnd.choice(NAMES), rnd.choice(THINGS)
    shape = rnd.randrange(4)
    if shape == 0:
        a, b, c = rnd.randint(5, 40), rnd.randint(2, 30), rnd.randint(1, 5)
        have = a + b
        left = have - c
        question = (f"{who} has {a} {thing}. {who} buys {b} more and then gives {c} to a friend. "
                    f"How many {thing} does {who} have now?")
        steps = [f"After buying, {who} has {a} + {b} = <<{a}+{b}={have}>>{have} {thing}.",
                 f"After giving some away, {who} has {have} - {c} = <<{have}-{c}={left}>>{left} {thing}."]
        return question, steps, left
    if shape == 1:
        boxes, per, price = rnd.randint(2, 9), rnd.randint(3, 12), rnd.randint(2, 6)
        count = boxes * per
        cost = count * price
        question = (f"{who} buys {boxes} boxes of {thing} with {per} {thing} in each box. Each one costs ${price}. "
                    f"How many dollars does {who} spend?")
        return question, [f"{who} buys {boxes} * {per} = <<{boxes}*{per}={count}>>{count} {thing}.",
                          f"They cost {count} * {price} = <<{count}*{price}={cost}>>{cost} dollars."], cost
    if shape == 2:
        friends, each = rnd.randint(2, 6), rnd.randint(3, 15)
        total = friends * each
        question = (f"{who} shares {total} {thing} equally among {friends} friends. "
                    f"How many {thing} does each friend get?")
        return question, [f"Each friend gets {total} / {friends} = <<{total}/{friends}={each}>>{each} {thing}."], each
    week, days, extra = rnd.randint(3, 20), rnd.randint(2, 7), rnd.randint(1, 30)
    made = week * days
    total = made + extra
    question = (f"{who} collects {week} {thing} every day for {days} days and then finds {extra} more. "
                f"How many {thing} does {who} have in total?")
    steps = [f"In {days} days {who} collects {week} * {days} = <<{week}*{days}={made}>>{made} {thing}.",
             f"With the ones found, that is {made} + {extra} = <<{made}+{extra}={total}>>{total} {thing}."]
    return question, steps, total


def gsm8k_items(n: int, seed: int = SEED) -> list[dict]:
    rnd = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        question, steps, answer = _gsm8k_problem(rnd)
        if question not in seen:
            seen.add(question)
            out.append({"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"})
    return out


# ---------------------------------------------------------------- files
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def as_lmeval_boolq(records: list[dict]) -> list[dict]:
    """lm-eval's boolq reads super_glue's fields: an int "label" (and "idx"), not a bool "answer"."""
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
            for i, r in enumerate(records)]


@dataclass(frozen=True)
class ItemFiles:
    native: Path  # what moe-surgeon's reader takes
    lmeval: Path  # the same items in lm-eval's field names
    fewshot_native: Path  # the exemplar pool (lm-eval: the training split)
    fewshot_lmeval: Path


def make_items(root: Path, counts: dict[str, int], fewshot: int = 100) -> dict[str, ItemFiles]:
    """Item and exemplar files for "arc", "boolq", "gsm8k" under root/items. Exemplars are drawn
    from the same generator after the evaluated items, so none is also a test item."""
    docs = stdlib_docs()
    made = {
        "arc": arc_items(counts["arc"] + fewshot, docs=docs),
        "boolq": boolq_items(counts["boolq"] + fewshot, docs=docs),
        "gsm8k": gsm8k_items(counts["gsm8k"] + fewshot),
    }
    files = {}
    for task, records in made.items():
        test, train = records[:counts[task]], records[counts[task]:]
        shaped = as_lmeval_boolq if task == "boolq" else (lambda r: r)
        native = write_jsonl(root / "items" / f"{task}.jsonl", test)
        pool = write_jsonl(root / "items" / f"{task}_fewshot.jsonl", train)
        same = task != "boolq"  # ARC and GSM8K files already have lm-eval's fields
        files[task] = ItemFiles(
            native, native if same else write_jsonl(root / "items" / "lmeval" / f"{task}.jsonl", shaped(test)),
            pool, pool if same else write_jsonl(root / "items" / "lmeval" / f"{task}_fewshot.jsonl", shaped(train)))
    return files

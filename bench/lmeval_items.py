"""Deterministic benchmark items for the lm-eval comparison, made from text that ships with Python.

No real benchmark data is reachable offline, so the items imitate ARC-Challenge, BoolQ and GSM8K in
their native file formats: cloze questions over the standard library's own docstrings (read with
`ast`, never imported: some stdlib modules act on import), yes/no questions over passages of them,
and templated multi-step arithmetic word problems. The questions need not be famous; what the
comparison needs is that the prompts have the real benchmarks' shapes, because the time either tool
takes depends on them: tokens per context, tokens per choice, choices per item, and how many
contexts share a passage. The targets below are the real sets' figures (issue 30), measured with
SmolLM2's tokenizer on lm-eval's own prompts; `python bench/lmeval_items.py --stats` measures the
generated items the same way and prints the two side by side.

Lengths are drawn in tokens and met with a tokenizer-free estimate (`approx_tokens`), so the files
do not depend on any model being installed. Every choice comes from `random.Random(seed)` over
sorted sources, so a file is the same on every run of the same Python. Files hold at least the
requested number of items and runs take the first N (lm-eval's --limit, our first=), so a small run
reads a prefix of the full one.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import json
import math
import random
import re
import statistics
import sys
import sysconfig
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from statistics import NormalDist

SEED = 15  # any fixed value would do
LETTERS = "ABCD"
# Modules with side effects or no prose worth asking about.
SKIP_MODULES = {"antigravity", "this", "__future__", "__hello__", "__phello__"}

# The real sets as (mean, median, p90, max), None where not measured: SmolLM2 tokens of lm-eval's
# prompts (issue 30). Context lengths are right-skewed, so they are drawn log-normally: a median and
# a spread (sigma) fitted to the mean and p90 below. ARC choices are about symmetric around their median.
REAL = {
    "arc": {"choices per item": (4, 4, 4, 4), "choice tokens": (5.9, 6, 10, None),
            "context tokens": (31, 26, 53, None)},
    "boolq": {"context tokens": (156, 140, 238, 784), "distinct passages": (296, None, None, None)},
    "gsm8k": {"prompt tokens": (65, None, None, None)},
}
ARC_CONTEXT = (26.0, 0.55)  # log-normal: median tokens, sigma
ARC_CHOICE = (5.8, 3.1)  # normal: mean tokens, standard deviation (at least one token)
BOOLQ_CONTEXT = (140.0, 0.40)  # log-normal: median tokens, sigma ...
BOOLQ_LONG = (1 / 150, 420, 800)  # ... and a long tail: this share of items drawn uniformly in this range


# ---------------------------------------------------------------- text
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


def _public(name: str) -> bool:
    return not name.startswith("_") and name not in SKIP_MODULES and "test" not in name and "-" not in name


def stdlib_docs() -> list[Doc]:
    """Docstrings of the standard library's public modules (the top level and one level into each
    package), their public top-level functions and classes, and those classes' public methods."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = sorted(p for p in root.iterdir() if _public(p.name) and (p / "__init__.py").is_file())
    files = [(p.stem, p) for p in sorted(root.glob("*.py"))]
    for package in packages:
        files += [(package.name if p.stem == "__init__" else f"{package.name}.{p.stem}", p)
                  for p in sorted(package.glob("*.py"))]
    docs = []
    for module, path in files:
        if not all(_public(part) for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [(tree, "")]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _public(node.name):
                nodes.append((node, node.name))
                if isinstance(node, ast.ClassDef):
                    nodes += [(m, f"{node.name}.{m.name}") for m in node.body
                              if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_")]
        for node, name in nodes:
            text = _clean(ast.get_docstring(node) or "")
            if len(text.split()) >= 4:
                docs.append(Doc(module, name, text))
    return docs


_PIECE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d|[^\sA-Za-z\d]")
# SmolLM2's BPE gives docstring text about this many tokens per piece counted by `_word_tokens`
# (measured over the corpus; within 10% on a 20-word span).
_PER_PIECE = 1.05


def _word_tokens(word: str) -> float:
    """A word's tokens without the tokenizer: a piece per lower-case run, capitalised word,
    acronym, digit or symbol, and a long run (past 8 letters) costs two."""
    pieces = _PIECE.findall(word)
    return sum(1 + (len(p) > 8) for p in pieces) / _PER_PIECE if pieces else 1.0


def approx_tokens(text: str) -> float:
    return sum(_word_tokens(w) for w in text.split())


@dataclass(frozen=True)
class Text:
    """Words with their running token estimate: cum[i] is the estimate of words[:i]."""
    module: str
    words: tuple[str, ...]
    cum: tuple[float, ...]

    @classmethod
    def of(cls, module: str, text: str) -> Text:
        words = tuple(text.split())
        return cls(module, words, tuple(accumulate((_word_tokens(w) for w in words), initial=0.0)))

    @property
    def tokens(self) -> float:
        return self.cum[-1]

    def end_after(self, start: int, tokens: float) -> int:
        """The end index whose span from `start` comes nearest `tokens`, at least one word."""
        want = self.cum[start] + tokens
        end = bisect.bisect_left(self.cum, want, lo=start + 1)
        if end > len(self.words) or (end > start + 1 and want - self.cum[end - 1] < self.cum[end] - want):
            end -= 1
        return max(start + 1, min(end, len(self.words)))

    def start_before(self, end: int, tokens: float) -> int:
        want = self.cum[end] - tokens
        start = bisect.bisect_right(self.cum, want, hi=end) - 1
        if start < 0:
            return 0
        if start < end - 1 and self.cum[start + 1] - want < want - self.cum[start]:
            start += 1
        return max(0, min(start, end - 1))

    def span(self, start: int, end: int) -> str:
        return " ".join(self.words[start:end])


class _Draws:
    """Uniform draws in (0, 1), stratified: each run of `block` draws has one in every 1/block of
    the range, in shuffled order. Every 50 items then follow the target distribution closely, where
    300 independent draws at ARC's spread would miss its median by 4% either way."""

    def __init__(self, rnd: random.Random, block: int = 50):
        self.rnd, self.block, self.queue = rnd, block, []

    def __call__(self) -> float:
        if not self.queue:
            self.queue = list(range(self.block))
            self.rnd.shuffle(self.queue)
        return (self.queue.pop() + self.rnd.random()) / self.block


def _lognormal(u: float, median: float, sigma: float) -> float:
    return median * math.exp(NormalDist(0.0, sigma).inv_cdf(u))


# ---------------------------------------------------------------- ARC-style multiple choice
ARC_PROMPT = "Question: {question}\nAnswer:"  # lm-eval's arc_challenge doc_to_text
ARC_QUESTION = 'What follows "{stem}"?'
_ARC_FRAME = approx_tokens(ARC_PROMPT.format(question=ARC_QUESTION.format(stem="")))


def _mc_record(rnd: random.Random, question: str, right: str, wrong: list[str], n: int) -> dict:
    choices = [right] + wrong
    rnd.shuffle(choices)
    return {"id": f"bench-arc-{n:04d}", "question": question,
            "choices": {"text": choices, "label": list(LETTERS)}, "answerKey": LETTERS[choices.index(right)]}


def _arc_item(rnd: random.Random, texts: list[Text], sizes: list[float], context: float,
              choice: float) -> tuple[str, str, list[str]] | None:
    """A cloze question of about `context` tokens in lm-eval's prompt: the quoted words of a
    docstring, and which words come next (about `choice` tokens). The wrong choices are spans of
    other docstrings of the same length. `texts` are sorted by size and `sizes` are their token
    estimates: the docstring is drawn among those long enough, since redrawing after a short one
    would favour short questions."""
    stem = max(2.0, context - _ARC_FRAME)
    long_enough = bisect.bisect_left(sizes, stem + choice)
    if long_enough == len(texts):
        return None
    text = texts[rnd.randrange(long_enough, len(texts))]
    # Where the answer may start: stem tokens before it and choice tokens after it.
    lo = bisect.bisect_left(text.cum, stem)
    hi = bisect.bisect_right(text.cum, text.tokens - choice) - 1
    if lo > hi:
        return None
    at = rnd.randint(lo, hi)
    start, end = text.start_before(at, stem), text.end_after(at, choice)
    right = text.span(at, end)
    size = text.cum[end] - text.cum[at]
    wrong: list[str] = []
    while len(wrong) < 3:
        other = rnd.choice(texts)
        if other is text or other.tokens < size:
            continue
        s = rnd.randint(0, bisect.bisect_right(other.cum, other.tokens - size) - 1)  # not cut short by the end
        candidate = other.span(s, other.end_after(s, size))
        if candidate != right and candidate not in wrong:
            wrong.append(candidate)
    return ARC_QUESTION.format(stem=text.span(start, at)), right, wrong


def arc_items(n: int, seed: int = SEED, docs: list[Doc] | None = None) -> list[dict]:
    rnd = random.Random(seed)
    texts = sorted((Text.of(d.module, d.text) for d in docs or stdlib_docs()), key=lambda t: t.tokens)
    sizes = [t.tokens for t in texts]
    contexts, choices = _Draws(rnd), _Draws(rnd)
    seen, out = set(), []
    while len(out) < n:
        context = min(max(_lognormal(contexts(), *ARC_CONTEXT), 12.0), 160.0)
        choice = max(1.0, round(NormalDist(*ARC_CHOICE).inv_cdf(choices())))
        # A drawn shape is kept until an item has it: skipping one would bend the distribution.
        for _ in range(1000):
            made = _arc_item(rnd, texts, sizes, context, choice)
            if made is not None and made[0] not in seen:
                break
        else:
            raise RuntimeError(f"no ARC-style item of {context:.0f} + {choice:.0f} tokens could be made")
        seen.add(made[0])
        out.append(_mc_record(rnd, *made, len(out)))
    return out


# ---------------------------------------------------------------- BoolQ-style passages
BOOLQ_PROMPT = "{passage}\nQuestion: {question}?\nAnswer:"  # lm-eval's boolq doc_to_text
_BOOLQ_FRAME = approx_tokens(BOOLQ_PROMPT.format(passage="", question="")) + 11  # + a question


def _sentence_end(word: str) -> bool:
    return word.endswith((".", "!", "?"))


class _Passages:
    """Passages cut from each module's docstrings in order, never overlapping, so every passage is
    distinct (as in BoolQ, where 296 of 300 are): a module's text is read on from where its last
    passage ended, and each cut lands on a sentence end near the length asked for."""

    def __init__(self, docs: list[Doc]):
        by_module: dict[str, list[str]] = {}
        for d in docs:
            by_module.setdefault(d.module, []).append(d.text)
        self.texts = [Text.of(m, " ".join(by_module[m])) for m in sorted(by_module)]
        self.at = [0] * len(self.texts)

    def take(self, rnd: random.Random, tokens: float) -> tuple[str, str]:
        room = [i for i, t in enumerate(self.texts) if t.tokens - t.cum[self.at[i]] >= tokens]
        if not room:
            raise RuntimeError(f"the standard library's docstrings ran out of {tokens:.0f}-token passages")
        i = rnd.choice(room)
        text, start = self.texts[i], self.at[i]
        end = text.end_after(start, tokens)
        near = [e for e in range(end - 12, end + 13)
                if start < e <= len(text.words) and _sentence_end(text.words[e - 1])
                and abs(text.cum[e] - text.cum[start] - tokens) <= 0.12 * tokens]
        if near:
            end = min(near, key=lambda e: abs(e - end))
        # The next passage starts at a sentence, as a paragraph would.
        after = next((e for e in range(end, len(text.words)) if _sentence_end(text.words[e - 1])), len(text.words))
        self.at[i] = after
        return text.module, text.span(start, end)


def _content_words(text: str) -> list[str]:
    return sorted({w.lower() for w in re.findall(r"[A-Za-z]{7,}", text)})


def boolq_items(n: int, seed: int = SEED, docs: list[Doc] | None = None) -> list[dict]:
    rnd = random.Random(seed)
    docs = docs or stdlib_docs()
    passages = _Passages(docs)
    modules = sorted({d.module for d in docs})
    words = [w for d in docs for w in _content_words(d.text)]
    draws, out = _Draws(rnd), []
    share, low, high = BOOLQ_LONG
    for k in range(n):
        u = draws()
        # The top `share` of the draws is the long tail; the rest maps onto the log-normal.
        context = low + (high - low) * (u - 1 + share) / share if u > 1 - share else \
            _lognormal(u / (1 - share), *BOOLQ_CONTEXT)
        module, passage = passages.take(rnd, max(24.0, min(context, 800.0) - _BOOLQ_FRAME))
        answer = rnd.random() < 0.5
        if k % 2 == 0:
            named = module if answer else rnd.choice([m for m in modules if m != module])
            question = f"is this text from the documentation of the python {named} module"
        else:
            mine = _content_words(passage)
            answer = answer and bool(mine)
            word = rnd.choice(mine) if answer else rnd.choice(words)
            while not answer and word in passage.lower():
                word = rnd.choice(words)
            question = f"does the passage use the word {word}"
        out.append({"question": question, "passage": passage, "answer": answer})
    return out


# ---------------------------------------------------------------- GSM8K-style word problems
GSM8K_PROMPT = "Question: {question}\nAnswer:"  # lm-eval's gsm8k doc_to_text
NAMES = ["Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam"]
FRIENDS = ["a neighbour", "a classmate", "a cousin", "an older brother", "an old friend", "the teacher"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["the market", "a garage sale", "the corner shop", "the school fair", "a toy store"]
# Operations per problem: GSM8K's questions take two to eight steps; these weights give its
# 65-token prompts on average.
STEPS = (1, 1, 2, 2, 2, 3, 3)


def _op(rnd: random.Random, who: str, thing: str, total: int) -> tuple[str, list[str], int] | None:
    """One sentence of a problem that changes the count, its worked steps, and the new count."""
    kind = rnd.randrange(6)
    if kind == 0:
        b = rnd.randint(3, 40)
        day, place = rnd.choice(DAYS), rnd.choice(PLACES)
        return (f"On {day}, {who} buys {b} more {thing} at {place}.",
                [f"After {day}'s shopping there are {total} + {b} = <<{total}+{b}={total + b}>>{total + b} {thing}."],
                total + b)
    if kind == 1 and total > 4:
        c = rnd.randint(1, total // 2)
        friend = rnd.choice(FRIENDS)
        return (f"{who} gives {c} of them to {friend} who has none.",
                [f"Giving some away leaves {total} - {c} = <<{total}-{c}={total - c}>>{total - c} {thing}."], total - c)
    if kind == 2:
        p, q = rnd.randint(2, 9), rnd.randint(3, 12)
        return (f"Later {who} buys {p} packs of {thing}, and each pack holds {q} {thing}.",
                [f"The packs hold {p} * {q} = <<{p}*{q}={p * q}>>{p * q} {thing}.",
                 f"Now there are {total} + {p * q} = <<{total}+{p * q}={total + p * q}>>{total + p * q} {thing}."],
                total + p * q)
    if kind == 3 and total > 8:
        c = rnd.randint(1, total // 4)
        return (f"Sadly, {c} of the {thing} are lost on the way home from school.",
                [f"After the loss there are {total} - {c} = <<{total}-{c}={total - c}>>{total - c} {thing}."], total - c)
    if kind == 4 and total < 200:
        return (f"Then {who}'s grandmother adds exactly as many {thing} as {who} already has.",
                [f"Doubling gives {total} * 2 = <<{total}*2={total * 2}>>{total * 2} {thing}."], total * 2)
    ways = [k for k in range(2, 7) if total % k == 0 and total // k >= 2]
    if kind == 5 and ways:
        k = rnd.choice(ways)
        return (f"{who} splits all the {thing} equally into {k} bags and keeps only one bag.",
                [f"One bag holds {total} / {k} = <<{total}/{k}={total // k}>>{total // k} {thing}."], total // k)
    return None


def _gsm8k_problem(rnd: random.Random) -> tuple[str, list[str], int]:
    """(question, worked steps with GSM8K's <<calc>> notes, answer): a start, a few operations on
    the count, and one of three closing questions."""
    who, thing = rnd.choice(NAMES), rnd.choice(THINGS)
    total = rnd.randint(5, 60)
    sentences = [rnd.choice([f"{who} has {total} {thing}.",
                             f"{who} starts the week with {total} {thing} in a jar on the kitchen shelf.",
                             f"At the start of the month, {who}'s collection holds {total} {thing}."])]
    steps: list[str] = []
    wanted = rnd.choice(STEPS)
    while len(sentences) <= wanted:
        made = _op(rnd, who, thing, total)
        if made:
            sentences.append(made[0])
            steps += made[1]
            total = made[2]
    close = rnd.randrange(3)
    if close == 0:
        sentences.append(f"How many {thing} does {who} have now?")
        answer = total
    elif close == 1:
        price = rnd.randint(2, 9)
        sentences.append(f"If {who} sells every one of them for ${price} each, how many dollars does {who} earn?")
        answer = total * price
        steps.append(f"Selling them earns {total} * {price} = <<{total}*{price}={answer}>>{answer} dollars.")
    else:
        goal = total + rnd.randint(5, 50)
        answer = goal - total
        sentences.append(f"How many more {thing} does {who} need to have {goal} {thing}?")
        steps.append(f"{who} needs {goal} - {total} = <<{goal}-{total}={answer}>>{answer} more {thing}.")
    return " ".join(sentences), steps, answer


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


# ---------------------------------------------------------------- --stats
WORK = Path(__file__).resolve().parent / "_work"


def _lmeval_lengths(encode, context: str, continuation: str) -> tuple[int, int]:
    """Tokens of a context and of its continuation as lm-eval's _encode_pair counts them: the
    whole string encoded at once, the continuation being what follows the context's own tokens."""
    n = len(encode(context))
    return n, len(encode(context + continuation)) - n


def measure(encode, counts: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    """Per task and field, the values over the first counts[task] items (what a full run reads)."""
    docs = stdlib_docs()
    arc = arc_items(counts["arc"], docs=docs)
    per_item, choices, contexts = [], [], []
    for r in arc:
        prompt = ARC_PROMPT.format(question=r["question"])
        per_item.append(len(r["choices"]["text"]))
        contexts.append(len(encode(prompt)))
        choices += [_lmeval_lengths(encode, prompt, " " + c)[1] for c in r["choices"]["text"]]
    boolq = boolq_items(counts["boolq"], docs=docs)
    gsm8k = gsm8k_items(counts["gsm8k"])
    return {
        "arc": {"choices per item": per_item, "choice tokens": choices, "context tokens": contexts},
        "boolq": {"context tokens": [len(encode(BOOLQ_PROMPT.format(**r))) for r in boolq],
                  "distinct passages": [len({r["passage"] for r in boolq})]},
        "gsm8k": {"prompt tokens": [len(encode(GSM8K_PROMPT.format(question=r["question"]))) for r in gsm8k]},
    }


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, int) else f"{value:.1f}"


def print_stats(measured: dict[str, dict[str, list[float]]], counts: dict[str, int]) -> None:
    print("bench items against the real sets: SmolLM2-135M tokens of lm-eval's prompts "
          "(real: issue 30, ARC-Challenge / BoolQ 300 items, GSM8K)")
    head = (f"{'task':<6} {'field':<18} {'n':>4} | {'mean':>6} {'median':>6} {'p90':>5} {'max':>5} | "
            f"{'real':>6} {'median':>6} {'p90':>5} {'max':>5} | {'mean off':>8} {'median off':>10}")
    print(head)
    print("-" * len(head))
    for task, fields in measured.items():
        for field, values in fields.items():
            real = REAL[task][field]
            ours = (statistics.mean(values), statistics.median(values), _p90(values), max(values))
            if len(values) == 1:  # a count over the whole file, not a per-item value
                ours = (values[0], None, None, None)
            off = [f"{100 * (o / r - 1):+.1f}%" if r and o is not None else "-" for o, r in zip(ours[:2], real[:2])]
            n = counts[task] if field != "choice tokens" else len(values)
            print(f"{task:<6} {field:<18} {n:>4} | " + " ".join(f"{_cell(v):>{w}}" for v, w in zip(ours, (6, 6, 5, 5)))
                  + " | " + " ".join(f"{_cell(v):>{w}}" for v, w in zip(real, (6, 6, 5, 5)))
                  + f" | {off[0]:>8} {off[1]:>10}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stats", action="store_true",
                    help="tokenize the items with SmolLM2's tokenizer and print their shapes beside the real sets'")
    ap.add_argument("--items", type=int, metavar="N", help="items per task (default: what a full --vs-lmeval run reads)")
    args = ap.parse_args(argv)
    if not args.stats:
        ap.print_help()
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import ensure_checkpoint
    from transformers import AutoTokenizer
    from vs_lmeval import FULL

    counts = {task: args.items or n for task, n in FULL.items()}
    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint(WORK / "smollm2-135m"))
    # lm-eval encodes requests without special tokens for this model (no BOS is added).
    print_stats(measure(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"], counts), counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

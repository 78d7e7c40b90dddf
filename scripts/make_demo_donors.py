"""Train the tiny OLMoE "demo donors" and their probe sets.

Makes, under --out (default surgeon/demo):
  data/base     an OLMoE (4 layers, 8 experts, top-2, hidden 64) trained briefly on a 50/50
                mix of two synthetic tasks. It stops while reversal is half learned
                (it is learned in a sudden jump); addition comes much later, so the base
                gets almost none of it;
  data/arith    base fine-tuned (all parameters) on 2-digit addition only ("12+7=19");
  data/reverse  base fine-tuned (all parameters) on string reversal only ("rev:abc=cba");
  probes/{arith,reverse}.jsonl        200 held-out exact-match items {"prompt", "answer"};
  probes/{arith,reverse}_mc.jsonl     the same items as ARC-style 4-way multiple choice.

Why: the donors share one pretrained ancestor and differ only by fine-tuning on different
tasks, so moving routers, attention or experts between them has visible effects on the two
tasks, in seconds on a CPU. The checkpoints are saved in bf16 (about 1 MB each) with a
character-level tokenizer, and load offline with AutoModelForCausalLM / AutoTokenizer.

The tokenizer adds no special tokens: tok("12+7=") is just the characters, and
tok(prompt) + tok(answer) == tok(prompt + answer). Training sequences are the same (no <bos>)
followed by <eos>, which is where generation should stop. Loss is on the answer and <eos>
only: the operands and letters in the prompt are random, so predicting them teaches nothing.

Everything is seeded and runs with deterministic algorithms on 2 CPU threads; the output is
bit-identical from run to run. It takes about 4 minutes on 2 idle cores.
"""

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARS = "0123456789" + LETTERS + "+=: \n"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TASKS = ("arith", "reverse")
N_PROBES = 200
BATCH = 128
# (name, parent, task mix, steps, peak lr)
STAGES = [
    ("base", None, ("arith", "reverse"), 180, 1e-3),
    ("arith", "base", ("arith",), 1200, 2e-3),
    ("reverse", "base", ("reverse",), 300, 2e-3),
]


def make_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def arith_item(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def reverse_item(rng):
    w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"rev:{w}=", w[::-1]


ITEM = {"arith": arith_item, "reverse": reverse_item}


def held_out_key(prompt):
    # 12+7 and 7+12 count as the same fact, so neither order is trained on.
    if "+" in prompt:
        return frozenset(prompt.rstrip("=").split("+"))
    return prompt


def make_probes(task, rng):
    items, seen = [], set()
    while len(items) < N_PROBES:
        prompt, answer = ITEM[task](rng)
        if held_out_key(prompt) not in seen:
            seen.add(held_out_key(prompt))
            items.append((prompt, answer))
    return items


def distractors(task, answer, rng):
    if task == "arith":
        s = int(answer)
        cands = [str(s + d) for d in (1, -1, 2, -2, 10, -10, 11, -9)] + [answer[::-1]]
        cands = [c for c in cands if not c.startswith("-") and (c == "0" or c[0] != "0")]
    else:
        i = rng.randrange(len(answer) - 1)
        # one wrong letter per position: enough choices even for "aaa"
        cands = [answer[:j] + rng.choice(LETTERS.replace(c, "")) + answer[j + 1:]
                 for j, c in enumerate(answer)]
        cands += [answer[::-1], answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:],
                  answer[1:], answer[0] + answer]
    # A choice that is a prefix of another is settled by length, not by the model:
    # log P("cz") >= log P("czo") whatever the weights.
    cands = sorted(c for c in set(cands) if not (c.startswith(answer) or answer.startswith(c)))
    return rng.sample(cands, 3)


def mc_item(task, prompt, answer, rng):
    choices = [answer] + distractors(task, answer, rng)
    rng.shuffle(choices)
    labels = ["A", "B", "C", "D"]
    return {"question": prompt, "choices": {"text": choices, "label": labels},
            "answerKey": labels[choices.index(answer)]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_batch(tok, items):
    seqs, labels = [], []
    for prompt, answer in items:
        p = tok(prompt).input_ids
        a = tok(answer).input_ids + [tok.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(map(len, seqs))
    pad = lambda rows, v: torch.tensor([r + [v] * (n - len(r)) for r in rows])
    ids = pad(seqs, tok.pad_token_id)
    return ids, (ids != tok.pad_token_id).long(), pad(labels, -100)


def train(model, tok, mix, steps, lr, rng, held_out):
    def sample():
        while True:
            prompt, answer = ITEM[rng.choice(mix)](rng)
            if held_out_key(prompt) not in held_out:
                return prompt, answer

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = 30
    # linear warm-up then linear decay: a short run still ends at a settled point
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.05, (steps - s) / (steps - warm))))
    model.train()
    for step in range(steps):
        ids, mask, labels = make_batch(tok, [sample() for _ in range(BATCH)])
        # router_logits on: the load-balancing loss keeps all 8 experts in use
        loss = model(input_ids=ids, attention_mask=mask, labels=labels,
                     output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f}", flush=True)


@torch.no_grad()
def exact_match(model, tok, items):
    # Group by prompt length so batches need no padding and greedy decoding is exact.
    by_len = {}
    for prompt, answer in items:
        by_len.setdefault(len(prompt), []).append((prompt, answer))
    right = 0
    for group in by_len.values():
        ids = torch.tensor([tok(p).input_ids for p, _ in group])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        for (_, answer), row in zip(group, out[:, ids.shape[1]:].tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            right += tok.decode(row) == answer
    return right / len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "surgeon" / "demo"
    ap.add_argument("--out", type=Path, default=default_out,
                    help="writes OUT/data/{base,arith,reverse} and OUT/probes/*.jsonl")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # one bar per save and per load buries the table

    tok = make_tokenizer()
    for s in ("rev:abc=cba", "12+7=19"):
        assert tok.decode(tok(s).input_ids) == s and len(tok(s).input_ids) == len(s), s

    # Probes come from their own seed; training skips them by key.
    probe_rng = random.Random(1234)
    probes = {t: make_probes(t, probe_rng) for t in TASKS}
    held_out = {held_out_key(p) for t in TASKS for p, _ in probes[t]}
    probe_dir = args.out / "probes"
    probe_dir.mkdir(parents=True, exist_ok=True)
    for t in TASKS:
        write_jsonl(probe_dir / f"{t}.jsonl", [{"prompt": p, "answer": a} for p, a in probes[t]])
        write_jsonl(probe_dir / f"{t}_mc.jsonl",
                    [mc_item(t, p, a, probe_rng) for p, a in probes[t]])

    config = OlmoeConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_experts=8,
        num_experts_per_tok=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    data_dir = args.out / "data"
    states = {}
    for name, parent, mix, steps, lr in STAGES:
        print(f"training {name} ({'+'.join(mix)}, {steps} steps, lr {lr})", flush=True)
        model = OlmoeForCausalLM(config)
        if parent:
            model.load_state_dict(states[parent])  # fp32 weights, not the bf16 copy on disk
        train(model, tok, mix, steps, lr, random.Random(f"train-{name}"), held_out)
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        save_donor(model, tok, data_dir / name)

    print_scores(data_dir, [name for name, *_ in STAGES], probes)
    print(f"done in {time.time() - t0:.0f}s")


def save_donor(model, tok, path):
    """Save in bf16 with the tokenizer, readable by everyone."""
    shutil.rmtree(path, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    # safetensors writes 0600; package data must be readable by whoever installs it
    for f in path.iterdir():
        f.chmod(0o644)


def print_scores(data_dir, names, probes):
    """Greedy exact match of each saved donor, as it loads from disk."""
    width = max(8, max(map(len, names)))
    print(f"\n{'donor':{width}s} {'arith':>7s} {'reverse':>8s}   (greedy exact match, bf16, "
          f"{len(probes[TASKS[0]])} held-out items each)")
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(data_dir / name, dtype=torch.bfloat16).eval()
        dtok = AutoTokenizer.from_pretrained(data_dir / name)
        acc = [exact_match(model, dtok, probes[t]) for t in TASKS]
        print(f"{name:{width}s} {acc[0]:7.1%} {acc[1]:8.1%}")


if __name__ == "__main__":
    main()

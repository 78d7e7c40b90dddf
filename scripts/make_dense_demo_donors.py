"""Train the tiny dense llama "dense demo donors" that `moe-surgeon mix` turns into an MoE.

Makes, under --out (default surgeon/demo):
  data/dense-base     a llama (4 layers, hidden 64, MLP 256) trained briefly on a 50/50 mix of the
                      two synthetic tasks of the OLMoE demo (2-digit addition, string reversal);
  data/dense-arith    dense-base with only its MLPs fine-tuned on addition;
  data/dense-reverse  dense-base with only its MLPs fine-tuned on reversal;
  mix/train.jsonl     400 prompt/answer items, half of each task, none of them a probe item: a
                      small local dataset to train a mix's routers on;
  mix/prompts.json    a few prompts per task, for `--router hidden` with experts (arith, reverse).

Why MLP-only fine-tuning: the experts of a mix share the base's attention, norms and embeddings, so
donors whose attention never moved give experts that all read the hidden states they were
trained on (Lee, Wynter and Ganti mix full fine-tunes; a tiny demo cannot afford that drift). Each donor
learns its task and loses some of the other, which is what a mix should win back.

Same tokenizer, task generators and held-out probe sets as scripts/make_demo_donors.py, so the
built-in probes `em:arith` and `em:reverse` measure these donors too. Seeded, deterministic
algorithms, 1 CPU thread (about 3 minutes); bit-identical from run to run.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_donors import (  # noqa: E402
    ITEM,
    TASKS,
    held_out_key,
    make_batch,
    make_tokenizer,
    print_scores,
    save_donor,
)

BATCH = 64
# (name, parent, task mix, steps, peak lr, which weights train)
STAGES = [
    ("dense-base", None, ("arith", "arith", "reverse"), 800, 3e-3, "all"),
    ("dense-arith", "dense-base", ("arith",), 1000, 3e-3, "mlp"),
    ("dense-reverse", "dense-base", ("reverse",), 250, 1e-2, "mlp"),
]
TRAIN_ITEMS = 200  # per task, for mix/train.jsonl
PROMPTS = 8  # per task, for mix/prompts.json


def train(model, tok, mix, steps, lr, rng, held_out, which):
    def sample():
        while True:
            prompt, answer = ITEM[rng.choice(mix)](rng)
            if held_out_key(prompt) not in held_out:
                return prompt, answer

    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or ".mlp." in name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = 30
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.05, (steps - s) / (steps - warm))))
    model.train()
    for step in range(steps):
        ids, mask, labels = make_batch(tok, [sample() for _ in range(BATCH)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f}", flush=True)


def load_probes(probe_dir: Path) -> dict:
    return {t: [(r["prompt"], r["answer"]) for r in map(json.loads, (probe_dir / f"{t}.jsonl").open())]
            for t in TASKS}


def write_mix_data(mix_dir: Path, held_out: set) -> None:
    mix_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random("mix-data")
    seen = set(held_out)
    rows = {t: [] for t in TASKS}
    for t in TASKS:
        while len(rows[t]) < TRAIN_ITEMS + PROMPTS:
            prompt, answer = ITEM[t](rng)
            if held_out_key(prompt) not in seen:
                seen.add(held_out_key(prompt))
                rows[t].append((prompt, answer))
    train = [r for pair in zip(*(rows[t][:TRAIN_ITEMS] for t in TASKS)) for r in pair]
    (mix_dir / "train.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in train))
    prompts = {str(i): [p + a for p, a in rows[t][TRAIN_ITEMS:]] for i, t in enumerate(TASKS)}
    (mix_dir / "prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "surgeon" / "demo"
    ap.add_argument("--out", type=Path, default=default_out,
                    help="writes OUT/data/dense-{base,arith,reverse} and OUT/mix/; reads OUT/probes/")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(1)  # faster than 2 for a model this small
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()

    tok = make_tokenizer()
    probes = load_probes(args.out / "probes")
    held_out = {held_out_key(p) for t in TASKS for p, _ in probes[t]}
    write_mix_data(args.out / "mix", held_out)

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    data_dir = args.out / "data"
    states = {}
    for name, parent, mix, steps, lr, which in STAGES:
        print(f"training {name} ({'+'.join(mix)}, {steps} steps, lr {lr}, {which} weights)", flush=True)
        model = LlamaForCausalLM(config)
        if parent:
            model.load_state_dict(states[parent])
        train(model, tok, mix, steps, lr, random.Random(f"train-{name}"), held_out, which)
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        save_donor(model, tok, data_dir / name)

    print_scores(data_dir, [name for name, *_ in STAGES], probes)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

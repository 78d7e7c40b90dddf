"""Train only the routers of a live mix on a small local dataset (moetify's router training).

Every weight but the routers (`mlp.gate` of each layer) is frozen; a Qwen2-MoE's shared-expert
gate stays frozen too, so the always-on expert keeps adding exactly its MLP. The loss is the
next-token cross-entropy on the answer (and the end-of-sequence token) of prompt/answer items,
or on every token of plain text. AdamW at a constant learning rate, no weight decay, as moetify
trains routers. Batches are drawn by a seeded shuffle and the run uses deterministic algorithms,
so the same data, settings, device and thread count give the same router bits: a mix with a
trained router replays.

Data: any jsonl surgeon/probes/data.py reads (`{"prompt","answer"}`, GSM8K, `{"question","answer"}`, ...; the
`raw` template joins prompt and answer as the demo donors were trained, `qa` writes
"Question: ...\nAnswer: ..."), a `{"text"}` jsonl, or a text file split at blank lines.

With top-1 routing the one kept weight is renormalised to exactly 1 whatever the router says,
so the router gets no gradient: training needs K >= 2.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, CancelToken, Meter, Progress

TEMPLATES = ("raw", "qa")


@dataclass(frozen=True)
class TrainSpec:
    data: str  # path to the training file
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    template: str = "raw"

    def check(self) -> None:
        if self.steps < 1:
            raise SurgeonError(f"--steps {self.steps}: train for at least 1 step")
        if not self.lr > 0:
            raise SurgeonError(f"--lr {self.lr}: the learning rate must be positive")
        if self.batch_size < 1:
            raise SurgeonError(f"--train-batch-size {self.batch_size}: at least 1")
        if self.template not in TEMPLATES:
            raise SurgeonError(f"--train-template {self.template!r}: one of {', '.join(TEMPLATES)}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise SurgeonError(f"{path}: no such file") from None
    return digest.hexdigest()


def load_examples(spec: TrainSpec) -> list[tuple[str, str | None]]:
    """(context, target) pairs: loss on the target; target None means loss on all of the text."""
    from surgeon.probes.data import load_items, load_text
    from surgeon.probes.prompts import answer_sep, gold_text, prompt

    path = Path(spec.data)
    if not path.is_file():
        raise SurgeonError(f"{path}: no such training file")
    if path.suffix != ".jsonl":
        return [(i.text, None) for i in load_text(path)]
    items = load_items(path)
    out = []
    for item in items:
        if item.kind == "text":
            out.append((item.text, None))
        elif item.kind == "exact":
            out.append((prompt(item, spec.template), answer_sep(spec.template) + gold_text(item)))
        else:  # multiple choice: train on the gold choice
            out.append((prompt(item, spec.template), " " + gold_text(item)))
    return out


def _encode_batch(tokenizer, examples, device):
    import torch

    from surgeon.probes.scoring import encode

    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for context, target in examples:
        if target is None:
            ids = encode(tokenizer, context)
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id] + ids
            seqs.append(ids)
            labels.append(list(ids))
        else:
            c = encode(tokenizer, context) or [tokenizer.bos_token_id]
            t = encode(tokenizer, target) + ([eos] if eos is not None else [])
            seqs.append(c + t)
            labels.append([-100] * len(c) + t)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (s, lb) in enumerate(zip(seqs, labels)):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
        lab[r, :len(lb)] = torch.tensor(lb)
    return ids.to(device), mask.to(device), lab.to(device)


def train_routers(live, tokenizer, spec: TrainSpec, *, progress: Progress | None = None,
                  cancel: CancelToken = NEVER) -> list[float]:
    """Train the routers of `live` (a features.mix.live.LiveMix) in place; returns the loss of every step.

    Reports a Step per training step (unit "steps", the losses so far as its series) and stops at
    the next step when `cancel` is set."""
    import torch

    spec.check()
    if live.layout.top_k < 2:
        raise SurgeonError(
            f"--train: with top-{live.layout.top_k} routing the kept weight is always exactly 1, so the router "
            "gets no gradient; use a router with K >= 2 (e.g. uniform or noisy:2)"
        )
    examples = load_examples(spec)
    model = live.model
    device = next(model.parameters()).device
    params = live.router_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    rng = random.Random(spec.seed)
    order: list[int] = []
    losses = []
    meter = Meter(progress, spec.steps, "steps", "train routers")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model.eval()  # no dropout, no router jitter: the only randomness is the seeded batch order
        for step in range(spec.steps):
            cancel.check()
            batch = []
            while len(batch) < spec.batch_size:
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch.append(examples[order.pop()])
            ids, mask, labels = _encode_batch(tokenizer, batch, device)
            with torch.enable_grad():
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            meter(step + 1, detail=f"loss {losses[-1]:.4f}", series=tuple(losses))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        for p in params:
            p.requires_grad_(False)
    return losses

"""Train only the layer gates of a model on a local text file (Self-MoE, section 4.1 in small).

The text becomes sequences (`text_data`: windows of one token stream, or one sequence per line);
each step draws `batch_size` of them with a seeded generator and minimises the mean next-token
cross-entropy over their tokens. Every weight of the model is frozen except the
gates; AdamW with a linear warm-up to the learning rate, then constant (Self-MoE's schedule).
The same seed, data, settings and device give the same gates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, Meter
from surgeon.live.layer_gates import gate_parameters
from surgeon.probes.perplexity import token_nll


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 20
    batch_size: int = 16
    seq_len: int = 64
    seed: int = 0
    weight_decay: float = 0.0  # decay would pull the gates back to zero, i.e. to the base model
    grad_clip: float = 1.0

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise SurgeonError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.warmup < 0:
            raise SurgeonError(f"--warmup {self.warmup}: must not be negative")
        if not self.lr > 0:
            raise SurgeonError(f"--lr {self.lr}: must be positive")


@dataclass
class TrainResult:
    settings: TrainSettings
    losses: list[float]  # training loss (mean nats per token) of every step
    sequences: int  # training sequences (windows, lines or prompt/answer pairs)
    seconds: float
    eval_before: float | None = None  # held-out perplexity before and after, when asked
    eval_after: float | None = None

    def to_json(self) -> dict:
        return {"settings": asdict(self.settings), "losses": self.losses, "sequences": self.sequences,
                "seconds": self.seconds, "eval_ppl_before": self.eval_before, "eval_ppl_after": self.eval_after}

    def summary(self) -> dict:
        """What the sidecar's metadata keeps: the settings and the ends of the loss curve."""
        k = min(10, len(self.losses))
        return {"settings": asdict(self.settings), "sequences": self.sequences,
                "loss_first": sum(self.losses[:k]) / max(1, k), "loss_last": sum(self.losses[-k:]) / max(1, k),
                "eval_ppl_before": self.eval_before, "eval_ppl_after": self.eval_after}


def read_text(path: str | Path, what: str = "--data") -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SurgeonError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise SurgeonError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SurgeonError(f"{what} {path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise SurgeonError(f"{what} {path}: the file is empty")
    return text


@dataclass
class TextData:
    """Token sequences, right-padded: ids [N, L], and which next-token targets count, [N, L-1].

    Right padding needs no attention mask in a causal model: a real token never attends to the
    pads after it, so every real position's logits are those of the unpadded sequence.
    """

    ids: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index, device) -> tuple[torch.Tensor, torch.Tensor]:
        ids, valid = self.ids[index], self.valid[index]
        width = int(valid.any(0).nonzero().max()) + 2  # drop the columns that are pads in every row
        return ids[:, :width].to(device), valid[:, :width - 1].to(device)

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


UNITS = ("auto", "stream", "line", "pairs")


def load_data(tokenizer, source: str, seq_len: int, unit: str = "auto", where: str = "--data",
              template: str | None = None) -> TextData:
    """Training or scoring sequences from a file (or, for pairs, a built-in probe set's name).

    stream: the file is one text, cut into non-overlapping windows of seq_len + 1 tokens.
    line:   every non-empty line is one sequence ending in <eos> (a file of examples).
    pairs:  a jsonl of prompt/answer items in any exact-match probe format (surgeon/probes/data.py;
            the built-in sets by name, e.g. `arith`): prompt + answer + <eos>, and only the answer
            and <eos> tokens count, as the demo donors were fine-tuned.
    auto:   pairs for a .jsonl file or a built-in set's name, else stream.
    `template` (pairs): raw or qa, as for the exact-match probe (surgeon/probes/prompts.py);
    by default raw for the built-in sets and qa for other files, as the probes choose.
    """
    from surgeon.probes.data import builtin_sets

    if unit not in UNITS:
        raise SurgeonError(f"--unit {unit!r}: one of {', '.join(UNITS)}")
    if unit == "auto":
        unit = "pairs" if source.endswith(".jsonl") or source in builtin_sets() else "stream"
    if unit == "pairs":
        return pair_data(tokenizer, source, seq_len, where, template)
    return text_data(tokenizer, read_text(source, where), seq_len, unit, where)


def pair_data(tokenizer, source: str, seq_len: int, where: str = "--data", template: str | None = None) -> TextData:
    from surgeon.probes.data import builtin_sets, load_items, resolve_set
    from surgeon.probes.prompts import answer_sep, gold_text, prompt

    items = [it for it in load_items(resolve_set(source)) if it.kind == "exact"]
    if not items:
        raise SurgeonError(f"{where} {source}: no prompt/answer items (an exact-match probe file)")
    if template is None:
        template = "raw" if source in builtin_sets() else "qa"
    if template not in ("raw", "qa"):
        raise SurgeonError(f"--template {template!r}: raw or qa")
    eos = tokenizer.eos_token_id
    rows = []
    for it in items:
        p = tokenizer(prompt(it, template))["input_ids"]
        a = tokenizer(answer_sep(template) + gold_text(it), add_special_tokens=False)["input_ids"]
        a = a + ([eos] if eos is not None else [])
        rows.append(((p + a)[: seq_len + 1], len(p)))
    return _padded(tokenizer, rows, where)


def _padded(tokenizer, rows: list[tuple[list[int], int]], where: str) -> TextData:
    """Right-padded TextData from (ids, first scored position) rows."""
    rows = [(ids, start) for ids, start in rows if len(ids) - max(start, 1) >= 1]
    if not rows:
        raise SurgeonError(f"{where}: no sequence has a token to score (is --seq-len too small?)")
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (ids, start) in enumerate(rows):
        ids_t[i, :len(ids)] = torch.tensor(ids)
        valid[i, max(start, 1) - 1:len(ids) - 1] = True  # target j is token j + 1
    return TextData(ids_t, valid)


def text_data(tokenizer, text: str, seq_len: int, unit: str = "stream", where: str = "text") -> TextData:
    """Text as sequences, encoded with the tokenizer's own special tokens (see load_data)."""
    if unit not in ("stream", "line"):
        raise SurgeonError(f"--unit {unit!r}: stream or line for a text file")
    if unit == "stream":
        ids = tokenizer(text)["input_ids"]
        n = (len(ids) - 1) // seq_len
        if n < 1:
            raise SurgeonError(f"{where}: {len(ids)} tokens, too few for one window of --seq-len {seq_len} + 1")
        windows = torch.tensor(ids[: n * seq_len + 1]).unfold(0, seq_len + 1, seq_len).contiguous()
        return TextData(windows, torch.ones(n, seq_len, dtype=torch.bool))
    eos = tokenizer.eos_token_id
    rows = []
    for line in text.splitlines():
        if line.strip():
            ids = tokenizer(line)["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            rows.append((ids[: seq_len + 1], 1))
    return _padded(tokenizer, rows, where)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, data: TextData, batch_size: int = 16) -> float:
    """exp of the mean next-token NLL over every valid token of `data`."""
    dev = _device_of(model)
    total = 0.0
    for i in range(0, len(data), batch_size):
        total += float(token_nll(model, *data.batch(slice(i, i + batch_size), dev), reduction="sum"))
    return math.exp(total / data.tokens)


def train_gates(model, data: TextData, settings: TrainSettings, *, held_out: TextData | None = None,
                progress=None, cancel=NEVER) -> TrainResult:
    """Train the attached gates in place. A job (surgeon.jobs): a Step after every training step (its
    loss in the detail), `cancel` checked before each; a cancelled run leaves the gates half-trained
    in memory only, so the caller writes nothing."""
    settings.check()
    params = gate_parameters(model)
    if not params:
        raise SurgeonError("gates train: the model has no layer gates (add some with moe-surgeon gates add)")
    dev = _device_of(model)
    started = time.perf_counter()
    eval_before = perplexity(model, held_out, settings.batch_size) if held_out is not None else None

    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warm = max(1, settings.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    was_training = model.training
    model.eval()  # no dropout: the frozen model is the one the gates will run with
    losses = []
    meter = Meter(progress, settings.steps, "steps", "train")
    try:
        for step in range(settings.steps):
            cancel.check()
            ids, valid = data.batch(torch.randint(len(data), (settings.batch_size,), generator=gen), dev)
            loss = token_nll(model, ids, valid, reduction="sum") / valid.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise SurgeonError(f"gates train: the loss became {losses[-1]} at step {step + 1}; try a smaller --lr")
            meter(step + 1, detail=f"loss {losses[-1]:.4f}")
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    cancel.check()
    eval_after = perplexity(model, held_out, settings.batch_size) if held_out is not None else None
    return TrainResult(settings, losses, len(data), time.perf_counter() - started, eval_before, eval_after)

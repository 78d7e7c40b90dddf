"""Batched scoring primitives the probes share: continuation log-likelihoods and greedy decoding.

Requests are sorted by length so a batch pads little, and a prefix shared by every request (a
k-shot preamble) is run through the model once: its key/value cache is copied into each batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import SurgeonError


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum over the continuation's tokens
    tokens: int
    greedy: bool  # every continuation token was the argmax


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SurgeonError(f"{path}: no usable tokenizer files ({type(e).__name__}); probes need one") from None


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _prefix_cache(model, prefix_ids: list[int]):
    """Run the shared prefix once; returns (cache, logits of its last position) or (None, None)."""
    if not prefix_ids:
        return None, None
    ids = torch.tensor([prefix_ids], device=_device_of(model))
    out = model(ids, use_cache=True)
    return out.past_key_values, out.logits[0, -1]


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, prefix: str = "",
                   batch_size: int = 16, progress=None) -> list[LogLik]:
    """log P(continuation | prefix + context) for each (context, continuation)."""
    dev = _device_of(model)
    prefix_ids = encode(tokenizer, prefix) if prefix else []
    bos = tokenizer.bos_token_id
    encoded = []
    for ctx, cont in requests:
        ctx_ids, cont_ids = encode(tokenizer, ctx), encode(tokenizer, cont)
        if not cont_ids:
            raise SurgeonError(f"empty continuation for context {ctx[:40]!r}")
        if not ctx_ids and not prefix_ids:
            if bos is None:
                raise SurgeonError("a request with no context needs a tokenizer with a bos token")
            ctx_ids = [bos]
        encoded.append((ctx_ids, cont_ids))
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[LogLik | None] = [None] * len(encoded)
    with torch.no_grad():
        cache, prefix_last = _prefix_cache(model, prefix_ids)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [encoded[i][0] + encoded[i][1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), len(prefix_ids) + width, dtype=torch.long)
            mask[:, : len(prefix_ids)] = 1
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, len(prefix_ids): len(prefix_ids) + len(s)] = 1
            kwargs = {}
            if cache is not None:
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(seqs))
                kwargs["past_key_values"] = batch_cache
            logits = model(ids.to(dev), attention_mask=mask.to(dev), **kwargs).logits.float()
            if prefix_last is not None:  # the prefix's last position predicts each sequence's first token
                logits = torch.cat([prefix_last.float().expand(len(seqs), 1, -1), logits[:, :-1]], dim=1)
            else:
                logits = logits[:, :-1]
                ids = ids[:, 1:]
            logprobs = F.log_softmax(logits, dim=-1)
            ids = ids.to(dev)
            offset = 0 if prefix_last is not None else 1
            for r, i in enumerate(idx):
                ctx_len, cont_len = len(encoded[i][0]), len(encoded[i][1])
                lo = ctx_len - offset
                target = ids[r, lo: lo + cont_len]
                lp = logprobs[r, lo: lo + cont_len]
                chosen = lp.gather(-1, target[:, None])[:, 0]
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = LogLik(float(chosen.sum()), cont_len, greedy)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32,
                    stop: tuple[str, ...] = (), batch_size: int = 16, progress=None) -> list[str]:
    """Greedy continuations, cut at the first stop sequence (the eos token always stops)."""
    dev = _device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SurgeonError("the tokenizer has neither a pad nor an eos token; generation needs one")
    encoded = [encode(tokenizer, p) or [tokenizer.bos_token_id] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            out = model.generate(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
            for r, i in enumerate(idx):
                text = tokenizer.decode(out[r, width:], skip_special_tokens=True)
                outputs[i] = cut_at_stop(text, stop)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return outputs


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if s and pos != -1:
            cut = min(cut, pos)
    return text[:cut]

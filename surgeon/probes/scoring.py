"""Batched scoring primitives the probes share: continuation log-likelihoods and greedy decoding.

Requests are sorted by length so a batch pads little, and a prefix shared by every request (a
k-shot preamble) is run through the model once: its key/value cache is copied into each batch.
The cache goes in and comes out as `cache` (transformers 5.x's name; `past_key_values` warns from
5.24 and is removed in 5.40).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surgeon.errors import SurgeonError


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum over the continuation's tokens
    tokens: int
    greedy: bool  # every continuation token was the argmax


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SurgeonError(f"{path}: no usable tokenizer files ({type(e).__name__}); probes need one") from None
    # Without tokenizer files transformers builds the config's tokenizer class with an empty
    # vocabulary (its special tokens only): every text would then encode to nothing, and the
    # caller would report an empty corpus instead of the missing files.
    if len(tokenizer.get_vocab()) <= len(getattr(tokenizer, "added_tokens_decoder", {})):
        raise SurgeonError(f"{path} has no tokenizer (no tokenizer.json, tokenizer.model or vocab file there)")
    return tokenizer


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
    return out.cache, out.logits[0, -1]


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
                kwargs["cache"] = batch_cache
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


def greedy_generate(model, tokenizer, prompts: list[str], *, prefix: str = "", max_new_tokens: int = 32,
                    stop: tuple[str, ...] = (), batch_size: int = 16, progress=None) -> list[str]:
    """Greedy continuations of prefix + prompt, cut at the first stop sequence (eos always stops).

    The shared prefix (a k-shot preamble) runs once; each batch starts from a copy of its KV
    cache, with the prompts left-padded after it and positions counted past the padding, so a
    batched, prefix-cached run decodes what one prompt at a time would.
    """
    dev = _device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SurgeonError("the tokenizer has neither a pad nor an eos token; generation needs one")
    prefix_ids = encode(tokenizer, prefix) if prefix else []
    encoded = [encode(tokenizer, p) or ([] if prefix_ids else [tokenizer.bos_token_id]) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with torch.no_grad():
        cache, _ = _prefix_cache(model, prefix_ids)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            new = _greedy_batch(model, [encoded[i] for i in idx], cache, len(prefix_ids), pad,
                                tokenizer.eos_token_id, max_new_tokens, dev)
            for r, i in enumerate(idx):
                outputs[i] = cut_at_stop(tokenizer.decode(new[r], skip_special_tokens=True), stop)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return outputs


def _greedy_batch(model, seqs, cache, prefix_len, pad, eos, max_new_tokens, dev) -> list[list[int]]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), prefix_len + width, dtype=torch.long)
    mask[:, :prefix_len] = 1
    for r, s in enumerate(seqs):  # left padding after the prefix: every prompt ends where decoding starts
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, prefix_len + width - len(s):] = 1
    # Positions count real tokens only, so a padded prompt sits where it would sit alone.
    positions = (prefix_len + mask[:, prefix_len:].cumsum(-1) - 1).clamp(min=prefix_len)
    kwargs = {"use_cache": True}
    if cache is not None:
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(seqs))
        kwargs["cache"] = batch_cache
    ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    new: list[list[int]] = [[] for _ in seqs]
    done = torch.zeros(len(seqs), dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        out = model(ids, attention_mask=mask, position_ids=positions, **kwargs)
        nxt = out.logits[:, -1].argmax(-1)
        kwargs["cache"] = out.cache
        for r in range(len(seqs)):
            if not done[r]:
                new[r].append(int(nxt[r]))
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=mask.dtype, device=dev)], dim=1)
        positions = positions[:, -1:] + 1
    return new


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if s and pos != -1:
            cut = min(cut, pos)
    return text[:cut]

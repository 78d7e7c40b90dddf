"""Batched scoring primitives the probes share: continuation log-likelihoods (greedy decoding, which
starts from the same prefill, is in `generation.py`).

Both see exactly the token sequences lm-evaluation-harness (HFLM, a causal model, default
arguments) builds, so a probe here agrees with lm-eval item for item: the context's trailing
whitespace moves to the continuation, the pair is encoded as one string and split where the
context's own encoding ends, the tokenizer adds its own special tokens (a Llama tokenizer its bos,
GPT-2's none), an empty context is the bos (else eos) token, and too long a sequence loses tokens
on the left.

They are cheaper than lm-eval's one forward over context + continuation per request:
- Requests that share a context (the choices of a multiple-choice item) run in one row: the
  context once, then each continuation's tokens but its last, under an attention mask that lets a
  continuation see the context and itself only, with positions counted on from the context's as
  if it ran alone. A one-token continuation costs nothing beyond the context.
- A token prefix common to every context (a k-shot preamble) runs once; each batch starts from
  its cache. It is found on token ids, so it is shared only where the tokens really are a prefix.
- Contexts that share a long prefix with each other (several questions on one passage) run in one
  row: the prefix once, then each context's own tokens and its continuations, a tree under the
  same kind of mask.
- Logits are made only where a token is scored (the model's `logits_to_keep`): never a
  [batch, length, vocab] tensor.
- Batches are capped by rows and by padded tokens, longest first, so a batch pads little.

The cache goes in and comes out as `cache` (transformers 5.x's name; `past_key_values` warns from
5.24 and is removed in 5.40).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from surgeon.errors import SurgeonError
from surgeon.live.allocator import keep_freed_memory
from surgeon.probes.attention import grouped_kv_on_cpu
from surgeon.probes.linear_kernels import onednn_linears

MIN_SHARED_PREFIX = 8  # tokens; below this the cache copies cost more than the forward they save
DEFAULT_MAX_BATCH_TOKENS = 4096  # padded tokens per forward
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a model that states no length
_UNSET_MODEL_MAX_LENGTH = 10**29  # transformers' "no limit" placeholder is ~1e30


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum over the continuation's tokens
    tokens: int
    greedy: bool  # every continuation token was the argmax


def load_tokenizer(path, *, lean: bool = False):
    """The checkpoint's tokenizer, as transformers loads it. With `lean`, read with the `tokenizers`
    library alone where that gives the same tokenizer (lean_tokenizer.py), so that a probe on our own
    forward never imports transformers."""
    if lean:
        from surgeon.probes.lean_tokenizer import lean_tokenizer

        found = lean_tokenizer(path)
        if found is not None:
            return found
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


# --- lm-eval's token sequences ---------------------------------------------------------------

def encode_like_lm_eval(tokenizer, text: str, marker: str | None) -> list[int]:
    """The tokenizer's default encoding (its own special tokens), as lm-eval's HFLM does without
    add_bos_token, except that a text already starting with `marker` (the bos string) gets none."""
    if marker is not None and text.startswith(marker):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def prefix_token_id(tokenizer) -> int | None:
    """What an empty context becomes: bos, else eos."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def max_length(model, tokenizer) -> int:
    """The model's context length, looked up where lm-eval looks: config, then tokenizer, then 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _UNSET_MODEL_MAX_LENGTH:
        return int(limit)
    return _DEFAULT_MAX_LENGTH


def bos_marker(tokenizer) -> str | None:
    """The text of the token an empty context becomes; a context starting with it gets no other."""
    first = prefix_token_id(tokenizer)
    return None if first is None else tokenizer.decode([first])


def encode_request(tokenizer, context: str, continuation: str, limit: int,
                   marker: str | None = None, contexts: dict[str, list[int]] | None = None
                   ) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one log-likelihood request, as lm-eval scores it;
    `marker` is bos_marker(tokenizer), computed once by a caller with many requests, and
    `contexts` keeps each context's tokens for the next request with the same context (a
    multiple-choice item's choices), which then encodes only context + continuation."""
    if context == "":
        cont = encode(tokenizer, continuation)
        first = prefix_token_id(tokenizer)
        if first is None:
            raise SurgeonError("a request with an empty context needs a tokenizer with a bos or eos token")
        # lm-eval: a continuation that itself starts with that token lends it to the context.
        ctx, cont = ([first], cont) if not cont or cont[0] != first else (cont[:1], cont[1:])
    else:
        # A word's leading space belongs to the word: "Answer: " + "Paris" is "Answer:" + " Paris".
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        if marker is None:
            marker = bos_marker(tokenizer)
        ctx = contexts.get(stripped) if contexts is not None else None
        if ctx is None:
            ctx = encode_like_lm_eval(tokenizer, stripped, marker)
            if contexts is not None:
                contexts[stripped] = ctx
        cont = encode_like_lm_eval(tokenizer, stripped + continuation, marker)[len(ctx):]
    if not cont:
        raise SurgeonError(f"empty continuation for context {context[-40:]!r}: nothing to score")
    if not ctx:
        raise SurgeonError(f"context {context[:40]!r} encodes to no tokens: nothing to condition on")
    if len(cont) > limit:
        raise SurgeonError(f"continuation of {len(cont)} tokens is longer than the model's {limit}-token context")
    # Left-truncated as lm-eval does: the last limit + 1 tokens, of which the last is only a target.
    keep = limit + 1 - len(cont)
    return ctx[-keep:], cont


# --- batches, caches, forwards -----------------------------------------------------------------

@contextmanager
def probe_forwards(model, dev: torch.device):
    """The setting every probe forward runs in: no autograd, and on the CPU the faster kernels
    that compute the same numbers (grouped-head attention) or the same products in another order
    (oneDNN linears); glibc keeps a forward's freed temporaries for the next (live/allocator.py)."""
    keep_freed_memory()
    with torch.no_grad(), grouped_kv_on_cpu(dev), onednn_linears(model):
        yield


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    # Padding is always masked out; any id the embedding has will do.
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _check_sizes(batch_size: int, max_batch_tokens: int | None) -> int:
    if batch_size < 1:
        raise SurgeonError(f"batch_size must be at least 1, not {batch_size}")
    tokens = DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
    if tokens < 1:
        raise SurgeonError(f"max_batch_tokens must be at least 1, not {max_batch_tokens}")
    return tokens


def _batches(order: list[int], lengths, batch_size: int, max_tokens: int):
    """Runs of `order` (longest first) of at most batch_size rows and max_tokens padded tokens; a
    sequence longer than max_tokens on its own still gets a batch of one."""
    batch: list[int] = []
    width = 0
    for i in order:
        wider = max(width, lengths[i])
        if batch and (len(batch) == batch_size or (len(batch) + 1) * wider > max_tokens):
            yield batch
            batch, wider = [], lengths[i]
        batch.append(i)
        width = wider
    if batch:
        yield batch


def _common_length(a, b) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence starts with, if long enough to be worth a cache;
    each sequence keeps at least one token of its own, whose logits it needs."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = min(n, _common_length(seqs[0], s))
    return n if n >= MIN_SHARED_PREFIX else 0


def _fork(cache, rows: torch.Tensor):
    """A cache holding `rows` of `cache` (repeats allowed), which itself stays as it was: a forward
    rebinds a layer's tensors (torch.cat) rather than writing into them, so copied layer objects
    over the selected tensors are enough."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    forked.batch_select_indices(rows)
    return forked


@dataclass
class _Base:
    """What every batch starts from: the shared prefix's cache (or none) and its length."""
    cache: object = None
    length: int = 0

    def for_rows(self, n: int, dev):
        return None if self.cache is None else _fork(self.cache, torch.zeros(n, dtype=torch.long, device=dev))


def _run_base(model, seqs: list[list[int]], dev) -> _Base:
    n = _shared_prefix(seqs)
    if n == 0:
        return _Base()
    out = model(input_ids=torch.tensor([seqs[0][:n]], device=dev), use_cache=True, logits_to_keep=1)
    return _Base(out.cache, n)


@dataclass
class _Ran:
    """A left-padded batch of contexts after its forward: what greedy decoding goes on from."""
    last: torch.Tensor  # [rows, vocab] logits at each context's last token
    cache: object
    mask: torch.Tensor  # [rows, base + width] attention mask over the cache
    next_pos: torch.Tensor  # [rows] position of each row's next token


def _left_padded(seqs: list[list[int]], pad: int, base_len: int, dev):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), base_len + width, dtype=torch.long)
    mask[:, :base_len] = 1
    for r, s in enumerate(seqs):  # every sequence ends where its continuation starts
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, base_len + width - len(s):] = 1
    # Positions count real tokens only, so a padded sequence sits where it would sit alone.
    positions = (base_len + mask[:, base_len:].cumsum(-1) - 1).clamp(min=base_len)
    return ids.to(dev), mask.to(dev), positions.to(dev)


def _run_contexts(model, seqs: list[list[int]], base: _Base, pad: int, dev) -> _Ran:
    ids, mask, positions = _left_padded(seqs, pad, base.length, dev)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=base.for_rows(len(seqs), dev),
                use_cache=True, logits_to_keep=1)
    next_pos = torch.tensor([base.length + len(s) for s in seqs], device=dev)
    return _Ran(out.logits[:, -1].float(), out.cache, mask, next_pos)


def _token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability, is-argmax) of each row's target; logits [n, vocab], targets [n]."""
    logits = logits.float()
    chosen = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)
    return chosen, logits.argmax(-1) == targets


def _families(contexts: list[list[int]], extra: list[int], max_tokens: int) -> list[tuple[list[int], int]]:
    """Contexts that share a long token prefix (one passage, several questions), as (members, shared
    length): each family runs in one row with the prefix once. A context joins its neighbour in
    token order only if that saves at least half of its own tokens and the row, with each member's
    `extra` tokens (its continuations'), stays within a batch's token cap, so a family row is
    never much wider than its members would be apart."""
    families: list[tuple[list[int], int]] = []
    for n in sorted(range(len(contexts)), key=lambda n: contexts[n]):
        ctx = contexts[n]
        if families:
            members, shared = families[-1]
            joint = min(shared, _common_length(contexts[members[-1]], ctx))
            apart = shared + sum(len(contexts[m]) - shared for m in members)
            together = joint + sum(len(contexts[m]) - joint for m in [*members, n])
            row = together + sum(extra[m] for m in [*members, n])
            if joint >= MIN_SHARED_PREFIX and together - apart <= len(ctx) // 2 and row <= max_tokens:
                families[-1] = ([*members, n], joint)
                continue
        families.append(([n], len(ctx)))
    return families


@dataclass
class _Packed:
    """One row: contexts that share a prefix and all of their continuations, a tree of segments. The
    shared prefix (segment 0), each context's own tokens after it, then each continuation but its
    last token; a token sees its own segment and the segments above it (`parent`), causally, with
    positions counted on from its parent's as if its context ran alone."""
    tokens: list[int]
    positions: list[int]
    segment: list[int]
    parent: list[int]  # each segment's parent; -1 for the shared prefix
    scored: list[tuple[int, list[int], list[int]]]  # (request, row indices whose logits predict, its tokens)

    def _grow(self, tokens, start: int, parent: int) -> int:
        seg = len(self.parent)
        self.parent.append(parent)
        self.tokens += tokens
        self.positions += range(start, start + len(tokens))
        self.segment += [seg] * len(tokens)
        return seg

    def is_chain(self) -> bool:
        """Does every token see every token before it (no branches: one context, at most one
        continuation with tokens)? Then the tree mask is the plain causal one."""
        seg = self.segment
        return all(seg[k] == seg[k - 1] or self.parent[seg[k]] == seg[k - 1] for k in range(1, len(seg)))

    def sees(self) -> torch.Tensor:
        """[segments, segments]: may a token of segment a see one of segment b (b is a or above it)."""
        visible = torch.eye(len(self.parent), dtype=torch.bool)
        for a in range(len(self.parent)):
            b = self.parent[a]
            while b >= 0:
                visible[a, b] = True
                b = self.parent[b]
        return visible


def _pack(family: list[list[int]], owners: list[list[int]], shared: int, encoded, start: int) -> _Packed:
    """A row for contexts `family` (which all begin with the same `shared` tokens) and the requests
    each one owns; `start` is the position of their first token."""
    row = _Packed([], [], [], [], [])
    row._grow(family[0][:shared], start, -1)
    for ctx, requests in zip(family, owners):
        own = row._grow(ctx[shared:], start + shared, 0) if len(ctx) > shared else 0
        last = len(row.tokens) - 1  # the context's last token predicts every continuation's first
        for i in requests:
            cont = encoded[i][1]
            first = len(row.tokens)
            row._grow(cont[:-1], start + len(ctx), own)
            row.scored.append((i, [last, *range(first, len(row.tokens))], cont))
    return row


def _tree_mask(rows: list[_Packed], width: int, base_len: int, dtype, dev) -> torch.Tensor:
    """[rows, 1, width, base + width] additive mask: a token sees the shared prefix, and, causally,
    the segments of its row it descends from. Padding queries see themselves only (no empty softmax)."""
    allowed = torch.zeros(len(rows), width, base_len + width, dtype=torch.bool)
    allowed[:, :, :base_len] = True
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        n = len(row.tokens)
        seg = torch.tensor(row.segment)
        allowed[r, :n, base_len:base_len + n] = causal[:n, :n] & row.sees()[seg[:, None], seg[None, :]]
        pads = torch.arange(n, width)
        allowed[r, pads, base_len + pads] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(dev)


def _score_packed(model, rows: list[_Packed], base: _Base, pad: int, dev, results) -> None:
    """One forward for a batch of packed rows; fills in results for every request they hold."""
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    keep = torch.zeros(len(rows), width, dtype=torch.bool)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        n = len(row.tokens)
        real[r, :n] = True
        ids[r, :n] = torch.tensor(row.tokens)
        positions[r, :n] = torch.tensor(row.positions)
        positions[r, n:] = row.positions[-1]  # padding: anywhere, it is seen by nobody
        for _, predicts, _ in row.scored:
            keep[r, predicts] = True
    if base.cache is None and all(row.is_chain() for row in rows):
        # Each row is one causal run with its padding after it, which no real token sees: the
        # model's own causal mask is the tree mask, and with none given SDPA skips the blocks
        # above the diagonal (3% of a SmolLM2-135M forward at 8 x 278 tokens on a 2-core CPU).
        mask = None
    else:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        mask = _tree_mask(rows, width, base.length, dtype, dev)
    # Our own forward skips the padding (no token sees it, as above); transformers' runs it too.
    skip = {"real": real.to(dev)} if getattr(model, "native", False) else {}
    out = model(input_ids=ids.to(dev), attention_mask=mask, position_ids=positions.to(dev),
                cache=base.for_rows(len(rows), dev), use_cache=base.cache is not None, logits_to_keep=keep.to(dev),
                **skip)
    # The kept logits come flattened row by row, in position order: map (row, position) to its line.
    line = torch.full((len(rows), width), -1, dtype=torch.long)
    line[keep] = torch.arange(int(keep.sum()))
    at, targets, owners = [], [], []
    for r, row in enumerate(rows):
        for i, predicts, cont in row.scored:
            at += line[r, predicts].tolist()
            targets += cont
            owners.append((i, len(cont)))
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    chosen, argmax = _token_scores(logits[torch.tensor(at, device=dev)], torch.tensor(targets, device=dev))
    chosen, argmax, start = chosen.tolist(), argmax.tolist(), 0
    for i, n in owners:
        results[i] = LogLik(sum(chosen[start:start + n]), n, all(argmax[start:start + n]))
        start += n


def _window_reaches(model, encoded) -> bool:
    """Could the model's sliding window (Mistral's, say) cut into one of these requests?"""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return False
    return max((len(ctx) + len(cont) for ctx, cont in encoded), default=0) > window


# --- log-likelihoods ---------------------------------------------------------------------------

def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                   max_batch_tokens: int | None = None, progress=None, prefix: str = "") -> list[LogLik]:
    """log P(continuation | context) for each (context, continuation), in request order, on the
    token sequences lm-eval scores. `prefix` (for older callers) is put before every context.

    Each distinct context runs once, in one row with all of its continuations (see `_Packed`), so a
    multiple-choice item costs one forward over its context and its choices' tokens; contexts that
    share a long prefix share a row and the prefix (`_families`); rows are batched longest first,
    capped by batch_size rows and max_batch_tokens padded tokens. Where a request is longer than
    the model's sliding window, every request runs alone instead (`_window_reaches`)."""
    max_tokens = _check_sizes(batch_size, max_batch_tokens)
    limit = max_length(model, tokenizer)
    marker = bos_marker(tokenizer)
    seen: dict[str, list[int]] = {}
    encoded = [encode_request(tokenizer, prefix + ctx, cont, limit, marker, seen) for ctx, cont in requests]
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        by_context.setdefault(tuple(ctx), []).append(i)
    contexts = [list(c) for c in by_context]
    owners = list(by_context.values())
    results: list[LogLik | None] = [None] * len(encoded)
    dev, pad = _device_of(model), _pad_id(tokenizer)
    done = 0
    with probe_forwards(model, dev):
        if _window_reaches(model, encoded):
            # The tree mask goes to the model as given, without its sliding window: run each request
            # in a causal row of its own, as lm-eval does, and let the model apply the window.
            base = _Base()
            packed = [_pack([ctx], [[i]], len(ctx), encoded, 0) for i, (ctx, _) in enumerate(encoded)]
        else:
            base = _run_base(model, contexts, dev)
            tails = [c[base.length:] for c in contexts]
            extra = [sum(len(encoded[i][1]) - 1 for i in owners[n]) for n in range(len(tails))]
            families = _families(tails, extra, max_tokens)
            packed = [_pack([tails[m] for m in members], [owners[m] for m in members], shared, encoded, base.length)
                      for members, shared in families]
        lengths = [len(p.tokens) for p in packed]
        order = sorted(range(len(packed)), key=lambda n: -lengths[n])
        for batch in _batches(order, lengths, batch_size, max_tokens):
            _score_packed(model, [packed[n] for n in batch], base, pad, dev, results)
            done += sum(len(p.scored) for p in (packed[n] for n in batch))
            if progress is not None:
                progress(done, len(encoded))
    return results  # type: ignore[return-value]

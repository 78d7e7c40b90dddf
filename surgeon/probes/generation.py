"""Greedy generation as lm-eval's generate_until gives it, decoded in slots with draft tokens.

The texts are lm-eval's (HFLM, default arguments): the prompt encoded as lm-eval encodes it and
left-truncated to leave room for max_new_tokens, greedy tokens until eos or max_new_tokens, the
text cut at each stop string in turn. How the tokens are computed is cheaper:
- equal prompts decode once; a token prefix common to every prompt runs once (scoring's `_Base`);
- rows decode together in up to batch_size slots (`kv_slots`); a row that finishes leaves at once
  and a waiting prompt, prefilled, takes its slot (continuous batching), so no step waits on one
  long row;
- each step also checks up to `lookahead` draft tokens per row, looked up in the row's own tokens
  (`lookup`); the guesses the model agrees with are kept, so a step may add several tokens.
A step over a few tokens per row costs little more than over one: decoding reads every weight
for the sake of a handful of tokens.

Arithmetic is float arithmetic: a token computed in a step of several can differ from one computed
alone in its last bits, so where two candidates tie to that precision the choice can differ, as it
can between lm-eval's own batch sizes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from surgeon.errors import SurgeonError
from surgeon.probes.kv_slots import SlotCache, plain_layers
from surgeon.probes.lookup import PromptLookup
from surgeon.probes.scoring import (
    _Base,
    _check_sizes,
    _device_of,
    _pad_id,
    _run_base,
    _run_contexts,
    encode_like_lm_eval,
    max_length,
    prefix_token_id,
    probe_forwards,
)

# Draft tokens checked per row and step. A step is as wide as its widest row, so every row pays
# for each guess: on a 2-core CPU (bench/probe.py --vs-lmeval, GSM8K) one or three guesses per row
# were no faster than two.
LOOKAHEAD = 2
# Decoding a few more tokens may still change the last characters of the text (a partial UTF-8
# sequence, " ." cleaned up to "."): a stop is trusted only this far from the end.
_DECODE_SLACK = 4


def cut_at_stop(text: str, stop) -> str:
    """The text before the first occurrence of each stop string in turn (lm-eval's rule)."""
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    return text


def _stop_terms(tokenizer, until, stop) -> tuple[str, ...]:
    terms = [until] if isinstance(until, str) else list(until or ())
    if stop is not None:
        terms += [stop] if isinstance(stop, str) else list(stop)
    # lm-eval adds the eos token's text, which matters where decoding keeps it.
    if tokenizer.eos_token_id is not None:
        eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
        if eos_text not in terms:
            terms.append(eos_text)
    return tuple(terms)


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the model's generation config's (as model.generate uses),
    else the tokenizer's eos."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _settled(text: str, terms: tuple[str, ...]) -> bool:
    """Whether no further tokens can change where `text` is cut, so decoding it may stop.

    The cut is settled once some stop string occurs in the text, unless an earlier one in `terms`
    (which is cut at first) could still appear across the end of the text and leave a different
    result. The last few characters may still change as tokens arrive, so they are not trusted.
    """
    known = text[: max(0, len(text) - _DECODE_SLACK)]
    live = [t for t in terms if t]
    for j, term in enumerate(live):
        if term in known:
            return True
        now = cut_at_stop(known, live[j:])
        for start in range(max(0, len(known) - len(term) + 1), len(known)):
            if term.startswith(known[start:]) and cut_at_stop(known[:start], live[j + 1:]) != now:
                return False
    return False


def greedy_generate(model, tokenizer, contexts: list[str], *, until=(), max_new_tokens: int = 256,
                    batch_size: int = 16, max_batch_tokens: int | None = None, progress=None, prefix: str = "",
                    stop=None, lookahead: int = LOOKAHEAD) -> list[str]:
    """Greedy continuation of each context, as lm-eval's generate_until gives it: at most
    max_new_tokens, ended by eos, cut at each `until` string in turn (`stop` is the older name).
    `lookahead` draft tokens are checked per row and step (0: one token per step); the text does
    not depend on it, nor on the batch a context ran in, beyond float rounding (module docstring).
    """
    max_tokens = _check_sizes(batch_size, max_batch_tokens)
    if max_new_tokens < 1:
        raise SurgeonError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if lookahead < 0:
        raise SurgeonError(f"lookahead must be 0 or more, not {lookahead}")
    room = max_length(model, tokenizer) - max_new_tokens
    if room < 1:
        raise SurgeonError(f"max_new_tokens {max_new_tokens} leaves no room for a context in the model's "
                           f"{room + max_new_tokens}-token length")
    terms = _stop_terms(tokenizer, until, stop)
    # Equal prompts decode to equal texts: each distinct one runs once.
    distinct: dict[tuple[int, ...], int] = {}
    slots = [distinct.setdefault(tuple(_encode_prompt(tokenizer, prefix + c)[-room:]), len(distinct))
             for c in contexts]
    encoded = [list(ids) for ids in distinct]
    uses = Counter(slots)
    texts = [""] * len(encoded)
    done = [0]

    def finished(i: int, toks: list[int]) -> None:
        texts[i] = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), terms)
        done[0] += uses[i]
        if progress is not None:
            progress(done[0], len(contexts))

    dev = _device_of(model)
    with probe_forwards(model, dev):
        base = _run_base(model, encoded, dev)
        lengths = [len(s) - base.length for s in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -lengths[i])
        decoder = _Decoder(model, tokenizer, terms, _eos_ids(model, tokenizer), max_new_tokens, lookahead,
                           _pad_id(tokenizer), dev, finished)
        decoder.run_all({i: encoded[i][base.length:] for i in order}, base,
                        encoded[0][:base.length] if encoded else [], batch_size, max_tokens)
    return [texts[slot] for slot in slots]


def _encode_prompt(tokenizer, text: str) -> list[int]:
    ids = encode_like_lm_eval(tokenizer, text, tokenizer.bos_token)
    if ids:
        return ids
    # An empty prompt cannot be run; lm-eval would hand generate() an all-padding row.
    first = prefix_token_id(tokenizer)
    if first is None:
        raise SurgeonError("an empty prompt needs a tokenizer with a bos or eos token")
    return [first]


@dataclass
class _Decoder:
    model: object
    tokenizer: object
    terms: tuple[str, ...]
    eos: set[int]
    max_new: int
    lookahead: int
    pad: int
    dev: torch.device
    finished: object  # finished(key, tokens), called once per sequence as it ends
    dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        self.dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def run_all(self, seqs: dict[int, list[int]], base: _Base, shared: list[int], slots: int,
                max_tokens: int) -> None:
        """Decode every sequence (in the dict's order; `shared` is the prefix `base` holds) with at
        most `slots` rows per step. Where the model's cache keeps every token, rows decode in a
        SlotCache and a finished row's slot goes to the next waiting sequence at once; otherwise
        (sliding windows) each prefilled batch decodes to its end, one token per step."""
        waiting = list(seqs)
        toks: dict[int, list[int]] = {i: [] for i in seqs}
        cache: SlotCache | None = None
        live: list[int] = []  # per slot: the sequence, its last token, its lookup
        last: list[int] = []
        lookups: list[PromptLookup] = []
        while waiting or live:
            free = slots - len(live)
            if waiting and free > 0:
                take = _admit(waiting, seqs, free, max_tokens)
                ran = _run_contexts(self.model, [seqs[i] for i in take], base, self.pad, self.dev)
                firsts = ran.last.argmax(-1).tolist()
                keep = self._advance(take, firsts, toks)
                if not keep:
                    continue
                if cache is None and not plain_layers(ran.cache):
                    self._decode_batch(ran, take, firsts, keep, toks)
                    continue
                if cache is None:
                    cache = SlotCache(len(ran.cache.layers), slots)
                cache.add(ran.cache, ran.mask, keep, room=self.max_new + self.lookahead)
                for k in keep:
                    live.append(take[k])
                    last.append(firsts[k])
                    lookups.append(PromptLookup(shared + seqs[take[k]] + [firsts[k]]))
                continue
            self._step(cache, live, last, lookups, toks)

    def _step(self, cache: SlotCache, live: list[int], last: list[int], lookups: list[PromptLookup],
              toks: dict) -> None:
        """One forward for every live row: its last token and its draft tokens; each row keeps its
        greedy tokens up to the first draft token the model disagrees with."""
        drafts = [lk.draft(min(self.lookahead, self.max_new - len(toks[i]) - 1)) for lk, i in zip(lookups, live)]
        width = 1 + max(len(d) for d in drafts)
        ids = torch.full((len(live), width), self.pad, dtype=torch.long)
        for r, (token, draft) in enumerate(zip(last, drafts)):
            ids[r, :1 + len(draft)] = torch.tensor([token, *draft], dtype=torch.long)
        positions, mask = cache.prepare(width, self.dtype)
        out = self.model(input_ids=ids.to(self.dev), attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=width)
        best = out.logits.argmax(-1).tolist()  # [rows, width]: the greedy token after each fed token
        kept, ended = [], []
        for r, i in enumerate(live):
            draft, greedy = drafts[r], best[r]
            agree = 0
            while agree < len(draft) and draft[agree] == greedy[agree]:
                agree += 1
            kept.append(1 + agree)  # the last token and the draft tokens that were right
            for token in greedy[:agree + 1]:
                lookups[r].append(token)
                if not self._extend(toks[i], token):
                    self.finished(i, toks[i])
                    ended.append(r)
                    break
            last[r] = greedy[agree]
        cache.keep(kept)
        if ended:
            cache.drop(ended, live, last, lookups)

    def _decode_batch(self, ran, take: list[int], firsts: list[int], keep: list[int], toks: dict) -> None:
        """Decode one prefilled batch to its end, one token per step, in transformers' own cache
        (for caches whose rows cannot move into slots); finished rows leave the batch."""
        rows = torch.tensor(keep, dtype=torch.long, device=self.dev)
        cache = ran.cache
        cache.batch_select_indices(rows)
        mask, positions = ran.mask[rows], ran.next_pos[rows][:, None]
        live, last = [take[k] for k in keep], [firsts[k] for k in keep]
        while live:
            ids = torch.tensor([[t] for t in last], device=self.dev)
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=self.dev)], dim=1)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
            cache, positions = out.cache, positions + 1
            nxt = out.logits[:, -1].argmax(-1).tolist()
            going = self._advance(live, nxt, toks)
            if going and len(going) < len(live):
                index = torch.tensor(going, dtype=torch.long, device=self.dev)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
            live, last = [live[k] for k in going], [nxt[k] for k in going]

    def _advance(self, rows: list[int], tokens: list[int], toks: dict) -> list[int]:
        """Give each row its next token; the positions (in `rows`) of those that go on, the others
        handed to `finished`."""
        going = []
        for k, i in enumerate(rows):
            if self._extend(toks[i], tokens[k]):
                going.append(k)
            else:
                self.finished(i, toks[i])
        return going

    def _extend(self, toks: list[int], token: int) -> bool:
        """Append the next token; whether the sequence goes on."""
        toks.append(token)
        if token in self.eos or len(toks) >= self.max_new:
            return False
        return not _settled(self.tokenizer.decode(toks, skip_special_tokens=True), self.terms)


def _admit(waiting: list[int], seqs: dict[int, list[int]], free: int, max_tokens: int) -> list[int]:
    """The next waiting sequences to prefill together: at most `free`, and at most max_tokens padded."""
    take = [waiting.pop(0)]
    width = len(seqs[take[0]])
    while waiting and len(take) < free and (len(take) + 1) * max(width, len(seqs[waiting[0]])) <= max_tokens:
        width = max(width, len(seqs[waiting[0]]))
        take.append(waiting.pop(0))
    return take

"""The keys and values of decoding rows, each row in a fixed slot, written in place at its own end.

transformers' DynamicCache grows by torch.cat: each decoding step copies the whole cache into newly
allocated memory, and on CPU the page faults on that memory cost about a quarter of a step once
contexts reach a few hundred tokens. Here each layer owns one [slots, heads, capacity, dim] buffer
per keys and values:

- row r's tokens sit at columns [0, length[r]), column = position, so a row needs no padding and
  its next tokens go at length[r] onwards, written by the forward itself (`update`);
- a forward may write more columns than the row keeps (draft tokens that were rejected, padding up
  to the widest row of the step): the row's length grows by the tokens kept only, so the next step
  writes over the rest;
- the live rows are slots [0, live): a row that finishes hands its slot to the last live row (one
  row copied), so a step runs on a view of the buffers, never a gathered copy.

The forward gets an explicit 4D mask (each row sees its own columns, causally) and explicit
positions; the model's own mask building is bypassed, as for the scorer's tree mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def plain_layers(cache) -> bool:
    """Whether every layer of a prefilled cache keeps every token (no sliding window, no state):
    only then can its rows move into slots, where a row's column is its position."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _SlotLayer(DynamicLayer):
    """One layer's buffers; `keys`/`values` are views of the live rows' columns after each update."""

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        rows = key_states.shape[0]
        at = o.write_at.to(key_states.device)  # [rows, 1, width, 1]; layers may sit on several devices
        self.k_buf[:rows].scatter_(2, at.expand(-1, key_states.shape[1], -1, key_states.shape[-1]), key_states)
        self.v_buf[:rows].scatter_(2, at.expand(-1, value_states.shape[1], -1, value_states.shape[-1]),
                                   value_states)
        self.keys, self.values = self.k_buf[:rows, :, :o.span], self.v_buf[:rows, :, :o.span]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.past

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise TypeError("rows leave a SlotCache through SlotCache.drop")


class SlotCache(Cache):
    """Up to `slots` decoding rows; see the module's docstring."""

    def __init__(self, num_layers: int, slots: int):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.slots = slots
        self.capacity = 0
        self.lengths: list[int] = []  # per live row
        self.write_at: torch.Tensor | None = None
        self.span = 0  # key columns a step's attention sees
        self.past = 0

    @property
    def live(self) -> int:
        return len(self.lengths)

    def _reserve(self, columns: int, like) -> None:
        """Buffers at least `columns` wide, keeping what the live rows hold; shaped after the
        prefilled cache `like` (heads and head size may differ between keys and values)."""
        if columns <= self.capacity:
            return
        capacity = max(columns, self.capacity + self.capacity // 2)
        used = max(self.lengths, default=0)
        for mine, theirs in zip(self.layers, like.layers):
            for name, src in (("k_buf", theirs.keys), ("v_buf", theirs.values)):
                old = getattr(mine, name)
                # zeros, not empty: a masked column must still hold a finite number (NaN * 0 is NaN)
                new = torch.zeros(self.slots, src.shape[1], capacity, src.shape[-1], dtype=src.dtype,
                                  device=src.device)
                if old is not None and self.live:
                    new[:self.live, :, :used] = old[:self.live, :, :used]
                setattr(mine, name, new)
        self.capacity = capacity

    def add(self, prefilled, mask: torch.Tensor, rows: list[int], room: int) -> None:
        """Move rows of a prefilled DynamicCache into the next free slots: the columns its 2D
        attention `mask` marks as real, in order (a left-padded row's tokens and any shared prefix
        before them); `room` more columns are reserved for each row's decoding."""
        if self.live + len(rows) > self.slots:
            raise ValueError(f"{self.live} + {len(rows)} rows do not fit in {self.slots} slots")
        columns = [mask[r].nonzero()[:, 0] for r in rows]
        sizes = [len(c) for c in columns]
        self._reserve(max(sizes) + room, prefilled)
        for r, cols, n in zip(rows, columns, sizes):
            slot = self.live
            for mine, theirs in zip(self.layers, prefilled.layers):
                mine.k_buf[slot, :, :n] = theirs.keys[r].index_select(-2, cols)
                mine.v_buf[slot, :, :n] = theirs.values[r].index_select(-2, cols)
            self.lengths.append(n)

    def prepare(self, width: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids [live, width], additive attention mask [live, 1, width, span]) for a step
        that feeds `width` tokens to every live row, and where update() will write them."""
        dev = self.layers[0].k_buf.device
        lengths = torch.tensor(self.lengths, device=dev)
        offsets = torch.arange(width, device=dev)
        positions = lengths[:, None] + offsets[None, :]
        self.past = max(self.lengths)
        self.span = self.past + width
        if self.span > self.capacity:
            raise ValueError(f"a step of {width} tokens needs {self.span} columns; {self.capacity} reserved")
        self.write_at = positions[:, None, :, None]
        allowed = torch.arange(self.span, device=dev)[None, None, :] <= positions[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return positions, mask[:, None]

    def keep(self, kept: list[int]) -> None:
        """After a step: each live row keeps this many of the tokens it was fed."""
        self.lengths = [n + k for n, k in zip(self.lengths, kept)]

    def drop(self, slots: list[int], *per_slot: list) -> None:
        """Free these slots: the last live rows move into them, and each list in `per_slot` (the
        caller's own per-row state, in slot order) is rearranged the same way."""
        for slot in sorted(slots, reverse=True):
            last = self.live - 1
            if slot != last:
                n = self.lengths[last]
                for layer in self.layers:
                    layer.k_buf[slot, :, :n] = layer.k_buf[last, :, :n]
                    layer.v_buf[slot, :, :n] = layer.v_buf[last, :, :n]
                for values in (self.lengths, *per_slot):
                    values[slot] = values[last]
            for values in (self.lengths, *per_slot):
                values.pop()

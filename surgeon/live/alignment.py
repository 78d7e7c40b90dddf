"""CPU weights placed at the same offset within a page as the file bytes that fill them.

A read from a file copies each page-cache page to its place in the destination. That copy runs at
full speed only when the bytes keep their offset within a page: on the 2-core AMD EPYC machine
this project is measured on, reading the 96 attention tensors of a 0.94 GB OLMoE-shape donor
(34 MB) took 3.1 ms into memory at their own page offset, 5.0 ms into the places torch's allocator
gave the live weights (64-byte aligned, any offset in a page) and 12 ms with every destination
8 bytes ahead. Before a CPU model is filled, each large weight, still unwritten, is given new
memory whose page offset matches its file bytes: the fill and every later swap from donors laid
out like the one it was matched to (fine-tunes of one base mostly are) copy at the faster rate.
"""

from __future__ import annotations

import torch

PAGE = 4096
SMALLEST = 1 << 16  # bytes; below this a weight's copy is too short for its alignment to matter


def aligned_empty(like: torch.Tensor, page_offset: int) -> torch.Tensor | None:
    """An uninitialised CPU tensor of `like`'s shape and dtype whose first byte lies `page_offset`
    bytes into a page; None where that offset does not suit the dtype's alignment."""
    size = like.element_size()
    if page_offset % size:
        return None
    nbytes = like.numel() * size
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, device=like.device)
    shift = (page_offset - raw.data_ptr()) % PAGE
    return raw[shift:shift + nbytes].view(like.dtype).view(like.shape)


def align(live: dict[str, torch.Tensor], page_offsets: dict[str, int]) -> int:
    """Give each tensor of `live` named in `page_offsets` (name -> the page offset its first byte
    should have) new unwritten memory at that offset, in place (`.data`, so modules and tied
    names keep the same Parameter). Only contiguous CPU tensors of at least SMALLEST bytes whose
    contents do not matter yet; the count moved."""
    moved = 0
    with torch.no_grad():
        for name, offset in page_offsets.items():
            t = live[name]
            if (t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < SMALLEST
                    or (t.data_ptr() - offset) % PAGE == 0):
                continue
            fresh = aligned_empty(t, offset % PAGE)
            if fresh is not None:
                t.data = fresh
                moved += 1
    return moved

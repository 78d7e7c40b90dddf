"""Bytes on disk: safetensors headers, atomic files and staged directories, shards, model cards.

The bottom layer: imports nothing of the engine but `surgeon.errors`, and never torch.
"""

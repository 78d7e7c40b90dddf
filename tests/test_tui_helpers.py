"""Helpers for the workbench tests (no tests here): deterministic donors and Pilot waits.

Snapshot tests need donors whose bytes never change with the installed transformers version,
so these are written directly as safetensors with seeded numpy values and a fixed config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from surgeon.io.safetensors_file import encode_header


def write_synthetic(path: Path, seed: int, *, layers=4, experts=8, hidden=8, inter=4, vocab=32) -> Path:
    """An OLMoE-shaped F32 checkpoint with `layers` x `experts`, values from `seed`."""
    path.mkdir(parents=True, exist_ok=True)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes += [(p + f"self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [(p + "self_attn.q_norm.weight", (hidden,)), (p + "self_attn.k_norm.weight", (hidden,)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate.weight", (experts, hidden))]
        for e in range(experts):
            shapes += [(p + f"mlp.experts.{e}.gate_proj.weight", (inter, hidden)),
                       (p + f"mlp.experts.{e}.up_proj.weight", (inter, hidden)),
                       (p + f"mlp.experts.{e}.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    header, _ = encode_header([(n, "F32", s) for n, s in shapes], {"format": "pt"})
    rng = np.random.default_rng(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(header)
        for _, shape in shapes:
            f.write((rng.standard_normal(int(np.prod(shape))) * 0.02).astype("<f4").tobytes())
    config = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 2,
              "num_key_value_heads": 2, "num_experts": experts, "num_experts_per_tok": 2,
              "vocab_size": vocab, "tie_word_embeddings": False, "dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return path


async def settle(pilot) -> None:
    """Wait for every worker (loading, autosave, distances, export), then for the repaint."""
    from textual.worker import WorkerCancelled

    for _ in range(3):
        try:
            await pilot.app.workers.wait_for_complete()
        except WorkerCancelled:  # a screen dismissed as its job ended cancels the worker still returning
            pass
        await pilot.pause()
    steady_cursors(pilot.app)
    await pilot.pause()


def steady_cursors(app) -> None:
    """Stop every text cursor blinking, shown: a blink is a 0.5 s timer in real time, so on a
    loaded machine a snapshot would catch the cursor on or off by chance."""
    from textual.widgets import Input

    for screen in app.screen_stack:
        for field in screen.query(Input):
            field.cursor_blink = False


async def save_as(pilot, path) -> None:
    """ctrl+s, type a path into the save prompt, enter."""
    from textual.widgets import Input

    from screens.dialogs import PathScreen

    await pilot.press("ctrl+s")
    await pilot.pause()
    assert isinstance(pilot.app.screen, PathScreen)
    pilot.app.screen.query_one(Input).value = str(path)
    await pilot.press("enter")
    await settle(pilot)


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]


def screen_text(app) -> str:
    """What the terminal shows, as plain text."""
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


def sync(fn):
    """Run an async Pilot test with asyncio.run: no pytest async plugin is needed."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper

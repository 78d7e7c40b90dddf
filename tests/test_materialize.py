"""Materialising builds the model empty and fills it from the donors' files (one copy in memory):
what it builds must be what from_pretrained loads, on every architecture, dtype and tying."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import CONFIGS, make_donor

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.live.hybrid import Hybrid
from surgeon.live.loader import load_model


def assert_same_model(got, want):
    g, w = dict(got.named_parameters()), dict(want.named_parameters())
    assert g.keys() == w.keys()
    for name in w:
        assert g[name].dtype == w[name].dtype, name
        assert torch.equal(g[name], w[name]), name
    gb, wb = dict(got.named_buffers()), dict(want.named_buffers())  # rotary frequencies included
    assert gb.keys() == wb.keys()
    for name in wb:
        assert gb[name].dtype == wb[name].dtype and torch.equal(gb[name], wb[name]), name
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_filled_model_is_what_from_pretrained_loads(model_type, donors_of):
    a = donors_of(model_type, 2)[0]
    hybrid = Hybrid.materialize(Plan("A"), {"A": open_donor(a)}, device="cpu")
    assert hybrid.filled_from_files
    assert_same_model(hybrid.model, load_model(a, device="cpu"))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "olmoe"])
@pytest.mark.parametrize("dtype", ["keep", "float32"])
def test_bf16_checkpoints_keep_from_pretrained_dtypes(model_type, dtype, tmp_path):
    # deepseek_v3 keeps its router and correction bias in float32 under bf16, as from_pretrained does
    a = make_donor(tmp_path / "a", model_type, seed=3, dtype=torch.bfloat16)
    hybrid = Hybrid.materialize(Plan("A"), {"A": open_donor(a)}, device="cpu", dtype=dtype)
    assert hybrid.filled_from_files
    assert_same_model(hybrid.model, load_model(a, device="cpu", dtype=dtype))


def test_tied_embeddings_stay_tied(tmp_path):
    a = make_donor(tmp_path / "a", "llama", seed=1, tie_word_embeddings=True)
    b = make_donor(tmp_path / "b", "llama", seed=2, tie_word_embeddings=True)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    hybrid = Hybrid.materialize(Plan("A", [parse_spec("embedding", "B")]), donors, device="cpu")
    assert hybrid.filled_from_files
    m = hybrid.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    want = load_model(a, device="cpu")
    with torch.no_grad():  # tied: the head follows
        want.model.embed_tokens.weight.copy_(load_model(b, device="cpu").model.embed_tokens.weight)
    assert_same_model(m, want)


def test_a_plan_is_filled_from_each_source_directly(donors_of):
    a, b, c = donors_of("qwen2_moe", 3)
    donors = {"A": open_donor(a), "B": open_donor(b), "C": open_donor(c)}
    plan = Plan("A", [parse_spec("attention", "B"), parse_spec("experts@1", "C"), parse_spec("router", "C")])
    direct = Hybrid.materialize(plan, donors, device="cpu")
    swapped = Hybrid.materialize(Plan("A"), donors, device="cpu")
    swapped.apply(plan)
    assert direct.filled_from_files
    assert_same_model(direct.model, swapped.model)
    assert direct.apply(plan).tensors == 0  # it holds the plan already


def test_a_tensor_the_model_has_no_place_for_falls_back_to_from_pretrained(tmp_path):
    a = make_donor(tmp_path / "a", "llama", seed=0)
    tensors = load_file(a / "model.safetensors")
    tensors["model.extra_probe.weight"] = torch.ones(3)  # from_pretrained ignores an unexpected key
    save_file(tensors, a / "model.safetensors", metadata={"format": "pt"})
    hybrid = Hybrid.materialize(Plan("A"), {"A": open_donor(a)}, device="cpu")
    assert not hybrid.filled_from_files
    assert_same_model(hybrid.model, load_model(a, device="cpu"))
    assert json.loads((a / "config.json").read_text())["model_type"] == "llama"


def mapped_kb(path) -> int:
    """Resident kB of this process's mappings of the file `path` (/proc/self/smaps)."""
    total, current = 0, None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line; anonymous ones name no file
            current = head[5] if len(head) >= 6 else None
        elif head[0] == "Rss:" and current == str(path):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("dtype", ["keep", "float32"])
def test_loads_and_swaps_leave_no_donor_pages_in_this_process(dtype, tmp_path):
    # Mapped donor pages count as the process's memory: a 7B hybrid would count its donors twice.
    # The kernel maps up to 64 kB around each page fault ("fault-around"), so the last read of a
    # file may leave that much; without the release every page read would stay.
    size = dict(hidden_size=64, intermediate_size=128, num_experts=8, vocab_size=1024)
    a = make_donor(tmp_path / "a", "olmoe", seed=0, dtype=torch.bfloat16, **size)
    b = make_donor(tmp_path / "b", "olmoe", seed=1, dtype=torch.bfloat16, **size)
    donors = {"A": open_donor(a), "B": open_donor(b)}
    files = [a / "model.safetensors", b / "model.safetensors"]
    assert all(f.stat().st_size > 1_000_000 for f in files)
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu", dtype=dtype)
    assert mapped_kb(files[0]) <= 64
    report = hybrid.apply(Plan("A", [parse_spec("experts", "B"), parse_spec("attention", "B")]))
    assert report.bytes > 500_000 and all(mapped_kb(f) <= 64 for f in files)
    name = "model.layers.0.self_attn.q_proj.weight"
    live = hybrid.live_view(name)
    assert torch.equal(live, load_file(files[1])[name].to(live.dtype))

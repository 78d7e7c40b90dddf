"""The surgery oracle: an exported hybrid loaded by plain transformers equals a reference built
independently here from the donors' state dicts, tensor for tensor and logit for logit."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import EXPERTS_PREFIX, MOE_TYPES
from transformers import AutoModelForCausalLM


def state_dict_of(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def expected_state(model_type, sds):
    """Written from the plan's meaning, not from moe-surgeon's tables: attention from donor 1,
    all experts of the last layer from donor 2, expert 1 of the first MoE layer from donor 3,
    routers and everything else from the base (donor 0)."""
    experts = EXPERTS_PREFIX.get(model_type, "mlp.experts")
    a, b, c, d = sds
    n_layers = max(int(m.group(1)) for k in a if (m := re.search(r"layers\.(\d+)\.", k))) + 1
    first_moe = 1 if model_type == "deepseek_v3" else 0
    out = {}
    for k, v in a.items():
        src = a
        if ".self_attn." in k:
            src = b
        if f"layers.{n_layers - 1}.{experts}." in k:
            src = c
        if f"layers.{first_moe}.{experts}.1." in k:
            src = d
        out[k] = src[k]
    return out, [
        "--take", "attention=DONOR1",
        "--take", f"experts@{n_layers - 1}=DONOR2",
        "--take", f"expert:1@{first_moe}=DONOR3",
    ]


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_export_equals_independent_reference(model_type, donors_of, tmp_path, cli):
    paths = donors_of(model_type, 4)
    sds = [state_dict_of(p) for p in paths]
    want, takes = expected_state(model_type, sds)
    takes = [t.replace("DONOR1", str(paths[1])).replace("DONOR2", str(paths[2])).replace("DONOR3", str(paths[3]))
             for t in takes]
    out = tmp_path / "hybrid"
    r = cli("export", out, "--base", paths[0], *takes)
    assert r.returncode == 0, r.stderr

    got = state_dict_of(out)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # Each donor really contributed something, so the check above is not vacuous.
    for i in (1, 2, 3):
        assert any(torch.equal(got[k], sds[i][k]) and not torch.equal(sds[0][k], sds[i][k]) for k in got)

    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    save_file(want, ref_dir / "model.safetensors", metadata={"format": "pt"})
    (ref_dir / "config.json").write_bytes((paths[0] / "config.json").read_bytes())

    hybrid = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hybrid(ids).logits, reference(ids).logits)
        base = AutoModelForCausalLM.from_pretrained(paths[0]).eval()
        assert not torch.allclose(hybrid(ids).logits, base(ids).logits)

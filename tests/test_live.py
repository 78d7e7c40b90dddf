"""The live layer's single sources: one dtype table (torch-free, with the torch side built from
it), one device check, one model loader."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgeon.core.donor import TORCH_TO_SAFETENSORS
from surgeon.core.gates_sidecar import write_gates
from surgeon.errors import SurgeonError
from surgeon.io.dtypes import CASTS, DTYPE_CHOICES, DTYPE_SIZES, FLOATS
from surgeon.live.devices import check_device
from surgeon.live.dtypes import TORCH_DTYPE_NAMES, TORCH_DTYPES, dtype_name
from surgeon.live.layer_gates import gate_modules
from surgeon.live.loader import load_model

IDS = torch.tensor([[5, 9, 12, 3, 30, 7]])


def test_the_dtype_table_agrees_with_torch():
    for name, dt in TORCH_DTYPES.items():
        assert torch.empty(0, dtype=dt).element_size() == DTYPE_SIZES[name], name
        assert TORCH_TO_SAFETENSORS[str(dt)] == name
    assert {n for n in TORCH_DTYPES if TORCH_DTYPES[n].is_floating_point and DTYPE_SIZES[n] > 1} == FLOATS
    assert DTYPE_CHOICES == ["keep", *CASTS]
    for user, dt in TORCH_DTYPE_NAMES.items():
        assert dtype_name(dt) == user and TORCH_DTYPES[CASTS[user]] is dt


def test_check_device_refuses_what_is_not_a_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(SurgeonError, match="not a device"):
        check_device("gpu7")


@pytest.fixture
def gated(tmp_path, donors_of):
    """A copy of a tiny llama with a non-zero scalar gate on layer 1."""
    path = shutil.copytree(donors_of("llama", 1)[0], tmp_path / "gated")
    write_gates(path, {1: torch.full((1,), 0.5)}, 32)
    return path


def test_load_model_is_eval_local_and_attaches_a_sidecars_gates(gated):
    plain = AutoModelForCausalLM.from_pretrained(gated, local_files_only=True).eval()
    with_gates = load_model(gated, device="cpu")
    without = load_model(gated, device="cpu", gates=False)
    assert not with_gates.training and not without.training
    assert list(gate_modules(with_gates)) == [1] and gate_modules(without) == {}
    with torch.no_grad():
        want = plain(IDS).logits
        assert torch.equal(without(IDS).logits, want)
        assert not torch.allclose(with_gates(IDS).logits, want)


def test_load_model_casts_and_reports_what_it_found(gated):
    model, info = load_model(gated, device="cpu", dtype="bfloat16", gates=False, loading_info=True)
    assert next(model.parameters()).dtype is torch.bfloat16
    assert not any(info.values())  # nothing missing or unexpected in a checkpoint transformers wrote


def test_load_model_refuses_a_directory_without_a_config(tmp_path):
    with pytest.raises(SurgeonError, match="no config.json"):
        load_model(tmp_path, device="cpu")

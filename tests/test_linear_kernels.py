"""While a probe runs, float32 CPU linears go through oneDNN: routed inside the block, restored
after it, the same products within float rounding, and hooks and autograd left alone."""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from transformers import AutoModelForCausalLM, AutoTokenizer

import surgeon.probes.linear_kernels as kernels
from surgeon.probes import ProbeOutcome, parse_probe
from surgeon.probes.generation import greedy_generate
from surgeon.probes.linear_kernels import onednn_linears, onednn_usable, routed_linears
from surgeon.probes.run import cache_key, make_record
from surgeon.probes.scoring import loglikelihoods

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not onednn_usable(), reason="this torch has no oneDNN linear")]


@pytest.fixture(scope="module")
def llama(donors_of):
    path = donors_of("llama", 1)[0]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def linears(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_every_linear_is_routed_inside_the_block_and_none_after(llama):
    model, _ = llama
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        plain = model(ids).logits
        with onednn_linears(model):
            assert routed_linears(model) == linears(model) > 0
            routed = model(ids).logits
    assert routed_linears(model) == 0
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)


def test_nested_blocks_keep_the_routing_until_the_last_one_ends(llama):
    model, _ = llama
    with onednn_linears(model):
        with onednn_linears(model):
            pass
        assert routed_linears(model) == linears(model)
    assert routed_linears(model) == 0


def test_a_hooked_module_keeps_its_hook_and_gradients_still_flow(donors_of):
    model = AutoModelForCausalLM.from_pretrained(donors_of("llama", 1)[0])  # of its own: hooks stay behind
    seen = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(module)
            return args, kwargs

    hooked = model.lm_head
    add_hook_to_module(hooked, Count())
    with onednn_linears(model):
        assert routed_linears(model) == linears(model) - 1
        out = model(torch.tensor([[1, 5, 9]])).logits  # autograd is on: MKL's linear, which has a backward
        out.sum().backward()
    assert seen == [hooked]
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_probes_run_routed_and_leave_the_model_as_it_was(llama):
    model, tok = llama
    during = []
    loglikelihoods(model, tok, [("12+7=", "19"), ("abc", "d")], progress=lambda *_: during.append(routed_linears(model)))
    greedy_generate(model, tok, ["5+5="], max_new_tokens=4, progress=lambda *_: during.append(routed_linears(model)))
    assert during and set(during) == {linears(model)}
    assert routed_linears(model) == 0


def test_results_say_which_kernel_and_donor_scores_are_cached_apart_by_it(monkeypatch):
    spec = parse_probe("mc:arith_mc,limit=4")
    outcome = ProbeOutcome(["1", "2"], [1.0, 0.0], metric="acc")
    assert make_record(spec, "hybrid", outcome, device="cpu", dtype="float32", batch_size=8)["cpu_linears"] == "onednn"
    assert "cpu_linears" not in make_record(spec, "hybrid", outcome, device="cuda:0", dtype="float32", batch_size=8)
    with_onednn = cache_key("f", spec, "cpu", "float32", 8)
    monkeypatch.setattr(kernels, "_usable", False)  # a torch without oneDNN: plain MKL linears
    assert make_record(spec, "hybrid", outcome, device="cpu", dtype="float32", batch_size=8)["cpu_linears"] == "mkl"
    assert cache_key("f", spec, "cpu", "float32", 8) != with_onednn
    assert cache_key("f", spec, "cuda", "float32", 8) == cache_key("f", spec, "cuda:1", "float32", 8)

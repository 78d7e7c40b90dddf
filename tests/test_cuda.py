"""The GPU paths: a hybrid filled on the GPU, hot-swaps into GPU tensors, and the probe command on
the GPU, each against the same on the CPU. Skipped without CUDA (CI has no GPU); on a lent GPU
machine `bench/device_check.sh` runs this file first.

MOE_SURGEON_TEST_GPU names the device to test (default "cuda"); set to "cpu" it runs the same
checks CPU against CPU, which proves the tests themselves on a machine without a GPU."""

import json
import os

import pytest
import torch

from surgeon.core.donor import open_donor
from surgeon.core.plan import Plan, parse_spec
from surgeon.live.hybrid import Hybrid

GPU = os.environ.get("MOE_SURGEON_TEST_GPU", "cuda")
pytestmark = pytest.mark.skipif(GPU.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _donors(donors_of):
    a, b = donors_of("olmoe", 2)
    return {"A": open_donor(a), "B": open_donor(b)}


def _same_bytes(on_gpu: Hybrid, on_cpu: Hybrid) -> None:
    assert on_gpu.resolution.sources.keys() == on_cpu.resolution.sources.keys()
    for name in on_cpu.resolution.sources:
        live = on_gpu.live_view(name)
        assert live.device.type == torch.device(GPU).type, name
        assert torch.equal(live.cpu(), on_cpu.live_view(name)), name


@pytest.mark.parametrize("native", [False, True], ids=["transformers", "native"])
def test_a_hybrid_filled_on_the_gpu_holds_the_bytes_the_cpu_one_holds(donors_of, native):
    donors = _donors(donors_of)
    plan = Plan("A", [parse_spec("attention", "B"), parse_spec("experts@0", "B")])
    on_gpu = Hybrid.materialize(plan, donors, device=GPU, native=native)
    on_cpu = Hybrid.materialize(plan, donors, device="cpu", native=native)
    assert all(p.device.type == torch.device(GPU).type for p in on_gpu.model.parameters())
    _same_bytes(on_gpu, on_cpu)


@pytest.mark.parametrize("native", [False, True], ids=["transformers", "native"])
def test_swaps_into_gpu_tensors_land_as_on_the_cpu_and_back(donors_of, native):
    donors = _donors(donors_of)
    on_gpu = Hybrid.materialize(Plan("A"), donors, device=GPU, native=native)
    on_cpu = Hybrid.materialize(Plan("A"), donors, device="cpu", native=native)
    for plan in (Plan("A", [parse_spec("attention", "B")]),
                 Plan("A", [parse_spec("experts@1", "B"), parse_spec("router", "B")]),
                 Plan("A")):
        moved = on_gpu.apply(plan)
        assert moved.tensors == on_cpu.apply(plan).tensors
        _same_bytes(on_gpu, on_cpu)


def test_the_probe_command_on_the_gpu_scores_every_item_as_on_the_cpu(tmp_path, run_cli):
    """The whole command: the hybrid filled on the device, our own forward there, the scores. Float32
    products on the GPU sum in another order than on the CPU, so log-likelihoods agree to rounding;
    every item's outcome must be the same."""
    samples = {}
    for device in ("cpu", GPU):
        out = tmp_path / f"{device.replace(':', '')}.jsonl"
        r = run_cli("probe", "demo:arith", "--probe", "mc:arith_mc,limit=48", "--device", device,
                    "--dtype", "float32", "--no-donors", "--samples", out, "--json")
        assert r.returncode == 0, r.stderr
        samples[device] = [json.loads(line) for line in out.read_text().splitlines()]
    cpu, gpu = samples["cpu"], samples[GPU]
    assert [s["doc_id"] for s in gpu] == [s["doc_id"] for s in cpu] and len(cpu) == 48
    assert [s["acc"] for s in gpu] == [s["acc"] for s in cpu]
    for a, b in zip(cpu, gpu):
        lls_a = [r[0][0] for r in a["resps"]]
        lls_b = [r[0][0] for r in b["resps"]]
        assert lls_b == pytest.approx(lls_a, abs=1e-3), a["doc_id"]

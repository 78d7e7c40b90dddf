"""Hot-swapping into a live model equals materialising the final plan from scratch."""

import os
import random
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgeon.core.donor import open_donor
from surgeon.core.plan import Assignment, Plan
from surgeon.core.resolve import changed_between, resolve
from surgeon.errors import SurgeonError
from surgeon.live.devices import check_device
from surgeon.live.hybrid import Hybrid


@pytest.fixture(params=["one thread", "lanes"])
def copy_lanes(request, monkeypatch):
    """Swaps copied in one thread, or in lanes of threads as a large swap is (Hybrid._copy_in_lanes):
    these models are far below the size where lanes start, so the threshold is lowered."""
    if request.param == "one thread":
        yield
        return
    import surgeon.live.hybrid as hybrid_module

    monkeypatch.setattr(hybrid_module, "LANE_BYTES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def random_plan(rng, anatomy, names):
    assignments = []
    for _ in range(rng.randint(1, 5)):
        comp = rng.choice(["attention", "router", "experts", "expert", "norms", "embedding", "lm_head", "final_norm"])
        layers = None
        if comp not in ("embedding", "lm_head", "final_norm") and rng.random() < 0.6:
            layers = tuple(sorted(rng.sample(range(anatomy.num_layers), rng.randint(1, anatomy.num_layers))))
        experts = tuple(sorted(rng.sample(range(anatomy.num_experts), 2))) if comp == "expert" else None
        assignments.append(Assignment(comp, rng.choice(names), layers, experts))
    return Plan("A", assignments)


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_hot_swap_sequence_equals_fresh_materialization(model_type, donors_of, copy_lanes):
    paths = donors_of(model_type, 3)
    donors = {n: open_donor(p) for n, p in zip("ABC", paths)}
    rng = random.Random(7)
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu")
    plan = Plan("A")
    for _ in range(6):
        plan = random_plan(rng, donors["A"].anatomy, list(donors))
        if model_type == "deepseek_v3":  # its layer 0 is dense: a per-layer transfer there would be refused
            plan.assignments = [a for a in plan.assignments if a.layers is None or 0 not in a.layers
                                or a.component not in ("router", "experts", "expert")]
        hybrid.apply(plan)
    fresh = Hybrid.materialize(plan, donors, device="cpu")
    live = hybrid.model.state_dict()
    for name, want in fresh.model.state_dict().items():
        assert torch.equal(live[name], want), name
    # and the fresh hybrid equals the disk tensors the plan names, through the fused layout
    for name, src in fresh.resolution.sources.items():
        disk = load_file(donors[src.donor].tensors[src.tensor].file)[src.tensor]
        assert torch.equal(fresh.live_view(name), disk), name


@pytest.mark.parametrize("model_type", ["olmoe", "gpt_oss"])
def test_a_swap_looks_at_every_tensor_whose_origin_moved(model_type, donors_of, moe_pair):
    """changed_between looks only at what either plan takes from another donor: it must name exactly
    what a scan of every tensor names, fused expert tensors spliced from two donors and a change of
    base included."""
    paths = moe_pair(model_type) if model_type == "gpt_oss" else donors_of(model_type, 2)
    donors = {n: open_donor(p) for n, p in zip("AB", paths)}
    rng = random.Random(3)
    old = resolve(Plan("A"), donors)
    seen = 0
    for i in range(16):
        new = resolve(random_plan(rng, donors["A"].anatomy, list(donors)), donors)
        if i % 5 == 4:
            new = resolve(Plan("B", new.plan.assignments), donors)
        scan = [n for n, s in new.sources.items() if s.origin != old.sources[n].origin]
        found = changed_between(old, new)
        assert len(found) == len(set(found)) and set(found) == set(scan), (old.plan, new.plan)
        seen += len(scan)
        old = new
    assert seen  # the plans did move tensors


def test_hybrid_logits_equal_exported_hybrid(donors_of, tmp_path, cli):
    a, b, c = donors_of("mixtral", 3)
    r = cli("export", tmp_path / "out", "--base", a, "--take", f"experts@1={b}", "--take", f"attention={c}",
            "--take", f"expert:2@0={c}")
    assert r.returncode == 0, r.stderr
    donors = {"A": open_donor(a), "B": open_donor(b), "C": open_donor(c)}
    from surgeon.core.plan import parse_spec

    plan = Plan("A", [parse_spec("experts@1", "B"), parse_spec("attention", "C"), parse_spec("expert:2@0", "C")])
    hybrid = Hybrid.materialize(plan, donors, device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hybrid.model(ids).logits, exported(ids).logits)


def test_swap_touches_only_changed_tensors(donors_of):
    paths = donors_of("olmoe", 2)
    donors = {"A": open_donor(paths[0]), "B": open_donor(paths[1])}
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu")
    report = hybrid.apply(Plan("A", [Assignment("expert", "B", (1,), (3,))]))
    assert report.tensors == 3  # gate, up and down of one expert
    assert hybrid.apply(Plan("A", [Assignment("expert", "B", (1,), (3,))])).tensors == 0
    assert hybrid.apply(Plan("A")).tensors == 3


def test_bad_device_is_a_clear_error():
    with pytest.raises(SurgeonError, match="not a device"):
        check_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(SurgeonError, match="CUDA is not available"):
            check_device("cuda:0")


def test_device_map_auto_materializes_and_swaps(donors_of):
    """device_map=auto (accelerate) places the hybrid itself; hot-swaps still land in place."""
    paths = donors_of("olmoe", 2)
    donors = {"A": open_donor(paths[0]), "B": open_donor(paths[1])}
    plan = Plan("A", [Assignment("attention", "B")])
    auto = Hybrid.materialize(plan, donors, device="auto")
    plain = Hybrid.materialize(plan, donors, device="cpu")
    for name in auto.resolution.sources:
        assert torch.equal(auto.live_view(name).cpu(), plain.live_view(name))


def test_a_swap_that_fails_midway_leaves_the_old_plan_live(donors_of, tmp_path, copy_lanes):
    import shutil

    paths = donors_of("olmoe", 3)
    c = shutil.copytree(paths[2], tmp_path / "c")
    donors = {"A": open_donor(paths[0]), "B": open_donor(paths[1]), "C": open_donor(c)}
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu")
    before = {k: v.clone() for k, v in hybrid.model.state_dict().items()}
    (c / "model.safetensors").unlink()  # C vanishes after it was opened: its tensors cannot be read
    with pytest.raises(SurgeonError, match=r"c/model.safetensors: cannot read tensor .*No such file"):
        hybrid.apply(Plan("A", [Assignment("attention", "B", (0,)), Assignment("experts", "C", (1,))]))
    after = hybrid.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # layer 0 attention was put back
    assert hybrid.apply(Plan("A", [Assignment("attention", "B")])).tensors > 0


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral", "qwen2_moe"])
def test_cpu_weights_sit_at_their_files_page_offsets(model_type, donors_of, monkeypatch):
    """Before the fill, each weight is moved to memory whose page offset is its file bytes' (a read
    into it then copies at full speed, live/alignment.py); its contents are still the donor's, and
    a swap to a donor laid out alike reads into the same places."""
    import surgeon.live.alignment as alignment
    from surgeon.live.alignment import PAGE
    from surgeon.live.layout import live_slice

    monkeypatch.setattr(alignment, "SMALLEST", 0)  # these weights are far below the size that counts
    paths = donors_of(model_type, 2)
    donors = {n: open_donor(p) for n, p in zip("AB", paths)}
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu")
    first: dict[str, int] = {}  # live name -> page offset of the first disk tensor read into it
    checked = 0
    for name, src in sorted(hybrid.resolution.sources.items(),
                            key=lambda item: donors["A"].tensors[item[0]].start):
        info = donors["A"].tensors[name]
        t = hybrid.target(name)
        view, live = live_slice(hybrid._live, t), hybrid._live[t.name]
        assert torch.equal(view, hybrid.reader.read("A", name).to(view.dtype)), name
        if view.dtype != live.dtype or info.start % live.element_size():
            continue
        want = first.setdefault(t.name, (info.start - (view.data_ptr() - live.data_ptr())) % PAGE)
        assert live.data_ptr() % PAGE == want, t.name
        checked += 1
    assert checked > len(first) / 2
    swapped = Plan("A", [Assignment("attention", "B")])
    hybrid.apply(swapped)
    fresh = Hybrid.materialize(swapped, donors, device="cpu")
    for name in hybrid.resolution.sources:
        t = hybrid.target(name)
        assert torch.equal(live_slice(hybrid._live, t), live_slice(fresh._live, fresh.target(name))), name


def test_a_first_swap_from_another_donor_reads_into_the_same_places_only_when_they_fit(donors_of, tmp_path):
    """A donor's tensor of the live dtype and shape is read straight into the bytes the base's was
    read into; one saved in another dtype is converted on the way instead, never read into them."""
    from tiny_models import make_donor

    a, c = donors_of("olmoe", 3)[0], donors_of("olmoe", 3)[2]
    b = make_donor(tmp_path / "b16", "olmoe", seed=1, dtype=torch.bfloat16)
    donors = {"A": open_donor(a), "B": open_donor(b), "C": open_donor(c)}
    hybrid = Hybrid.materialize(Plan("A"), donors, device="cpu")
    for donor in ("C", "B", "C"):
        hybrid.apply(Plan("A", [Assignment("attention", donor)]), dtype="float32")  # B's bf16 is cast
        disk = load_file(donors[donor].tensors["model.layers.0.self_attn.q_proj.weight"].file)
        for name in hybrid.resolution.changed():
            assert torch.equal(hybrid.live_view(name), disk[name].to(hybrid.live_view(name).dtype)), (donor, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_swaps_in_lanes_of_its_own(donors_of, monkeypatch):
    """The lane threads are kept between swaps; a child forked after one has none of them and must
    start its own rather than wait forever for the parent's."""
    import surgeon.live.hybrid as hybrid_module

    monkeypatch.setattr(hybrid_module, "LANE_BYTES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        a, b = donors_of("olmoe", 2)
        hybrid = Hybrid.materialize(Plan("A"), {"A": open_donor(a), "B": open_donor(b)}, device="cpu")
        hybrid.apply(Plan("A", [Assignment("attention", "B")]))  # starts the lane threads
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if hybrid.apply(Plan("A")).tensors > 0 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's swap never finished")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        torch.set_num_threads(threads)

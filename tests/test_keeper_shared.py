"""The app's one live hybrid (surgeon/live/keeper.py), shared by every screen that runs on it.

A job holds the hybrid for the whole job (`HybridKeeper.use`), so a probe and a routing run never
swap the one model under each other: the second waits, says so, and can be cancelled while it
waits. The Routing and Layer gates screens ask the keeper for the hybrid the Probes screen built
instead of materialising their own, and what they measure on it equals what a freshly materialised
model gives (the command line's path, `probe_hybrid`); no hook of theirs stays on the shared model.

Tiny real OLMoE donors with a character tokenizer (conftest's donors_of), as test_tui_probes.py.
"""

import threading
import time

import numpy as np
import pytest
from test_tui_helpers import screen_text, settle, sync
from test_tui_probes import SIZE, make_app, open_probes, run, write_mc

from screens.heatmap import HYBRID, RoutingScreen
from screens.probes import ProbesScreen
from surgeon.core.plan import Assignment, Plan
from surgeon.errors import SurgeonError
from surgeon.jobs import CancelToken, Cancelled
from surgeon.live.keeper import HybridKeeper

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture
def olmoe3(donors_of):
    return [str(p) for p in donors_of("olmoe", 3)]


# ---------------------------------------------------------------- the lock, on a stand-in hybrid
class FakeDonor:
    def __init__(self, path):
        self.path, self.fingerprint = path, f"fp-{path}"


class FakeHybrid:
    """Records the plans it is moved to; `fail` makes the next apply raise."""

    def __init__(self, plan):
        self.plans, self.fail = [plan], False
        self.resolution = type("R", (), {"plan": plan})()

    def apply(self, plan, dtype="keep"):
        if self.fail:
            raise RuntimeError("disk gone")
        self.plans.append(plan)
        self.resolution.plan = plan
        return f"swap to {plan.base}"


@pytest.fixture
def fake_materialize(monkeypatch):
    from surgeon.live.hybrid import Hybrid

    built = []

    def materialize(plan, donors, *, device=None, dtype="keep", **kw):
        built.append(FakeHybrid(plan))
        return built[-1]

    monkeypatch.setattr(Hybrid, "materialize", staticmethod(materialize))
    return built


DONORS = {"A": FakeDonor("a"), "B": FakeDonor("b")}


def test_use_builds_once_reuses_then_rebuilds_for_other_donors(fake_materialize):
    keeper = HybridKeeper()
    with keeper.use(Plan("A"), DONORS, "cpu", job="probe") as first:
        assert first.built and keeper.busy == "probe" and keeper.builds == 1
    assert keeper.busy is None
    with keeper.use(Plan("A"), DONORS, "cpu") as second:
        assert second.hybrid is first.hybrid and not second.built and second.swap == "swap to A"
    with keeper.use(Plan("A"), DONORS, "cpu", swap=False) as third:  # a sweep moves it itself
        assert third.hybrid is first.hybrid and third.swap is None
    with keeper.use(Plan("A"), {"A": DONORS["A"]}, "cpu") as other:
        assert other.hybrid is not first.hybrid and other.built
    assert keeper.builds == 2 and len(fake_materialize) == 2


def test_a_failure_drops_the_hybrid_and_a_cancel_keeps_it(fake_materialize):
    keeper = HybridKeeper()
    with pytest.raises(Cancelled):
        with keeper.use(Plan("A"), DONORS, "cpu") as lease:
            raise Cancelled()
    assert keeper.hybrid is lease.hybrid  # a job stops between batches, never inside a swap
    with pytest.raises(SurgeonError):
        with keeper.use(Plan("A"), DONORS, "cpu"):
            raise SurgeonError("a probe file went bad")
    assert keeper.hybrid is None and keeper.busy is None  # a swap may have stopped half-way
    with keeper.use(Plan("A"), DONORS, "cpu") as lease:
        lease.hybrid.fail = True
    with pytest.raises(RuntimeError, match="disk gone"):  # the swap to the job's plan itself failed
        with keeper.use(Plan("A", [Assignment("attention", "B")]), DONORS, "cpu"):
            pytest.fail("the block runs only once the hybrid is on the plan")
    assert keeper.hybrid is None and keeper.busy is None
    with keeper.use(Plan("A"), DONORS, "cpu") as lease:  # the lock was let go: the next job runs
        assert lease.built and keeper.builds == 3


def test_a_second_job_waits_for_the_first_says_so_and_then_runs(fake_materialize):
    keeper = HybridKeeper()
    holding, release, events, notes = threading.Event(), threading.Event(), [], []

    def probe():
        with keeper.use(Plan("A"), DONORS, "cpu", job="probe"):
            events.append("probe starts")
            holding.set()
            assert release.wait(10)
            events.append("probe ends")

    first = threading.Thread(target=probe)
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=lambda: _routing(keeper, events, notes))
    second.start()
    for _ in range(1000):
        if notes:
            break
        time.sleep(0.01)
    assert notes == ["waiting for the running probe…"] and events == ["probe starts"]
    release.set()
    first.join(10)
    second.join(10)
    assert events == ["probe starts", "probe ends", "routing starts"]
    assert keeper.builds == 1 and keeper.busy is None


def _routing(keeper, events, notes):
    plan = Plan("A", [Assignment("attention", "B")])
    with keeper.use(plan, DONORS, "cpu", job="routing run", note=notes.append) as lease:
        events.append("routing starts")
        assert lease.hybrid.resolution.plan == plan


def test_a_waiting_job_can_be_cancelled_and_a_job_cannot_wait_for_itself(fake_materialize):
    keeper = HybridKeeper()
    token, notes, raised = CancelToken(), [], []

    def waiter():
        try:
            with keeper.use(Plan("A"), DONORS, "cpu", job="routing run", note=notes.append, cancel=token):
                raised.append("entered")
        except Cancelled:
            raised.append("cancelled")

    with keeper.use(Plan("A"), DONORS, "cpu", job="sweep"):
        t = threading.Thread(target=waiter)
        t.start()
        for _ in range(1000):
            if notes:
                break
            time.sleep(0.01)
        token.cancel()
        t.join(10)
        assert raised == ["cancelled"] and notes == ["waiting for the running sweep…"]
        assert keeper.busy == "sweep"  # the cancelled waiter never held it
        with pytest.raises(RuntimeError, match="already held by this thread's sweep"):
            with keeper.use(Plan("A"), DONORS, "cpu", job="probe"):
                pass
    assert keeper.busy is None


# ---------------------------------------------------------------- routing on the shared hybrid
def hook_state(model) -> dict:
    """Every module's hooks and instance-level forward: what a routing probe adds and must take off."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), "forward" in m.__dict__)
            for name, m in model.named_modules()}


def assert_same_routing(mine: dict, fresh: dict) -> None:
    assert list(mine) == list(fresh)
    for corpus in fresh:
        a, b = mine[corpus], fresh[corpus]
        assert (a.layers, a.num_experts, a.top_k, a.tokens) == (b.layers, b.num_experts, b.top_k, b.tokens)
        for field in ("counts", "top1_counts", "token_ids", "selected", "cofire"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{corpus} {field}")
        for field in ("prob_sum", "weight_sum", "reap_sum", "norm_sum"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), field
            if x is not None:
                np.testing.assert_allclose(x, y, rtol=1e-9, atol=0, err_msg=f"{corpus} {field}")


def fresh_routing(plan, donors, corpora, tokenizer, device):
    """The command line's way: a model materialised for the call (probe_hybrid)."""
    from surgeon.features.routing.run import probe_hybrid

    return probe_hybrid(plan, donors, corpora, tokenizer=tokenizer, device=device, batch_size=32, reap="auto")


@pytest.fixture
def opened(olmoe3):
    from surgeon.core.donor import open_donor

    donors = {n: open_donor(p) for n, p in zip("ABC", olmoe3)}
    plan = Plan("A", [Assignment("attention", "B", (0,)), Assignment("expert", "C", (1,), (0, 3))])
    return donors, plan


CORPORA = {"sums": ["1+2=3", "12+30=42", "7+7=14"], "words": ["abc cab", "hello world", "zz top"]}


def test_probe_live_equals_a_fresh_model_and_leaves_no_hook_on_the_shared_hybrid(opened):
    from surgeon.features.routing.run import probe_live
    from surgeon.probes.scoring import load_tokenizer

    donors, plan = opened
    tokenizer = load_tokenizer(donors["A"].path)
    keeper = HybridKeeper()
    with keeper.use(plan, donors, "cpu", job="routing run") as lease:
        before = hook_state(lease.model)
        for donor in (None, "B", "C"):  # the hybrid, then each donor swapped in whole and back
            mine = probe_live(lease.hybrid, plan, CORPORA, tokenizer=tokenizer, donor=donor, device="cpu",
                              batch_size=32, reap="auto")
            assert lease.hybrid.resolution.plan == plan and hook_state(lease.model) == before
            assert_same_routing(mine, fresh_routing(plan if donor is None else Plan(donor), donors, CORPORA,
                                                    tokenizer, "cpu"))
        assert mine["sums"].reap_sum is not None  # the REAP layer was recorded (expert wrappers, taken off)
        # A failure and a cancel half-way through a donor: the hooks come off, the hybrid goes back.
        for stop, exc in ((RuntimeError("boom"), RuntimeError), (None, Cancelled)):
            token = CancelToken()

            def progress(step, stop=stop, token=token):
                if step.done:
                    if stop is not None:
                        raise stop
                    token.cancel()

            with pytest.raises(exc):
                probe_live(lease.hybrid, plan, CORPORA, tokenizer=tokenizer, donor="B", device="cpu", batch_size=1,
                           reap="auto", progress=progress, cancel=token)
            assert lease.hybrid.resolution.plan == plan and hook_state(lease.model) == before
    assert keeper.builds == 1


def test_gate_selection_shares_the_hybrid_without_changing_it(tmp_path, donors_of):
    """Selection only reads the model (an observer it takes off, no gradients): the same numbers on
    the kept hybrid as on one of its own, twice, with every weight as it was."""
    import torch

    from surgeon.core.donor import open_donor
    from surgeon.core.gates_sidecar import read_gates, write_gates
    from surgeon.features.gates.run import run_add, select_hybrid
    from surgeon.live.layer_gates import gate_modules

    base = donors_of("olmoe", 3)[0]
    gated = tmp_path / "gated"
    run_add(str(base), str(gated), "vector", "all")
    gates, _ = read_gates(gated)
    generator = torch.Generator().manual_seed(0)
    hidden = next(iter(gates.values())).shape[0]
    write_gates(gated, {layer: torch.randn(g.shape, generator=generator) * 0.5 for layer, g in gates.items()}, hidden)
    donors = {"A": open_donor(base), "G": open_donor(gated)}
    plan = Plan("A", [Assignment("layer_gate", "G")])
    fresh, _ = select_hybrid(plan, donors, "arith", device="cpu")
    keeper = HybridKeeper()
    with keeper.use(plan, donors, "cpu") as lease:
        weights = {n: t.clone() for n, t in lease.model.state_dict().items()}
        modules = [n for n, _ in lease.model.named_modules()]
    for _ in range(2):
        shared, _ = select_hybrid(plan, donors, "arith", device="cpu", keeper=keeper)
        assert shared.to_json() == fresh.to_json()
    model = keeper.hybrid.model
    assert keeper.builds == 1 and [n for n, _ in model.named_modules()] == modules
    assert all(torch.equal(weights[n], t) for n, t in model.state_dict().items())
    assert gate_modules(model) and all(g.observer is None for g in gate_modules(model).values())


# ---------------------------------------------------------------- the screens, through the app
def routed(app) -> dict:
    screen = app.get_screen("routing")
    return {m: stats for m, (ident, stats, error) in screen.results.items() if ident == screen.idents.get(m)}


def assert_screen_routing_is_fresh(app) -> None:
    """Every model the Routing screen shows equals its routing on a freshly materialised model."""
    from surgeon.features.routing.corpora import read_corpora
    from surgeon.live.devices import default_device
    from surgeon.probes.scoring import load_tokenizer

    wb = app.wb
    donors, corpora = dict(wb.donors), read_corpora(())
    tokenizer = load_tokenizer(donors[wb.base].path)
    shown = routed(app)
    assert set(shown) == {*donors, HYBRID} and all(s is not None for s in shown.values())
    for model, stats in shown.items():
        plan = wb.plan() if model == HYBRID else Plan(model)
        assert_same_routing(stats, fresh_routing(plan, donors, corpora, tokenizer, default_device()))
    assert not np.array_equal(shown[HYBRID]["arith"].counts, shown[wb.base]["arith"].counts)  # a real hybrid


@pytest.mark.slow  # a probe run and a routing run through the app
@sync
async def test_routing_after_a_probe_run_reads_the_same_live_hybrid(olmoe3, tmp_path, monkeypatch):
    from surgeon.features.routing.probe import moe_layers
    from surgeon.live.hybrid import Hybrid

    mc = write_mc(tmp_path / "mc.jsonl", 6, seed=2)
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")  # layer 0 attention from B: the hybrid is none of the donors
        screen = await open_probes(pilot, f"mc:{mc}")
        await run(pilot, screen)
        hybrid = app.hybrids.hybrid
        assert hybrid is not None and app.hybrids.builds == 1
        before = hook_state(hybrid.model)
        built = []
        real = Hybrid.materialize.__func__
        monkeypatch.setattr(Hybrid, "materialize",
                            classmethod(lambda cls, *a, **k: built.append(a) or real(cls, *a, **k)))
        await pilot.press("escape", "R")
        await settle(pilot)
        assert isinstance(app.screen, RoutingScreen)
        # No second model: the Probes screen's hybrid, donors swapped into it and back.
        assert app.hybrids.hybrid is hybrid and app.hybrids.builds == 1 and built == []
        assert hybrid.resolution.plan == app.wb.plan() and app.hybrids.busy is None
        assert hook_state(hybrid.model) == before and moe_layers(hybrid.model)
        assert_screen_routing_is_fresh(app)
        assert "4 of 4 models probed" in screen_text(app)


@pytest.mark.slow  # a probe run and a routing run through the app
@sync
async def test_a_routing_run_waits_for_the_running_probe_then_completes(olmoe3, tmp_path, monkeypatch):
    import surgeon.probes.run as probes_run

    mc = write_mc(tmp_path / "mc.jsonl", 6, seed=3)
    holding, release = threading.Event(), threading.Event()
    real = probes_run.evaluate

    def held(*args, **kwargs):  # the probe job, inside its hold on the keeper, waits for the test
        holding.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(probes_run, "evaluate", held)
    app = make_app(tmp_path, olmoe3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        probes = await open_probes(pilot, f"mc:{mc}")
        await pilot.press("r")
        for _ in range(3000):
            if holding.is_set():
                break
            await pilot.pause(0.01)
        assert holding.is_set() and probes.running and app.hybrids.busy == "probe"
        hybrid = app.hybrids.hybrid
        before = hook_state(hybrid.model)
        app.open_screen("routing")  # over the running Probes screen
        status = ""
        for _ in range(3000):
            await pilot.pause(0.01)
            if isinstance(app.screen, RoutingScreen):
                status = str(app.screen.query_one("#routing-status").render())
                if "waiting for the running probe" in status:
                    break
        routing = app.screen
        assert isinstance(routing, RoutingScreen) and "waiting for the running probe…" in status
        await pilot.pause(0.3)
        # While the probe holds the hybrid the routing run touches nothing: no hooks, no swap, no result.
        assert routing.job_running and routed(app) == {} and app.hybrids.busy == "probe"
        assert hook_state(hybrid.model) == before and hybrid.resolution.plan == app.wb.plan()
        release.set()
        await settle(pilot)
        assert not probes.running and not routing.job_running and app.hybrids.busy is None
        assert isinstance(app.get_screen("probes"), ProbesScreen)
        assert [r["model"] for r in app.records.results][:1] == ["hybrid"]  # the probe was recorded
        assert app.hybrids.hybrid is hybrid and app.hybrids.builds == 1
        assert hook_state(hybrid.model) == before and hybrid.resolution.plan == app.wb.plan()
        assert_screen_routing_is_fresh(app)

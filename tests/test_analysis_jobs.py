"""Routing, compress, gates and distance as jobs (surgeon.jobs): Steps while they work, a cancel that
stops them between batches, layers or steps and leaves nothing written, and one engine function the
command line is a thin wrapper around."""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_tui_helpers import settle, sync
from tiny_models import make_donor, save_char_tokenizer
from transformers import AutoModelForCausalLM

from surgeon.cli.main import main
from surgeon.core.donor import open_donor
from surgeon.core.plan import parse_layers
from surgeon.errors import SurgeonError
from surgeon.jobs import Cancelled, CancelToken

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

TEXTS = ["12+7=19", "rev:abc=cba", "the cat sat on the mat", "99+1=100", "rev:hello=olleh", "a", "zebra: 42"]
LINES = "".join(f"the cat sat on mat {i} and {i}+{2 * i % 7}={i + 2 * i % 7}\n" for i in range(24))


def cancel_after(token: CancelToken, n: int, steps: list):
    """A progress callback that records Steps and cancels the job after the n-th."""
    def progress(step):
        steps.append(step)
        if len(steps) == n:
            token.cancel()
    return progress


def test_parse_layers_is_the_one_layer_spec_parser():
    assert parse_layers(None) is None and parse_layers("all") is None
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers("3,0-1") == (0, 1, 3)
    with pytest.raises(SurgeonError, match=r"--layers 0-5: layer 3 out of range \(the model has 3 layers: 0-2\)"):
        parse_layers("0-5", 3)
    with pytest.raises(SurgeonError, match="layers x"):
        parse_layers("x", flag="layers")


def test_routing_probe_reports_sequences_and_stops_between_batches(donors_of):
    from surgeon.features.routing.probe import probe_domains
    from surgeon.probes.scoring import load_tokenizer

    path = donors_of("olmoe", 2)[0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    corpora = {"one": TEXTS, "two": TEXTS[:3]}
    steps = []
    probe_domains(model, tok, corpora, batch_size=2, progress=steps.append)
    assert [s.done for s in steps] == [2, 4, 6, 7, 9, 10] and {s.total for s in steps} == {10}
    assert {s.unit for s in steps} == {"sequences"} and [s.detail for s in steps][-1] == "two"
    token, seen = CancelToken(), []
    with pytest.raises(Cancelled):
        probe_domains(model, tok, corpora, batch_size=2, progress=cancel_after(token, 2, seen), cancel=token)
    assert len(seen) == 2  # the batch after the cancel never ran


def test_the_routing_command_prints_what_run_routing_returns(donors_of, tmp_path, capsys):
    from surgeon.features.routing.run import RoutingRequest, run_routing

    path = donors_of("olmoe", 2)[0]
    (tmp_path / "a.txt").write_text("12+7=19\n\n3+4=7\n\n88+12=100\n")
    assert main(["routing", str(path), "--corpus", f"sums={tmp_path / 'a.txt'}", "--corpus", "arith",
                 "--expert", "1:0", "--take-used", "2", "--max-tokens", "300", "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = run_routing(RoutingRequest(str(path), corpora=(f"sums={tmp_path / 'a.txt'}", "arith"), experts=("1:0",),
                                        take_used=2, max_tokens=300, device="cpu"))
    assert printed == json.loads(json.dumps(result.report))
    assert set(result.stats) == {"sums", "arith"} and result.takes == printed["takes"]


def test_a_cancelled_compress_writes_nothing(donors_of, tmp_path):
    from surgeon.features.compress import CompressRequest, run_compress

    path = donors_of("qwen3_moe", 1)[0]
    out = tmp_path / "compact"
    token, steps = CancelToken(), []
    layers = len(open_donor(path).anatomy.experts_per_layer)
    request = CompressRequest(str(out), str(path), experts=("0,1",), device="cpu")
    with pytest.raises(Cancelled):  # cancelled after the last layer: the write stops before its first shard
        run_compress(request, progress=cancel_after(token, layers, steps), cancel=token)
    assert [s.done for s in steps] == list(range(1, layers + 1)) and steps[-1].unit == "layers"
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its staging directory
    result = run_compress(request)
    assert (out / "config.json").is_file() and result.report["written"]["path"] == str(out)


def test_gates_training_cancelled_leaves_the_sidecar_as_it_was(tmp_path):
    from surgeon.core.gates_sidecar import GATES_FILE
    from surgeon.features.gates.run import TRAINING_LOG, DataSpec, run_add, run_train
    from surgeon.features.gates.train import TrainSettings

    base = save_char_tokenizer(make_donor(tmp_path / "base", "llama", seed=0, num_hidden_layers=3))
    gated = tmp_path / "gated"
    record = run_add(str(base), str(gated), "vector", "1-2")
    assert record["layers"] == [1, 2] and (gated / GATES_FILE).is_file()
    (tmp_path / "lines.txt").write_text(LINES)
    data = DataSpec(str(tmp_path / "lines.txt"), seq_len=24, unit="line")
    settings = TrainSettings(steps=6, lr=2e-2, warmup=1, batch_size=4, seq_len=24)
    before = (gated / GATES_FILE).read_bytes()
    token, steps = CancelToken(), []
    with pytest.raises(Cancelled):
        run_train(str(gated), data, settings, device="cpu", progress=cancel_after(token, 3, steps), cancel=token)
    assert len(steps) == 3 and (gated / GATES_FILE).read_bytes() == before and not (gated / TRAINING_LOG).exists()
    steps = []
    run = run_train(str(gated), data, settings, device="cpu", progress=steps.append)
    assert [s.done for s in steps] == list(range(1, 7)) and steps[-1].unit == "steps"
    assert steps[-1].detail == f"loss {run.result.losses[-1]:.4f}"
    assert (gated / GATES_FILE).read_bytes() != before and (gated / TRAINING_LOG).is_file()


def test_distance_map_stops_when_cancelled_and_keeps_what_it_computed(donors_of, tmp_path):
    from surgeon.features.distance import DistanceCache, component_tensors, distance_map

    a, b = (open_donor(p) for p in donors_of("olmoe", 2))
    cache = DistanceCache(tmp_path / "cache")
    token, steps, cells = CancelToken(), [], []
    with pytest.raises(Cancelled):
        for cell, _ in distance_map(a, b, cache, progress=cancel_after(token, 3, steps), cancel=token):
            cells.append(cell)
    assert len(cells) == 3 and steps[-1].total == len(component_tensors(a))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the three figures are cached all the same


@sync
async def test_restart_job_replaces_a_running_job_without_a_cancelled_notice():
    from textual.app import App

    from screens.job import JobScreen

    class Probe(JobScreen):
        def __init__(self):
            super().__init__()
            self.ended = []

        def slow(self, name, *, progress, cancel):
            while True:  # until cancelled
                cancel.check()
                time.sleep(0.01)

        def quick(self, name, *, progress, cancel):
            return name

        def job_finished(self, result):
            self.ended.append(("finished", result))

        def job_cancelled(self):
            self.ended.append(("cancelled", None))

    class Host(App):
        def on_mount(self):
            self.push_screen(Probe())

    app = Host()
    async with app.run_test() as pilot:
        screen = app.screen
        screen.restart_job(screen.slow, "first")
        assert screen.job_running and threading.active_count() > 1
        screen.restart_job(screen.quick, "second")
        screen.restart_job(screen.quick, "third")  # only the newest waits
        await settle(pilot)
        assert screen.ended == [("finished", "third")] and not screen.job_running
        screen.restart_job(screen.slow, "fourth")
        screen.cancel_job()
        await settle(pilot)
        assert screen.ended[-1] == ("cancelled", None)

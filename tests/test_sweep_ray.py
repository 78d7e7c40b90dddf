"""The sweep on a local Ray cluster: the same record and tables as the serial sweep, saved after
every configuration, resumable, and one line when a worker cannot see the donors.

Needs the `ray` extra (pip install "moe-surgeon[ray]"; CI installs it). Without Ray installed the
cluster tests are skipped with that reason; when Ray is installed but cannot start, they fail with
Ray's reason (the SurgeonError `ray_cluster` raises).
"""

import itertools
import json
import os
import re
import shutil
import socket
import sys

import pytest
from test_bad_input import assert_one_line_error

from surgeon.core.donor import open_donor
from surgeon.core.session import load_session
from surgeon.errors import SurgeonError
from surgeon.features.sweep.distributed import (
    Cluster,
    cut_segments,
    donor_source,
    plan_units,
    ray_cluster,
    run_distributed_sweep,
)
from surgeon.features.sweep.report import analyze, to_csv, to_markdown
from surgeon.features.sweep.runner import (
    SweepSpec,
    default_groups,
    gray_order,
    is_complete,
    run_sweep,
)
from surgeon.probes import parse_probe

# The sweep tests' own probe sizes: two multiple-choice sets and a short generative one.
PROBES = ["mc:arith_mc,limit=12", "mc:reverse_mc,limit=12", "em:arith,limit=6,max_new_tokens=3"]
RAY_EXTRA = 'Ray is not installed: pip install "moe-surgeon[ray]" (CI installs it and runs these tests)'


@pytest.fixture(scope="module")
def demo():
    return {"A": open_donor("demo:arith"), "B": open_donor("demo:reverse")}


def make_spec():
    return SweepSpec("A", "B", default_groups(), [parse_probe(p) for p in PROBES], device="cpu")


@pytest.fixture(scope="module")
def serial(demo):
    """The serial sweep every Ray run must reproduce."""
    return run_sweep(make_spec(), demo)


@pytest.fixture(scope="module")
def cluster():
    """One local 2-worker cluster for the module: starting Ray costs seconds."""
    pytest.importorskip("ray", reason=RAY_EXTRA)
    with ray_cluster(workers=2) as c:  # a Ray that cannot start fails here, with Ray's reason
        yield c


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty donor score cache, so the workers measure the ceilings rather than read them."""
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))


def same_outcomes(a: dict, b: dict) -> None:
    assert [c["mask"] for c in a["configurations"]] == [c["mask"] for c in b["configurations"]]
    for x, y in zip(a["configurations"], b["configurations"]):
        assert x["groups"] == y["groups"]
        for label, rec in x["results"].items():
            assert y["results"][label]["ids"] == rec["ids"]
            assert y["results"][label]["outcomes"] == rec["outcomes"], (x["mask"], label)
    for name, ceilings in a["ceilings"].items():
        for label, rec in ceilings.items():
            assert b["ceilings"][name][label]["outcomes"] == rec["outcomes"], (name, label)
    assert to_markdown(analyze(a)) == to_markdown(analyze(b))
    assert to_csv(analyze(a)) == to_csv(analyze(b))


# ---------------------------------------------------------------- pure parts
def test_segments_are_contiguous_balanced_and_cover_the_walk():
    assert cut_segments([1] * 8, 2) == [range(4), range(4, 8)]
    assert cut_segments([4, 1, 1, 1, 1], 2) == [range(1), range(1, 5)]
    assert cut_segments([1, 1], 5) == [range(1), range(1, 2)]  # never an empty segment
    for n in range(1, 7):
        segs = cut_segments([3, 1, 4, 1, 5, 9, 2, 6], n)
        assert [i for s in segs for i in s] == list(range(8)) and all(segs)


def test_units_walk_base_ceiling_gray_order_donor_ceiling(demo):
    spec = make_spec()
    labels = [s.label for s in spec.probes]
    units = plan_units(spec, {"A": labels, "B": labels[:1]}, {m: labels for m in range(8)})
    assert [u.name or u.mask for u in units] == ["A", *gray_order(3)[1:], "B"]  # the empty one is A's ceiling
    assert units[-1].labels == tuple(labels[:1]) and [u.index for u in units] == list(range(9))
    assert donor_source(demo["A"]) == "demo:arith"  # a demo donor by name: its path differs per node


def test_workers_take_one_gpu_each_or_a_share_of_the_cores():
    assert Cluster(None, 2, 2, 0).device(None) == "cpu" and Cluster(None, 2, 2, 0).threads == 1
    assert Cluster(None, 2, 2, 0).resources("cpu") == {"num_cpus": 1}
    assert Cluster("auto", 4, 64, 8).device(None) == "cuda" and Cluster("auto", 4, 64, 8).device("cuda:1") == "cuda"
    assert Cluster("auto", 4, 64, 8).resources("cuda") == {"num_gpus": 1, "num_cpus": 1}
    assert Cluster(None, 2, 16, 1).device("cpu") == "cpu"
    for cluster, asked, needle in [
        (Cluster(None, 2, 16, 1), None, "--workers 2: 2 workers take one GPU each and this machine has 1"),
        (Cluster("ray://h:10001", 2, 16, 0), "cuda", "--device cuda: the cluster at ray://h:10001 has no GPU"),
        (Cluster(None, 1, 16, 1), "auto", "use --device cuda"),
        (Cluster(None, 1, 16, 1), "mps", "runs on cpu or cuda"),
    ]:
        with pytest.raises(SurgeonError, match=re.escape(needle)):
            cluster.device(asked)


def test_without_ray_the_options_say_how_to_install_it(run_cli, demo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    for opts in (["--workers", "2"], ["--ray", "auto"]):
        r = run_cli("sweep", tmp_path / "s.json", "--base", "demo:arith", "--donor", "demo:reverse", *opts)
        assert_one_line_error(r, 'pip install "moe-surgeon[ray]"')
    assert not (tmp_path / "s.json").exists()


def test_an_address_nothing_answers_at_is_one_line_in_seconds(run_cli, tmp_path):
    pytest.importorskip("ray", reason=RAY_EXTRA)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("sweep", tmp_path / "s.json", "--base", "demo:arith", "--donor", "demo:reverse",
                "--ray", f"ray://127.0.0.1:{port}")
    assert_one_line_error(r, f"--ray ray://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}")
    assert not (tmp_path / "s.json").exists()


def test_more_workers_than_cores_is_refused_before_ray_starts(run_cli, tmp_path):
    pytest.importorskip("ray", reason=RAY_EXTRA)
    cores = os.cpu_count() or 1
    r = run_cli("sweep", tmp_path / "s.json", "--base", "demo:arith", "--donor", "demo:reverse",
                "--workers", str(cores + 1))
    assert_one_line_error(r, f"--workers {cores + 1}: this machine has {cores} core")
    assert not (tmp_path / "s.json").exists()
    for bad in ("abc", "-"):
        r = run_cli("sweep", tmp_path / "s.json", "--workers", bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--workers" in r.stderr


# ---------------------------------------------------------------- on the cluster
@pytest.mark.slow
def test_two_workers_give_the_serial_record_saved_after_every_configuration(demo, serial, cluster, fresh_cache):
    spec = make_spec()
    saved, events, steps = [], [], []

    def save(rec):
        saved.append(json.loads(json.dumps(rec)))  # what the session file holds at that moment

    def on_event(e):
        if e.kind == "configuration":  # saved before anyone hears of it, whichever worker finished it
            assert e.mask in [c["mask"] for c in saved[-1]["configurations"]]
        events.append(e)

    record = run_distributed_sweep(spec, demo, cluster, save=save, on_event=on_event, progress=steps.append)
    assert is_complete(record)
    same_outcomes(serial, record)

    done = [e for e in events if e.kind == "configuration"]
    assert sorted(e.mask for e in done) == list(range(8)) and [e.done for e in done] == list(range(1, 9))
    assert [len(s["configurations"]) for s in saved] == sorted(len(s["configurations"]) for s in saved)
    by_worker = {e.worker for e in done if e.mask}
    assert by_worker == {1, 2}  # both workers measured configurations
    for w in (1, 2):  # and each walked its own segment in Gray-code order, one group per step after the first
        mine = [e.mask for e in done if e.worker == w]
        assert mine == sorted(mine, key=gray_order(3).index)
        assert all((a ^ b).bit_count() == 1 for a, b in itertools.pairwise(mine))
    assert {e.worker for e in events if e.kind == "worker"} == {1, 2}
    assert {e.name for e in events if e.kind == "worker"} == {socket.gethostname()}
    assert {e.cached for e in events if e.kind == "ceiling"} == {False}
    run = record["runs"][-1]
    assert (run["workers"], run["configurations_measured"], run["ceilings_measured"]) == (2, 8, 6)
    assert steps[-1].finished and steps[-1].total == 7 * 30 + 2 * 30  # items: 7 configurations + 2 ceilings
    assert "worker 1: " in steps[0].detail and "worker 2: " in steps[0].detail
    # the serial runner takes the record over as its own: nothing left to measure
    again = run_sweep(spec, demo, record=json.loads(json.dumps(record)),
                      on_event=lambda e: e.kind == "configuration" and pytest.fail("measured again"))
    assert len(again["runs"]) == len(record["runs"])


@pytest.mark.slow
def test_a_partial_record_resumes_on_the_cluster_measuring_only_what_is_missing(demo, serial, cluster):
    spec = make_spec()
    partial = json.loads(json.dumps(serial))  # what a serial run killed after 3 configurations saved
    partial["configurations"] = partial["configurations"][:3]
    measured = []
    resumed = run_distributed_sweep(spec, demo, cluster, record=partial,
                                    on_event=lambda e: e.kind == "configuration" and measured.append(e.mask))
    assert sorted(measured) == sorted(gray_order(3)[3:])  # nothing finished is measured twice
    assert resumed["runs"][-1]["ceilings_measured"] == 0
    same_outcomes(serial, resumed)
    # a finished sweep starts no worker
    again = run_distributed_sweep(spec, demo, cluster, record=resumed)
    assert len(again["runs"]) == len(resumed["runs"])


@pytest.mark.slow
def test_a_worker_that_cannot_see_a_donor_stops_the_run_in_one_line(demo, cluster, fresh_cache, tmp_path):
    copies = {n: open_donor(shutil.copytree(d.path, tmp_path / n)) for n, d in demo.items()}
    spec = make_spec()
    assert copies["A"].fingerprint  # the driver opened it while it was there
    shutil.move(tmp_path / "A", tmp_path / "A-moved")  # gone from the path the workers are given
    saved = []
    with pytest.raises(SurgeonError) as err:
        run_distributed_sweep(spec, copies, cluster, save=saved.append)
    text = str(err.value)
    assert "\n" not in text and f"on {socket.gethostname()}" in text and "worker " in text
    assert f"{tmp_path / 'A'}: no such directory" in text and "a filesystem all nodes share" in text
    assert not saved or all(not s["configurations"] for s in saved)


def test_cli_workers_progress_per_worker_and_same_table(cli, serial, tmp_path):
    pytest.importorskip("ray", reason=RAY_EXTRA)
    r = cli("sweep", tmp_path / "s.json", "--base", "demo:arith", "--donor", "demo:reverse", "--device", "cpu",
            *[a for p in PROBES for a in ("--probe", p)], "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == to_markdown(analyze(serial))
    assert "worker 1 on " in r.stderr and "worker 2 on " in r.stderr
    assert "on worker 1; saved" in r.stderr and "on worker 2; saved" in r.stderr
    assert "worker 1: " in r.stderr and "items" in r.stderr  # the total item line with each worker's place
    (record,) = load_session(tmp_path / "s.json").extensions["sweeps"]
    same_outcomes(serial, record)

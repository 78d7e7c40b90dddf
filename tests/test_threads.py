"""Robust under load: the OpenMP wait policy and torch's thread count are set as the process starts
(before torch loads) unless the user set them, and the workbench's background hash pauses while a
foreground job (a probe) runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from test_tui_helpers import settle, sync, write_synthetic

from surgeon.io import content_hash as CH
from surgeon.jobs import FOREGROUND, CancelToken
from surgeon.live.threads import THREAD_SETTINGS, WAIT_SETTINGS, cgroup_cpu_limit, configure_threads

# What the process sees after the real entry point ran a command that loads no model.
CHILD = """
import json, os, sys
from surgeon.cli.main import main
assert "torch" not in sys.modules
main(["probe", "--list"])
import torch
print(json.dumps({"env": {k: os.environ.get(k) for k in %r}, "threads": torch.get_num_threads()}))
""" % ((*WAIT_SETTINGS, *THREAD_SETTINGS),)


def run_child(extra_env: dict, affinity: set | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*WAIT_SETTINGS, *THREAD_SETTINGS)}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_torch_threads(env: dict) -> int:
    return int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                              capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow
def test_the_entry_point_sets_a_passive_wait_and_keeps_torchs_thread_count_on_the_whole_machine():
    got = run_child({})
    assert got["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert got["env"]["GOMP_SPINCOUNT"] is None and got["env"]["OMP_NUM_THREADS"] is None
    clean = {k: v for k, v in os.environ.items() if k not in (*WAIT_SETTINGS, *THREAD_SETTINGS)}
    assert got["threads"] == plain_torch_threads(clean)


@pytest.mark.slow
def test_what_the_user_set_is_left_alone():
    got = run_child({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"})
    assert got["env"]["OMP_WAIT_POLICY"] == "ACTIVE" and got["env"]["OMP_NUM_THREADS"] == "1"
    assert got["threads"] == 1
    # GNU OpenMP's spin count overrides the policy: a user who set it chose how threads wait.
    got = run_child({"GOMP_SPINCOUNT": "300000", "MKL_NUM_THREADS": "1"})
    assert got["env"]["OMP_WAIT_POLICY"] is None and got["env"]["OMP_NUM_THREADS"] is None
    assert got["env"]["GOMP_SPINCOUNT"] == "300000"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_a_process_pinned_to_fewer_cores_than_the_machine_has_gets_one_thread_per_core():
    one = {min(os.sched_getaffinity(0))}
    got = run_child({}, affinity=one)
    assert got["env"]["OMP_NUM_THREADS"] == "1" and got["threads"] == 1


def test_once_torch_is_loaded_nothing_is_set():
    import torch

    assert torch.get_num_threads() >= 1  # loaded: OpenMP has read its settings already

    env = {}
    assert configure_threads(env) == {} and env == {}


def test_the_cgroup_quota_is_read_in_cores(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.0


def wait_for(predicate, what: str, seconds: float = 30.0) -> None:
    """Poll until `predicate()`; the limit only turns a hang into a failure, it times nothing."""
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.01)


def test_a_background_hash_pauses_while_a_foreground_job_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(CH, "CHUNK", 4096)
    f = tmp_path / "shard.bin"
    f.write_bytes(os.urandom(5 * 4096 + 7))
    steps, got = [], {}
    with FOREGROUND.running():
        worker = threading.Thread(target=lambda: got.update(CH.hash_files([f], progress=steps.append,
                                                                          background=True)))
        worker.start()
        wait_for(lambda: FOREGROUND.waiting > 0, "the hash paused")
        assert worker.is_alive() and steps == []  # not one chunk read while the job runs
    worker.join()
    assert got[f] == CH.hash_file(f, use_cache=False) and steps[-1].done == f.stat().st_size
    # A hash a job itself asks for never waits (it would wait on itself).
    with FOREGROUND.running():
        assert CH.hash_file(f, use_cache=False) == got[f]


def test_a_paused_hash_still_stops_when_cancelled(tmp_path, monkeypatch):
    from surgeon.jobs import Cancelled

    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "shard.bin"
    f.write_bytes(b"x" * 1000)
    token, raised = CancelToken(), []

    def hash_it():
        try:
            CH.hash_files([f], cancel=token, background=True)
        except Cancelled:
            raised.append(True)

    with FOREGROUND.running():
        worker = threading.Thread(target=hash_it)
        worker.start()
        wait_for(lambda: FOREGROUND.waiting > 0, "the hash paused")
        token.cancel()
        worker.join()
    assert raised == [True] and CH.cached_hash(f) is None


async def until(pilot, predicate, what: str, seconds: float = 30.0) -> None:
    """wait_for, letting the app run meanwhile."""
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, f"never happened: {what}"
        await pilot.pause(0.01)


@sync
async def test_the_workbench_hash_waits_for_a_running_job(tmp_path, monkeypatch):
    """The real app: its donor hash pauses while a job screen's job runs, then finishes."""
    from screens.app import SurgeonApp
    from screens.job import JobScreen

    monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache"))
    shards = [write_synthetic(tmp_path / n, seed) / "model.safetensors" for seed, n in enumerate("AB")]
    release, seen = threading.Event(), []

    def job(*, progress, cancel):
        seen.append(FOREGROUND.busy)
        release.wait(60)

    class Busy(JobScreen):
        def on_mount(self):
            self.start_job(job)

    app = SurgeonApp([str(p.parent) for p in shards], None, state_dir=tmp_path / "state", offer_recovery=False)
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(pilot)  # loaded, and these small donors hashed
        monkeypatch.setenv("MOE_SURGEON_CACHE", str(tmp_path / "cache2"))  # so the next hash must read them
        await app.push_screen(Busy())
        await until(pilot, lambda: seen, "the job started")
        app.start_hashing()  # what the app does when its donors change
        await until(pilot, lambda: FOREGROUND.waiting > 0, "the workbench hash paused")
        assert seen == [True] and all(CH.cached_hash(p) is None for p in shards)
        release.set()
        await settle(pilot)
        assert not FOREGROUND.busy and all(CH.cached_hash(p) for p in shards)

"""bench/device_check.sh, the prepared run for a lent GPU machine, works end to end here in its dry
run (DEVICE=cpu): the GPU tests' own code runs, CPU against CPU (on a machine without CUDA they are
otherwise skipped), and each step's output and exit status land in OUT."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_device_check_runs_the_gpu_tests_cpu_against_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "STEPS": "tests", "OUT": str(out)}
    r = subprocess.run(["bash", "bench/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch" in (out / "env.txt").read_text()
    log = (out / "tests.txt").read_text()
    assert "== tests: exit 0" in log, log[-3000:]
    assert "= 5 passed in" in log and "skipped" not in log, log[-3000:]
    assert not (out / "scale.txt").exists()  # STEPS picks the steps

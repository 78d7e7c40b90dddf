"""A forward's freed temporaries stay with the process for the next forward (surgeon/live/allocator.py):
without it glibc gives large freed blocks back and every long forward faults its pages in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from surgeon.live import allocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

# Three 24 MiB tensors alive at once and freed, as a long batch's MLP outputs are, twice; prints the
# page faults of the second time. With `keep`, the probes' setting first.
CHILD = """
import resource, sys, torch
from surgeon.live.allocator import keep_freed_memory
from surgeon.probes.scoring import probe_forwards
if sys.argv[1] == "keep":
    with probe_forwards(torch.nn.Linear(2, 2), torch.device("cpu")):
        pass
def forward():
    a, b, c = torch.ones(6 << 20), torch.ones(6 << 20), torch.ones(6 << 20)
    del a, b, c
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, keep_freed_memory())
"""


def second_forward_faults(mode: str, **extra) -> tuple[int, bool]:
    env = {k: v for k, v in os.environ.items() if not allocator.user_tuned_malloc({k: v})}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=True)
    faults, kept = out.stdout.split()
    return int(faults), kept == "True"


def test_a_probe_keeps_freed_temporaries_so_the_next_forward_does_not_fault_them_in_again():
    pages = 3 * (24 << 20) // 4096
    default, _ = second_forward_faults("default")
    kept, applied = second_forward_faults("keep")
    assert default > pages // 2  # glibc handed the blocks back: the second forward faulted them in
    assert applied and kept < pages // 20


def test_what_the_user_set_for_malloc_is_left_alone():
    faults, applied = second_forward_faults("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied and faults > (3 * (24 << 20) // 4096) // 2
    assert allocator.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not allocator.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "PATH": "/bin"})

"""How torch's CPU threads wait and how many there are, chosen once as the process starts.

OpenMP threads spin while they wait for the next parallel region. Alone on the machine that saves
a wake-up; with another process busy on the same cores, the spinning threads take the cores the
working ones need, and a probe collapses: one forward of the demo OLMoE (8 x 24 tokens) took
1,367 ms with torch's defaults beside an lm-eval run on this 2-core machine, and 19 ms with
OMP_WAIT_POLICY=PASSIVE (threads sleep when idle). On an idle machine PASSIVE costs a wake-up per
parallel region, within the noise at these sizes (docs/performance.md).

The thread count stays torch's own (the machine's cores): with PASSIVE, two threads beside two busy
processes still ran a SmolLM2-135M-shaped prefill in 3.7 s where one thread took 5.0-6.9 s (one
thread is as fast only for models as small as the demo's). It is lowered only where this process
may use fewer cores than the machine has: an affinity mask (taskset, a scheduler's cpuset) or a
cgroup CPU quota (containers), which torch does not look at, so its threads would outnumber the
cores it gets.

libgomp reads OMP_WAIT_POLICY once, when torch loads it: this must run before torch is imported,
so this module imports nothing heavy. What the user set is theirs: a wait setting or a thread count
already in the environment is left alone.

`spare_cores` answers a question asked while the process runs, not at its start: whether another
core is free now, so that work handed to a second thread (the export's writer) runs beside the
caller rather than taking turns with it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

WAIT_POLICY = "PASSIVE"
# Any of these means the user chose how OpenMP threads wait (GOMP_SPINCOUNT overrides the policy in
# GNU OpenMP, KMP_BLOCKTIME is Intel OpenMP's).
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Either of these means the user chose the thread count (torch reads both).
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 `cpu.max`, else v1's CFS quota);
    None when there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by its cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def runnable_elsewhere(loadavg: Path = Path("/proc/loadavg")) -> int | None:
    """Threads other than the calling one that are running or ready to run on this machine now
    (Linux's count in /proc/loadavg, which includes the caller); None where it cannot be read."""
    try:
        running = int(loadavg.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)


def spare_cores(looks: int = 5, apart: float = 0.0005) -> int:
    """The usable cores no other thread is running on now, counting the caller's own; all usable
    cores where the count cannot be read. It says whether work handed to a second thread would run
    beside this one or take turns with it. The fewest threads of a few looks 0.5 ms apart: a
    competing process shows in every look, a kernel thread's moment of work rarely in all of them
    (on the idle machine one look in five counted one). In a container the count is the whole
    host's, so a busy host reads as no spare core even where a CPU quota reserves one: the caller
    then works in turn, as it did before it asked."""
    cores = usable_cores()
    counts = []
    for i in range(looks):
        if i:
            time.sleep(apart)
        counts.append(runnable_elsewhere())
        if counts[-1] is None:
            return cores
        if counts[-1] == 0:
            break
    return max(1, cores - min(counts))


def configure_threads(environ=None) -> dict[str, str]:
    """Set the OpenMP wait policy and, where the process may use fewer cores than the machine has,
    the thread count, each unless the user set it. Returns what it set (nothing once torch has
    loaded: OpenMP has read its settings by then). Safe to call more than once."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return {}
    chosen = {}
    if not any(k in environ for k in WAIT_SETTINGS):
        chosen["OMP_WAIT_POLICY"] = WAIT_POLICY
    if not any(k in environ for k in THREAD_SETTINGS):
        cores = usable_cores()
        if cores < (os.cpu_count() or cores):
            chosen["OMP_NUM_THREADS"] = str(cores)
    environ.update(chosen)
    return chosen

"""The probe use case, once: check the probe data, bring a hybrid to the plan (a kept live one,
hot-swapped, or a new one), run the probes on it and its donors. `moe-surgeon probe`, `replay
--probes`, the Probes screen and the Sweep screen all start here; recording the results in a session
is `surgeon.probes.run.record_probe_results`, the same for every caller."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from surgeon.core.donor import Donor
from surgeon.core.plan import Plan
from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, CancelToken
from surgeon.probes.types import ProbeSpec


def check_probe_data(specs: list[ProbeSpec]) -> None:
    """Every spec's data loads (files read, items checked), before any model is loaded: a bad probe
    file is an error in a second, not after minutes of loading."""
    from surgeon.probes.run import load_probe_data

    for s in specs:
        load_probe_data(s)


@dataclass
class ProbeRequest:
    plan: Plan
    donors: dict[str, Donor]
    specs: list[ProbeSpec]
    device: str | None = None  # None: CUDA when present, else the CPU
    dtype: str = "keep"
    batch_size: int = 16
    compare_donors: bool = True
    keep_samples: bool = False
    shown_as: str = "hybrid"  # what progress calls the model (a checkpoint probed alone: its name)
    preload: object = None  # the plan's tensors being read already (live/preload.py; see start_reading)


@dataclass
class ProbeRun:
    records: list[dict]
    specs: list[ProbeSpec]
    device: str
    seconds: float
    materialized: bool = True  # False: a kept hybrid was swapped to the plan
    swap: object = None  # the SwapReport of moving a kept hybrid to the plan
    extra: dict = field(default_factory=dict)


def run_probe(request: ProbeRequest, *, keeper=None, progress=None, cancel: CancelToken = NEVER,
              note: Callable[[str], None] | None = None) -> ProbeRun:
    """Run `request`'s probes on the hybrid of its plan (and on each donor unless not compare_donors).

    keeper: a live.keeper.HybridKeeper whose hybrid is held for the whole run (`keeper.use`: a job
    that holds it meanwhile is waited for), reused and moved to the plan; without one a hybrid is
    materialised for this run. A failure after the kept hybrid was touched drops it (a swap may have
    stopped half-way); a cancel does not (runs stop between batches, and run_probes puts the hybrid
    back on the plan).
    """
    from surgeon.live.devices import default_device

    started = time.perf_counter()
    check_probe_data(request.specs)
    cancel.check()
    device = request.device or default_device()
    say = note or (lambda text: None)
    if keeper is None:
        from surgeon.live.hybrid import Hybrid

        say(f"materialising the hybrid on {device}…")
        hybrid = Hybrid.materialize(request.plan, request.donors, device=device, dtype=request.dtype,
                                    native=native_forward(request.specs), preload=request.preload)
        records = _probe_on(hybrid, request, device, progress, cancel, say)
        return ProbeRun(records, request.specs, device, time.perf_counter() - started, True, None)
    with keeper.use(request.plan, request.donors, device, request.dtype, job="probe", note=say,
                    cancel=cancel) as lease:  # moved to the plan: only the tensors whose source changed
        records = _probe_on(lease.hybrid, request, device, progress, cancel, say)
    return ProbeRun(records, request.specs, device, time.perf_counter() - started, lease.built, lease.swap)


FORWARD_ENV = "MOE_SURGEON_FORWARD"  # "transformers": never our own forward


def native_forward(specs: list[ProbeSpec]) -> bool:
    """Whether a hybrid made for these probes alone may run on our own forward (live/native_model.py,
    for the architectures it covers): every probe only scores text, and the user did not ask for
    transformers' classes. A kept hybrid (the workbench's) is always transformers': routing and
    gate training hook its modules."""
    from surgeon.probes.registry import KINDS

    return os.environ.get(FORWARD_ENV, "") != "transformers" and all(KINDS[s.kind].scores_only for s in specs)


def start_reading(plan: Plan, donors: dict[str, Donor], specs: list[ProbeSpec], device: str | None, dtype: str):
    """Before torch imports: start reading what the load will read. Where the hybrid will run on our
    own forward on the CPU, into memory it then takes as its weights (the returned Preload, for
    ProbeRequest.preload); elsewhere into the page cache only (None)."""
    from surgeon.live.loader import prefetch
    from surgeon.live.native_config import read_native_config

    # No device given: the CPU where no GPU device file exists (asking torch would import it first).
    if device is None and not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/kfd", "/dev/dxg")):
        device = "cpu"
    if device == "cpu" and native_forward(specs) and read_native_config(donors[plan.base].path) is not None:
        from surgeon.live.preload import start_preload

        preload = start_preload(plan, donors, dtype)
        if preload is not None:
            return preload
    prefetch(plan, donors)
    return None


def _probe_on(hybrid, request: ProbeRequest, device: str, progress, cancel: CancelToken, say) -> list[dict]:
    from surgeon.probes.run import run_probes

    cancel.check()
    say(f"probing on {device}…")
    return run_probes(hybrid, request.plan, request.specs, device=device, dtype=request.dtype,
                      batch_size=request.batch_size, compare_donors=request.compare_donors,
                      keep_samples=request.keep_samples, progress=progress, cancel=cancel,
                      shown_as=request.shown_as)


# ---------------------------------------------------------------- what a session recorded, what to offer
def split_runs(records: list[dict]) -> list[list[dict]]:
    """Group session result records into runs, in order.

    A run (one `probe` command or one press of r) writes its hybrid records first, then its donor
    records. So a hybrid record starts a new run after a donor record, when its probe repeats
    within the current run, or when it measured another plan.
    """
    runs: list[list[dict]] = []
    seen: set = set()
    plan = None
    for r in records:
        hybrid = r.get("model") == "hybrid"
        key = (r.get("label"), r.get("vs"))
        new = not runs or (hybrid and (runs[-1][-1].get("model") != "hybrid" or key in seen
                                       or ("plan" in r and plan is not None and r["plan"] != plan)))
        if new:
            runs.append([])
            seen, plan = set(), None
        runs[-1].append(r)
        if hybrid:
            seen.add(key)
            plan = r.get("plan", plan)
    return runs


def default_specs(recorded: list) -> tuple[list[ProbeSpec], int]:
    """The session's recorded probes (those that parse), then one per built-in set with the probe
    that fits it; and how many of them are recorded ones."""
    from surgeon.probes.registry import spec_from_json
    from surgeon.probes.run import builtin_probes

    specs: list[ProbeSpec] = []
    for data in recorded:
        try:
            spec = spec_from_json(data)
        except (SurgeonError, TypeError):
            continue
        if spec not in specs:
            specs.append(spec)
    n_recorded = len(specs)
    for spec in builtin_probes():
        if spec not in specs:
            specs.append(spec)
    return specs, n_recorded

"""The component-transfer sweep on a Ray cluster: the same grid, cut into segments, one per worker.

What still has to be measured is laid out as one walk of *units*: the base's ceiling (measured
where every worker's hybrid starts), the configurations in Gray-code order, the donor's ceiling
(a whole-model swap, so last). The walk is cut into contiguous segments of about equal cost, one
per worker. A worker is a Ray actor (one GPU each when the sweep runs on CUDA, else CPU cores):
it opens the donors from the driver's paths, materialises the base once and measures its units
in order with `runner.Walker`, exactly as the serial runner does, so a configuration moves one
group at a time inside a segment.

Every unit is its own actor call, so results reach the driver as each one finishes (`ray.wait`);
the driver stores each into the record and calls `save` after every one, as `run_sweep` does.
A run that stops (ctrl+c, a lost worker, an error) keeps what was saved; running it again
measures only what is missing. The empty configuration is the base's ceiling, filled in on the
driver. Probe data is read on the driver and shipped; donors are not: every worker must see them
at the driver's paths (a shared filesystem), and one that cannot is a one-line error naming the
path and the worker's host. Ray is an optional extra; nothing here imports it at module level.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from surgeon.core.donor import DEMO_ROOT, DEMO_SCHEME, Donor, open_donor
from surgeon.errors import SurgeonError
from surgeon.features.sweep.runner import (
    SweepEvent,
    SweepSpec,
    Walker,
    base_configuration_results,
    configuration_entry,
    configuration_slot,
    measure_ceiling,
    measure_configuration,
    missing,
    new_run_stats,
    open_record,
    swap_json,
)
from surgeon.jobs import NEVER, CancelToken, Meter

INSTALL_HINT = 'pip install "moe-surgeon[ray]"'
POLL_SECONDS = 0.2  # how often the driver looks at cancel and progress while workers run
BOARD_SECONDS = 0.5  # a worker posts its item progress at most this often
# The run counters a worker measures and the driver adds up (worker-seconds, not wall time).
SUMMED = ("materialize_seconds", "surgery_seconds", "swaps", "tensors_swapped", "bytes_swapped", "probe_seconds")


def import_ray():
    try:
        import ray
    except ImportError:
        raise SurgeonError(f"--workers/--ray run the sweep on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# ---------------------------------------------------------------- the cluster
@dataclass(frozen=True)
class Cluster:
    """A Ray cluster this process is connected to, and how a sweep uses it."""

    address: str | None  # None: a local cluster this process started
    workers: int
    cpus: int
    gpus: int

    def device(self, asked: str | None) -> str:
        """The device every worker runs on ("cpu" or "cuda"): CUDA when the cluster has GPUs,
        unless `asked` (--device) says otherwise."""
        kind = (asked or ("cuda" if self.gpus else "cpu")).split(":")[0]
        option = f"--device {asked}" if asked else f"--workers {self.workers}"
        where = f"the cluster at {self.address}" if self.address else "this machine"
        if kind == "auto":
            raise SurgeonError("--device auto spreads one model over a machine's GPUs; with --workers/--ray each "
                               "worker takes one GPU: use --device cuda")
        if kind not in ("cpu", "cuda"):
            raise SurgeonError(f"--device {asked}: a distributed sweep runs on cpu or cuda")
        if kind == "cuda" and not self.gpus:
            raise SurgeonError(f"{option}: {where} has no GPU for Ray; use --device cpu")
        if kind == "cuda" and self.workers > self.gpus:
            raise SurgeonError(f"{option}: {self.workers} workers take one GPU each and {where} has {self.gpus}; "
                               f"use --workers {self.gpus}, or --device cpu")
        return kind

    def resources(self, device: str) -> dict:
        """A worker's Ray resource request: one GPU, or an equal share of the CPUs."""
        if device == "cuda":
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": self.threads}

    @property
    def threads(self) -> int:
        """torch threads per CPU worker: the workers share the cores, and an oversubscribed torch
        pool is many times slower than one thread per core."""
        return max(1, self.cpus // self.workers)


@contextmanager
def ray_cluster(*, workers: int | None = None, address: str | None = None) -> Iterator[Cluster]:
    """Start a local cluster with `workers` workers, or join the one at `address` (`auto`,
    `ray://head:10001`, `head:6379`) with `workers` workers (default: one per GPU, else one per
    node); disconnect (and stop a local one) at the end."""
    ray = import_ray()
    if workers is not None and workers < 1:
        raise SurgeonError(f"--workers {workers}: must be at least 1")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        _check_reachable(address)
    elif workers is not None and workers > (cores := os.cpu_count() or 1):
        # A worker holds a model and a core or more; more than the cores only queue up (1000 asked
        # for on two cores started 1000 processes and did nothing for a minute).
        raise SurgeonError(f"--workers {workers}: this machine has {cores} core{'s' * (cores != 1)}, so a local "
                           f"cluster runs at most {cores} workers")
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            cores = os.cpu_count() or 1
            per = max(1, cores // workers) if workers else cores
            ray.init(address="local", num_cpus=per * (workers or 1), include_dashboard=False, **quiet)
    except Exception as e:  # noqa: BLE001 -- Ray raises ConnectionError, RuntimeError, ValueError...
        where = f"--ray {address}: cannot join the Ray cluster" if address else "--workers: cannot start Ray"
        raise SurgeonError(f"{where}: {_why(e)}") from None
    try:
        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        if workers is None:
            workers = gpus or max(1, len([n for n in ray.nodes() if n.get("Alive")]))
        elif workers > max(cpus, 1):
            raise SurgeonError(f"--workers {workers}: the cluster at {address} has {cpus} CPUs, so at most {cpus} "
                               "workers can run")
        yield Cluster(address, workers, max(cpus, 1), gpus)
    finally:
        ray.shutdown()


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    """Refuse an address nothing answers at, in seconds: Ray itself retries for minutes."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as e:
        raise SurgeonError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or e}); "
                           "is the cluster's head running?") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _why(e: BaseException) -> str:
    """Ray's message and, where it hides one, its root cause (an authentication error behind
    "Failed to connect"), on one line."""
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return _first_line(e) if root is e else f"{_first_line(e)} ({_first_line(root)})"


# ---------------------------------------------------------------- units and segments
@dataclass(frozen=True)
class Unit:
    """One piece of a worker's walk: a donor's ceiling (`name`) or a configuration (`mask`)."""

    index: int
    labels: tuple[str, ...]
    mask: int | None = None
    name: str = ""  # the donor, for a ceiling

    @property
    def is_ceiling(self) -> bool:
        return self.mask is None


def plan_units(spec: SweepSpec, ceilings: dict[str, list[str]], configs: dict[int, list[str]]) -> list[Unit]:
    """What is left to measure, as one walk: base ceiling, configurations in Gray-code order (the
    empty one is the base's ceiling, filled in on the driver), donor ceiling."""
    units: list[Unit] = []

    def add(labels, **kw):
        if labels:
            units.append(Unit(len(units), tuple(labels), **kw))

    add(ceilings.get(spec.base), name=spec.base)
    for mask in spec.order():
        if mask:
            add(configs.get(mask), mask=mask)
    add(ceilings.get(spec.donor), name=spec.donor)
    return units


def cut_segments(weights: list[int], n: int) -> list[range]:
    """Cut `weights` into at most `n` contiguous, non-empty segments of about equal sum."""
    n = min(n, len(weights))
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    bounds = [0]
    for i in range(1, n):
        target = prefix[-1] * i / n
        choices = range(bounds[-1] + 1, len(weights) - (n - i) + 1)
        bounds.append(min(choices, key=lambda p: abs(prefix[p] - target)))
    bounds.append(len(weights))
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def donor_source(donor: Donor) -> str:
    """Where a worker opens `donor`: a built-in demo donor by name (its path is the package's,
    which may differ on another node), any other by its absolute path."""
    path = donor.path.resolve()
    if path.parent == DEMO_ROOT.resolve():
        return f"{DEMO_SCHEME}{path.name}"
    return str(path)


# ---------------------------------------------------------------- the worker (a Ray actor)
class ProgressBoard:
    """Where workers post the items done within their current unit: a tiny actor the driver reads,
    as a worker's own actor is busy measuring and answers no calls until its unit is done."""

    def __init__(self):
        self.state: dict[int, tuple] = {}

    def post(self, worker: int, unit: int, label: str, done: int, of: int) -> None:
        self.state[worker] = (unit, label, done, of)

    def read(self) -> dict[int, tuple]:
        return self.state


class SweepWorker:
    """One worker: opens the donors, materialises the base once, measures the units it is sent in
    order (Ray runs one caller's calls to an actor in the order they were made)."""

    def __init__(self, index: int):
        self.index, self.host = index, socket.gethostname()
        self.walker: Walker | None = None
        self.board = None
        self._posted = 0.0

    def _where(self) -> str:
        return f"worker {self.index} on {self.host}"

    def open(self, spec: SweepSpec, sources: dict[str, tuple[str, str, bool]], datas: dict, threads: int,
             board) -> dict:
        from surgeon import __version__

        t0 = time.perf_counter()
        donors = {}
        for name, (source, fingerprint, pickled) in sources.items():
            try:
                donor = open_donor(source, allow_pickle=pickled)
            except SurgeonError as e:
                raise SurgeonError(f"{self._where()}: {e} (every worker opens the donors at the driver's paths: "
                                   "put them on a filesystem all nodes share)") from None
            if donor.fingerprint != fingerprint:
                raise SurgeonError(f"{self._where()}: donor {name} ({donor.path}) is not the checkpoint the driver "
                                   "opened (fingerprint differs); every worker must see the same files")
            donors[name] = donor
        import torch  # after the donors: a worker that cannot see them says so at once

        torch.set_num_threads(threads)
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise SurgeonError(f"{self._where()}: --device cuda, but torch sees no GPU there")
        self.board = board
        self.walker = Walker(spec, donors, datas, new_run_stats())
        self.walker.live()  # materialise once, before the first unit
        return {"host": self.host, "version": __version__, "seconds": time.perf_counter() - t0}

    def measure(self, unit: Unit) -> dict:
        w = self.walker
        if w is None:
            raise SurgeonError(f"{self._where()}: asked to measure before its donors were opened")
        t0 = time.perf_counter()

        def probe(label, model_label, extra):
            return w.probe(label, model_label, extra, progress=lambda done, of: self._post(unit, label, done, of))

        if unit.is_ceiling:
            swap, results = None, {}
            for label in unit.labels:
                moved, results[label] = measure_ceiling(w, unit.name, label, probe)
                swap = swap or moved
        else:
            swap, results = measure_configuration(w, unit.mask, list(unit.labels), probe)
        stats, w.run = w.run, new_run_stats()
        return {"unit": unit.index, "swap": swap_json(swap) if swap is not None else None, "results": results,
                "seconds": time.perf_counter() - t0, "stats": {k: stats[k] for k in SUMMED}}

    def _post(self, unit: Unit, label: str, done: int, of: int) -> None:
        now = time.perf_counter()
        if self.board is not None and (now - self._posted >= BOARD_SECONDS or done >= of):
            self._posted = now
            self.board.post.remote(self.index, unit.index, label, done, of)  # fire and forget


# ---------------------------------------------------------------- the driver
@dataclass
class _Worker:
    index: int
    actor: object
    units: list[Unit]
    host: str = "an unknown host"  # until it reports from open()
    finished: int = 0
    posted: tuple | None = None  # (unit, label, done, of) from the board
    calls: list = field(default_factory=list)  # [(ObjectRef, Unit or None for open)], oldest first

    @property
    def current(self) -> Unit | None:
        return self.units[self.finished] if self.finished < len(self.units) else None


class _Driver:
    """The record's keeper: stores what the workers send as the serial runner would, saves after
    every unit, and turns it into events and progress."""

    def __init__(self, spec: SweepSpec, donors: dict[str, Donor], record: dict, datas: dict, save, emit, progress):
        self.spec, self.donors, self.record, self.save, self.emit = spec, donors, record, save, emit
        self.progress = progress
        self.labels = [s.label for s in spec.probes]
        self.items = {lab: len(d.items) for lab, d in datas.items()}
        self.datas = datas
        from surgeon.probes.run import ScoreCache

        self.scores = ScoreCache(donors[spec.base].path, spec.device, spec.dtype, spec.batch_size)
        self.need_ceilings, self.need_configs = missing(record, self.labels)
        self.run = {**new_run_stats(), "workers": 0}
        self.started = time.perf_counter()
        self.workers: list[_Worker] = []
        self.meter: Meter | None = None
        self.measured = 0  # items of the units finished

    def done_count(self) -> int:
        return self.spec.size - len(missing(self.record, self.labels)[1])

    def event(self, kind: str, *args, **kw) -> None:
        self.emit(SweepEvent(kind, self.done_count(), self.spec.size, *args, **kw))

    def checkpoint(self) -> None:
        self.record["updated"] = _now()
        self.run["seconds"] = time.perf_counter() - self.started
        if self.save is not None:
            self.save(self.record)

    def probe(self, label: str):
        return next(p for p in self.spec.probes if p.label == label)

    def store_ceiling(self, name, label, rec, cached, swap=None, worker=None) -> None:
        self.record["ceilings"].setdefault(name, {})[label] = {**rec, "model": f"donor:{name}", "cached": cached}
        self.event("ceiling", None, name, label, swap=swap, cached=cached, record=self.record, worker=worker,
                   seconds=0.0 if cached else rec.get("seconds", 0.0))

    def cached_ceilings(self) -> dict[str, list[str]]:
        """Take the ceilings the donor score cache has, as the serial runner does; return the rest."""
        todo: dict[str, list[str]] = {}
        for name, labels in self.need_ceilings.items():
            for label in labels:
                rec = self.scores.get(self.donors[name], self.probe(label), self.datas[label])
                if rec is None:
                    todo.setdefault(name, []).append(label)
                else:
                    self.store_ceiling(name, label, rec, True)
        if self.need_ceilings and todo != self.need_ceilings:
            self.checkpoint()
        return todo

    def fill_base_configuration(self) -> None:
        """The empty configuration, once the base's ceilings it needs are in."""
        entry = configuration_entry(self.record, 0)
        todo = [lab for lab in self.need_configs.get(0, []) if entry is None or lab not in entry["results"]]
        if not todo or any(lab not in self.record["ceilings"].get(self.spec.base, {}) for lab in todo):
            return
        entry = configuration_slot(self.record, self.spec.groups, 0)
        entry["results"].update(base_configuration_results(self.record, todo))
        self.run["configurations_measured"] += 1
        self.checkpoint()
        self.event("configuration", 0, self.spec.name(0), entry=copy.deepcopy(entry), record=self.record)

    def ready(self, w: _Worker, out: dict) -> None:
        if out["version"] != _version():
            raise SurgeonError(f"worker {w.index} on {out['host']}: moe-surgeon {out['version']} there, "
                               f"{_version()} here; install the same version on every node")
        w.host = out["host"]
        self.event("worker", name=w.host, items=len(w.units), seconds=out["seconds"], worker=w.index)

    def finish(self, w: _Worker, unit: Unit, out: dict) -> None:
        """Store one unit a worker finished, save, and tell."""
        for k in SUMMED:
            self.run[k] += out["stats"][k]
        w.finished += 1
        self.measured += sum(self.items[lab] for lab in unit.labels)
        swap = _swap_report(out["swap"])
        if unit.is_ceiling:
            for label, rec in out["results"].items():
                self.scores.put(self.donors[unit.name], self.probe(label), self.datas[label], rec)
                self.run["ceilings_measured"] += 1
                self.store_ceiling(unit.name, label, rec, False, swap, w.index)
            self.checkpoint()
            self.fill_base_configuration()
        else:
            entry = configuration_slot(self.record, self.spec.groups, unit.mask)
            entry["swap"] = out["swap"]
            entry["results"].update(out["results"])
            entry["seconds"] += out["seconds"]
            self.run["configurations_measured"] += 1
            self.checkpoint()
            name = self.spec.name(unit.mask)
            self.event("swap", unit.mask, name, swap=swap, worker=w.index)
            self.event("configuration", unit.mask, name, entry=copy.deepcopy(entry), record=self.record,
                       seconds=out["seconds"], worker=w.index)
        self.show()

    def posted(self, state: dict) -> None:
        """What the workers posted on the board: "probe" events and the item count."""
        for w in self.workers:
            posted, unit = state.get(w.index), w.current
            if posted is None or posted == w.posted:
                continue
            w.posted = posted
            if unit is not None and posted[0] == unit.index:
                name = unit.name if unit.is_ceiling else self.spec.name(unit.mask)
                self.event("probe", unit.mask, name, *posted[1:], worker=w.index)
        self.show()

    def in_flight(self, w: _Worker) -> int:
        """Items of a worker's current unit done so far, from its last post on the board."""
        unit = w.current
        if unit is None or w.posted is None or w.posted[0] != unit.index:
            return 0
        _, label, done, of = w.posted
        before = unit.labels[:unit.labels.index(label)]
        return sum(self.items[lab] for lab in before) + (round(self.items[label] * done / of) if of else 0)

    def show(self) -> None:
        if self.meter is not None:
            self.meter(self.measured + sum(map(self.in_flight, self.workers)),
                       detail=" · ".join(_worker_text(self.spec, w) for w in self.workers))


def run_distributed_sweep(spec: SweepSpec, donors: dict[str, Donor], cluster: Cluster, *,
                          record: dict | None = None, save: Callable[[dict], None] | None = None,
                          on_event: Callable[[SweepEvent], None] | None = None, progress=None,
                          cancel: CancelToken = NEVER) -> dict:
    """`runner.run_sweep` on `cluster`'s workers: the same record, saved after every finished unit.

    spec.device is "cpu" or "cuda" (see Cluster.device). Events are the serial runner's, with
    `worker` set, and "worker" when one is ready; `progress` steps count items in total, with
    each worker's place in its segment as the detail. A worker that fails stops the run (its
    error, one line, naming the worker's host) after the finished units are saved; so does
    `cancel` (Cancelled), checked every POLL_SECONDS.
    """
    from surgeon.probes.run import load_probe_data

    ray = import_ray()
    record = open_record(spec, donors, record)
    datas = {s.label: load_probe_data(s) for s in spec.probes}
    d = _Driver(spec, donors, record, datas, save, on_event or (lambda e: None), progress)
    d.event("start", resumed=len(record["configurations"]))
    if not d.need_ceilings and not d.need_configs:
        d.event("done", record=record)
        return record
    record["runs"].append(d.run)
    try:
        units = plan_units(spec, d.cached_ceilings(), d.need_configs)
        d.fill_base_configuration()
        if units:
            _run_units(ray, d, cluster, units, datas, cancel)
        d.event("done", record=record)
    finally:
        d.run["seconds"] = time.perf_counter() - d.started
    return record


def _run_units(ray, d: _Driver, cluster: Cluster, units: list[Unit], datas: dict, cancel: CancelToken) -> None:
    """Cut `units` into segments, one per worker, and take the workers' answers as they come."""
    spec, donors = d.spec, d.donors
    cost = [sum(d.items[lab] for lab in u.labels) for u in units]
    d.meter = Meter(d.progress, sum(cost))
    segments = cut_segments(cost, cluster.workers)
    d.run["workers"] = len(segments)
    worker_cls = ray.remote(SweepWorker)
    board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
    # A pickle-only donor was allowed on the driver (--allow-pickle); its workers may load it too.
    sources = {n: (donor_source(donors[n]), donors[n].fingerprint, bool(donors[n].pickled))
               for n in (spec.base, spec.donor)}
    shipped = ray.put(datas)
    try:
        for i, seg in enumerate(segments, 1):
            actor = worker_cls.options(**cluster.resources(spec.device)).remote(i)
            w = _Worker(i, actor, [units[j] for j in seg])
            # All queued at once; the actor runs them in this order, so the driver takes each
            # worker's answers in this order too (its oldest call is the next to finish).
            w.calls = [(actor.open.remote(spec, sources, shipped, cluster.threads, board), None)]
            w.calls += [(actor.measure.remote(u), u) for u in w.units]
            d.workers.append(w)
        d.show()
        last_board = time.perf_counter()
        while any(w.calls for w in d.workers):
            cancel.check()
            heads = {w.calls[0][0]: w for w in d.workers if w.calls}
            ready, _ = ray.wait(list(heads), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                w = heads[ref]
                unit = w.calls.pop(0)[1]
                try:
                    out = _get(ray, ref, w)
                except SurgeonError:
                    cancel.check()  # ctrl+c reaches the workers too: that is a cancel, not a failure
                    raise
                if unit is None:
                    d.ready(w, out)
                else:
                    d.finish(w, unit, out)
            if time.perf_counter() - last_board >= BOARD_SECONDS:
                last_board = time.perf_counter()
                d.posted(_read_board(ray, board))
    finally:
        for w in d.workers:
            ray.kill(w.actor)  # a stopped run stops its workers; a finished one frees them
        ray.kill(board)


def _get(ray, ref, w: _Worker) -> dict:
    """A worker's answer, or its failure as one line naming the worker and its host."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SurgeonError):
            raise SurgeonError(str(cause)) from None
        raise SurgeonError(f"worker {w.index} on {w.host}: {type(cause or e).__name__}: "
                           f"{_first_line(cause or e)}") from None
    except ray.exceptions.RayActorError as e:
        raise SurgeonError(f"worker {w.index} on {w.host} was lost ({_first_line(e)}); what it had not "
                           "finished is measured when the sweep runs again") from None


def _read_board(ray, board) -> dict:
    try:
        return ray.get(board.read.remote(), timeout=5)
    except Exception:  # noqa: BLE001 -- progress is a display: a slow board must not stop the sweep
        return {}


def _worker_text(spec: SweepSpec, w: _Worker) -> str:
    if w.finished >= len(w.units):
        return f"worker {w.index}: done"
    unit = w.units[w.finished]
    what = f"ceiling {unit.name}" if unit.is_ceiling else spec.name(unit.mask)
    return f"worker {w.index}: {w.finished + 1}/{len(w.units)} {what}"


def _swap_report(data: dict | None):
    if data is None:
        return None
    from surgeon.live.hybrid import SwapReport

    return SwapReport(data["tensors"], data["bytes"], data["seconds"])


def _version() -> str:
    from surgeon import __version__

    return __version__


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

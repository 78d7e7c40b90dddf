"""`moe-surgeon sweep`: the component-transfer grid (Tiwari 2026, docs/references.md) from the command line.

The engine is `features/sweep/runner.py` (groups, Gray-code walk, resumable runner) and
`features/sweep/report.py` (tables and verdicts); this module parses arguments, keeps the session
file up to date after every configuration, prints progress on stderr and the report on stdout.
The first ctrl+c stops the sweep at its next batch; the configurations saved so far stay.
With --workers N or --ray ADDRESS the grid runs on a Ray cluster (`features/sweep/distributed.py`):
the same record, saved after every configuration, with progress per worker.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from surgeon.cli.options import add_model_options, out_of_memory_is_an_error
from surgeon.cli.progress import StepPrinter
from surgeon.core.plan import DONOR_LETTERS
from surgeon.errors import SurgeonError
from surgeon.io.sizes import human_bytes
from surgeon.jobs import CancelToken, cancel_on_interrupt


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="the component-transfer grid: every subset of component groups from a donor",
        description="Transfer every subset of up to 6 component groups from a donor into the base, probe each "
        "configuration (visited in Gray-code order, one hot-swap per step), and report accuracy with 95% CIs, "
        "significance against both donors, single-group effects, the best configuration per probe and which "
        "donor each group should come from. Results are saved in SESSION after every configuration; running "
        "the same sweep again resumes it (and only reprints a finished one).",
    )
    p.add_argument("session", metavar="SESSION",
                   help="session file; when it does not exist it is created from --base DIR and --donor DIR")
    p.add_argument("--base", metavar="NAME",
                   help="the base donor (default: the session's base); a DIR or demo:NAME when creating SESSION")
    p.add_argument("--donor", metavar="NAME",
                   help="the donor the groups come from (default: the session's other donor); "
                   "a DIR or demo:NAME when creating SESSION")
    p.add_argument("--group", action="append", default=[], metavar="[LABEL=]SPEC[+SPEC...]",
                   help="a group of components switched together, e.g. experts@0-7, expert:1,3@2 or "
                   "early=router@0-3+attention@0-3; repeatable, at most 6 (default: router, attention, experts)")
    p.add_argument("--probe", action="append", default=[], metavar="KIND:DATA[,key=value...]",
                   help="e.g. em:arith or mc:arc.jsonl,limit=500; repeatable (default: the session's probes, "
                   "else the built-in sets)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", dest="format", action="store_const", const="markdown",
                     help="print the report as Markdown (the default)")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv",
                     help="print one CSV line per configuration and probe")
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="print the report as JSON")
    p.set_defaults(format="markdown")
    p.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout")
    p.add_argument("--test", choices=["mcnemar", "z"], default="mcnemar",
                   help="significance test: McNemar's paired test (default) or Tiwari's two-proportion z-test")
    add_model_options(p)
    from surgeon.cli.probe import add_trust_option

    add_trust_option(p)
    ray = p.add_argument_group("on a Ray cluster (pip install \"moe-surgeon[ray]\")")
    ray.add_argument("--workers", type=int, metavar="N",
                     help="run the sweep on N Ray workers: a local cluster started for it, or N workers on the "
                     "--ray cluster (default there: one per GPU, else one per node); each walks a segment of the "
                     "Gray-code order on one GPU or its share of the CPU cores")
    ray.add_argument("--ray", metavar="ADDRESS",
                     help="join an existing Ray cluster (auto, ray://head:10001, head:6379); every node needs "
                     "this moe-surgeon version and the donors at the same paths (a shared filesystem)")
    p.add_argument("--restart", action="store_true", help="discard this sweep's stored results and measure again")
    p.add_argument("--ignore-fingerprints", action="store_true", help="run even if a donor changed since the session")
    p.set_defaults(func=cmd_sweep)


def _open_session(args):
    """(session, donors, created): the session file, or a new one from --base DIR --donor DIR."""
    from surgeon.core.session import (
        load_session,
        open_session_donors,
        refuse_mix_session,
    )

    path = Path(args.session)
    if path.exists():
        session = load_session(path)
        refuse_mix_session(session, path, "sweep a session made with --base")
        donors = open_session_donors(session, path, ignore_fingerprints=args.ignore_fingerprints,
                                     allow_pickle=args.allow_pickle)
        return session, donors, False
    if not args.base or not args.donor:
        raise SurgeonError(f"{path}: no such session file (to start one, give --base DIR and --donor DIR)")
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Plan
    from surgeon.core.session import make_session

    base, donor = (open_donor(p, allow_pickle=args.allow_pickle) for p in (args.base, args.donor))
    if base.path.resolve() == donor.path.resolve():
        raise SurgeonError(f"--donor {args.donor}: the same checkpoint as --base")
    donors = dict(zip(DONOR_LETTERS, (base, donor)))  # A and B
    args.base, args.donor = "A", "B"
    return make_session(Plan("A"), donors, path), donors, True


def _choose_donors(args, session, donors) -> tuple[str, str]:
    names = list(donors)
    base = args.base or session.plan.base
    if base not in donors:
        raise SurgeonError(f"--base {base!r}: no donor of that name in {args.session} (donors: {', '.join(names)})")
    if args.donor:
        if args.donor not in donors:
            raise SurgeonError(f"--donor {args.donor!r}: no donor of that name in {args.session} "
                               f"(donors: {', '.join(names)})")
        if args.donor == base:
            raise SurgeonError(f"--donor {args.donor!r}: that is the base; the donor must be another checkpoint")
        return base, args.donor
    from surgeon.features.sweep.runner import default_donor

    try:
        return base, default_donor(names, base)
    except SurgeonError as e:
        raise SurgeonError(f"{args.session}: {e}") from None


class _Progress:
    """Progress lines on stderr: one per ceiling and per finished configuration (always), and the
    items measured (`step`, a StepPrinter: one live line on a terminal, a line every few seconds
    elsewhere)."""

    def __init__(self, spec, donors, session_path: str):
        self.spec, self.donors, self.session_path = spec, donors, session_path
        self.printer = StepPrinter("sweep")
        self.t0 = time.perf_counter()
        self.swap = {}  # worker (None when serial) -> its last swap
        self.prev = {}  # worker -> the configuration its hybrid is on: a run starts from the base

    def step(self, step) -> None:
        self.printer(step)

    def _line(self, text: str) -> None:
        if self.printer.tty:  # clear the live item line, if one is drawn
            print("\r\033[K", end="", file=sys.stderr)
        print(text, file=sys.stderr, flush=True)

    def __call__(self, e) -> None:
        s = self.spec
        if e.kind == "start":
            label = {n: self.donors[n].path.name for n in (s.base, s.donor)}
            self._line(f"sweep: {s.donor} ({label[s.donor]}) into {s.base} ({label[s.base]}): "
                       f"{len(s.groups)} group(s), {e.total} configurations, {len(s.probes)} probe(s) on {s.device}")
            if e.done:
                self._line(f"resuming: {e.done} of {e.total} configurations already in {self.session_path}")
        elif e.kind == "worker":
            self._line(f"worker {e.worker} on {e.name}: ready in {e.seconds:.1f}s, {e.items} unit(s) to measure")
        elif e.kind == "ceiling":
            how = "from the score cache" if e.cached else f"measured in {e.seconds:.1f}s{_on(e.worker)}"
            self._line(f"ceiling {e.name} {e.probe}: {how}")
        elif e.kind == "swap":
            self.swap[e.worker] = e.swap
        elif e.kind == "configuration":
            scores = "  ".join(f"{lab} {_score(r)}" for lab, r in e.entry["results"].items())
            moved = ""
            swap, prev = self.swap.pop(e.worker, None), self.prev.get(e.worker, 0)
            if swap is not None and e.mask:
                flipped = ", ".join(("+" if e.mask >> j & 1 else "-") + g.name
                                    for j, g in enumerate(s.groups) if (prev ^ e.mask) >> j & 1)
                moved = (f"swap {flipped} ({swap.tensors} tensors, {human_bytes(swap.bytes, 1)}, "
                         f"{1000 * swap.seconds:.0f} ms); ")
            self.prev[e.worker] = e.mask
            self._line(f"[{e.done}/{e.total}] {e.name}: {moved}{scores}; {e.seconds:.1f}s{_on(e.worker)}; saved")
        elif e.kind == "done":
            self._line(f"sweep complete ({time.perf_counter() - self.t0:.1f}s)")


def _on(worker: int | None) -> str:
    return "" if worker is None else f" on worker {worker}"


def _score(rec: dict) -> str:
    from surgeon.probes import metric_of

    return metric_of(rec["metric"]).score_text(rec["score"])


def cmd_sweep(args) -> int:
    from surgeon.features.sweep.runner import (
        MAX_GROUPS,
        check_groups,
        default_groups,
        parse_group,
    )
    from surgeon.probes import parse_probe, trusting

    groups = [parse_group(g) for g in args.group] or default_groups()
    if len(groups) > MAX_GROUPS:
        raise SurgeonError(f"--group: {len(groups)} groups given; a sweep takes at most {MAX_GROUPS} "
                           f"(2^{MAX_GROUPS} = {2 ** MAX_GROUPS} configurations)")
    specs = trusting([parse_probe(p) for p in args.probe], args.trust_task_code)
    if args.batch_size < 1:
        raise SurgeonError(f"--batch-size {args.batch_size}: must be at least 1")
    distributed = args.workers is not None or args.ray is not None
    if distributed:
        from surgeon.features.sweep.distributed import import_ray

        import_ray()  # without Ray: one line saying how to install it, before any work
        if args.workers is not None and args.workers < 1:
            raise SurgeonError(f"--workers {args.workers}: must be at least 1")
    session, donors, created = _open_session(args)
    base, donor = _choose_donors(args, session, donors)
    for w in check_groups(groups, donors, base, donor):
        print(f"moe-surgeon: warning: {w}", file=sys.stderr)
    from surgeon.features.probe import check_probe_data

    check_probe_data(specs)  # refuse bad probe data before starting anything
    if not distributed:
        from surgeon.live.devices import check_device, default_device

        device = args.device or default_device()
        if device != "auto":  # auto: accelerate spreads a large hybrid over every GPU
            check_device(device)
        spec, record = _run(args, session, donors, created, base, donor, groups, specs, device, None)
    else:
        from surgeon.features.sweep.distributed import ray_cluster

        with ray_cluster(workers=args.workers, address=args.ray) as cluster:
            spec, record = _run(args, session, donors, created, base, donor, groups, specs,
                                cluster.device(args.device), cluster)
    _print_report(args, record, [s.label for s in spec.probes])
    return 0


def _run(args, session, donors, created, base, donor, groups, specs, device, cluster):
    """Run (or resume) the sweep on `device`, serially or on `cluster`'s workers: (spec, record)."""
    from surgeon.features.sweep.runner import (
        SweepSpec,
        check_probes,
        default_probes,
        find_sweep,
        record_probes,
        store_sweep,
    )

    spec = SweepSpec(base, donor, groups, specs, device=device, dtype=args.dtype, batch_size=args.batch_size)
    record = None if args.restart else find_sweep(session, spec.key(donors))
    if not specs:  # the stored sweep's probes (a plain re-run resumes or reprints it), else the defaults
        spec.probes = record_probes(record) if record and record["probes"] else default_probes(session.probes)
    from surgeon.probes import trusting

    spec.probes = trusting(spec.probes, args.trust_task_code)  # recorded ones too: a record never grants it
    check_probes(spec.probes)
    from surgeon.features.probe import check_probe_data

    check_probe_data(spec.probes)  # refuse bad probe data before loading any model
    if session.plan.assignments and not created:
        print(f"moe-surgeon: note: the sweep starts from the plain base {base}; the session's plan "
              f"({len(session.plan.assignments)} assignment(s)) is kept but not part of it", file=sys.stderr)

    from surgeon.core.session import record_full_hashes, save_session
    from surgeon.features.sweep.runner import run_sweep

    record_full_hashes(session, donors, progress=StepPrinter("hashing donors"))  # read once, then cached
    from surgeon.cli.probe import record_trust

    record_trust(session, spec.probes, args)

    def save(rec: dict) -> None:
        store_sweep(session, rec)
        save_session(session, args.session)

    shown = _Progress(spec, donors, args.session)
    with out_of_memory_is_an_error(device), cancel_on_interrupt(CancelToken()) as cancel:
        if cluster is None:
            return spec, run_sweep(spec, donors, record=record, save=save, on_event=shown, progress=shown.step,
                                   cancel=cancel)
        from surgeon.features.sweep.distributed import run_distributed_sweep

        return spec, run_distributed_sweep(spec, donors, cluster, record=record, save=save, on_event=shown,
                                           progress=shown.step, cancel=cancel)


def _print_report(args, record: dict, labels: list[str]) -> None:
    from surgeon.features.sweep.report import analyze, to_csv, to_json, to_markdown

    analysis = analyze(record, labels, test=args.test)
    if args.format == "json":
        import json

        text = json.dumps(to_json(analysis), indent=2) + "\n"
    elif args.format == "csv":
        text = to_csv(analysis)
    else:
        text = to_markdown(analysis)
    if args.output:
        from surgeon.io.atomic import write_atomic

        write_atomic(args.output, text.encode())
    else:
        sys.stdout.write(text)

"""`moe-surgeon distance`: how far a donor moved from the base, per layer and component."""

from __future__ import annotations

import json

from surgeon.errors import SurgeonError


def cmd_distance(args) -> int:
    """Relative L2 distance of DONOR from BASE per layer and component (the TUI's distance map)."""
    from surgeon.core.architectures import GLOBAL_KINDS, LAYER_KINDS
    from surgeon.core.donor import open_donor
    from surgeon.features.distance import AGGREGATE, ESTIMATE_ABOVE, SAMPLE_EVERY, DistanceCache, distance_map

    base, donor = open_donor(args.base), open_donor(args.donor)
    if base.model_type != donor.model_type:
        raise SurgeonError(f"{donor.path} is {donor.model_type}, {base.path} is {base.model_type}")
    from surgeon.cli.progress import StepPrinter
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    with cancel_on_interrupt(CancelToken()) as token:
        cells = dict(distance_map(base, donor, DistanceCache(), progress=StepPrinter("distance"), cancel=token,
                                  estimate_above=ESTIMATE_ABOVE if args.estimate else None))
    # Said wherever the figures go: a tensor of more values than ESTIMATE_ABOVE whose exact figure was
    # not cached counted with an estimate from a sample of its values.
    estimated = (f"estimates: each tensor of more than {ESTIMATE_ABOVE:,} values not computed before counts with "
                 f"its distance over a sample of 1/{SAMPLE_EVERY} of its values") if args.estimate else None
    if args.json:
        out = {"base": str(base.path), "donor": str(donor.path), "aggregate": AGGREGATE, "estimated": estimated,
               "cells": [{"layer": layer, "component": kind, "distance": value} for (layer, kind), value in cells.items()]}
        print(json.dumps(out, indent=2))
        return 0
    kinds = [k for k in LAYER_KINDS if any(kind == k for _, kind in cells)]
    print(f"distance of {donor.path} from {base.path}")
    print(f"each cell: {AGGREGATE}")
    if estimated:
        print(estimated)
    print("layer " + "".join(f"{k:>14}" for k in kinds))
    for layer in range(base.anatomy.num_layers):
        row = [cells.get((layer, k)) for k in kinds]
        print(f"{layer:>5} " + "".join(f"{v:>14.4f}" if v is not None else f"{'-':>14}" for v in row))
    print("globals " + "  ".join(f"{k} {cells[(None, k)]:.4f}" for k in GLOBAL_KINDS if (None, k) in cells))
    return 0


def register(sub) -> None:
    p = sub.add_parser("distance", help="how far DONOR's weights are from BASE's, per layer and component")
    p.add_argument("base")
    p.add_argument("donor")
    p.add_argument("--json", action="store_true")
    p.add_argument("--estimate", action="store_true",
                   help="estimate each tensor of more than 4M values not computed before from a sixteenth of its "
                        "values (of a DeepSeek-V3 donor's 690 GB, about a sixteenth is read); the output says so")
    p.set_defaults(func=cmd_distance)

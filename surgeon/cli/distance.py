"""`moe-surgeon distance`: how far a donor moved from the base, per layer and component."""

from __future__ import annotations

import json

from surgeon.errors import SurgeonError


def cmd_distance(args) -> int:
    """Relative L2 distance of DONOR from BASE per layer and component (the TUI's distance map)."""
    from surgeon.core.architectures import GLOBAL_KINDS, LAYER_KINDS
    from surgeon.core.donor import open_donor
    from surgeon.features.distance import AGGREGATE, DistanceCache, distance_map

    base, donor = open_donor(args.base), open_donor(args.donor)
    if base.model_type != donor.model_type:
        raise SurgeonError(f"{donor.path} is {donor.model_type}, {base.path} is {base.model_type}")
    from surgeon.cli.progress import StepPrinter
    from surgeon.jobs import CancelToken, cancel_on_interrupt

    with cancel_on_interrupt(CancelToken()) as token:
        cells = dict(distance_map(base, donor, DistanceCache(), progress=StepPrinter("distance"), cancel=token))
    if args.json:
        out = {"base": str(base.path), "donor": str(donor.path), "aggregate": AGGREGATE, "cells": [
            {"layer": layer, "component": kind, "distance": value} for (layer, kind), value in cells.items()]}
        print(json.dumps(out, indent=2))
        return 0
    kinds = [k for k in LAYER_KINDS if any(kind == k for _, kind in cells)]
    print(f"distance of {donor.path} from {base.path}")
    print(f"each cell: {AGGREGATE}")
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
    p.set_defaults(func=cmd_distance)

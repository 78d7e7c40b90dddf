"""`moe-surgeon sweep`: placeholder until the sweep lands (see issue 5)."""

from .errors import SurgeonError


def register(sub) -> None:
    p = sub.add_parser("sweep", help="the component-transfer grid (not yet implemented)")
    p.add_argument("session")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    raise SurgeonError("sweep: not implemented yet")

"""`moe-surgeon routing`: placeholder until the routing analysis lands (see issue 6)."""

from .errors import SurgeonError


def register(sub) -> None:
    p = sub.add_parser("routing", help="expert routing analysis (not yet implemented)")
    p.add_argument("target")
    p.set_defaults(func=cmd_routing)


def cmd_routing(args) -> int:
    raise SurgeonError("routing: not implemented yet")

"""`moe-surgeon mix` (being built; see its issue)."""

from __future__ import annotations

from .errors import SurgeonError


def register(sub) -> None:
    p = sub.add_parser("mix", help="build an MoE from dense donors (their MLPs become the experts)")
    p.set_defaults(func=cmd_mix)


def cmd_mix(args) -> int:
    raise SurgeonError("mix: not built yet")

"""`moe-surgeon gates` (being built; see its issue)."""

from __future__ import annotations

from .errors import SurgeonError


def register(sub) -> None:
    p = sub.add_parser("gates", help="gates between decoder layers (Self-MoE): add, train, select")
    p.set_defaults(func=cmd_gates)


def cmd_gates(args) -> int:
    raise SurgeonError("gates: not built yet")

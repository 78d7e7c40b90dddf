"""`moe-surgeon compress` (being built; see its issue)."""

from __future__ import annotations

from .errors import SurgeonError


def register(sub) -> None:
    p = sub.add_parser("compress", help="Tucker-compress chosen experts into a compact dense FFN checkpoint")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    raise SurgeonError("compress: not built yet")

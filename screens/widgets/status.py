"""The donor legend and the status line: share of parameters per donor and changed tensors."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

from surgeon.core.workbench import Workbench

from .grid import donor_style


def legend(wb: Workbench, labels: dict[str, str], brush: str | None) -> Text:
    text = Text()
    for name in wb.donors:
        text.append(f" {name} ", donor_style(wb, name) + Style(bold=True))
        text.append(f"{labels.get(name, wb.donors[name].path.name)}")
        if name == wb.base:
            text.append(" (base)", "dim")
        if wb.problem(name):
            text.append(" incompatible", "bold red")
        text.append("  ")
    if brush:
        text.append("brush ", "dim")
        text.append(f" {brush} ", donor_style(wb, brush) + Style(bold=True))
    return text


def status_line(wb: Workbench, session: str | None, dirty: bool, note: str | None = None) -> Text:
    tally = wb.tally()
    text = Text()
    for name in wb.donors:
        share = 100 * tally.share(name)
        text.append(f" {name} ", donor_style(wb, name))
        text.append(f" {share:.1f}% ")
    text.append(f"· {tally.changed_tensors} of {tally.total_tensors} tensors changed", "bold")
    text.append(" · ")
    text.append(session or "unsaved session", "italic")
    if dirty and session:
        text.append(" (modified)", "yellow")
    if note:
        text.append(f" · {note}", "dim")
    return text

"""GateChart: one diverging bar per gated layer, the relative change of its logit-lens perplexity.

A gate that lowers the perplexity (helps) draws to the left of the axis, one that raises it
(hurts) to the right, all on one scale (the largest change), so layers compare at a glance.
Kept gates are green, dropped ones red, and the verdict ends the line. Small on purpose (one
row per decoder layer), so it renders one rich Text sized to its width, like ScoreChart.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

KEEP_STYLE = "green"
DROP_STYLE = "red"


@dataclass(frozen=True)
class ChangeRow:
    label: str  # "layer 3"
    change: float  # p_t2 / p_t1 - 1: negative when the gate helps
    keep: bool


def change_text(change: float) -> str:
    return f"{100 * change:+.2f}%"


def half_bar(change: float, scale: float, width: int) -> str:
    """`width` cells of bar for |change| on a 0..scale axis; a sliver when it rounds to nothing."""
    if scale <= 0 or change == 0:
        return ""
    n = max(0, min(width, round(abs(change) / scale * width)))
    return "█" * n if n else ("▕" if change < 0 else "▏")  # the sliver touches the axis


class GateChart(Widget):
    DEFAULT_CSS = """
    GateChart {
        height: auto;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.rows: list[ChangeRow] = []
        self.empty = "no selection yet"

    def set_rows(self, rows: list[ChangeRow], empty: str = "no selection yet") -> None:
        self.rows = list(rows)
        self.empty = empty
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.rows) + 1 if self.rows else 1

    def render(self) -> Text:
        if not self.rows:
            return Text(self.empty, "dim")
        width = max(30, self.content_size.width)
        label_w = max(len(r.label) for r in self.rows)
        value_w = max(len(change_text(r.change)) for r in self.rows)
        half = max(4, (width - label_w - value_w - len(" keep") - 3) // 2)
        scale = max(abs(r.change) for r in self.rows)
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(" " * (label_w + 1) + "helps ◀".rjust(half) + "│" + "▶ hurts".ljust(half), "dim")
        for r in self.rows:
            style = KEEP_STYLE if r.keep else DROP_STYLE
            left = half_bar(r.change, scale, half) if r.change < 0 else ""
            right = half_bar(r.change, scale, half) if r.change > 0 else ""
            out.append(f"\n{r.label:>{label_w}} ")
            out.append(left.rjust(half), style)
            out.append("│", "dim")
            out.append(right.ljust(half), style)
            out.append(f" {change_text(r.change):>{value_w}} ")
            out.append("keep" if r.keep else "drop", f"bold {style}")
        return out

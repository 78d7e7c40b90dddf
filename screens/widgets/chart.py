"""ScoreChart: one horizontal bar per model, grouped by probe, with the 95% CI shaded.

Small on purpose (a probe run has a handful of probes and donors), so it renders one rich Text
sized to its width instead of using the Line API. A bar is solid up to the interval's lower end,
dark-shaded up to the score and light-shaded up to the upper end, so overlapping intervals (no
real difference) are visible at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from surgeon.probes import metric_of


@dataclass(frozen=True)
class Bar:
    tag: str  # "H" for the hybrid, a donor's letter otherwise
    style: Style
    score: float
    lo: float
    hi: float


@dataclass(frozen=True)
class BarGroup:
    probe: str
    metric: str  # a result's metric (surgeon.probes.metric_of says how it reads)
    bars: tuple[Bar, ...]


def value_text(metric: str, value: float) -> str:
    m = metric_of(metric)
    return m.score_text(value) if m.proportion else f"{m.label} {value:.3g}"


def bar_cells(bar: Bar, top: float, width: int) -> str:
    """The bar as `width` characters on a 0..top axis."""
    def cells(v: float) -> int:
        return max(0, min(width, round(v / top * width))) if top > 0 else 0

    lo, score, hi = cells(bar.lo), cells(bar.score), cells(bar.hi)
    text = "".join("█" if i < lo else "▓" if i < score else "░" if i < hi else " " for i in range(width))
    if score == 0 and bar.score > 0:
        text = "▏" + text[1:]
    return text


class ScoreChart(Widget):
    DEFAULT_CSS = """
    ScoreChart {
        height: auto;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.groups: list[BarGroup] = []
        self.empty = "no results"

    def set_groups(self, groups: list[BarGroup], empty: str = "no results") -> None:
        self.groups = list(groups)
        self.empty = empty
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(1, sum(len(g.bars) for g in self.groups))

    def render(self) -> Text:
        if not self.groups:
            return Text(self.empty, "dim")
        width = max(20, self.content_size.width)
        label_w = min(16, max(len(g.probe) for g in self.groups))
        value_w = max(len(value_text(g.metric, b.score)) for g in self.groups for b in g.bars)
        bar_w = max(4, width - label_w - 4 - value_w - 1)
        out = Text(no_wrap=True, overflow="ellipsis")
        lines = 0
        for g in self.groups:
            top = 1.0 if metric_of(g.metric).proportion else max([b.hi for b in g.bars] + [b.score for b in g.bars] + [1e-12])
            for i, b in enumerate(g.bars):
                if lines:
                    out.append("\n")
                lines += 1
                label = g.probe if len(g.probe) <= label_w else g.probe[: label_w - 1] + "…"
                out.append(f"{label if i == 0 else '':<{label_w}} ", "bold" if i == 0 else "")
                out.append(f"{b.tag:>2} ", b.style + Style(bold=True))
                out.append(bar_cells(b, top, bar_w), b.style)
                out.append(f" {value_text(g.metric, b.score):>{value_w}}")
        return out

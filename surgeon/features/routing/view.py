"""A routing heatmap as a value: layers x experts, what it shows, and writers for papers.

A view is one matrix (MoE layers x experts) of one routing metric, either for one model on one
corpus or the difference of two such (another model on the same corpus, or the same model on
another corpus). The TUI's Routing screen and `moe-surgeon routing --save` build views here and
write them as CSV or JSON (the numbers, full precision) or as SVG or PNG (the picture, with axis
labels, a colour bar and a title). Both images are drawn from one Layout, so a test can find
every cell in either. The SVG is written by hand: it is a few hundred lines of plain elements
that any paper toolchain takes. Pillow draws the PNG because text labels are what it does well.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from surgeon.errors import SurgeonError
from surgeon.features.routing.probe import RoutingStats, heatmap_lines
from surgeon.io.atomic import write_atomic

METRICS = ("frequency", "top1", "mean_prob", "importance")
METRIC_NAMES = {
    "frequency": "activation frequency",
    "top1": "top-1 share",
    "mean_prob": "mean router probability",
    "importance": "importance",
    "gate": "mean gate weight",
    "reap": "REAP score",
}
# The saliency pruning reads (features/prune/saliency.py), as more layers of the same heatmap: the
# combine weight a routed expert gets, and REAP's gate x output norm, both over its routed tokens.
SALIENCY = ("gate", "reap")
FORMATS = (".csv", ".json", ".svg", ".png")

# Viridis (sequential: dark = rarely used) and RdBu reversed (diverging: blue < 0 < red), as
# evenly spaced anchors; cells interpolate between them. Both read in greyscale print.
SEQUENTIAL = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
              "#b5de2b", "#fde725"]
DIVERGING = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d",
             "#b2182b"]


def metric_values(stats: RoutingStats, metric: str) -> np.ndarray:
    """The [layers, experts] matrix of `metric` (see routing.py's terms)."""
    if metric not in METRICS + SALIENCY:
        raise SurgeonError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    values = stats.mean_weight if metric == "gate" else getattr(stats, metric)
    if values is None and metric == "reap":
        raise SurgeonError("REAP score: not measured; this family's expert outputs cannot be read during the "
                           "forward pass")
    if values is None:
        raise SurgeonError("metric importance: the probe did not score importance (--importance)")
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class Side:
    """One routing measurement: which model read which corpus."""

    model: str
    domain: str
    tokens: int

    def to_json(self) -> dict:
        return {"model": self.model, "domain": self.domain, "tokens": self.tokens}


@dataclass
class RoutingView:
    values: np.ndarray  # [layers, experts] float64
    layers: list[int]  # MoE layer indices, the rows
    metric: str
    a: Side
    b: Side | None = None  # set: the view is a - b
    top_k: int = 0
    scale: tuple[float, float] | None = None  # colour range; None: from the values

    @property
    def is_difference(self) -> bool:
        return self.b is not None

    @property
    def num_experts(self) -> int:
        return int(self.values.shape[1])

    @property
    def title(self) -> str:
        what = METRIC_NAMES.get(self.metric, self.metric)
        a, b = self.a, self.b
        if b is None:
            return f"{what} of {a.model} on {a.domain} ({a.tokens} tokens)"
        if a.model == b.model:
            return f"{what} of {a.model}: {a.domain} minus {b.domain}"
        if a.domain == b.domain:
            return f"{what} on {a.domain}: {a.model} minus {b.model}"
        return f"{what}: {a.model} on {a.domain} minus {b.model} on {b.domain}"

    def colour_range(self) -> tuple[float, float]:
        if self.scale is not None:
            return self.scale
        if self.is_difference:  # symmetric, so white is exactly zero
            top = float(np.abs(self.values).max()) if self.values.size else 0.0
            top = top or 1.0
            return -top, top
        top = float(self.values.max()) if self.values.size else 0.0
        return 0.0, top or 1.0

    def colours(self) -> np.ndarray:
        """[layers, experts, 3] uint8 RGB of every cell."""
        lo, hi = self.colour_range()
        return palette_rgb(self.values, lo, hi, diverging=self.is_difference)

    def value_format(self) -> str:
        return "{:+.2f}" if self.is_difference else "{:.2f}"

    def to_json(self) -> dict:
        lo, hi = self.colour_range()
        return {
            "kind": "moe-surgeon routing view", "version": 1,
            "title": self.title, "metric": self.metric, "difference": self.is_difference,
            "a": self.a.to_json(), "b": None if self.b is None else self.b.to_json(),
            "top_k": self.top_k, "layers": list(self.layers), "experts": list(range(self.num_experts)),
            "scale": [lo, hi],
            "values": [[float(v) for v in row] for row in self.values],
        }


# ---------------------------------------------------------------- building views
def stats_view(stats: RoutingStats, metric: str, model: str, domain: str, *, scale=None) -> RoutingView:
    return RoutingView(metric_values(stats, metric), list(stats.layers), metric, Side(model, domain, stats.tokens),
                       top_k=stats.top_k, scale=scale)


def difference_view(a: RoutingStats, b: RoutingStats, metric: str, a_side: tuple[str, str],
                    b_side: tuple[str, str]) -> RoutingView:
    """`a` minus `b`; sides are (model, domain)."""
    if a.layers != b.layers or a.num_experts != b.num_experts:
        raise SurgeonError(f"difference {a_side[0]} - {b_side[0]}: the models have different MoE layers or "
                           f"expert counts ({len(a.layers)}x{a.num_experts} vs {len(b.layers)}x{b.num_experts})")
    values = metric_values(a, metric) - metric_values(b, metric)
    return RoutingView(values, list(a.layers), metric, Side(*a_side, a.tokens), Side(*b_side, b.tokens),
                       top_k=a.top_k)


def view_lines(view: RoutingView) -> list[str]:
    """The text heatmap of a view (shade blocks and values), as `moe-surgeon routing` prints it."""
    lo, hi = view.colour_range()
    fmt = "{:+5.2f}" if view.is_difference else "{:4.2f}"
    return heatmap_lines(view.values, view.layers, scale=max(abs(lo), abs(hi)), fmt=fmt)


# ---------------------------------------------------------------- colour
def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def palette_rgb(values, lo: float, hi: float, *, diverging: bool) -> np.ndarray:
    """Map values in [lo, hi] (clipped) through the palette; uint8 RGB, vectorised."""
    anchors = np.array([_hex(c) for c in (DIVERGING if diverging else SEQUENTIAL)], dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full(v.shape, 0.5 if diverging else 0.0)
    pos = np.linspace(0.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(t, pos, anchors[:, ch]) for ch in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(x) for x in rgb))


def ink_for(rgb) -> str:
    """Black or white text, whichever reads on this background (relative luminance)."""
    r, g, b = (int(x) for x in rgb)
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else "#ffffff"


# ---------------------------------------------------------------- geometry shared by SVG and PNG
@dataclass(frozen=True)
class Layout:
    rows: int
    cols: int
    cell_w: int
    cell_h: int
    left: int  # x of the first cell column
    top: int  # y of the first cell row
    bar_x: int  # the colour bar's left edge
    bar_w: int
    width: int
    height: int
    annotate: bool  # values written in the cells
    row_step: int  # label every n-th row / column (large models)
    col_step: int
    font: int  # font size (px)

    def cell_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        return self.left + c * self.cell_w, self.top + r * self.cell_h, self.cell_w, self.cell_h

    @property
    def grid_bottom(self) -> int:
        return self.top + self.rows * self.cell_h


def layout_for(view: RoutingView) -> Layout:
    rows, cols = view.values.shape
    annotate = cols <= 16 and rows <= 64
    cell_w, cell_h = (46, 26) if annotate else (14, 14)
    row_step = max(1, math.ceil(rows / 40))
    col_step = 1 if cols <= 32 else 8
    font = 12
    left = 70
    top = 48
    grid_w = cols * cell_w
    bar_x = left + grid_w + 24
    bar_w = 16
    width = max(bar_x + bar_w + 64, left + 9 * len(view.title) + 16)  # a bold 15px title: ~8.5px a character
    height = top + rows * cell_h + 48
    return Layout(rows, cols, cell_w, cell_h, left, top, bar_x, bar_w, width, height, annotate, row_step, col_step,
                  font)


def colour_bar_ticks(view: RoutingView, n: int = 5) -> list[tuple[float, float]]:
    """(value, fraction from the bottom of the bar) for n evenly spaced ticks."""
    lo, hi = view.colour_range()
    return [(lo + (hi - lo) * i / (n - 1), i / (n - 1)) for i in range(n)]


def _tick_text(view: RoutingView, v: float) -> str:
    lo, hi = view.colour_range()
    span = hi - lo
    digits = 2 if span >= 0.5 else 3 if span >= 0.05 else 4  # ticks stay distinct on small ranges
    if abs(v) < 1e-12:
        v = 0.0  # never "-0.000"
    return f"{v:+.{digits}f}" if view.is_difference and v else f"{v:.{digits}f}"


# ---------------------------------------------------------------- writers
def view_csv(view: RoutingView) -> str:
    """One row per MoE layer, one column per expert; values at full precision (repr round-trips)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["layer"] + [f"e{e}" for e in range(view.num_experts)])
    for layer, row in zip(view.layers, view.values):
        w.writerow([layer] + [repr(float(v)) for v in row])
    return out.getvalue()


def view_svg(view: RoutingView) -> str:
    lay = layout_for(view)
    colours = view.colours()
    fmt = view.value_format()
    title = escape(view.title)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{lay.width}" height="{lay.height}" '
        f'viewBox="0 0 {lay.width} {lay.height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
        f'font-size="{lay.font}">',
        f"<title>{title}</title>",
        f'<g id="background"><rect x="0" y="0" width="{lay.width}" height="{lay.height}" fill="#ffffff"/></g>',
        f'<text id="title" x="{lay.left}" y="24" font-size="15" font-weight="bold">{title}</text>',
        '<g id="cells">',
    ]
    for r, layer in enumerate(view.layers):
        for c in range(lay.cols):
            x, y, w, h = lay.cell_box(r, c)
            tip = f"layer {layer}, expert {c}: {view.values[r, c]:.6g}"
            out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{hex_colour(colours[r, c])}">'
                       f"<title>{escape(tip)}</title></rect>")
    out.append("</g>")
    if lay.annotate:
        out.append('<g id="values" text-anchor="middle" font-size="11">')
        for r in range(lay.rows):
            for c in range(lay.cols):
                x, y, w, h = lay.cell_box(r, c)
                out.append(f'<text x="{x + w / 2:g}" y="{y + h / 2 + 4:g}" fill="{ink_for(colours[r, c])}">'
                           f"{fmt.format(view.values[r, c])}</text>")
        out.append("</g>")
    out.append('<g id="axes">')
    for r, layer in enumerate(view.layers):
        if r % lay.row_step == 0:
            x, y, w, h = lay.cell_box(r, 0)
            out.append(f'<text x="{x - 6}" y="{y + h / 2 + 4:g}" text-anchor="end">{layer}</text>')
    for c in range(0, lay.cols, lay.col_step):
        x, y, w, h = lay.cell_box(lay.rows - 1, c)
        out.append(f'<text x="{x + w / 2:g}" y="{lay.grid_bottom + 16}" text-anchor="middle">{c}</text>')
    mid_y = (lay.top + lay.grid_bottom) / 2
    out.append(f'<text x="18" y="{mid_y:g}" text-anchor="middle" transform="rotate(-90 18 {mid_y:g})">'
               "MoE layer</text>")
    out.append(f'<text x="{lay.left + lay.cols * lay.cell_w / 2:g}" y="{lay.grid_bottom + 36}" '
               'text-anchor="middle">expert</text>')
    out.append("</g>")
    # The colour bar: one gradient (bottom = low) with the palette's anchors as stops.
    anchors = DIVERGING if view.is_difference else SEQUENTIAL
    out.append('<g id="colour-bar"><defs><linearGradient id="bar" x1="0" y1="1" x2="0" y2="0">')
    for i, c in enumerate(anchors):
        out.append(f'<stop offset="{i / (len(anchors) - 1):.4f}" stop-color="{c}"/>')
    out.append("</linearGradient></defs>")
    height = lay.grid_bottom - lay.top
    out.append(f'<rect x="{lay.bar_x}" y="{lay.top}" width="{lay.bar_w}" height="{height}" fill="url(#bar)" '
               'stroke="#555555" stroke-width="0.5"/>')
    for v, f in colour_bar_ticks(view):
        y = lay.grid_bottom - f * height
        out.append(f'<line x1="{lay.bar_x + lay.bar_w}" y1="{y:g}" x2="{lay.bar_x + lay.bar_w + 4}" y2="{y:g}" '
                   'stroke="#000000" stroke-width="1"/>')
        out.append(f'<text x="{lay.bar_x + lay.bar_w + 7}" y="{y + 4:g}">{_tick_text(view, v)}</text>')
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def view_png(view: RoutingView, *, zoom: int = 2) -> bytes:
    """The same picture as view_svg, `zoom` pixels per layout unit (2: sharp in a paper)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise SurgeonError("PNG output needs Pillow: pip install pillow (or save as .svg)") from None
    lay = layout_for(view)
    z = zoom
    img = Image.new("RGB", (lay.width * z, lay.height * z), "white")
    draw = ImageDraw.Draw(img)
    font, small, big = _font(lay.font * z), _font(11 * z), _font(15 * z)
    colours = view.colours()
    fmt = view.value_format()
    draw.text((lay.left * z, 24 * z), view.title, fill="black", font=big, anchor="ls")
    for r in range(lay.rows):
        for c in range(lay.cols):
            x, y, w, h = lay.cell_box(r, c)
            fill = tuple(int(v) for v in colours[r, c])
            draw.rectangle([x * z, y * z, (x + w) * z - 1, (y + h) * z - 1], fill=fill)
            if lay.annotate:
                draw.text(((x + w / 2) * z, (y + h / 2) * z), fmt.format(view.values[r, c]),
                          fill=ink_for(colours[r, c]), font=small, anchor="mm")
    for r, layer in enumerate(view.layers):
        if r % lay.row_step == 0:
            x, y, w, h = lay.cell_box(r, 0)
            draw.text(((x - 6) * z, (y + h / 2) * z), str(layer), fill="black", font=font, anchor="rm")
    for c in range(0, lay.cols, lay.col_step):
        x, y, w, h = lay.cell_box(lay.rows - 1, c)
        draw.text(((x + w / 2) * z, (lay.grid_bottom + 12) * z), str(c), fill="black", font=font, anchor="mm")
    draw.text(((lay.left + lay.cols * lay.cell_w / 2) * z, (lay.grid_bottom + 32) * z), "expert", fill="black",
              font=font, anchor="mm")
    label = Image.new("RGB", (90 * z, 18 * z), "white")  # the y-axis label, drawn flat then turned
    ImageDraw.Draw(label).text((45 * z, 9 * z), "MoE layer", fill="black", font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    mid_y = (lay.top + lay.grid_bottom) / 2
    img.paste(label, (int((18 - 9) * z), int(mid_y * z - label.height / 2)))
    # The colour bar, one pixel row at a time (bottom = low).
    height = (lay.grid_bottom - lay.top) * z
    lo, hi = view.colour_range()
    ramp = palette_rgb(lo + (hi - lo) * (1 - (np.arange(height) + 0.5) / height), lo, hi,
                       diverging=view.is_difference)
    x0, x1 = lay.bar_x * z, (lay.bar_x + lay.bar_w) * z - 1
    for i, rgb in enumerate(ramp):
        draw.line([(x0, lay.top * z + i), (x1, lay.top * z + i)], fill=tuple(int(v) for v in rgb))
    draw.rectangle([x0, lay.top * z, x1, lay.grid_bottom * z - 1], outline="#555555")
    for v, f in colour_bar_ticks(view):
        y = (lay.grid_bottom - f * (lay.grid_bottom - lay.top)) * z
        draw.line([(x1 + 1, y), (x1 + 4 * z, y)], fill="black", width=z)
        draw.text((x1 + 7 * z, y), _tick_text(view, v), fill="black", font=font, anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG", dpi=(72 * z, 72 * z))
    return buf.getvalue()


def save_view(view: RoutingView, path: str | Path) -> str:
    """Write the view to `path` atomically, the format by its extension; returns the format."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".csv":
        data = view_csv(view).encode()
    elif ext == ".json":
        data = (json.dumps(view.to_json(), indent=1) + "\n").encode()
    elif ext == ".svg":
        data = view_svg(view).encode()
    elif ext == ".png":
        data = view_png(view)
    else:
        raise SurgeonError(f"{path}: unknown view format {ext or '(none)'!r}; use {', '.join(FORMATS)}")
    try:
        write_atomic(path, data)
    except OSError as e:
        raise SurgeonError(f"{path}: cannot write ({e.strerror or e})") from None
    return ext[1:]

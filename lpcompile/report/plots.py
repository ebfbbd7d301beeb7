"""The report's plots, each rendered by matplotlib to an inline SVG string (no external resources).

Figures are built with :class:`matplotlib.figure.Figure` and saved through the SVG canvas, so no
pyplot state and no GUI backend is involved (the Agg/SVG canvases only). Text stays text
(``svg.fonttype = "none"``), the date and RDF metadata are left out, and each plot gets its own
``svg.hashsalt`` so element ids are deterministic and do not collide when several SVGs share a page.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence

import matplotlib
from matplotlib.axis import Axis
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

from lpcompile.report.overlay import LOSS_STOPS, format_color

logger = logging.getLogger(__name__)

WIDTH_IN = 9.0
_XML_HEAD = re.compile(r"^.*?(?=<svg)", re.S)


def render_svg(fig: Figure, name: str) -> str:
    """``fig`` as an ``<svg>`` element string (XML prolog, DOCTYPE and metadata stripped)."""
    buf = io.StringIO()
    rc = {"svg.fonttype": "none", "svg.hashsalt": f"lpcompile-{name}", "font.size": 9}
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = _XML_HEAD.sub("", buf.getvalue(), count=1)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    return svg.replace("<svg ", f'<svg class="plot" data-plot="{name}" role="img" ', 1)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _decade(value: float, _pos: object = None) -> str:
    """Tick label of a log axis as plain text (``10⁻³``); mathtext labels cost seconds to lay out."""
    if value == 0:
        return "0"
    if not value > 0:
        return ""
    exp = math.log10(value)
    if abs(exp - round(exp)) > 1e-9:
        return ""
    return "10" + str(round(exp)).translate(_SUPERSCRIPT)


def _plain_log(axis: Axis) -> None:
    axis.set_major_formatter(FuncFormatter(_decade))
    axis.set_minor_formatter(NullFormatter())


def _short(label: str, width: int = 42) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def bits_along_graph(
    names: Sequence[str],
    formats: Sequence[str],
    bits: Sequence[float],
    budget_bits: float | None,
    achieved_bits: float,
) -> str:
    """Bars of bits per weight for each planned node in graph order, coloured by format."""
    n = len(names)
    fig = Figure(figsize=(WIDTH_IN, 3.4), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(n))
    ax.bar(xs, bits, color=[format_color(f) for f in formats], width=0.85, edgecolor="none")
    if budget_bits is not None:
        ax.axhline(budget_bits, color="#333333", ls="--", lw=1, label=f"budget {budget_bits:g} bits")
    ax.axhline(achieved_bits, color="#c0392b", ls="-", lw=1, label=f"achieved {achieved_bits:.4g} bits")
    ax.set_ylabel("bits per weight")
    ax.set_xlabel("planned node (graph order)")
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    ax.set_ylim(0, max([*bits, budget_bits or 0, 1]) * 1.12)
    if n <= 40:
        ax.set_xticks(xs, [_short(s, 30) for s in names], rotation=60, ha="right", fontsize=7)
    line_handles = ax.get_legend_handles_labels()[0]
    fmt_handles = [Patch(facecolor=format_color(f), label=f) for f in dict.fromkeys(formats)]
    ax.legend(
        handles=[*fmt_handles, *line_handles],
        fontsize=8,
        frameon=False,
        ncols=6,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
    )
    ax.spines[["top", "right"]].set_visible(False)
    return render_svg(fig, "bits")


def loss_heatmap(
    names: Sequence[str],
    formats: Sequence[str],
    losses: Sequence[Sequence[float | None]],
    chosen: Sequence[str],
) -> str:
    """Predicted loss per (node, format) on a log colour scale; the chosen format is boxed.

    Zero and unknown losses are drawn light grey (a log scale cannot place them).
    """
    import numpy as np

    data = np.array([[np.nan if v is None or not v > 0 else float(v) for v in row] for row in losses], dtype=float)
    if data.size == 0:
        data = np.full((max(len(names), 1), max(len(formats), 1)), np.nan)
    finite = data[np.isfinite(data)]
    n = len(names)
    height = min(2.0 + 0.2 * n, 40.0)
    fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("lploss", list(LOSS_STOPS)).with_extremes(bad="#eeeeee")
    norm = LogNorm(vmin=float(finite.min()), vmax=float(max(finite.max(), finite.min() * 10))) if finite.size else None
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(formats)), list(formats), rotation=30, ha="right")
    if n <= 120:
        ax.set_yticks(range(n), [_short(s) for s in names], fontsize=7 if n > 30 else 8)
    else:
        ax.set_ylabel(f"{n} planned nodes (graph order)")
    col = {f: j for j, f in enumerate(formats)}
    for i, f in enumerate(chosen):
        if f in col:
            ax.add_patch(Rectangle((col[f] - 0.5, i - 0.5), 1, 1, fill=False, ec="#000000", lw=1.4))
    if finite.size:
        cb = fig.colorbar(im, ax=ax, shrink=min(1.0, 6.0 / height) if height > 6 else 1.0)
        cb.set_label("predicted loss (log scale)")
        _plain_log(cb.ax.yaxis)
    ax.set_title("predicted loss per (node, format); box = chosen format, grey = 0 or unknown", fontsize=9)
    return render_svg(fig, "heatmap")


def predicted_vs_measured(
    predicted: Sequence[float],
    measured: Sequence[float],
    formats: Sequence[str],
    rho: float | None,
) -> str:
    """Scatter of predicted against measured loss (log-log, coloured by format) with Spearman ρ."""
    pairs = [(p, m, f) for p, m, f in zip(predicted, measured, formats, strict=True) if p > 0 and m > 0]
    fig = Figure(figsize=(6.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for fmt in dict.fromkeys(f for _, _, f in pairs):
        pts = [(p, m) for p, m, f in pairs if f == fmt]
        ax.scatter(
            [p for p, _ in pts],
            [m for _, m in pts],
            s=18,
            color=format_color(fmt),
            label=fmt,
            edgecolors="#333333",
            linewidths=0.3,
        )
    if pairs:
        lo = min(min(p, m) for p, m, _ in pairs)
        hi = max(max(p, m) for p, m, _ in pairs)
        ax.plot([lo, hi], [lo, hi], color="#888888", ls="--", lw=0.8, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log(ax.xaxis)
        _plain_log(ax.yaxis)
    ax.set_xlabel("predicted loss (Hessian)")
    ax.set_ylabel("measured loss (quantize one node, run)")
    title = f"Spearman ρ = {rho:.3f}" if rho is not None and math.isfinite(rho) else "Spearman ρ: n/a"
    ax.set_title(f"{title}; {len(pairs)} pairs with non-zero losses drawn", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return render_svg(fig, "scatter")


def pareto_curve(
    bits: Sequence[float],
    losses: Sequence[float],
    front: Sequence[bool],
    current: tuple[float, float] | None,
    budget_bits: float | None,
) -> str:
    """Predicted loss against achieved bits over a budget sweep; the front as a step line, the plan starred.

    Log loss axis; solutions that predict exactly 0 sit on the decade below the smallest positive
    loss, whose tick reads ``0``.
    """
    values = [*losses, *([current[1]] if current is not None else [])]
    positive = [v for v in values if v > 0]
    zero_at = 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive and len(positive) < len(values) else None

    def y(v: float) -> float:
        return v if v > 0 or zero_at is None else zero_at

    fig = Figure(figsize=(WIDTH_IN, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(bits, [y(v) for v in losses], s=14, color="#bbbbbb", label="solved budgets", zorder=2)
    fb = [(b, v) for b, v, f in zip(bits, losses, front, strict=True) if f]
    if fb:
        # best loss reachable with at most b bits: a step function through the front's points
        ax.plot(
            [b for b, _ in fb],
            [y(v) for _, v in fb],
            marker="o",
            ms=4,
            color="#4e79a7",
            label="Pareto front",
            drawstyle="steps-post",
            zorder=3,
        )
    if current is not None:
        ax.scatter(
            [current[0]],
            [y(current[1])],
            marker="*",
            s=160,
            color="#c0392b",
            zorder=4,
            label=f"this plan ({current[0]:.4g} bits)",
        )
    if budget_bits is not None:
        ax.axvline(budget_bits, color="#333333", ls="--", lw=0.8, label=f"budget {budget_bits:g} bits")
    if positive:
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        if zero_at is not None:
            ax.axhline(zero_at, color="#cccccc", lw=0.6, ls=":")
            ax.yaxis.set_major_formatter(
                FuncFormatter(lambda v, pos: "0" if math.isclose(v, zero_at, rel_tol=1e-6) else _decade(v, pos))
            )
    ax.set_xlabel("achieved bits per weight")
    ax.set_ylabel("predicted loss (sum over nodes)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    return render_svg(fig, "pareto")


def format_mix(mix: Mapping[str, int], bits_of: Mapping[str, float]) -> str:
    """Horizontal bars: share of the parameters in each format (most bits on top)."""
    total = sum(mix.values()) or 1
    order = sorted(mix, key=lambda f: (bits_of.get(f, 0.0), f))
    fig = Figure(figsize=(WIDTH_IN, 0.9 + 0.38 * max(len(order), 1)), layout="constrained")
    ax = fig.add_subplot()
    shares = [100.0 * mix[f] / total for f in order]
    ax.barh(range(len(order)), shares, color=[format_color(f) for f in order])
    ax.set_yticks(range(len(order)), order)
    for i, (f, s) in enumerate(zip(order, shares, strict=True)):
        ax.text(s + 0.8, i, f"{s:.1f}%  ({mix[f]:,} weights)", va="center", fontsize=8)
    ax.set_xlim(0, 118)
    ax.set_xlabel("share of quantizable weights (%)")
    ax.spines[["top", "right"]].set_visible(False)
    return render_svg(fig, "mix")


__all__ = [
    "bits_along_graph",
    "format_mix",
    "loss_heatmap",
    "pareto_curve",
    "predicted_vs_measured",
    "render_svg",
]

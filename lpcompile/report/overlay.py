"""Model Explorer node-data overlays: the precision map as node colours.

Model Explorer ("node data" / node data provider JSON, see ``model_explorer.node_data_builder``)
loads a JSON object of the ``GraphNodeData`` form and applies it to the graph on screen::

    {"name": "lpcompile format (bits/weight)",
     "results": {"<node id>": {"value": 4.125, "bgColor": "#b07aa1", "textColor": "#ffffff"}, ...},
     "gradient": [{"stop": 0, "bgColor": "#..."}, {"stop": 1, "bgColor": "#..."}]}

The ONNX adapter (``model-explorer-onnx``) uses the ONNX node name as the node id, so results
are keyed by node name. ``value`` must be a number: the format overlay writes bits per weight
and colours each node by its format (fixed palette, :data:`FORMAT_COLORS`); the loss overlay
writes the predicted loss and colours it on a log scale (explicit ``bgColor``; the ``gradient``
runs over the same colours for Model Explorer's legend).

Sources: a rewritten model (``ir.Model``, ``onnx.ModelProto`` or a path; nodes carry
``lpcompile.format`` / ``lpcompile.bits`` / ``lpcompile.predicted_loss`` metadata from
AnnotatePass, and the Q/DQ/Cast nodes that serve them ``lpcompile.serves``) or a
:class:`~lpcompile.plan.PrecisionPlan`.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpcompile.errors import ModelLoadError
from lpcompile.io_utils import atomic_write_text
from lpcompile.plan import PrecisionPlan

logger = logging.getLogger(__name__)

FORMAT_KEY = "lpcompile.format"
BITS_KEY = "lpcompile.bits"
LOSS_KEY = "lpcompile.predicted_loss"
PARAMS_KEY = "lpcompile.params"
SERVES_KEY = "lpcompile.serves"

#: Colour of each registered format (shared by the report's plots and the overlays).
FORMAT_COLORS: Mapping[str, str] = {
    "fp32": "#9e9e9e",
    "bf16": "#4e79a7",
    "fp16": "#76b7b2",
    "fp8_e4m3": "#59a14f",
    "fp8_e5m2": "#8cd17d",
    "int8": "#edc948",
    "int4_b32": "#f28e2b",
    "int4_b64": "#e15759",
    "int4_b128": "#b07aa1",
}

#: Low-to-high loss colours (light yellow to dark red) for the loss overlay and legend.
LOSS_STOPS: tuple[str, ...] = ("#ffffcc", "#fed976", "#fd8d3c", "#e31a1c", "#800026")


def format_color(fmt: str) -> str:
    """The colour of ``fmt``: the fixed palette, or a stable hash-derived colour for other names."""
    if fmt in FORMAT_COLORS:
        return FORMAT_COLORS[fmt]
    h = int(hashlib.sha256(fmt.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hls_to_rgb(h, 0.55, 0.55)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def text_color(bg: str) -> str:
    """Black or white text, whichever reads better on ``bg`` (``#rrggbb``)."""
    r, g, b = (int(bg[i : i + 2], 16) / 255 for i in (1, 3, 5))
    lum = 0.2126 * r**2.2 + 0.7152 * g**2.2 + 0.0722 * b**2.2
    return "#ffffff" if lum < 0.3 else "#1f1f1f"


def loss_color(value: float, lo: float, hi: float) -> str:
    """Colour of a loss on a log scale between ``lo`` and ``hi`` (both > 0)."""
    if value <= 0 or lo <= 0:
        return LOSS_STOPS[0]
    if hi <= lo:
        return LOSS_STOPS[len(LOSS_STOPS) // 2]
    t = (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    t = min(1.0, max(0.0, t)) * (len(LOSS_STOPS) - 1)
    i = min(int(t), len(LOSS_STOPS) - 2)
    frac = t - i
    a, b = LOSS_STOPS[i], LOSS_STOPS[i + 1]
    mix = [round(int(a[k : k + 2], 16) * (1 - frac) + int(b[k : k + 2], 16) * frac) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in mix)


@dataclass(frozen=True)
class OverlayNode:
    """One node of the precision map as the overlays see it.

    Attributes:
        name: node name (Model Explorer's node id for ONNX).
        format: its format.
        bits: bits per weight.
        predicted_loss: predicted loss of the format, when known.
        serves: for Q/DQ/Cast nodes inserted by the passes, the planned nodes they feed (empty for
            planned nodes themselves).
    """

    name: str
    format: str
    bits: float | None
    predicted_loss: float | None = None
    serves: tuple[str, ...] = ()


ModelSource = Any  # ir.Model | onnx.ModelProto | PrecisionPlan | str | os.PathLike | list[OverlayNode]


def precision_map(source: ModelSource) -> list[OverlayNode]:
    """The planned nodes (and the inserted nodes serving them) of a model or a plan, in graph order.

    Raises:
        ModelLoadError: a path that is not a readable ONNX file.
    """
    if isinstance(source, PrecisionPlan):
        return [OverlayNode(n.name, n.format, n.bits, n.predicted_loss) for n in source.nodes]
    if isinstance(source, list | tuple) and all(isinstance(n, OverlayNode) for n in source):
        return list(source)  # already a precision map
    nodes = list(_model_node_props(source))
    planned: dict[str, OverlayNode] = {}
    out: list[OverlayNode] = []
    for name, props in nodes:
        fmt = props.get(FORMAT_KEY)
        if fmt and SERVES_KEY not in props:
            node = OverlayNode(name, fmt, _float(props.get(BITS_KEY)), _float(props.get(LOSS_KEY)))
            planned[name] = node
    for name, props in nodes:
        if name in planned:
            out.append(planned[name])
        elif SERVES_KEY in props:
            served = tuple(s for s in props[SERVES_KEY].split(",") if s)
            fmts = {planned[s].format for s in served if s in planned}
            if len(fmts) == 1:
                fmt = fmts.pop()
                out.append(
                    OverlayNode(name, fmt, planned[served[0]].bits if served[0] in planned else None, None, served)
                )
    return out


def format_overlay(source: ModelSource) -> dict[str, Any]:
    """Node data colouring every planned node (and the Q/DQ/Cast nodes serving it) by its format."""
    results: dict[str, dict[str, Any]] = {}
    for n in precision_map(source):
        bg = format_color(n.format)
        results[n.name] = {
            "value": _json_num(n.bits if n.bits is not None else 0.0),
            "bgColor": bg,
            "textColor": text_color(bg),
        }
    return {"name": "lpcompile format (bits/weight)", "results": results}


def loss_overlay(source: ModelSource) -> dict[str, Any]:
    """Node data colouring every planned node by its predicted loss (log scale, yellow to dark red)."""
    nodes = [n for n in precision_map(source) if not n.serves and n.predicted_loss is not None]
    positive = [n.predicted_loss for n in nodes if n.predicted_loss is not None and n.predicted_loss > 0]
    lo, hi = (min(positive), max(positive)) if positive else (0.0, 0.0)
    results: dict[str, dict[str, Any]] = {}
    for n in nodes:
        value = float(n.predicted_loss)  # type: ignore[arg-type]
        bg = loss_color(value, lo, hi)
        results[n.name] = {"value": _json_num(value), "bgColor": bg, "textColor": text_color(bg)}
    gradient = [{"stop": round(i / (len(LOSS_STOPS) - 1), 4), "bgColor": c} for i, c in enumerate(LOSS_STOPS)]
    return {"name": "lpcompile predicted loss (log colour scale)", "results": results, "gradient": gradient}


def write_overlays(source: ModelSource, out_dir: str | os.PathLike[str], stem: str) -> list[Path]:
    """Write ``STEM.format.json`` and ``STEM.loss.json`` (the latter only when losses are known).

    Returns:
        The written paths (format overlay first).
    """
    out_dir = Path(out_dir)
    fmt = format_overlay(source)
    paths = [out_dir / f"{stem}.format.json"]
    atomic_write_text(paths[0], json.dumps(fmt, indent=1, allow_nan=False) + "\n")
    loss = loss_overlay(source)
    if loss["results"]:
        paths.append(out_dir / f"{stem}.loss.json")
        atomic_write_text(paths[1], json.dumps(loss, indent=1, allow_nan=False) + "\n")
    return paths


# -- helpers ----------------------------------------------------------------------------------
def _model_node_props(source: ModelSource) -> Iterable[tuple[str, dict[str, str]]]:
    """(node name, metadata_props) of the main graph's nodes, for ir.Model / ModelProto / a path."""
    if isinstance(source, str | os.PathLike):
        source = _load_proto(Path(source))
    graph = getattr(source, "graph", None)
    if graph is None:
        raise TypeError(f"expected a model, a model path or a PrecisionPlan, got {type(source).__name__}")
    if hasattr(graph, "node") and not hasattr(graph, "initializers"):  # onnx.GraphProto
        for node in graph.node:
            yield node.name, {p.key: p.value for p in node.metadata_props}
    else:  # onnx_ir.Graph
        for node in graph:
            yield node.name or "", dict(node.metadata_props)


def _load_proto(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise ModelLoadError(f"cannot read ONNX model {path}: {type(exc).__name__}") from None


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _json_num(v: float) -> float:
    return float(f"{v:.6g}")

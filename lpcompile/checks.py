"""Model sanity checks before a rewrite: what lpcompile leaves alone, and why.

:func:`check_model` looks at a loaded (normalised) model and returns a :class:`ModelCheck`:
findings the workflow logs as warnings (or info) and puts in its JSON summary, and the weighted
nodes that must stay in fp32 whatever the plan says.

Decisions (one per kind of finding, :class:`Finding.code`):

* ``nonfinite-weight`` (warning): a MatMul/Gemm/Conv weight holds NaN or ±Inf. Its scale would
  be NaN/Inf and every code garbage, so the node is kept in fp32 (``keep_fp32``); a plan that
  asks for another format is overridden with a warning. (Inf elsewhere, e.g. a ``-inf``
  attention-mask constant, is legitimate and not reported.)
* ``zero-weight`` (info): an all-zero weight quantizes to zeros exactly (zero scale handled by
  the formats); reported, not changed.
* ``control-flow`` (warning): ``If`` / ``Loop`` / ``Scan`` nodes. Their subgraphs are left as
  they are (fp32); only the main graph's weighted nodes get formats.
* ``custom-domain`` (warning): nodes outside the standard ONNX domains. They are kept as they
  are; ONNX Runtime must know them to evaluate or analyse the model.
* ``shared-weight`` (info): one initializer feeding several weighted nodes; they share one format.
* ``zero-sized`` (info): initializers with no elements; left alone.
* ``dynamic-shape`` (info): graph inputs with symbolic dims besides the batch axis; synthetic
  calibration data fixes them (``seq_len``), real data may use any size.
* ``untyped-input`` (warning): graph inputs without a shape; synthetic calibration is impossible.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from lpcompile.graph import WeightNode, find_weight_nodes, release_data

logger = logging.getLogger(__name__)

Severity = Literal["warning", "info"]

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})
OWN_DOMAINS = frozenset({"lpcompile"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
_MAX_NAMES = 5


@dataclass(frozen=True)
class Finding:
    """One thing the checks noticed.

    Attributes:
        code: stable identifier (see the module docstring).
        severity: ``"warning"`` (logged as a warning) or ``"info"``.
        message: one line for people.
        nodes: node (or initializer, or input) names concerned, sorted.
    """

    code: str
    severity: Severity
    message: str
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message, "nodes": list(self.nodes)}


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` found.

    Attributes:
        findings: in a fixed order (by code as listed in the module docstring, then by name).
        keep_fp32: weighted nodes that must stay fp32 (non-finite weights).
    """

    findings: tuple[Finding, ...] = ()
    keep_fp32: frozenset[str] = field(default_factory=frozenset)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    def codes(self) -> tuple[str, ...]:
        return tuple(f.code for f in self.findings)

    def log(self, log: logging.Logger = logger) -> None:
        """Warnings as WARNING records, the rest as INFO."""
        for f in self.findings:
            (log.warning if f.severity == "warning" else log.info)("%s", f.message)

    def to_list(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.findings]


def _names(names: Iterable[str]) -> str:
    names = sorted(set(names))
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def _nonfinite_weights(model: ir.Model, nodes: list[WeightNode]) -> tuple[list[Finding], set[str], set[str]]:
    bad_nodes: set[str] = set()
    zero_nodes: set[str] = set()
    counts: dict[str, int] = {}
    zero_weights: set[str] = set()
    for w in sorted({n.weight for n in nodes}):
        tensor = model.graph.initializers[w].const_value
        arr = np.asarray(tensor.numpy())
        finite = np.isfinite(arr)
        if not finite.all():
            counts[w] = int(arr.size - np.count_nonzero(finite))
        elif not np.any(arr):
            zero_weights.add(w)
        del arr, finite
        release_data(tensor)  # a big external model is scanned one mapped tensor at a time
    for n in nodes:
        if n.weight in counts:
            bad_nodes.add(n.name)
        if n.weight in zero_weights:
            zero_nodes.add(n.name)
    out = []
    if bad_nodes:
        total = sum(counts.values())
        out.append(
            Finding(
                "nonfinite-weight",
                "warning",
                f"{len(bad_nodes)} node(s) with NaN/Inf weights ({total} value(s)) kept in fp32: {_names(bad_nodes)}",
                tuple(sorted(bad_nodes)),
            )
        )
    if zero_nodes:
        out.append(
            Finding(
                "zero-weight",
                "info",
                f"all-zero weights (quantize to zeros): {_names(zero_nodes)}",
                tuple(sorted(zero_nodes)),
            )
        )
    return out, bad_nodes, zero_nodes


def _control_flow(model: ir.Model) -> list[Finding]:
    names = [
        n.name or n.op_type
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if n.op_type in CONTROL_FLOW_OPS and n.domain in ("", "ai.onnx")
    ]
    if not names:
        return []
    return [
        Finding(
            "control-flow",
            "warning",
            f"{len(names)} control-flow node(s) (If/Loop/Scan): their subgraphs stay fp32: {_names(names)}",
            tuple(sorted(names)),
        )
    ]


def _custom_domains(model: ir.Model) -> list[Finding]:
    functions = {(f.domain, f.name) for f in model.functions.values()}
    by_op: dict[str, list[str]] = {}
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.domain in STANDARD_DOMAINS or n.domain in OWN_DOMAINS or (n.domain, n.op_type) in functions:
            continue
        by_op.setdefault(f"{n.domain}::{n.op_type}", []).append(n.name or n.op_type)
    if not by_op:
        return []
    ops = sorted(by_op)
    nodes = sorted(x for v in by_op.values() for x in v)
    return [
        Finding(
            "custom-domain",
            "warning",
            f"{len(nodes)} node(s) of custom domains kept as they are ({_names(ops)}); "
            "ONNX Runtime must know them to evaluate or analyse the model",
            tuple(nodes),
        )
    ]


def _shared(nodes: list[WeightNode]) -> list[Finding]:
    by_weight: dict[str, list[str]] = {}
    for n in nodes:
        by_weight.setdefault(n.weight, []).append(n.name)
    shared = {w: v for w, v in by_weight.items() if len(v) > 1}
    if not shared:
        return []
    names = sorted(x for v in shared.values() for x in v)
    return [
        Finding(
            "shared-weight",
            "info",
            f"{len(shared)} weight(s) shared by several nodes (one format per weight): {_names(shared)}",
            tuple(names),
        )
    ]


def _zero_sized(model: ir.Model) -> list[Finding]:
    names = [
        v.name or ""
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.size == 0
    ]
    if not names:
        return []
    return [
        Finding(
            "zero-sized", "info", f"{len(names)} empty initializer(s) left alone: {_names(names)}", tuple(sorted(names))
        )
    ]


def _inputs(model: ir.Model) -> list[Finding]:
    dynamic, untyped = [], []
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        if v.shape is None:
            untyped.append(v.name or "")
        elif any(not isinstance(d, int) for d in list(v.shape)[1:]):
            dynamic.append(v.name or "")
    out = []
    if dynamic:
        out.append(
            Finding(
                "dynamic-shape",
                "info",
                f"input(s) with symbolic dims beyond the batch axis: {_names(dynamic)}",
                tuple(sorted(dynamic)),
            )
        )
    if untyped:
        out.append(
            Finding(
                "untyped-input",
                "warning",
                f"input(s) without a declared shape (give --calib data): {_names(untyped)}",
                tuple(sorted(untyped)),
            )
        )
    return out


def check_model(model: ir.Model) -> ModelCheck:
    """Sanity-check a loaded model (normalise it first so weights are found as the plan names them)."""
    nodes = find_weight_nodes(model)
    weights, keep, _ = _nonfinite_weights(model, nodes)
    findings = [
        *weights,
        *_control_flow(model),
        *_custom_domains(model),
        *_shared(nodes),
        *_zero_sized(model),
        *_inputs(model),
    ]
    return ModelCheck(findings=tuple(findings), keep_fp32=frozenset(keep))

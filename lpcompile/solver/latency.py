"""Latency in the decision: ``--objective size|latency|both``.

The latency model is the target's declared per-(op, format) cost relative to the fp32 op
(:func:`lpcompile.passes.targets.relative_latency`), weighted by each node's share of the weights
(a batch-1 GEMV/GEMM reads every weight once, so its time is roughly proportional to its size).
The predicted latency of a plan is ``Σ params·cost / Σ params`` (1.0 = fp32 speed).

* ``auto`` (default): ``fast`` on ONNX Runtime targets (``qdq``, ``ort``), ``size`` on ``tvm``.
* ``size``: the least predicted loss within the budget; latency is not looked at.
* ``both``: among (near-)equal-loss choices, the faster one. Each choice's loss gets a tie-break
  ``ε·(cost − 1)·params / Σ params`` with ``ε = tolerance · L*``, ``L*`` the predicted loss of the
  ``size`` plan at the same budget. The result's predicted loss is at most ``L*·(1 + tolerance·Δ)``
  (``Δ`` the largest cost spread of a node, ≤ 3): no budget is refused and quality moves within the
  tolerance.
* ``fast``: the least predicted loss within the budget among the choices the target runs at least as
  fast as fp32 per node (:func:`lpcompile.passes.targets.runs_fast`); a node with no such choice keeps
  all of its choices, and an infeasible budget falls back to every choice: no budget is refused. On
  ONNX Runtime this drops the formats whose activation rounding is emulated per run (bf16, fp16, FP8:
  ORT CPU has no arithmetic in them), so the file runs at fp32 speed or better.
* ``latency``: speed first. Only choices the target runs at least as fast as fp32 per node
  (:func:`lpcompile.passes.targets.runs_fast`); among them the least predicted latency within the
  budget, the predicted loss breaking ties (the latency term is weighted ``LATENCY_FIRST`` times the
  largest possible loss, so any latency gain outweighs any loss difference). When the restriction
  makes the budget infeasible the unrestricted items are used: refuse none. This is the objective
  that picks ``w8a8`` on ``ort`` (an int8 GEMM, 0.3× fp32) over the more accurate weight-only ``int8``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from lpcompile.analysis.table import NodeSensitivity, SensitivityTable
from lpcompile.budget import Budget
from lpcompile.errors import BudgetError, UsageError
from lpcompile.formats import get_format
from lpcompile.passes.targets import relative_latency, runs_fast
from lpcompile.solver.ilp import solve
from lpcompile.solver.problem import Choice, Item, Solution

logger = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("auto", "size", "fast", "latency", "both")
DEFAULT_TOLERANCE = 0.02
"""Relative predicted-loss slack ``both`` may spend on faster choices (see the module docstring)."""
LATENCY_FIRST = 1e3
"""``latency``: weight of the latency term over the largest possible total loss."""


def resolve_objective(objective: str, target: str) -> str:
    """``auto`` → ``fast`` on ONNX Runtime targets (ORT CPU has no bf16/FP8 arithmetic: a format that rounds
    activations only emulates it, per run, slower than fp32), ``size`` on ``tvm``; others unchanged."""
    name = check_objective(objective)
    if name != "auto":
        return name
    return "size" if str(target) == "tvm" else "fast"


def check_objective(objective: str) -> str:
    """``objective`` as a plain string, or ``UsageError``."""
    name = str(objective)
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    return name


def _geometry(node: NodeSensitivity, fmt: str) -> dict[str, int]:
    f = get_format(fmt)
    rank = len(node.shape)
    axis = 1 if node.op_type in ("Conv", "ConvTranspose") else 0
    bs = int(f.block_size or 0)
    if bs and rank > axis:
        bs = min(bs, int(node.shape[axis]))
    return {"block_size": bs, "rank": rank, "axis": axis, "elements": int(node.params)}


def node_cost(node: NodeSensitivity, fmt: str, target: str, int8_residuals: bool = False) -> float:
    """Declared latency of ``node`` in ``fmt`` over its fp32 latency on ``target`` (``int8_residuals``: written
    with QLinearAdd residuals, :mod:`lpcompile.passes.qlinear_add`)."""
    return relative_latency(target, node.op_type, fmt, int8_residuals=int8_residuals, **_geometry(node, fmt))


def node_fast(node: NodeSensitivity, fmt: str, target: str) -> bool:
    """Whether ``target`` runs ``node`` in ``fmt`` at least as fast as fp32."""
    g = _geometry(node, fmt)
    return runs_fast(target, node.op_type, fmt, block_size=g["block_size"], rank=g["rank"], axis=g["axis"])


@dataclass(frozen=True)
class LatencyEstimate:
    """Predicted batch-1 latency of a plan relative to fp32 (weights-weighted declared costs)."""

    ratio: float
    slow_nodes: int


def predict_latency(
    table: SensitivityTable, assignments: Mapping[str, str], target: str, int8_residuals: bool = False
) -> LatencyEstimate:
    """``Σ params·cost / Σ params`` over the assigned nodes of ``table`` (1.0 = fp32)."""
    num = den = 0.0
    slow = 0
    for n in table.nodes:
        fmt = assignments.get(n.name)
        if fmt is None:
            continue
        c = node_cost(n, fmt, target, int8_residuals)
        num += n.params * c
        den += n.params
        slow += c > 1.0
    return LatencyEstimate(ratio=num / den if den else 1.0, slow_nodes=slow)


def _tie_broken(
    items: Sequence[Item],
    nodes: Mapping[str, NodeSensitivity],
    target: str,
    eps: float,
    total: int,
    int8_residuals: bool = False,
) -> list[Item]:
    out = []
    for it in items:
        n = nodes.get(it.name)
        if n is None or total <= 0:
            out.append(it)
            continue
        choices = tuple(
            replace(c, loss=c.loss + eps * (node_cost(n, c.format, target, int8_residuals) - 1.0) * it.params / total)
            for c in it.choices
        )
        out.append(replace(it, choices=choices))
    return out


def _fast_only(items: Sequence[Item], nodes: Mapping[str, NodeSensitivity], target: str) -> list[Item]:
    out = []
    for it in items:
        n = nodes.get(it.name)
        keep: tuple[Choice, ...] = it.choices
        if n is not None:
            fast = tuple(c for c in it.choices if node_fast(n, c.format, target))
            keep = fast or it.choices
        out.append(replace(it, choices=keep))
    return out


def solve_with_objective(
    items: Sequence[Item],
    budget: Budget,
    table: SensitivityTable,
    target: str,
    objective: str,
    tolerance: float = DEFAULT_TOLERANCE,
    int8_residuals: bool = False,
) -> Solution:
    """Solve ``items`` at ``budget`` for ``objective`` (module docstring); the loss reported is the true one.

    ``int8_residuals``: the plan will be written with QLinearAdd residuals (w8a8 Convs cost less on ``ort``).
    """
    objective = resolve_objective(objective, target)
    nodes = {n.name: n for n in table.nodes}
    if objective == "fast":  # the size plan is solved only when the fast choices cannot meet the budget
        try:
            return solve(_fast_only(items, nodes, target), budget)
        except BudgetError:
            logger.warning("objective fast: the budget needs formats that run slower than fp32; allowing them")
            objective = "size"
    base = solve(items, budget)
    if objective == "size":
        return base
    total = sum(it.params for it in items)
    eps = tolerance * max(abs(base.predicted_loss), 1e-30)
    chosen = list(items)
    if objective == "latency":
        chosen = _fast_only(items, nodes, target)
        worst = sum(max(abs(c.loss) for c in it.choices) for it in items if it.choices)
        eps = LATENCY_FIRST * max(worst, 1e-30)
    try:
        sol = solve(_tie_broken(chosen, nodes, target, eps, total, int8_residuals), budget)
    except BudgetError:
        logger.warning("objective latency: the budget needs formats that run slower than fp32; allowing them")
        sol = solve(_tie_broken(items, nodes, target, eps, total, int8_residuals), budget)
    true = {it.name: {c.format: c.loss for c in it.choices} for it in items}
    loss = sum(true[name][fmt] for name, fmt in sol.assignments.items() if name in true)
    return replace(sol, predicted_loss=loss)


__all__ = [
    "DEFAULT_TOLERANCE",
    "LATENCY_FIRST",
    "OBJECTIVES",
    "LatencyEstimate",
    "check_objective",
    "node_cost",
    "node_fast",
    "predict_latency",
    "resolve_objective",
    "solve_with_objective",
]

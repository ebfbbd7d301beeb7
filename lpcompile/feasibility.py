"""Feasibility before analysis: the smallest budget a model's weights can meet, from shapes alone.

The smallest feasible budget puts every weighted node (every tied group, once) at its cheapest
allowed format; it depends only on weight shapes, layouts and the candidate formats, so an
infeasible ``--budget`` can fail in well under a second, before any calibration or Hessian work.

Bits are counted as the target stores them (:func:`stored_bits`): on ``"ort"`` an int4 MatMul
weight is written as ``com.microsoft.MatMulNBits``, whose scales must have the activation's type
(fp32 here: the op's ``T1`` binds ``A`` and ``scales``), so it costs ``4 + 32/bs`` bits rather
than the ``4 + 16/bs`` of the fp16-scale format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from lpcompile.analysis.table import SensitivityTable
from lpcompile.budget import Budget, parse_budget
from lpcompile.errors import BudgetError, FormatError
from lpcompile.formats import Format, get_format
from lpcompile.graph import WeightNode, find_weight_nodes
from lpcompile.passes import targets as _targets

logger = logging.getLogger(__name__)

_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def uses_matmul_nbits(fmt: Format, node: WeightNode, target: str) -> bool:
    """Whether ``target`` writes ``node``'s weight in ``fmt`` as MatMulNBits (fp32 scales)."""
    bs = int(fmt.block_size or 0)
    return (
        target == "ort"
        and node.op_type == "MatMul"
        and not node.via
        and node.dtype == "float32"
        and fmt.element == "int4"
        and fmt.scale == "per_block"
        and len(node.shape) == 2
        and node.layout.reduction_axis == 0
        and bs >= 16
        and (bs & (bs - 1)) == 0
        and math.prod(node.shape) >= _targets.NBITS_MIN_ELEMENTS  # smaller ones: decoded once (passes/targets.py)
    )


def stored_bits(fmt: Format | str, node: WeightNode, target: str = "qdq") -> float:
    """Bits per weight of ``node`` in ``fmt`` as ``target`` writes it (codes + scales).

    ``fp32`` means "kept as it is": 16 bits for an fp16/bf16 initializer.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if fmt.is_identity:  # kept as it is: a 16-bit initializer stays 16 bits
        return float(_DTYPE_BITS.get(node.dtype, 32))
    if not uses_matmul_nbits(fmt, node, target):
        return fmt.bits_for(node.shape, node.layout)
    k, n = node.shape
    bs = int(fmt.block_size or 0)
    nblk = -(-k // bs)
    # MatMulNBits pads a partial last block with zero codes: the packed B holds nblk·bs codes.
    return (fmt.storage_bits * nblk * bs * n + 32 * nblk * n) / (k * n)


@dataclass(frozen=True)
class Feasibility:
    """The cheapest assignment of a model's weights.

    Attributes:
        min_total_bits: Σ over weights (tied groups once) of cheapest bits × params.
        total_params: weights the plan covers (tied groups once).
        cheapest: node name → its cheapest allowed format.
        target: the target the bits were counted for.
    """

    min_total_bits: float
    total_params: int
    cheapest: Mapping[str, str] = field(default_factory=dict)
    target: str = "qdq"

    @property
    def min_bits_per_weight(self) -> float:
        return self.min_total_bits / self.total_params if self.total_params else 0.0

    def feasible(self, budget: Budget | str) -> bool:
        budget = parse_budget(budget) if isinstance(budget, str) else budget
        if not self.total_params:
            return True
        return self.min_total_bits <= budget.max_total_bits(self.total_params) * (1.0 + 1e-9)


def smallest_feasible(
    nodes: Sequence[WeightNode],
    formats: Iterable[str],
    target: str = "qdq",
    allowed: Mapping[str, Sequence[str]] | None = None,
) -> Feasibility:
    """The smallest feasible budget of ``nodes`` with candidate ``formats`` (shapes only).

    Args:
        nodes: weighted nodes (:func:`lpcompile.graph.find_weight_nodes`).
        formats: candidate format names (aliases allowed).
        target: ``"qdq"``, ``"ort"`` or ``"tvm"`` (see :func:`stored_bits`).
        allowed: optional per-node format restrictions (pins/keeps); a node absent keeps ``formats``.

    Raises:
        FormatError: an unknown format, or a tied group with no common allowed format.
    """
    fmts = [get_format(f) for f in formats]
    if not fmts:
        raise FormatError("no candidate formats")
    by_weight: dict[str, list[WeightNode]] = {}
    for n in nodes:
        by_weight.setdefault(n.weight, []).append(n)
    parts: list[float] = []
    total_params = 0
    cheapest: dict[str, str] = {}
    for weight, members in by_weight.items():
        names = None
        for m in members:
            own = {get_format(f).name for f in (allowed or {}).get(m.name, [f.name for f in fmts])}
            names = own if names is None else names & own
        cands = [f for f in fmts if f.name in (names or set())]
        if not cands:
            raise FormatError(f"weight {weight!r}: its nodes have no allowed format in common")
        # one decision per weight: the format's cost is the most any member's storage costs
        best = min(cands, key=lambda f: max(stored_bits(f, m, target) for m in members))
        bits = max(stored_bits(best, m, target) for m in members)
        parts.append(bits * members[0].params)
        total_params += members[0].params
        for m in members:
            cheapest[m.name] = best.name
    return Feasibility(math.fsum(parts), total_params, cheapest, target)


def check_budget(
    model: ir.Model | Sequence[WeightNode],
    budget: Budget | str,
    formats: Iterable[str],
    target: str = "qdq",
) -> Feasibility:
    """Fail at once when ``budget`` is below the smallest feasible budget of ``model``.

    Returns the :class:`Feasibility` when the budget can be met.

    Raises:
        BudgetError: the budget is infeasible; the message names the smallest feasible budget in
            the unit the budget was given in.
    """
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    nodes = find_weight_nodes(model) if isinstance(model, ir.Model) else list(model)
    feas = smallest_feasible(nodes, formats, target)
    if not feas.feasible(budget):
        smallest = budget.describe_total(feas.min_total_bits, feas.total_params)
        raise BudgetError(
            f"budget {budget} is infeasible: the smallest feasible budget is {smallest} "
            f"(every weight at its cheapest format, counted as target {target!r} stores it; "
            "known from weight shapes alone, before analysis)"
        )
    logger.info(
        "smallest feasible budget: %.4f bits/weight over %d weights (target %s)",
        feas.min_bits_per_weight,
        feas.total_params,
        target,
    )
    return feas


def retarget_table(table: SensitivityTable, nodes: Sequence[WeightNode], target: str) -> SensitivityTable:
    """``table`` with every candidate's bits as ``target`` stores them (:func:`stored_bits`).

    The analysis counts each format's own storage (``Format.bits_for``: fp16 block scales, fp32
    for a kept weight); on ``"ort"`` large int4 MatMul weights become MatMulNBits with fp32 scales,
    and a kept fp16/bf16 weight costs 16 bits. Nodes of ``table`` missing from ``nodes`` are kept.
    """
    by_name = {n.name: n for n in nodes}
    out = []
    changed = 0
    for ns in table.nodes:
        node = by_name.get(ns.name)
        if node is None:
            out.append(ns)
            continue
        cands = {}
        for f, c in ns.candidates.items():
            bits = stored_bits(f, node, target)
            changed += bits != c.bits
            cands[f] = replace(c, bits=bits)
        out.append(replace(ns, candidates=cands))
    if changed:
        logger.info("%d candidate cost(s) recounted as target %r stores them", changed, target)
    return replace(table, nodes=tuple(out))


def retarget_saved_table(table: SensitivityTable, model: ir.Model, target: str) -> SensitivityTable:
    """A saved table's candidate bits recounted as ``target`` stores them, from the model it was made of.

    The table stores node names and shapes but not the layouts, dtypes and tied-head paths the
    storage depends on, so those are read from ``model`` (weights are not needed).

    Raises:
        UsageError: ``model`` does not hold the table's nodes (another model), or a node's weight
            shape differs.
    """
    from lpcompile.errors import UsageError

    nodes = {n.name: n for n in find_weight_nodes(model)}
    missing = [ns.name for ns in table.nodes if ns.name not in nodes]
    if missing:
        raise UsageError(
            f"the model has no weighted node {missing[0]!r} of the sensitivity table "
            f"({len(missing)} of {len(table.nodes)} missing): give the model the table was analysed from"
        )
    for ns in table.nodes:
        if tuple(ns.shape) != nodes[ns.name].shape:
            raise UsageError(
                f"node {ns.name!r}: weight shape {nodes[ns.name].shape} in the model, {tuple(ns.shape)} in the table"
            )
    return retarget_table(table, list(nodes.values()), target)

"""From a sensitivity table and a budget to a precision plan (pure; no model, no ONNX imports).

Kept apart from :mod:`lpcompile.compiler` so ``lpcompile plan`` starts without loading onnx-ir.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace

from lpcompile.analysis.table import SensitivityTable
from lpcompile.budget import Budget, parse_budget
from lpcompile.errors import FormatError
from lpcompile.formats import get_format
from lpcompile.plan import NodeAssignment, PrecisionPlan
from lpcompile.solver import Choice, Item, KeepRule, Solution, apply_rules, solve

logger = logging.getLogger(__name__)


def items_from_table(table: SensitivityTable, formats: Sequence[str] | None = None) -> list[Item]:
    """Solver items from a table, restricted to ``formats`` (fp32 always allowed)."""
    allowed = None if formats is None else {get_format(f).name for f in formats} | {"fp32"}
    items = []
    for n in table.nodes:
        choices = tuple(
            Choice(format=f, bits=c.bits, loss=float(c.predicted_loss or 0.0))
            for f, c in n.candidates.items()
            if allowed is None or f in allowed
        )
        if not choices:
            raise FormatError(f"node {n.name!r} has none of the requested formats in the sensitivity table")
        items.append(Item(name=n.name, params=n.params, choices=choices, group=n.group))
    return items


def plan_from_solution(
    table: SensitivityTable, solution: Solution, budget_text: str | None, softmax: str = "auto"
) -> PrecisionPlan:
    nodes = []
    by_name = {n.name: n for n in table.nodes}
    for name, fmt in solution.assignments.items():
        n = by_name[name]
        c = n.candidates[fmt]
        nodes.append(
            NodeAssignment(
                name=n.name,
                op_type=n.op_type,
                weight=n.weight,
                params=n.params,
                format=fmt,
                bits=c.bits,
                predicted_loss=c.predicted_loss,
                module_path=n.module_path,
                candidates=dict(n.candidates),
                trace=n.trace,
            )
        )
    order = {n.name: i for i, n in enumerate(table.nodes)}
    nodes.sort(key=lambda a: order[a.name])
    budget_bits = None
    if solution.budget is not None and solution.budget.kind == "bits":
        budget_bits = float(solution.budget.value)
    elif solution.budget is not None and solution.total_params:
        budget_bits = solution.budget.max_total_bits(solution.total_params) / solution.total_params
    return PrecisionPlan(
        nodes=tuple(nodes),
        budget=budget_text,
        budget_bits=budget_bits,
        model=table.model,
        softmax=softmax,
        activation_scales=dict(table.activation_amax),
        metadata={
            "analysis": {
                "method": table.method,
                "loss": table.loss,
                "probes": table.probes,
                "seed": table.seed,
                "calib": table.calib,
                "num_samples": table.num_samples,
                "validation": table.validation,
            },
            "solver": {"status": solution.status, "optimal": solution.optimal},
        },
    )


def rules_with_module_paths(table: SensitivityTable, keep: Sequence[KeepRule]) -> list[KeepRule]:
    """``--keep`` rules that also match PyTorch module paths.

    Solver items carry only node names, so a rule whose regex matches the module path of some node
    (``encoder.layer.0.attention.self.query``) is rewritten into an exact-name rule for every node
    whose name *or* module path it matches (its ``spec``, used in messages, is unchanged). Rules
    that match no module path are kept as they are.
    """

    out = []
    for rule in keep:
        if not any(n.module_path and rule.matches(n.module_path) for n in table.nodes):
            out.append(rule)
            continue
        names = [n.name for n in table.nodes if rule.matches(n.name) or (n.module_path and rule.matches(n.module_path))]
        pattern = "^(?:" + "|".join(re.escape(name) for name in names) + ")$"
        out.append(replace(rule, pattern=pattern, spec=rule.spec))
    return out


def plan_from_table(
    table: SensitivityTable,
    budget: str | Budget,
    *,
    formats: Sequence[str] | None = None,
    keep: Sequence[KeepRule] = (),
    softmax: str = "auto",
) -> tuple[PrecisionPlan, Solution]:
    """Solve the budget problem on a saved table (no re-analysis)."""
    b = parse_budget(budget) if isinstance(budget, str) else budget
    items = apply_rules(items_from_table(table, formats), rules_with_module_paths(table, keep))
    solution = solve(items, b)
    return plan_from_solution(table, solution, str(budget), softmax), solution

"""The dual of the budget problem: the fewest bits whose predicted loss stays within ``max_loss``.

Same units as :mod:`lpcompile.solver.ilp` (untied items and tied groups, each reduced to its
Pareto frontier of formats), binary x[u, f] with Σ_f x[u, f] = 1; constraint Σ loss·x ≤ max_loss;
objective, lexicographic: minimise Σ bits·params, then, among bit-optimal answers, the predicted
loss (a second solve with the bits bounded by the first optimum). Exact ILP (HiGHS through
``scipy.optimize.milp``). The answer's loss is re-checked in correctly rounded sums.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from lpcompile.errors import BudgetError, UsageError
from lpcompile.solver.ilp import CompiledProblem, compile_problem, total_bits
from lpcompile.solver.problem import Item, Solution

logger = logging.getLogger(__name__)

#: relative slack on the loss bound (absorbs rounding of the scaled constraint).
REL_SLACK = 1e-9


def solve_max_loss(items: Sequence[Item], max_loss: float, *, time_limit: float = 30.0) -> Solution:
    """Choose one format per item (per tied group) with the fewest total bits and Σ loss ≤ ``max_loss``.

    Raises:
        UsageError: ``max_loss`` is not a finite number >= 0, or a bad time limit.
        BudgetError: no assignment reaches ``max_loss``; the message names the smallest reachable loss.
    """
    if not isinstance(max_loss, int | float) or not math.isfinite(max_loss) or max_loss < 0:
        raise UsageError(f"max loss must be a finite number >= 0, got {max_loss!r}")
    if not math.isfinite(time_limit) or time_limit <= 0:
        raise UsageError(f"time limit must be a positive number of seconds, got {time_limit!r}")
    problem = compile_problem(items)
    units = problem.units
    if not units:
        return _solution(problem, [], True, "empty: no quantizable items")
    best_loss = [len(u.formats) - 1 for u in units]
    floor = math.fsum(u.losses[-1] for u in units)
    bound = max_loss * (1.0 + REL_SLACK) + 1e-300
    if floor > bound:
        raise BudgetError(
            f"max loss {max_loss:.6g} is out of reach: the smallest predicted loss is {floor:.6g} "
            "(every node at its lowest-loss format)"
        )
    cheapest = [0] * len(units)
    if math.fsum(u.losses[0] for u in units) <= bound:
        return _solution(problem, cheapest, True, "optimal: loss bound not binding, every node at its cheapest format")
    # variables: every frontier format of every unit
    var_unit = [ui for ui, u in enumerate(units) for _ in u.formats]
    var_choice = [j for u in units for j in range(len(u.formats))]
    n = len(var_unit)
    cost = np.array([units[ui].costs[j] - units[ui].costs[0] for ui, j in zip(var_unit, var_choice, strict=True)])
    loss = np.array([units[ui].losses[j] for ui, j in zip(var_unit, var_choice, strict=True)], dtype=np.float64)
    scale_c = max(float(cost.max()), 1.0)
    lmin = float(loss.min())
    shifted = loss - lmin  # keep the constraint well conditioned: Σ (loss − lmin)·x ≤ max_loss − U·lmin
    rhs = bound - len(units) * lmin
    lscale = max(float(shifted.max()), abs(rhs), 1e-300)
    rows = np.asarray(var_unit)
    one_each = csr_array((np.ones(n), (rows, np.arange(n))), shape=(len(units), n))
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(csr_array(shifted[None, :] / lscale), -np.inf, rhs / lscale),
    ]
    res = milp(
        cost / scale_c,
        constraints=constraints,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "disp": False, "mip_rel_gap": 0.0},
    )
    if res.x is None:
        logger.warning("max-loss ILP found no answer (%s); using every node's lowest-loss format", res.message)
        return _solution(problem, best_loss, False, f"fallback: {res.message}")
    chosen = _decode(res.x, var_unit, var_choice, len(units))
    optimal = bool(res.status == 0)
    # second level: least loss among answers with these bits
    bits_opt = float(cost @ _onehot(chosen, var_unit, var_choice))
    res2 = milp(
        shifted / lscale,
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(csr_array(cost[None, :] / scale_c), -np.inf, bits_opt / scale_c * (1 + 1e-12) + 1e-12),
        ],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "disp": False, "mip_rel_gap": 0.0},
    )
    if res2.x is not None:
        alt = _decode(res2.x, var_unit, var_choice, len(units))
        if _loss(units, alt) < _loss(units, chosen) and total_bits(units, alt) <= total_bits(units, chosen):
            chosen = alt
    if _loss(units, chosen) > bound:  # numerical safety: never return an answer over the bound
        logger.warning("max-loss ILP answer exceeds the bound in exact sums; using lowest-loss formats")
        return _solution(problem, best_loss, False, "fallback: bound violated in exact sums")
    return _solution(problem, chosen, optimal, "optimal" if optimal else f"time limit: {res.message}")


def _onehot(chosen: Sequence[int], var_unit: Sequence[int], var_choice: Sequence[int]) -> np.ndarray:
    return np.array([1.0 if chosen[u] == j else 0.0 for u, j in zip(var_unit, var_choice, strict=True)])


def _decode(x: np.ndarray, var_unit: Sequence[int], var_choice: Sequence[int], n_units: int) -> list[int]:
    chosen = [0] * n_units
    best = [-1.0] * n_units
    for v, (u, j) in enumerate(zip(var_unit, var_choice, strict=True)):
        if x[v] > best[u]:
            best[u], chosen[u] = float(x[v]), j
    return chosen


def _loss(units: Sequence[object], chosen: Sequence[int]) -> float:
    return math.fsum(u.losses[j] for u, j in zip(units, chosen, strict=True))  # type: ignore[attr-defined]


def _solution(problem: CompiledProblem, chosen: Sequence[int], optimal: bool, status: str) -> Solution:
    assignments: dict[str, str] = {}
    for u, j in zip(problem.units, chosen, strict=True):
        for m in u.members:
            assignments[m.name] = u.formats[j]
    tb = total_bits(problem.units, chosen) if chosen else 0.0
    loss = _loss(problem.units, chosen) if chosen else 0.0
    params = problem.total_params
    return Solution(
        assignments=assignments,
        total_bits=tb,
        achieved_bits=tb / params if params else 0.0,
        predicted_loss=loss,
        optimal=optimal,
        status=status,
        budget=None,
        total_params=params,
    )


__all__ = ["solve_max_loss"]

"""Budget sweeps: solve one set of items for many budgets and keep the Pareto front.

``parse_sweep`` accepts a bits range ``START:END:STEP`` (end inclusive, e.g. ``4:8:0.5`` ->
4, 4.5, ..., 8 bits; each bound may carry the ``bits`` unit) or a comma-separated list of
budgets in any ``parse_budget`` form (``4,4.5,12MB``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from lpcompile.budget import Budget, parse_budget
from lpcompile.errors import BudgetError
from lpcompile.solver.ilp import compile_problem, solve_compiled
from lpcompile.solver.problem import Item, Solution

logger = logging.getLogger(__name__)

#: most budgets a range may expand to.
MAX_SWEEP_POINTS = 1000


def parse_sweep(text: str) -> list[Budget]:
    """Parse ``START:END:STEP`` (bits, end inclusive) or a comma-separated list of budgets.

    Raises:
        BudgetError: malformed text, non-positive or non-finite numbers, ``END < START``, a
            non-positive step, or more than ``MAX_SWEEP_POINTS`` budgets.
    """
    if not isinstance(text, str) or not text.strip():
        raise BudgetError("empty sweep: expected START:END:STEP (e.g. 4:8:0.5) or a list like 4,4.5,12MB")
    text = text.strip()
    if ":" not in text:
        budgets = [parse_budget(part) for part in text.split(",")]
        if len(budgets) > MAX_SWEEP_POINTS:
            raise BudgetError(f"sweep {text!r} has {len(budgets)} budgets, more than {MAX_SWEEP_POINTS}")
        return budgets
    parts = text.split(":")
    if len(parts) != 3:
        raise BudgetError(f"malformed sweep {text!r}: expected START:END:STEP in bits (e.g. 4:8:0.5)")
    bounds = []
    for part in parts:
        try:
            b = parse_budget(part)
        except BudgetError as exc:
            raise BudgetError(f"malformed sweep {text!r}: {exc}") from None
        if b.kind != "bits":
            raise BudgetError(f"sweep range {text!r} must be in bits; list byte budgets with commas instead")
        bounds.append(b.value)
    start, end, step = bounds
    if end < start:
        raise BudgetError(f"sweep {text!r}: END {end:g} is smaller than START {start:g}")
    count = math.floor((end - start) / step * (1 + 1e-12) + 1e-9) + 1
    if count > MAX_SWEEP_POINTS:
        raise BudgetError(f"sweep {text!r} expands to {count} budgets, more than {MAX_SWEEP_POINTS}")
    # round away float noise such as 4.499999999 from repeated steps
    return [Budget("bits", round(start + k * step, 12)) for k in range(count)]


def sweep(items: Sequence[Item], budgets: Sequence[Budget], *, time_limit: float = 30.0) -> list[Solution]:
    """Solve ``items`` for each budget, building the problem once.

    Infeasible budgets are skipped with a warning (each ``Solution`` records its ``budget``);
    the results keep the order of ``budgets``.

    Raises:
        BudgetError: every budget is infeasible (the message names the smallest feasible one).
    """
    problem = compile_problem(items)
    out: list[Solution] = []
    last_error: BudgetError | None = None
    for budget in budgets:
        try:
            out.append(solve_compiled(problem, budget, time_limit=time_limit))
        except BudgetError as exc:
            logger.warning("skipping budget %s: %s", budget, exc)
            last_error = exc
    if not out and last_error is not None:
        raise last_error
    return out


def pareto_front(solutions: Sequence[Solution]) -> list[Solution]:
    """Solutions not dominated in (total bits, predicted loss), sorted by bits ascending.

    A solution is dropped when another has no more bits and strictly less loss, or the same
    bits and the same loss and comes earlier (duplicates from neighbouring budgets).
    """
    ordered = sorted(enumerate(solutions), key=lambda p: (p[1].total_bits, p[1].predicted_loss, p[0]))
    front: list[Solution] = []
    for _, sol in ordered:
        if not front or sol.predicted_loss < front[-1].predicted_loss:
            front.append(sol)
    return front

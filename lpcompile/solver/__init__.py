"""Budget solver: choose one format per quantizable node to minimise predicted loss within a size budget."""

from __future__ import annotations

from lpcompile.solver.ilp import REL_SLACK, CompiledProblem, Unit, compile_problem, solve, solve_compiled
from lpcompile.solver.pareto import MAX_SWEEP_POINTS, pareto_front, parse_sweep, sweep
from lpcompile.solver.problem import (
    DEFAULT_KEEP_FORMAT,
    Choice,
    Item,
    KeepRule,
    Solution,
    apply_rules,
    parse_keep,
)

__all__ = [
    "DEFAULT_KEEP_FORMAT",
    "MAX_SWEEP_POINTS",
    "REL_SLACK",
    "Choice",
    "CompiledProblem",
    "Item",
    "KeepRule",
    "Solution",
    "Unit",
    "apply_rules",
    "compile_problem",
    "pareto_front",
    "parse_keep",
    "parse_sweep",
    "solve",
    "solve_compiled",
    "sweep",
]

"""The budget solver: a multiple-choice knapsack solved as an ILP with ``scipy.optimize.milp`` (HiGHS).

Variables are binary x[u, f], one per (unit, format), where a unit is an untied item or a whole
tied group (one variable per (group, format), the group's cost and loss being the sums over its
members). Constraints: Σ_f x[u, f] = 1 for every unit and Σ bits·params·x ≤ the budget's total
bits. Objective, lexicographic: minimise the predicted loss, then, among loss-optimal answers,
the total bits (the smaller model). The second level is a second solve with the loss bounded by
the first optimum; an answer is only replaced by a strictly better one, checked in exact sums.

Before the ILP each unit's formats are reduced to its Pareto frontier (a format with no fewer bits
and no less loss than another is never needed) and formats that cannot fit in the budget are
dropped. Then reduced-cost fixing: the LP relaxation (greedy over each unit's convex hull) gives a
Lagrangian lower bound and a greedy integer answer gives an upper bound; every format whose reduced
cost exceeds the gap is fixed to 0, which leaves HiGHS a small core (2000 items x 6 formats:
~11000 variables, ~150 left). Costs and losses are shifted and scaled so HiGHS sees well-conditioned numbers
(losses scaled to [0, 1e6] so that its absolute tolerances resolve ~1e-12 of the loss range). When
the lowest-loss format of every unit fits, no ILP is solved at all. If HiGHS stops at the time limit
the best answer found (or the greedy one) is returned with ``optimal=False``.

Exactness: the budget is compared with a relative slack of ``REL_SLACK`` (1e-12) so that a
budget printed as "the smallest feasible budget" is feasible when passed back; the final
assignment is checked against the budget in correctly rounded sums (``math.fsum``).
Determinism: units and formats are sorted by name before the problem is built, so the same
items (in any order) give the same answer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from lpcompile.budget import Budget
from lpcompile.errors import BudgetError, PlanError, UsageError
from lpcompile.solver.problem import Item, Solution

logger = logging.getLogger(__name__)

#: relative slack on the budget, absorbs rounding of ``value × Σparams``.
REL_SLACK = 1e-12
#: the largest loss coefficient HiGHS sees (losses are rescaled to [0, OBJ_SCALE]).
OBJ_SCALE = 1e6

# HiGHS options scipy does not list are passed through verbatim (with a RuntimeWarning we
# silence): an exact optimum needs mip_abs_gap = 0, HiGHS' default is 1e-6.
_EXTRA_HIGHS_OPTIONS = {"mip_abs_gap": 0.0}


@dataclass(frozen=True)
class Unit:
    """One decision of the knapsack: an untied item or a tied group.

    ``formats``/``costs``/``losses`` hold the unit's Pareto frontier sorted by cost ascending
    (so losses strictly descending); ``costs`` are Σ bits·params over the members.
    """

    key: str
    is_group: bool
    members: tuple[Item, ...]
    formats: tuple[str, ...]
    costs: tuple[float, ...]
    losses: tuple[float, ...]
    parts: tuple[tuple[float, ...], ...]
    """per format, the members' bits·params (for correctly rounded totals)"""


@dataclass(frozen=True)
class CompiledProblem:
    """Items reduced to units, built once and solvable for many budgets (see ``pareto.sweep``)."""

    items: tuple[Item, ...]
    units: tuple[Unit, ...]
    total_params: int
    min_total_bits: float
    """Σ bits·params with every unit at its cheapest format."""
    free_total_bits: float
    """Σ bits·params with every unit at its lowest-loss format: any budget above needs no ILP."""


def compile_problem(items: Sequence[Item]) -> CompiledProblem:
    """Group, validate and reduce ``items``; see the module docstring.

    Raises:
        PlanError: duplicate item names, or a tied group with no format common to its members.
    """
    items = tuple(items)
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise PlanError(f"duplicate item names: {', '.join(dups[:5])}")
    buckets: dict[tuple[str, bool], list[Item]] = {}
    for it in items:
        key = (it.group, True) if it.group is not None else (it.name, False)
        buckets.setdefault(key, []).append(it)
    units = []
    for (key, is_group), members in sorted(buckets.items()):
        members.sort(key=lambda it: it.name)
        common = set(members[0].formats).intersection(*(m.formats for m in members[1:]))
        if not common:
            shown = ", ".join(f"{m.name} [{', '.join(m.formats)}]" for m in members[:6])
            raise PlanError(f"tied group {key!r} has no format common to all its members: {shown}")
        entries = []
        for fmt in sorted(common):
            chosen = [m.choice(fmt) for m in members]
            parts = tuple(c.bits * m.params for c, m in zip(chosen, members, strict=True))
            entries.append((math.fsum(parts), math.fsum(c.loss for c in chosen), fmt, parts))
        entries.sort()
        frontier: list[tuple[float, float, str, tuple[float, ...]]] = []
        for entry in entries:
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
        units.append(
            Unit(
                key=key,
                is_group=is_group,
                members=tuple(members),
                formats=tuple(e[2] for e in frontier),
                costs=tuple(e[0] for e in frontier),
                losses=tuple(e[1] for e in frontier),
                parts=tuple(e[3] for e in frontier),
            )
        )
    return CompiledProblem(
        items=items,
        units=tuple(units),
        total_params=sum(it.params for it in items),
        min_total_bits=total_bits(units, [0] * len(units)),
        free_total_bits=total_bits(units, [len(u.formats) - 1 for u in units]),
    )


def total_bits(units: Sequence[Unit], chosen: Sequence[int]) -> float:
    """Correctly rounded Σ bits·params when unit ``k`` takes its frontier format ``chosen[k]``."""
    return math.fsum(p for u, j in zip(units, chosen, strict=True) for p in u.parts[j])


def solve(items: Sequence[Item], budget: Budget, *, time_limit: float = 30.0) -> Solution:
    """Choose one format per item (per tied group) minimising predicted loss within ``budget``.

    An empty ``items`` gives a trivial solution (no assignments, status ``"empty"``).

    Raises:
        BudgetError: the budget is infeasible; the message names the smallest feasible budget
            in the unit the budget was given in.
        PlanError: inconsistent items (see ``compile_problem``).
    """
    return solve_compiled(compile_problem(items), budget, time_limit=time_limit)


def solve_compiled(problem: CompiledProblem, budget: Budget, *, time_limit: float = 30.0) -> Solution:
    """``solve`` for an already compiled problem (reuse it across budgets)."""
    if not math.isfinite(time_limit) or time_limit <= 0:
        raise UsageError(f"time limit must be a positive number of seconds, got {time_limit!r}")
    units = problem.units
    if not units:
        logger.warning("no quantizable items: nothing to solve")
        return _solution(problem, budget, [], True, "empty: no quantizable items")
    cap = budget.max_total_bits(problem.total_params) * (1.0 + REL_SLACK)
    if problem.min_total_bits > cap:
        smallest = budget.describe_total(problem.min_total_bits, problem.total_params)
        raise BudgetError(
            f"budget {budget} is infeasible: the smallest feasible budget is {smallest} "
            "(all nodes at their cheapest allowed format)"
        )
    free = [len(u.formats) - 1 for u in units]
    if problem.free_total_bits <= cap:
        return _solution(
            problem, budget, free, True, "optimal: budget not binding, every node at its lowest-loss format"
        )
    return _solve_ilp(problem, budget, cap, time_limit)


def _solve_ilp(problem: CompiledProblem, budget: Budget, cap: float, time_limit: float) -> Solution:
    units = problem.units
    slack = cap - problem.min_total_bits  # > 0 here: free_total_bits > cap >= min_total_bits
    extras = [[cost - u.costs[0] for cost in u.costs] for u in units]
    # formats that fit in the slack (a prefix of each frontier)
    kept = [sum(1 for e in ex if e <= slack) for ex in extras]
    allowed, greedy = _lagrangian_reduction(units, extras, kept, slack, cap)
    chosen_fixed = [a[0] for a in allowed]
    var_unit = [ui for ui, a in enumerate(allowed) if len(a) > 1 for _ in a]
    var_choice = [j for a in allowed if len(a) > 1 for j in a]
    n_vars = len(var_unit)
    logger.debug("ILP core: %d of %d formats left after reduced-cost fixing", n_vars, sum(kept))
    if not n_vars:  # every unit is decided
        return _solution(problem, budget, chosen_fixed, True, "optimal")
    vu = np.asarray(var_unit)
    vc = np.asarray(var_choice)
    fixed_extra = math.fsum(extras[ui][a[0]] for ui, a in enumerate(allowed) if len(a) == 1)
    weight = np.array([extras[i][j] for i, j in zip(var_unit, var_choice, strict=True)]) / slack
    rhs0 = (slack - fixed_extra) / slack
    best_loss = {}
    for i, j in zip(var_unit, var_choice, strict=True):
        best_loss[i] = min(best_loss.get(i, math.inf), units[i].losses[j])
    excess = np.array([units[i].losses[j] - best_loss[i] for i, j in zip(var_unit, var_choice, strict=True)])
    loss_scale = float(excess.max())  # > 0: frontier losses strictly decrease
    objective = excess / loss_scale * OBJ_SCALE
    rows = np.unique(vu, return_inverse=True)[1]
    n_rows = int(rows.max()) + 1
    one_hot = LinearConstraint(
        csr_array((np.ones(n_vars), (rows, np.arange(n_vars))), shape=(n_rows, n_vars)), 1.0, 1.0
    )

    def assignment(x: np.ndarray) -> list[int]:
        chosen = list(chosen_fixed)
        best = np.full(len(units), -1.0)
        for k in range(n_vars):  # argmax per unit; ties -> first (cheapest) format
            if x[k] > best[vu[k]]:
                best[vu[k]] = x[k]
                chosen[vu[k]] = int(vc[k])
        return chosen

    def loss_of(chosen: list[int]) -> float:
        return math.fsum(u.losses[j] for u, j in zip(units, chosen, strict=True))

    deadline = time.monotonic() + time_limit

    def run(c: np.ndarray, extra_rows: list[LinearConstraint], retries: int = 4) -> tuple[list[int] | None, bool, str]:
        """Solve, round, and re-solve with a tighter budget row while rounding overshoots."""
        rhs = rhs0
        for _ in range(retries):
            left = deadline - time.monotonic()
            if left <= 0:
                return None, False, "time limit reached"
            budget_row = LinearConstraint(weight.reshape(1, -1), -np.inf, rhs)
            res = _milp(c, [one_hot, budget_row, *extra_rows], left)
            if res.x is None:
                return None, False, str(res.message)
            chosen = assignment(res.x)
            over = total_bits(units, chosen) - cap
            if over <= 0:
                return chosen, res.status == 0, str(res.message)
            logger.debug("rounded ILP answer overshoots the budget by %g bits; tightening", over)
            rhs -= over / slack + 1e-12
        return None, False, "could not meet the budget exactly after rounding"

    t0 = time.monotonic()
    first, optimal, message = run(objective, [])
    if first is None:
        logger.warning("ILP gave no usable answer (%s); using the greedy one", message)
        return _solution(problem, budget, greedy, False, f"not optimal: {message}; greedy answer")
    if loss_of(greedy) < loss_of(first):  # below HiGHS' resolution (losses spanning > 1e12)
        first = greedy
    status = "optimal" if optimal else f"not optimal: {message}"
    if optimal:
        # second level: fewest bits among loss-optimal answers
        loss1 = loss_of(first)
        bound = float(math.fsum(objective[k] for k in range(n_vars) if first[vu[k]] == vc[k]))
        loss_row = LinearConstraint(objective.reshape(1, -1), -np.inf, bound + 1e-9)
        second, second_optimal, message2 = run(weight, [loss_row], retries=1)
        if not second_optimal and "time limit" in message2.lower():
            status = "optimal loss; fewest-bits tie-break stopped by the time limit"
        if second is None:
            logger.debug("fewest-bits tie-break gave no usable answer (%s)", message2)
        else:
            loss2, tol = loss_of(second), 1e-12 * max(abs(loss1), loss_scale)
            better_loss = loss2 < loss1 - tol
            fewer_bits = total_bits(units, second) < total_bits(units, first)
            if better_loss or (abs(loss2 - loss1) <= tol and fewer_bits):
                first = second
    logger.debug("ILP with %d variables solved in %.3f s: %s", n_vars, time.monotonic() - t0, status)
    return _solution(problem, budget, first, optimal, status)


def _lagrangian_reduction(
    units: Sequence[Unit], extras: list[list[float]], kept: list[int], slack: float, cap: float
) -> tuple[list[list[int]], list[int]]:
    """Fix formats that cannot be in any answer at least as good as a greedy one.

    The LP relaxation of the knapsack is solved greedily over each unit's lower convex hull;
    its budget multiplier λ >= 0 gives, for any feasible assignment x,
    loss(x) >= LB + Σ_u r_u(x_u) with r the reduced costs (loss + λ·extra bits, minus the unit's
    minimum) and LB the Lagrangian bound. A format whose reduced cost exceeds UB − LB, UB being
    the loss of the greedy integer answer, is in no answer with loss <= UB, so in no optimum and
    in no tied optimum either. Returns the allowed formats per unit and the greedy answer.
    """
    segments: list[tuple[float, int, int, int, float]] = []
    for ui, u in enumerate(units):
        ex, ls = extras[ui], u.losses
        hull = [0]
        for j in range(1, kept[ui]):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                turn = (ex[b] - ex[a]) * (ls[j] - ls[a]) - (ls[b] - ls[a]) * (ex[j] - ex[a])
                if turn > 0:
                    break
                hull.pop()
            hull.append(j)
        for a, b in itertools.pairwise(hull):
            dcost = ex[b] - ex[a]
            segments.append((-(ls[a] - ls[b]) / dcost, ui, a, b, dcost))
    segments.sort()
    position = [0] * len(units)
    blocked = [False] * len(units)
    remaining, lam = slack, 0.0
    for neg_eff, ui, a, b, dcost in segments:
        if blocked[ui] or position[ui] != a:
            continue
        if dcost <= remaining:
            position[ui], remaining = b, remaining - dcost
        else:
            if lam == 0.0:
                lam = -neg_eff  # the LP's break item: its efficiency is the multiplier
            blocked[ui] = True
    if total_bits(units, position) > cap:  # float drift in `remaining`: no safe upper bound
        return [list(range(n)) for n in kept], [0] * len(units)
    upper = math.fsum(u.losses[j] for u, j in zip(units, position, strict=True))
    reduced, minima, magnitude = [], [], lam * slack
    for ui, u in enumerate(units):
        values = [u.losses[j] + lam * extras[ui][j] for j in range(kept[ui])]
        low = min(values)
        reduced.append([v - low for v in values])
        minima.append(low)
        magnitude += max(abs(x) for x in u.losses[: kept[ui]]) + abs(low)
    lower = math.fsum(minima) - lam * slack
    gap = upper - lower + 1e-9 * magnitude  # generous: keeping a format is always safe
    allowed = [[j for j, r in enumerate(rs) if r <= gap] for rs in reduced]
    for ui, j in enumerate(position):  # the greedy answer always survives (Σ r <= UB - LB)
        if j not in allowed[ui]:
            allowed[ui].append(j)
            allowed[ui].sort()
    return allowed, position


@contextlib.contextmanager
def _quiet_highs() -> Iterator[None]:
    """Capture C-level writes to fd 1 while HiGHS runs and log them at DEBUG.

    HiGHS 1.12 sometimes prints a debug line (``HighsMipSolverData::transformNewIntegerFeasible
    Solution``) straight to stdout: on stdout it would corrupt ``--json`` output read by a pipeline,
    on stderr it reads like an error. It goes to a temporary file and then to the log (``-vv``).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured / replaced stdout: nothing to protect
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    logger.debug("HiGHS: %s", line.strip())


def _milp(c: np.ndarray, constraints: list[LinearConstraint], time_limit: float):
    options = {"time_limit": time_limit, "mip_rel_gap": 0.0, "presolve": True, "disp": False}
    with warnings.catch_warnings(), _quiet_highs():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        return milp(
            c,
            integrality=np.ones_like(c),
            bounds=Bounds(0.0, 1.0),
            constraints=constraints,
            options={**options, **_EXTRA_HIGHS_OPTIONS},
        )


def _solution(problem: CompiledProblem, budget: Budget, chosen: list[int], optimal: bool, status: str) -> Solution:
    assignments: dict[str, str] = {}
    for u, j in zip(problem.units, chosen, strict=True):
        for m in u.members:
            assignments[m.name] = u.formats[j]
    ordered = {it.name: assignments[it.name] for it in problem.items}
    picked = [it.choice(ordered[it.name]) for it in problem.items]
    total_bits = math.fsum(c.bits * it.params for c, it in zip(picked, problem.items, strict=True))
    total_params = problem.total_params
    return Solution(
        assignments=ordered,
        total_bits=total_bits,
        achieved_bits=total_bits / total_params if total_params else 0.0,
        predicted_loss=math.fsum(c.loss for c in picked),
        optimal=optimal,
        status=status,
        budget=budget,
        total_params=total_params,
    )

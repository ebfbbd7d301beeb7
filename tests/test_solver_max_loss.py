"""The dual solver (fewest bits within a predicted-loss bound) against brute force on small instances."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lpcompile.errors import BudgetError, UsageError
from lpcompile.solver.max_loss import solve_max_loss
from lpcompile.solver.problem import Choice, Item

BITS = {"fp32": 32.0, "int8": 8.0, "int4_b32": 4.5, "int4_b128": 4.125}


def _items(seed: int, n: int = 6, tie: bool = False) -> list[Item]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        s = float(rng.uniform(0.1, 10))
        choices = tuple(
            Choice(f, b, 0.0 if f == "fp32" else s * 2.0 ** (-b / 2) * float(rng.uniform(0.5, 2)))
            for f, b in BITS.items()
        )
        group = "g" if tie and i < 2 else None
        items.append(Item(f"n{i}", int(rng.integers(1, 50)), choices, group))
    return items


def _brute(items: list[Item], max_loss: float) -> tuple[float, float]:
    """(fewest total bits, then least loss) over all assignments respecting ties."""
    best = (math.inf, math.inf)
    names = list(BITS)
    for combo in itertools.product(names, repeat=len(items)):
        if any(
            it.group and combo[i] != combo[j]
            for i, it in enumerate(items)
            for j, jt in enumerate(items)
            if jt.group == it.group
        ):
            continue
        loss = math.fsum(it.choice(f).loss for it, f in zip(items, combo, strict=True))
        if loss > max_loss:
            continue
        bits = math.fsum(it.choice(f).bits * it.params for it, f in zip(items, combo, strict=True))
        best = min(best, (bits, loss))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tie", [False, True])
def test_matches_brute_force(seed: int, tie: bool) -> None:
    items = _items(seed, tie=tie)
    lo = math.fsum(min(c.loss for c in it.choices) for it in items)
    hi = math.fsum(max(c.loss for c in it.choices) for it in items)
    for frac in (0.05, 0.2, 0.5, 0.9):
        bound = lo + frac * (hi - lo)
        sol = solve_max_loss(items, bound)
        bits, loss = _brute(items, bound)
        assert sol.predicted_loss <= bound * (1 + 1e-9)
        assert sol.total_bits == pytest.approx(bits, rel=1e-12)
        assert sol.predicted_loss == pytest.approx(loss, rel=1e-9, abs=1e-15)
        if tie:
            assert sol.assignments["n0"] == sol.assignments["n1"]


def test_unreachable_and_not_binding() -> None:
    items = _items(1)
    for it in items:  # no lossless choice: fp32 removed
        object.__setattr__(it, "choices", tuple(c for c in it.choices if c.format != "fp32"))
    floor = math.fsum(min(c.loss for c in it.choices) for it in items)
    with pytest.raises(BudgetError, match="out of reach"):
        solve_max_loss(items, floor * 0.5)
    sol = solve_max_loss(items, 1e9)
    assert set(sol.assignments.values()) == {"int4_b128"}
    with pytest.raises(UsageError):
        solve_max_loss(items, float("nan"))
    assert solve_max_loss([], 1.0).assignments == {}

"""Budget solver (lpcompile.solver): ILP against brute force, rules, sweeps, determinism.

Tolerances: the solver honours the budget up to a relative slack of ``REL_SLACK`` (1e-12, rounding of
``value × Σparams``), and its loss equals the brute-force optimum within 1e-9 relative (HiGHS
tolerances on scaled data). Instances with dyadic bits and losses (k/4) make every sum exact, so
there the lexicographic optimum (loss, then fewest bits) is compared exactly.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpcompile.budget import BYTE_UNITS, Budget, parse_budget
from lpcompile.errors import BudgetError, FormatError, LpError, PlanError, UsageError
from lpcompile.solver import (
    REL_SLACK,
    Choice,
    Item,
    KeepRule,
    Solution,
    apply_rules,
    pareto_front,
    parse_keep,
    parse_sweep,
    solve,
    sweep,
)

FORMAT_BITS = {"fp32": 32.0, "bf16": 16.0, "int8": 8.0625, "fp8": 8.0, "int4": 4.125, "int3": 3.125}
FORMATS = sorted(FORMAT_BITS)
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- brute force


def brute_force(items: list[Item], budget: Budget) -> tuple[float, float, float] | None:
    """(min loss, fewest bits at that loss, min feasible total bits) or None when infeasible."""
    total_params = sum(it.params for it in items)
    cap = budget.max_total_bits(total_params) * (1 + REL_SLACK)
    groups: dict[object, list[Item]] = {}
    for it in items:
        groups.setdefault(it.group if it.group is not None else ("solo", it.name), []).append(it)
    options = []
    for members in groups.values():
        common = set.intersection(*(set(m.formats) for m in members))
        options.append(sorted(common))
    best: tuple[float, float] | None = None
    min_cost = math.inf
    for combo in itertools.product(*options):
        picked = [(m, m.choice(f)) for members, f in zip(groups.values(), combo, strict=True) for m in members]
        cost = math.fsum(c.bits * m.params for m, c in picked)
        loss = math.fsum(c.loss for _, c in picked)
        min_cost = min(min_cost, cost)
        if cost <= cap and (best is None or (loss, cost) < best):
            best = (loss, cost)
    if best is None:
        return None
    return best[0], best[1], min_cost


def min_cost_of(items: list[Item], pick=min) -> float:
    """Σ over units of the cheapest (``pick=max``: dearest) total bits; inf if a group has no common format."""
    groups: dict[object, list[Item]] = {}
    for it in items:
        groups.setdefault(it.group if it.group is not None else ("solo", it.name), []).append(it)
    total = []
    for members in groups.values():
        common = set.intersection(*(set(m.formats) for m in members))
        if not common:
            return math.inf
        total.append(pick(math.fsum(m.choice(f).bits * m.params for m in members) for f in common))
    return math.fsum(total)


# --------------------------------------------------------------------------- strategies


@st.composite
def instances(draw: st.DrawFn, dyadic: bool) -> list[Item]:
    n = draw(st.integers(1, 6))
    shared = {g: draw(st.sampled_from(FORMATS)) for g in ("g0", "g1")}  # usually common to the group
    items = []
    for i in range(n):
        group = draw(st.sampled_from([None, None, "g0", "g1"]))
        fmts = draw(st.lists(st.sampled_from(FORMATS), min_size=1, max_size=4, unique=True))
        if group is not None and shared[group] not in fmts and draw(st.integers(0, 9)) > 0:
            fmts = [*fmts[:3], shared[group]]
        bits = [FORMAT_BITS[f] for f in fmts]
        if not dyadic:  # per-item scale overhead
            bits = [b + draw(st.sampled_from([0.0, 0.0, draw(st.floats(0.0, 0.5))])) for b in bits]
        if dyadic:
            losses = draw(st.lists(st.integers(0, 40).map(lambda k: k / 4), min_size=len(fmts), max_size=len(fmts)))
        else:
            loss_values = st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_subnormal=False))
            losses = draw(st.lists(loss_values, min_size=len(fmts), max_size=len(fmts)))
        if draw(st.integers(0, 4)) > 0:  # usually fewer bits -> more loss, as in real models
            order = sorted(range(len(fmts)), key=lambda k: bits[k])
            ranked = sorted(losses, reverse=True)
            losses = [ranked[order.index(k)] for k in range(len(fmts))]
        choices = [Choice(f, b, loss) for f, b, loss in zip(fmts, bits, losses, strict=True)]
        params = 0 if draw(st.integers(0, 9)) == 0 else draw(st.integers(1, 5000))
        items.append(Item(f"node{i}", params, tuple(choices), group))
    return items


@st.composite
def problems(draw: st.DrawFn, dyadic: bool) -> tuple[list[Item], Budget]:
    items = draw(instances(dyadic))
    kind = draw(st.sampled_from(["between", "between", "between", "bits", "bytes", "min"]))
    total_params = sum(it.params for it in items)
    low, high = min_cost_of(items), min_cost_of(items, max)
    if not (total_params and math.isfinite(low)):
        kind = "bits"
    if kind == "between":  # where the budget binds: between all-cheapest and all-dearest
        t = draw(st.floats(0.0, 1.0))
        budget = Budget.bits(max(low + t * (high - low), 1.0) / total_params)
    elif kind == "bits":
        budget = Budget.bits(draw(st.floats(1.0, 34.0)))
    elif kind == "bytes":
        unit = draw(st.sampled_from(["B", "KB", "KiB"]))
        budget = Budget.bytes(draw(st.floats(0.5, 1.1)) * high / 8 / (1 if unit == "B" else 1000), unit)
    else:  # exactly the smallest feasible budget, in bits per weight
        budget = Budget.bits(low / total_params)
    return items, budget


# --------------------------------------------------------------------------- checks


def check_against_brute_force(items: list[Item], budget: Budget, exact: bool) -> None:
    groups_ok = all(
        set.intersection(*(set(m.formats) for m in items if m.group == g))
        for g in {it.group for it in items if it.group is not None}
    )
    if not groups_ok:
        with pytest.raises(PlanError, match="no format common"):
            solve(items, budget)
        return
    total_params = sum(it.params for it in items)
    expected = brute_force(items, budget)
    if expected is None:
        with pytest.raises(BudgetError) as info:
            solve(items, budget)
        msg = str(info.value)
        m = re.search(r"smallest feasible budget is ([0-9.e+-]+) (\S+)", msg)
        assert m is not None, msg
        assert m[2] == budget.unit
        true_min = min_cost_of(items)  # bits
        per = total_params if budget.kind == "bits" else 8 * BYTE_UNITS[budget.unit]
        true_value = true_min / per
        assert true_value <= float(m[1]) <= true_value * (1 + 1e-5)
        # passing the reported minimum back is feasible
        solve(items, parse_budget(f"{m[1]}{m[2]}"))
        return
    loss, bits, _ = expected
    sol = solve(items, budget)
    assert sol.optimal
    cap = budget.max_total_bits(total_params)
    assert sol.total_bits <= cap * (1 + REL_SLACK)
    # HiGHS resolves ~1e-12 of the loss range (losses are scaled to [0, 1e6] for it)
    loss_range = max((abs(c.loss) for it in items for c in it.choices), default=0.0)
    assert sol.predicted_loss == pytest.approx(loss, rel=1e-9, abs=1e-12 * loss_range)
    if exact:
        assert sol.predicted_loss == loss
        assert sol.total_bits == bits  # fewest bits among loss-optimal answers
    assert set(sol.assignments) == {it.name for it in items}
    for it in items:
        assert sol.assignments[it.name] in it.formats
    for g in {it.group for it in items if it.group is not None}:
        assert len({sol.assignments[it.name] for it in items if it.group == g}) == 1
    picked = [it.choice(sol.assignments[it.name]) for it in items]
    assert sol.total_bits == math.fsum(c.bits * it.params for c, it in zip(picked, items, strict=True))
    assert sol.predicted_loss == math.fsum(c.loss for c in picked)
    assert sol.achieved_bits == (sol.total_bits / total_params if total_params else 0.0)


@SETTINGS
@given(problems(dyadic=False))
def test_matches_brute_force(problem: tuple[list[Item], Budget]) -> None:
    check_against_brute_force(*problem, exact=False)


@SETTINGS
@given(problems(dyadic=True))
def test_matches_brute_force_lexicographic(problem: tuple[list[Item], Budget]) -> None:
    check_against_brute_force(*problem, exact=True)


@settings(max_examples=30, deadline=None)
@given(problems(dyadic=False), st.randoms(use_true_random=False))
def test_deterministic_and_order_independent(problem: tuple[list[Item], Budget], rnd: random.Random) -> None:
    items, budget = problem
    try:
        first = solve(items, budget)
    except LpError:
        return
    assert solve(items, budget) == first
    shuffled = list(items)
    rnd.shuffle(shuffled)
    again = solve(shuffled, budget)
    assert again.assignments == first.assignments
    assert again.predicted_loss == first.predicted_loss


def dp_optimum(items: list[Item], cap: float) -> tuple[float, float]:
    """Exact (min loss, fewest bits at that loss) by dynamic programming over total bits, for
    instances whose bits·params are multiples of 1/8 and whose losses are dyadic (exact sums)."""
    groups: dict[object, list[Item]] = {}
    for it in items:
        groups.setdefault(it.group if it.group is not None else ("solo", it.name), []).append(it)
    best = np.zeros(1)
    for members in groups.values():
        common = sorted(set.intersection(*(set(m.formats) for m in members)))
        options = [
            (round(8 * sum(m.choice(f).bits * m.params for m in members)), sum(m.choice(f).loss for m in members))
            for f in common
        ]
        size = len(best) + max(c for c, _ in options)
        new = np.full(size, np.inf)
        for cost, loss in options:
            np.minimum(new[cost : cost + len(best)], best + loss, out=new[cost : cost + len(best)])
        best = new
    reachable = best[: math.floor(cap * 8) + 1]
    loss = float(reachable.min())
    return loss, float(np.flatnonzero(reachable == loss)[0]) / 8


@pytest.mark.parametrize("seed", range(4))
def test_matches_dynamic_programming_on_medium_instances(seed: int) -> None:
    """40 items (beyond brute force) exercise the reduced-cost fixing and the ILP core."""
    rng = np.random.default_rng(seed)
    bits = {"fp32": 32.0, "bf16": 16.0, "int8": 8.125, "fp8": 8.0, "int4": 4.5, "int3": 3.125}
    items = []
    for i in range(40):
        fmts = rng.choice(sorted(bits), size=int(rng.integers(2, 7)), replace=False)
        sensitivity = float(rng.lognormal(0, 1.5))
        choices = tuple(
            Choice(str(f), bits[f], round(16 * sensitivity * 2.0 ** (-bits[f] / 2) * rng.uniform(0.5, 2)) / 16)
            for f in fmts
        )
        group = f"g{i % 5}" if i % 4 == 0 else None
        items.append(Item(f"n{i:02d}", int(rng.integers(1, 60)), choices, group))
    items = [it for it in items if it.group is None] + [  # groups need a common format
        Item(it.name, it.params, (*it.choices, Choice("tied", 10.0, 1.0)), it.group) for it in items if it.group
    ]
    total = sum(it.params for it in items)
    low, high = min_cost_of(items), min_cost_of(items, max)
    for t in (0.05, 0.2, 0.4, 0.6, 0.8):
        budget = Budget.bits((low + t * (high - low)) / total)
        sol = solve(items, budget)
        loss, fewest = dp_optimum(items, budget.max_total_bits(total))
        assert sol.optimal
        assert (sol.predicted_loss, sol.total_bits) == (loss, fewest)


# --------------------------------------------------------------------------- examples


def item(name: str, params: int, group: str | None = None, **losses: float) -> Item:
    return Item(name, params, tuple(Choice(f, FORMAT_BITS[f], loss) for f, loss in losses.items()), group)


def test_small_example() -> None:
    items = [
        item("a", 100, fp32=0.0, bf16=0.1, int4=5.0),
        item("b", 100, fp32=0.0, bf16=0.2, int4=1.0),
    ]
    sol = solve(items, parse_budget("10"))  # 2000 bits: one bf16 + one int4 (2012.5), or both int4
    assert sol.assignments == {"a": "int4", "b": "int4"}
    sol = solve(items, parse_budget("10.0625"))
    assert sol.assignments == {"a": "bf16", "b": "int4"}
    assert sol.total_bits == 1600 + 412.5
    assert sol.achieved_bits == pytest.approx(10.0625)
    assert sol.predicted_loss == pytest.approx(1.1)
    assert solve(items, parse_budget("32")).assignments == {"a": "fp32", "b": "fp32"}
    assert "not binding" in solve(items, parse_budget("64")).status


def test_tie_break_prefers_fewer_bits() -> None:
    # fp32 and bf16 have equal loss: the smaller format wins even with room for fp32
    items = [item("a", 10, fp32=0.0, bf16=0.0, int4=1.0), item("b", 10, fp32=1.0, bf16=1.0)]
    assert solve(items, parse_budget("32")).assignments == {"a": "bf16", "b": "bf16"}
    # equal total loss through different combinations: fewer bits wins
    items = [item("a", 10, bf16=0.0, int4=1.0), item("b", 20, bf16=0.0, int4=1.0)]
    sol = solve(items, parse_budget("12"))  # either a or b at bf16; a at bf16 is smaller
    assert sol.assignments == {"a": "bf16", "b": "int4"}


def test_tied_group_and_params_zero_and_single_choice() -> None:
    items = [
        item("q", 100, "attn", fp32=0.0, bf16=1.0, int4=3.0),
        item("k", 100, "attn", fp32=0.0, bf16=1.0, int4=3.0, int3=4.0),
        item("v", 50, "attn", bf16=0.5, int4=1.0),
        item("bias", 0, fp32=0.0, int4=7.0),
        item("head", 10, fp8=2.0),
    ]
    sol = solve(items, parse_budget("8"))
    assert sol.assignments["q"] == sol.assignments["k"] == sol.assignments["v"] == "int4"
    assert sol.assignments["bias"] == "fp32"  # free: zero params
    assert sol.assignments["head"] == "fp8"
    sol = solve(items, parse_budget("32"))
    assert {sol.assignments[n] for n in "qkv"} == {"bf16"}  # fp32 is not common to the group


def test_infeasible_message_in_user_unit() -> None:
    items = [item("a", 1000, fp32=0.0, int4=1.0), item("b", 1000, bf16=0.0, int8=1.0)]
    with pytest.raises(BudgetError) as info:
        solve(items, parse_budget("3bits"))
    assert str(info.value) == (
        "budget 3 bits is infeasible: the smallest feasible budget is 6.09375 bits "
        "(all nodes at their cheapest allowed format)"
    )
    with pytest.raises(BudgetError, match=r"budget 1 KB is infeasible: .* is 1.52344 KB"):
        solve(items, parse_budget("1KB"))
    assert solve(items, parse_budget("6.09375")).assignments == {"a": "int4", "b": "int8"}


def test_errors_on_bad_items() -> None:
    with pytest.raises(PlanError, match="duplicate"):
        solve([item("a", 1, fp32=0.0), item("a", 1, bf16=0.0)], parse_budget("8"))
    with pytest.raises(PlanError, match="no format common"):
        solve([item("a", 1, "g", fp32=0.0), item("b", 1, "g", bf16=0.0)], parse_budget("8"))
    with pytest.raises(PlanError):
        Item("a", 1, ())
    with pytest.raises(PlanError):
        Item("a", -1, (Choice("fp32", 32, 0),))
    with pytest.raises(PlanError):
        Item("a", 1, (Choice("fp32", 32, 0), Choice("fp32", 16, 0)))
    with pytest.raises(PlanError):
        Choice("fp32", math.nan, 0)
    with pytest.raises(PlanError):
        Choice("fp32", 32, math.inf)
    with pytest.raises(PlanError):
        Choice("", 32, 0)
    assert Item("a", np.int64(3), [Choice("fp32", 32, 0)]).params == 3  # type: ignore[arg-type]


def test_empty_items_give_trivial_solution() -> None:
    sol = solve([], parse_budget("4"))
    assert sol.assignments == {}
    assert sol.total_bits == 0.0 and sol.achieved_bits == 0.0 and sol.predicted_loss == 0.0
    assert sol.optimal and sol.status.startswith("empty")


def test_all_zero_params() -> None:
    sol = solve([item("a", 0, fp32=0.0, int4=1.0)], parse_budget("1B"))
    assert sol.assignments == {"a": "fp32"} and sol.achieved_bits == 0.0


def test_large_instance_solves() -> None:
    """Speed sanity (no timing assertion): 2000 items × 6 formats, some tied groups."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(2000):
        scale = float(rng.lognormal(0.0, 2.0))
        choices = tuple(
            Choice(f, b, 0.0 if f == "fp32" else scale * 2.0 ** (-b) * float(rng.uniform(0.5, 2.0)))
            for f, b in FORMAT_BITS.items()
        )
        items.append(
            Item(f"n{i:04d}", int(rng.integers(1000, 1_000_000)), choices, f"g{i // 3}" if i % 7 == 0 else None)
        )
    sol = solve(items, parse_budget("4.5"))
    assert sol.optimal
    assert sol.total_bits <= 4.5 * sum(it.params for it in items) * (1 + REL_SLACK)
    assert sol.achieved_bits > 4.4
    cheapest = solve(items, parse_budget("3.125"))
    assert set(cheapest.assignments.values()) == {"int3"}


def test_time_limit_gives_a_feasible_answer_marked_not_optimal() -> None:
    rng = np.random.default_rng(1)
    items = [
        Item(
            f"n{i}",
            int(rng.integers(1, 100)),
            tuple(Choice(f, b, float(rng.uniform(0, 9 / b))) for f, b in FORMAT_BITS.items()),
        )
        for i in range(30)
    ]
    budget = parse_budget("7.3")
    sol = solve(items, budget, time_limit=1e-9)
    assert not sol.optimal and sol.status.startswith("not optimal")
    assert sol.total_bits <= budget.max_total_bits(sol.total_params) * (1 + REL_SLACK)
    assert solve(items, budget).predicted_loss <= sol.predicted_loss
    with pytest.raises(UsageError):
        solve(items, budget, time_limit=0)


# --------------------------------------------------------------------------- --keep rules


@pytest.mark.parametrize(
    ("spec", "pattern", "formats", "exclude"),
    [
        ("attn=fp16", "attn", ("fp16",), False),
        ("attn = fp16", "attn ", ("fp16",), False),
        ("^lm_head$=fp32", "^lm_head$", ("fp32",), False),
        ("mlp=!int4", "mlp", ("int4",), True),
        ("mlp=!int4,int3", "mlp", ("int4", "int3"), True),
        ("mlp=bf16,fp8_e4m3", "mlp", ("bf16", "fp8_e4m3"), False),
        ("embed", "embed", ("fp32",), False),
        ("foo(?=bar)", "foo(?=bar)", ("fp32",), False),
        ("a(?=b)=int8", "a(?=b)", ("int8",), False),
        ("layer\\.0=bf16", "layer\\.0", ("bf16",), False),
        ("(?P<n>a)(?P=n)", "(?P<n>a)(?P=n)", ("fp32",), False),
        ("(?<=enc)/q", "(?<=enc)/q", ("fp32",), False),
        ("mlp = ! int4 , int3", "mlp", ("int4", "int3"), True),
    ],
)
def test_parse_keep(spec: str, pattern: str, formats: tuple[str, ...], exclude: bool) -> None:
    rule = parse_keep(spec)
    assert (rule.pattern, rule.formats, rule.exclude) == (pattern.strip(), formats, exclude)
    assert str(rule) == spec.strip()


@pytest.mark.parametrize(
    "spec", ["", "   ", "=fp16", "attn=", "attn=!", "(unclosed=fp16", "[a-", "=!int4", "attn=fp 16", "a=b=c)", "a=!!x"]
)
def test_parse_keep_rejects(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_keep(spec)


def test_apply_rules() -> None:
    items = [
        item("enc/attn/q", 10, fp32=0.0, bf16=0.1, int4=1.0),
        item("enc/mlp/fc1", 10, fp32=0.0, bf16=0.1, int4=1.0),
        item("lm_head", 10, fp32=0.0, bf16=0.1, int4=1.0),
    ]
    out = apply_rules(items, [parse_keep("attn=bf16"), parse_keep("mlp=!int4"), parse_keep("^lm_head$")])
    assert [it.formats for it in out] == [("bf16",), ("fp32", "bf16"), ("fp32",)]
    assert [it.name for it in out] == [it.name for it in items]
    with pytest.raises(BudgetError, match=r"smallest feasible budget is 21\.3334 bits"):
        solve(out, parse_budget("4.125"))
    assert apply_rules(items, []) == tuple(items)


def test_apply_rules_errors() -> None:
    items = [item("a", 10, fp32=0.0, int4=1.0), item("b", 10, int4=1.0)]
    with pytest.raises(UsageError, match="matches no quantizable node"):
        apply_rules(items, [parse_keep("zzz=fp32")])
    with pytest.raises(FormatError, match="'b' cannot take fp32"):
        apply_rules(items, [parse_keep("a|b")])
    with pytest.raises(FormatError, match="leave no format"):
        apply_rules(items, [parse_keep("b=!int4")])
    with pytest.raises(FormatError, match="leave no format"):
        apply_rules(items, [parse_keep("a=fp32"), parse_keep("a=int4")])
    # excluding a format an item does not have is fine
    assert apply_rules(items, [parse_keep("b=!fp32")])[1].formats == ("int4",)
    with pytest.raises(UsageError):
        KeepRule("a", ())


# --------------------------------------------------------------------------- sweeps and Pareto front


def test_parse_sweep() -> None:
    assert [b.value for b in parse_sweep("4:8:0.5")] == [4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8]
    assert [b.value for b in parse_sweep("3:3.3:0.1")] == [3.0, 3.1, 3.2, 3.3]
    assert [b.value for b in parse_sweep("4bits:5bits:1")] == [4.0, 5.0]
    assert [b.value for b in parse_sweep("4:4.9:0.5")] == [4.0, 4.5]
    assert [str(b) for b in parse_sweep("4, 4.5,12MB")] == ["4 bits", "4.5 bits", "12 MB"]
    assert len(parse_sweep("1:1000:1")) == 1000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "4:8",
        "4:8:0.5:1",
        "8:4:0.5",
        "4:8:0",
        "4:8:-1",
        "4:8:x",
        "a:8:1",
        "1MB:2MB:1",
        "4,,5",
        "1:2000:1",
        "4:nan:1",
    ],
)
def test_parse_sweep_rejects(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_sweep(text)


def test_sweep_and_pareto_front() -> None:
    items = [
        item("a", 100, fp32=0.0, bf16=0.1, int4=5.0, int3=9.0),
        item("b", 300, "g", fp32=0.0, bf16=0.2, int4=1.0, int3=1.5),
        item("c", 50, "g", fp32=0.0, bf16=0.2, int4=1.0),
    ]
    budgets = parse_sweep("2:33:0.5")
    sols = sweep(items, budgets)
    assert [s.budget for s in sols] == [b for b in budgets if b.value >= min_cost_of(items) / 450]
    for s in sols:
        assert s == solve(items, s.budget)  # reuse of the compiled problem changes nothing
    losses = [s.predicted_loss for s in sols]
    assert losses == sorted(losses, reverse=True)  # more budget never hurts
    front = pareto_front(sols)
    bits = [s.total_bits for s in front]
    assert bits == sorted(bits) and len(set(bits)) == len(bits)
    assert [s.predicted_loss for s in front] == sorted({s.predicted_loss for s in sols}, reverse=True)
    for s in sols:  # every solution is weakly dominated by a front member
        assert any(f.total_bits <= s.total_bits and f.predicted_loss <= s.predicted_loss for f in front)
    with pytest.raises(BudgetError, match="smallest feasible"):
        sweep(items, parse_sweep("1:2:0.5"))


def test_pareto_front_handcrafted() -> None:
    def sol(bits: float, loss: float) -> Solution:
        return Solution({}, bits, bits, loss, True, "optimal")

    s = [sol(4, 3.0), sol(8, 1.0), sol(6, 3.0), sol(8, 1.0), sol(5, 0.5), sol(2, 9.0)]
    assert [(x.total_bits, x.predicted_loss) for x in pareto_front(s)] == [(2, 9.0), (4, 3.0), (5, 0.5)]
    assert pareto_front([]) == []

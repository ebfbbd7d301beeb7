"""W8A8 int8 (format ``w8a8``), its ORT form (passes/w8a8.py) and the latency objective (solver/latency.py).

References are independent of lpcompile's code: the int8 activation rounding is checked against ONNX
Runtime's own ``QuantizeLinear``/``DequantizeLinear`` (int8, zero point 0), and the fused
``MatMulIntegerToFloat`` model against numpy ``Q(x) @ Q(W)`` with the codes and scales read from the
file, within the fp32 summation bound. Solver checks use hand-made items whose optimum is known.
No test asserts a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pass_helpers import assert_matmul_close, check, ops, relu_mlp, run, to_ir

from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.budget import parse_budget
from lpcompile.errors import UsageError
from lpcompile.formats import MATMUL_LAYOUT, activation_scale, get_format, qdq_activation, qdq_weight
from lpcompile.graph import candidate_nodes, find_weight_nodes
from lpcompile.passes.pipeline import apply_plan
from lpcompile.passes.targets import WeightForm, relative_latency, runs_fast, weight_form
from lpcompile.plan import NodeAssignment, PrecisionPlan
from lpcompile.solver.latency import predict_latency, solve_with_objective
from lpcompile.solver.problem import Choice, Item

RNG = np.random.default_rng(1616)


def ort_int8_qdq(x: np.ndarray, scale: float) -> np.ndarray:
    """ONNX Runtime's int8 QuantizeLinear → DequantizeLinear (zero point 0), optimisation off."""
    g = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    return run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), x=x)[0]


def test_int8_activation_rounding_matches_ort() -> None:
    x = (RNG.standard_normal((4, 300)) * 3).astype(np.float32)
    x[0, :5] = [0.5, -0.5, 1.5, 2.5, 1e6]  # ties (to even) and saturation
    s = activation_scale(float(np.abs(x[1:]).max()), "int8")
    assert s == pytest.approx(float(np.abs(x[1:]).max()) / 127, rel=1e-7)
    assert np.array_equal(qdq_activation(x, "int8", s), ort_int8_qdq(x, s))
    assert np.array_equal(qdq_activation(x, "int8", 1.0)[0, :4], [0.0, -0.0, 2.0, 2.0])


def test_w8a8_format_and_kernels() -> None:
    f = get_format("w8a8")
    assert (f.element, f.activation, f.scale) == ("int8", "int8", "per_channel")
    assert f.bits_for((512, 256), MATMUL_LAYOUT) == get_format("int8").bits_for((512, 256), MATMUL_LAYOUT)
    assert weight_form("ort", "MatMul", "w8a8") == WeightForm.DEQUANTIZE
    # never a decoded float weight behind an activation DQ: ORT re-quantizes that one per tensor
    assert weight_form("qdq", "MatMul", "w8a8") == WeightForm.DEQUANTIZE
    assert weight_form("qdq", "Conv", "w8a8", rank=4, axis=1) == WeightForm.DEQUANTIZE
    assert weight_form("ort", "Conv", "w8a8", rank=4, axis=1) == WeightForm.DEQUANTIZE
    assert runs_fast("ort", "MatMul", "w8a8") and not runs_fast("qdq", "MatMul", "w8a8")
    assert runs_fast("ort", "Conv", "w8a8", rank=4, axis=1) and not runs_fast("qdq", "Conv", "w8a8", rank=4, axis=1)
    assert relative_latency("ort", "MatMul", "w8a8") < 1.0 < relative_latency("qdq", "MatMul", "w8a8")
    assert relative_latency("ort", "Conv", "w8a8", rank=4, axis=1) <= 1.0 < relative_latency("qdq", "Conv", "w8a8")


def mlp(k: int = 64, h: int = 48, n: int = 10) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return relu_mlp(RNG, k, h, n)


def w8a8_plan(model: onnx.ModelProto, amax: dict[str, float]) -> PrecisionPlan:
    f = get_format("w8a8")
    nodes = tuple(
        NodeAssignment(w.name, w.op_type, w.weight, w.params, "w8a8", f.bits_for(w.shape, w.layout))
        for w in find_weight_nodes(to_ir(model))
    )
    return PrecisionPlan(nodes=nodes, activation_scales=amax)


def test_ort_target_writes_matmul_integer_to_float() -> None:
    proto, w = mlp()
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    r1 = np.maximum(x @ w["W1"] + w["b1"], 0)
    amax = {"x": float(np.abs(x).max()), "r1": float(np.abs(r1).max())}
    plan = w8a8_plan(proto, amax)
    model, _ = apply_plan(to_ir(proto), plan, target="ort")
    out = check(model)
    assert ops(out).count("MatMulIntegerToFloat") == 2 and "Add" not in ops(out)  # bias absorbed
    assert "MatMul" not in ops(out) and "DequantizeLinear" not in ops(out)
    # reference: numpy, Q(x) @ Q(W) (+ b) with the rounding of formats.qdq_activation / qdq_weight
    xa = qdq_activation(x, "int8", activation_scale(amax["x"], "int8"))
    w1 = qdq_weight("w8a8", w["W1"], MATMUL_LAYOUT)
    y1 = (xa.astype(np.float64) @ w1.astype(np.float64) + w["b1"]).astype(np.float32)
    ra = qdq_activation(np.maximum(y1, 0), "int8", activation_scale(amax["r1"], "int8"))
    w2 = qdq_weight("w8a8", w["W2"], MATMUL_LAYOUT)
    (y,) = run(out, x=x)
    assert_matmul_close(y, ra, w2)
    # the standard Q/DQ form (target qdq) computes the same numbers
    qdq_model, _ = apply_plan(to_ir(proto), plan, target="qdq")
    qdq_out = check(qdq_model)
    assert not {n.domain for n in qdq_out.graph.node} - {"", "ai.onnx"}
    assert np.allclose(run(qdq_out, x=x)[0], y, rtol=1e-5, atol=1e-5)


def test_gather_tables_get_no_int8_activation_format() -> None:
    proto, _ = mlp()
    nodes = find_weight_nodes(to_ir(proto))
    assert all("w8a8" in c for c in candidate_nodes(nodes, ["int8", "w8a8"]).values())


# -- the latency objective ------------------------------------------------------------------------


def table_two_nodes() -> SensitivityTable:
    """Two MatMuls: int8 and w8a8 have the same bits; w8a8 is a hair worse in loss but faster on ort."""

    def node(name: str, loss8: float, loss_w8a8: float) -> NodeSensitivity:
        return NodeSensitivity(
            name=name,
            op_type="MatMul",
            weight=name + ".w",
            params=1024 * 1024,
            shape=(1024, 1024),
            candidates={
                "fp32": Candidate(32.0, 0.0),
                "int8": Candidate(8.03, loss8),
                "w8a8": Candidate(8.03, loss_w8a8),
                "int4_b128": Candidate(4.125, 1.0),
            },
            activation=name + ".x",
        )

    return SensitivityTable(
        formats=("int8", "w8a8", "int4_b128"),
        method="hutchinson",
        loss="kl",
        nodes=(node("a", 0.010, 0.0101), node("b", 0.010, 0.5)),
    )


def items_of(table: SensitivityTable) -> list[Item]:
    return [
        Item(
            n.name, n.params, tuple(Choice(f, c.bits, float(c.predicted_loss or 0.0)) for f, c in n.candidates.items())
        )
        for n in table.nodes
    ]


def test_objective_prefers_faster_among_near_equal_losses() -> None:
    table = table_two_nodes()
    items = items_of(table)
    budget = parse_budget("8.1bits")
    size = solve_with_objective(items, budget, table, "ort", "size")
    both = solve_with_objective(items, budget, table, "ort", "both")
    assert size.assignments == {"a": "int8", "b": "int8"}
    assert both.assignments == {"a": "w8a8", "b": "int8"}  # b's w8a8 costs 50x the loss: not a tie
    assert both.predicted_loss == pytest.approx(0.0201)
    assert predict_latency(table, both.assignments, "ort").ratio < predict_latency(table, size.assignments, "ort").ratio
    # latency: only fast choices (on ort int8 decode-once is as fast as fp32, so b keeps int8)
    lat = solve_with_objective(items, budget, table, "ort", "latency")
    assert lat.assignments == {"a": "w8a8", "b": "w8a8"}  # speed first: b's loss does not stop it
    assert lat.predicted_loss == pytest.approx(0.5101)
    # on qdq w8a8 is slower than int8: size and both agree
    assert solve_with_objective(items, budget, table, "qdq", "both").assignments == size.assignments


def test_objective_fast_drops_emulated_activation_rounding() -> None:
    """``fast``: least loss among the formats ORT runs at fp32 speed; bf16 (a per-run Cast round trip) only
    when nothing else fits, and never a refused budget."""

    def node(name: str, loss_bf16: float, loss8: float) -> NodeSensitivity:
        return NodeSensitivity(
            name=name,
            op_type="Conv",
            weight=name + ".w",
            params=4096,
            shape=(64, 64, 1, 1),
            candidates={
                "fp32": Candidate(32.0, 0.0),
                "bf16": Candidate(16.0, loss_bf16),
                "int8": Candidate(8.5, loss8),
            },
            activation=name + ".x",
        )

    table = SensitivityTable(
        formats=("bf16", "int8"), method="hutchinson", loss="kl", nodes=(node("a", 1e-4, 0.02), node("b", 1e-4, 0.02))
    )
    items = items_of(table)
    budget = parse_budget("16bits")
    assert solve_with_objective(items, budget, table, "qdq", "size").assignments == {"a": "bf16", "b": "bf16"}
    fast = solve_with_objective(items, budget, table, "qdq", "fast")
    assert fast.assignments == {"a": "int8", "b": "int8"}  # int8 + fp32 (20.25 bits on average) does not fit
    assert fast.predicted_loss == pytest.approx(0.04)
    roomy = solve_with_objective(items, parse_budget("20.25bits"), table, "qdq", "fast")
    assert sorted(roomy.assignments.values()) == ["fp32", "int8"] and roomy.predicted_loss == pytest.approx(0.02)
    assert predict_latency(table, fast.assignments, "qdq").ratio <= 1.0
    # tvm runs bf16 natively: fast and size agree there
    assert solve_with_objective(items, budget, table, "tvm", "fast").assignments == {"a": "bf16", "b": "bf16"}
    # a budget only the slow formats meet is still solved
    tight = [Item(it.name, it.params, tuple(c for c in it.choices if c.format != "int8")) for it in items]
    assert set(solve_with_objective(tight, budget, table, "qdq", "fast").assignments.values()) == {"bf16"}


def test_objective_latency_refuses_no_budget() -> None:
    table = table_two_nodes()
    items = [
        Item(it.name, it.params, tuple(c for c in it.choices if c.format != "int4_b128")) for it in items_of(table)
    ]
    sol = solve_with_objective(items, parse_budget("8.1bits"), table, "tvm", "latency")
    assert set(sol.assignments.values()) <= {"int8", "w8a8"}
    with pytest.raises(UsageError):
        solve_with_objective(items, parse_budget("8.1bits"), table, "ort", "fastest")


def test_plan_cli_objective_records_predicted_latency(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from lpcompile.cli import main

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"{n}.w") for n in "ab"]
    nodes = [
        helper.make_node("MatMul", ["a.x", "a.w"], ["b.x"], name="a"),
        helper.make_node("MatMul", ["b.x", "b.w"], ["y"], name="b"),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("a.x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        inits,
    )
    model = tmp_path / "two.onnx"  # --target ort recounts bits from the model's layouts
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), model)
    sens = tmp_path / "t.sens.json"
    table_two_nodes().save(sens)
    out = tmp_path / "t.plan.json"
    args = ["plan", str(sens), "--budget", "8.1bits", "--target", "ort", "--model", str(model), "-o", str(out), "-q"]
    assert main([*args, "--objective", "both"]) == 0
    plan = PrecisionPlan.load(out)
    assert {a.name: a.format for a in plan.nodes} == {"a": "w8a8", "b": "int8"}
    lat = plan.metadata["latency"]
    assert lat["objective"] == "both" and lat["target"] == "ort" and lat["predicted_x_fp32"] < 1.0
    out.unlink()
    assert main(args) == 0  # default objective: auto, which is fast on ort
    assert PrecisionPlan.load(out).metadata["latency"]["objective"] == "fast"
    out.unlink()
    assert main([*args, "--objective", "size"]) == 0  # size: no latency entry
    assert "latency" not in PrecisionPlan.load(out).metadata


@pytest.mark.parametrize("fmt", ["w8a8", "w8a8_dyn"])
def test_analysis_scores_the_int8_activation_term(fmt: str) -> None:
    """w8a8 (calibrated scale) / w8a8_dyn (per-run range) = int8 weights + an activation term: the
    predicted loss exceeds int8's on every node."""
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.api import analyze
    from lpcompile.files import load_calib_for, load_normalized

    examples = Path(__file__).resolve().parents[1] / "examples" / "models"
    model = load_normalized(examples / "digits_mlp.onnx")
    calib = load_calib_for(model, examples / "digits_calib.npz")
    table = analyze(model, calib, AnalysisConfig(formats=("int8", fmt), probes=4))
    for n in table.nodes:
        int8, act = n.candidates["int8"].predicted_loss, n.candidates[fmt].predicted_loss
        assert int8 is not None and act is not None and act > int8 >= 0, n.name
    assert set(table.activation_amax) >= {n.activation for n in table.nodes}

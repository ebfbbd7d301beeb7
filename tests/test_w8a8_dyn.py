"""W8A8 with dynamic activations (format ``w8a8_dyn``): the reference, the written forms, the analysis term.

The activation reference (``formats.dynamic_uint8``) is checked bit for bit against ONNX Runtime's own
``DynamicQuantizeLinear`` → ``DequantizeLinear`` on random and adversarial tensors; the rewritten models
against numpy ``DQL(x) @ Q(W)`` with the codes and scales read from the file, within the fp32 summation
bound, at every ORT optimisation level. No test asserts a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from pass_helpers import assert_matmul_close, check, ops, parse, relu_mlp, run, to_ir

from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.budget import parse_budget
from lpcompile.formats import (
    DYNAMIC_UINT8,
    MATMUL_LAYOUT,
    dynamic_uint8,
    get_format,
    grid_activation,
    qdq_activation,
    qdq_weight,
    scaled_activation,
)
from lpcompile.graph import candidate_nodes, find_weight_nodes
from lpcompile.passes.pipeline import apply_plan
from lpcompile.passes.targets import relative_latency, runs_fast
from lpcompile.plan import NodeAssignment, PrecisionPlan
from lpcompile.solver.latency import solve_with_objective
from lpcompile.solver.problem import Choice, Item

RNG = np.random.default_rng(1717)
LEVELS = (
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
)


def ort_dynamic(x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's ``DynamicQuantizeLinear`` → ``DequantizeLinear`` (optimisation off)."""
    g = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
    )
    return run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), x=x)[0]


ADVERSARIAL = {
    "normal": (RNG.standard_normal((4, 97)) * 3).astype(np.float32),
    "zeros": np.zeros((3, 8), np.float32),
    "pm1000": np.array([[1000.0, -1000.0, 0.5, -0.5, 999.9, 3.0]], np.float32),
    "subnormals": np.array([[1e-40, -3e-39, 2e-45, 0.0, 1e-38]], np.float32),
    "all_positive": (np.abs(RNG.standard_normal((2, 50))) + 5).astype(np.float32),
    "all_negative": (-np.abs(RNG.standard_normal((2, 50))) - 5).astype(np.float32),
    "constant": np.full((2, 9), 7.25, np.float32),
    "half_steps": (np.arange(-255, 256, dtype=np.float32) / 2.0).reshape(1, -1),
    "huge_and_tiny": np.array([[3e38, -1e-3, 1e-3, 0.0]], np.float32),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_dynamic_uint8_is_ort_bit_exact(case: str) -> None:
    x = ADVERSARIAL[case]
    assert np.array_equal(dynamic_uint8(x), ort_dynamic(x))


def test_dynamic_uint8_error_is_half_a_step() -> None:
    """Every value within s/2 of its decode (s = range/255, the range holding 0), and 0 exact."""
    x = ADVERSARIAL["normal"]
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    y = dynamic_uint8(np.concatenate([x, np.zeros((1, x.shape[1]), np.float32)]))
    assert np.all(np.abs(y[:-1] - x) <= s / 2 * (1 + 1e-6) + 1e-6 * s)
    assert np.all(y[-1] == 0)


def test_qdq_activation_takes_one_range_per_sample() -> None:
    """The analysis models batch 1 (the deployed case): each sample along axis 0 has its own range."""
    x = (RNG.standard_normal((3, 5, 16)) * np.array([0.1, 1.0, 30.0])[:, None, None]).astype(np.float32)
    y = qdq_activation(x, DYNAMIC_UINT8)
    for i in range(3):
        assert np.array_equal(y[i], ort_dynamic(x[i]))
    assert not np.array_equal(y, ort_dynamic(x))  # the whole-batch range would round sample 0 coarser


def test_format_registry_and_kernels() -> None:
    f = get_format("w8a8_dyn")
    assert f.activation == DYNAMIC_UINT8 and f.element == "int8" and f.scale == "per_channel"
    assert not scaled_activation(f.activation)  # no calibrated amax
    assert grid_activation(f.activation)
    assert runs_fast("ort", "MatMul", f) and runs_fast("qdq", "MatMul", f)
    assert not runs_fast("ort", "Conv", f)
    assert relative_latency("ort", "MatMul", f) < 1.0 and relative_latency("qdq", "MatMul", f) < 1.0


def mlp(k: int = 64, h: int = 48, n: int = 10, batch: int = 5) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return relu_mlp(RNG, k, h, n, batch)


def dyn_plan(model: onnx.ModelProto) -> PrecisionPlan:
    f = get_format("w8a8_dyn")
    nodes = tuple(
        NodeAssignment(w.name, w.op_type, w.weight, w.params, "w8a8_dyn", f.bits_for(w.shape, w.layout))
        for w in find_weight_nodes(to_ir(model))
    )
    return PrecisionPlan(nodes=nodes)


def runs_at(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, x: np.ndarray) -> np.ndarray:
    """The output ONNX Runtime computes at optimisation ``level``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("target", ["qdq", "ort"])
def test_written_forms_compute_the_reference(target: str, tmp_path: Path) -> None:
    proto, w = mlp()
    x = (RNG.standard_normal((5, 64)) * 2).astype(np.float32)
    model, _ = apply_plan(to_ir(proto), dyn_plan(proto), target=target)
    out = check(model)
    kinds = ops(out)
    assert kinds.count("DynamicQuantizeLinear") == 2
    assert "DequantizeLinear" not in kinds and "MatMul" not in kinds  # int8 codes feed an integer GEMM
    if target == "qdq":
        assert not {n.domain for n in out.graph.node} - {"", "ai.onnx"}  # standard ONNX only
        assert kinds.count("MatMulInteger") == 2
        onnx.checker.check_model(out, full_check=True)
    else:
        assert kinds.count("MatMulIntegerToFloat") == 2 and "Add" not in kinds  # bias absorbed
    # the planned node names survive (the report and the bits check find them)
    assert {n.name for n in out.graph.node} >= {wn.name for wn in find_weight_nodes(to_ir(proto))}
    # reference: numpy, with the ONNX rounding of the whole (batch-5) tensor, as the op computes it
    w1 = qdq_weight("w8a8_dyn", w["W1"], MATMUL_LAYOUT)
    w2 = qdq_weight("w8a8_dyn", w["W2"], MATMUL_LAYOUT)
    xa = dynamic_uint8(x)
    (y,) = run(out, x=x)
    y1 = (xa.astype(np.float64) @ w1.astype(np.float64) + w["b1"]).astype(np.float32)
    assert_matmul_close(y, dynamic_uint8(np.maximum(y1, 0)), w2)
    # every ORT level computes the same (ORT fuses both forms into DynamicQuantizeMatMul at ALL)
    for level in LEVELS:
        got = runs_at(out, level, x)
        assert np.allclose(got, y, rtol=1e-5, atol=1e-5), level
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node].count("DynamicQuantizeMatMul") == 2


def test_shared_activation_is_quantized_once() -> None:
    """q/k/v-style: two MatMuls read one tensor: one DynamicQuantizeLinear feeds both."""
    w = {"Wa": RNG.standard_normal((32, 16)).astype(np.float32), "Wb": RNG.standard_normal((32, 8)).astype(np.float32)}
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[2,32] x) => (float[2,16] a, float[2,8] b) {
      a = MatMul(x, Wa)
      b = MatMul(x, Wb)
    }"""
    proto = parse(text, **w)
    for target in ("qdq", "ort"):
        out = check(apply_plan(to_ir(proto), dyn_plan(proto), target=target)[0])
        assert ops(out).count("DynamicQuantizeLinear") == 1, target


def test_gather_tables_get_no_dynamic_activation_format() -> None:
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (int64[3] ids) => (float[3,8] y) {
      e = Gather(T, ids)
      y = MatMul(e, W)
    }"""
    proto = parse(
        text, T=RNG.standard_normal((50, 16)).astype(np.float32), W=RNG.standard_normal((16, 8)).astype(np.float32)
    )
    nodes = find_weight_nodes(to_ir(proto))
    cands = candidate_nodes(nodes, ["int8", "w8a8_dyn"])
    by_op = {n.op_type: cands[n.name] for n in nodes}
    assert by_op["Gather"] == ("int8",) and by_op["MatMul"] == ("int8", "w8a8_dyn")


def test_objective_latency_picks_the_dynamic_int8_gemm() -> None:
    """At 8 bits, ``size`` keeps the more accurate weight-only int8; ``latency`` takes w8a8_dyn on ort."""

    def node(name: str) -> NodeSensitivity:
        return NodeSensitivity(
            name=name, op_type="MatMul", weight=name + ".w", params=384 * 1536, shape=(384, 1536),
            candidates={"fp32": Candidate(32.0, 0.0), "int8": Candidate(8.08, 1e-4), "w8a8_dyn": Candidate(8.08, 3e-4)},
            activation=name + ".x",
        )

    table = SensitivityTable(
        formats=("int8", "w8a8_dyn"), method="hutchinson", loss="kl", nodes=(node("a"), node("b"))
    )
    items = [
        Item(n.name, n.params, tuple(Choice(f, c.bits, c.predicted_loss or 0.0) for f, c in n.candidates.items()))
        for n in table.nodes
    ]
    budget = parse_budget("8.1bits")
    assert set(solve_with_objective(items, budget, table, "ort", "size").assignments.values()) == {"int8"}
    assert set(solve_with_objective(items, budget, table, "ort", "latency").assignments.values()) == {"w8a8_dyn"}
    assert set(solve_with_objective(items, budget, table, "qdq", "latency").assignments.values()) == {"w8a8_dyn"}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_interpreter_ops_match_the_reference(case: str) -> None:
    """The torch interpreter's DynamicQuantizeLinear (MLIR export, measurement) decodes bit for bit like ORT."""
    import torch

    from lpcompile.analysis.ops import lookup

    class Ctx:
        name = "t"

        def input_type(self, i: int) -> int:
            return 0

        def output_type(self, i: int) -> int:
            return 0

    x = ADVERSARIAL[case]
    q, s, z = lookup("DynamicQuantizeLinear")(Ctx(), [torch.tensor(x)], {})  # type: ignore[misc,arg-type]
    assert q.dtype == torch.uint8 and z.dtype == torch.uint8
    y = (q.to(torch.int64) - z.to(torch.int64)).float() * s
    assert np.array_equal(y.numpy(), dynamic_uint8(x))
    a = torch.tensor([[3, 200], [0, 255]], dtype=torch.uint8)
    b = torch.tensor([[-128, 7], [127, -1]], dtype=torch.int8)
    (acc,) = lookup("MatMulInteger")(Ctx(), [a, b, torch.tensor(128, dtype=torch.uint8)], {})  # type: ignore[misc,arg-type]
    ref = (a.numpy().astype(np.int64) - 128) @ b.numpy().astype(np.int64)
    assert acc.dtype == torch.int32 and np.array_equal(acc.numpy(), ref)


def test_mlir_linalg_runs_the_qdq_form_like_onnx_runtime(tmp_path: Path) -> None:
    pytest.importorskip("torch_mlir")
    from lpcompile.runtime import mlir

    proto, _ = mlp(batch=1)
    out = check(apply_plan(to_ir(proto), dyn_plan(proto), target="qdq")[0])
    path = tmp_path / "dyn.onnx"
    onnx.save(out, path)
    x = (RNG.standard_normal((1, 64)) * 2).astype(np.float32)
    module = mlir.import_onnx(path, "linalg", {"x": x})
    (got,) = mlir.run_linalg(module, [x])
    ref = runs_at(out, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x)
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))

"""ActivationPrecisionPass: FP8 Q/DQ pairs and bf16/fp16 Cast round trips on activations.

Tolerances: the rounding of a graph input is bit-exact (compared through ``qdq_activation``);
the MatMul after it is compared within the fp32 summation bound (pass_helpers). Where a rounded
tensor is itself computed by an fp32 MatMul (chains), ORT and numpy may land on different sides
of a rounding tie, i.e. one ulp of the activation type apart: that adds ``ulp·(|h|@|W|)``
(ulp = 2^-mantissa_bits relative) to the bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from pass_helpers import (
    assert_matmul_close,
    check,
    fp32_dot_bound,
    ops,
    parse,
    run,
    signature,
    snapshot,
    to_ir,
    ulp_bound,
)

from lpcompile.errors import PlanError
from lpcompile.formats import activation_scale, get_format, qdq_activation
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.activations import ActivationPrecisionPass, region_graph
from lpcompile.plan import NodeAssignment, PrecisionPlan

RNG = np.random.default_rng(5)


def plan_for(model: ir.Model, formats: dict[str, str], scales: dict[str, float] | None = None) -> PrecisionPlan:
    nodes = []
    for w in find_weight_nodes(model):
        if w.name in formats:
            fmt = formats[w.name]
            nodes.append(
                NodeAssignment(w.name, w.op_type, w.weight, w.params, fmt, get_format(fmt).bits_for(w.shape, w.layout))
            )
    return PrecisionPlan(nodes=tuple(nodes), activation_scales=scales or {})


def props(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def two_consumers() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    wa = RNG.standard_normal((32, 8)).astype(np.float32)
    wb = RNG.standard_normal((32, 8)).astype(np.float32)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[4,32] x) => (float[4,8] a, float[4,8] b, float[4,32] s) {
          a = MatMul(x, WA)
          b = MatMul(x, WB)
          s = Relu(x)
        }""",
        WA=wa,
        WB=wb,
    )
    return proto, wa, wb


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_pair_on_graph_input(fmt: str) -> None:
    w = RNG.standard_normal((32, 8)).astype(np.float32)
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[4,32] x) => (float[4,8] y) {
          y = MatMul(x, W)
        }""",
        W=w,
    )
    model = to_ir(proto)
    amax = 2.0
    plan = plan_for(model, {"n0": fmt}, {"x": amax})
    assert ActivationPrecisionPass(plan)(model).modified
    out = check(model)
    assert signature(out) == signature(proto)
    assert ops(out) == ["QuantizeLinear", "DequantizeLinear", "MatMul"]
    q, dq, mm = out.graph.node
    assert (q.name, dq.name) == ("n0/act_q", "n0/act_dq")
    assert list(q.input) == ["x", "x_act_scale", "x_act_zp"] and list(dq.input) == [
        "x_act_q",
        "x_act_scale",
        "x_act_zp",
    ]
    assert {a.name: a.i for a in q.attribute} == {"saturate": 1}
    element = get_format(fmt).activation
    zp = next(t for t in out.graph.initializer if t.name == "x_act_zp")
    scale = next(t for t in out.graph.initializer if t.name == "x_act_scale")
    assert (
        zp.data_type
        == {"float8_e4m3fn": onnx.TensorProto.FLOAT8E4M3FN, "float8_e5m2": onnx.TensorProto.FLOAT8E5M2}[element]
    )
    assert list(zp.dims) == [] and list(scale.dims) == [] and scale.data_type == onnx.TensorProto.FLOAT
    assert props(q)["lpcompile.serves"] == "n0"
    assert mm.input[0] == "x_act_dq"
    x = (RNG.standard_normal((4, 32)) * 3).astype(np.float32)  # beyond amax: saturates
    (y,) = run(out, x=x)
    s = activation_scale(amax, element)
    assert_matmul_close(y, qdq_activation(x, element, s), w)
    before = snapshot(model)
    assert ActivationPrecisionPass(plan)(model).modified is False
    assert snapshot(model) == before


def test_missing_amax_is_plan_error() -> None:
    proto, _, _ = two_consumers()
    model = to_ir(proto)
    with pytest.raises(PlanError, match="calibrat"):
        ActivationPrecisionPass(plan_for(model, {"n0": "fp8_e4m3"}))(model)


def test_unknown_node_is_plan_error() -> None:
    proto, _, _ = two_consumers()
    model = to_ir(proto)
    plan = PrecisionPlan(nodes=(NodeAssignment("ghost", "MatMul", "W", 1, "bf16", 16.0),))
    with pytest.raises(PlanError, match="ghost"):
        ActivationPrecisionPass(plan)(model)


def test_one_fp8_pair_shared_by_consumers() -> None:
    proto, wa, wb = two_consumers()
    model = to_ir(proto)
    plan = plan_for(model, {"n0": "fp8_e4m3", "n1": "fp8_e4m3"}, {"x": 3.0})
    ActivationPrecisionPass(plan)(model)
    out = check(model)
    assert ops(out) == ["QuantizeLinear", "DequantizeLinear", "MatMul", "MatMul", "Relu"]
    q, dq = out.graph.node[:2]
    assert (q.name, dq.name) == ("x/act_q", "x/act_dq")
    assert props(dq)["lpcompile.serves"] == "n0,n1"
    assert out.graph.node[4].input[0] == "x"  # the Relu still reads the fp32 tensor
    x = RNG.standard_normal((4, 32)).astype(np.float32)
    a, b, s = run(out, x=x)
    xq = qdq_activation(x, "float8_e4m3fn", activation_scale(3.0, "float8_e4m3fn"))
    assert_matmul_close(a, xq, wa)
    assert_matmul_close(b, xq, wb)
    np.testing.assert_array_equal(s, np.maximum(x, 0))


def test_bf16_and_fp16_consumers_get_one_round_trip_each() -> None:
    proto, wa, wb = two_consumers()
    model = to_ir(proto)
    ActivationPrecisionPass(plan_for(model, {"n0": "bf16", "n1": "fp16"}))(model)
    out = check(model)
    names = [n.name for n in out.graph.node if n.op_type == "Cast"]
    assert sorted(names) == ["n0/to_bf16", "n0/to_fp32", "n1/to_fp16", "n1/to_fp32"]
    to = {n.name: n.attribute[0].i for n in out.graph.node if n.op_type == "Cast"}
    assert to["n0/to_bf16"] == onnx.TensorProto.BFLOAT16 and to["n1/to_fp16"] == onnx.TensorProto.FLOAT16
    assert to["n0/to_fp32"] == to["n1/to_fp32"] == onnx.TensorProto.FLOAT
    x = RNG.standard_normal((4, 32)).astype(np.float32)
    a, b, _ = run(out, x=x)
    assert_matmul_close(a, qdq_activation(x, "bfloat16"), wa)
    assert_matmul_close(b, qdq_activation(x, "float16"), wb)


def chain() -> tuple[onnx.ModelProto, list[np.ndarray]]:
    ws = [RNG.standard_normal((16, 16)).astype(np.float32) for _ in range(3)]
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[4,16] x) => (float[4,16] y, float[4,16] h1) {
          h1 = MatMul(x, W1)
          h2 = MatMul(h1, W2)
          y = MatMul(h2, W3)
        }""",
        W1=ws[0],
        W2=ws[1],
        W3=ws[2],
    )
    return proto, ws


def test_bf16_region_round_trips_after_producer() -> None:
    proto, ws = chain()
    model = to_ir(proto)
    plan = plan_for(model, {"n0": "bf16", "n1": "bf16", "n2": "bf16"})
    graph = region_graph(model.graph, plan)
    assert sorted(graph.edges) == [("n0", "n1"), ("n1", "n2")]
    assert ActivationPrecisionPass(plan)(model).modified
    out = check(model)
    assert signature(out) == signature(proto)
    order = [n.name for n in out.graph.node]
    # x enters the region: before its consumer; h1, h2 are internal: right after their producer
    assert order == [
        "n0/to_bf16",
        "n0/to_fp32",
        "n0",
        "n1/to_bf16",
        "n1/to_fp32",
        "n1",
        "n2/to_bf16",
        "n2/to_fp32",
        "n2",
    ]
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    rounded = [n.input[0] for n in casts if n.attribute[0].i == onnx.TensorProto.BFLOAT16]
    assert sorted(rounded) == ["h1", "h2", "x"]  # one round trip per tensor, never two
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    y, h1 = run(out, x=x)
    assert_matmul_close(h1, qdq_activation(x, "bfloat16"), ws[0])
    ulp = ulp_bound("bfloat16")
    h2 = qdq_activation(h1, "bfloat16").astype(np.float64) @ ws[1]
    r2 = qdq_activation(h2.astype(np.float32), "bfloat16")
    ref = r2.astype(np.float64) @ ws[2]
    bound = fp32_dot_bound(r2, ws[2]) + ulp * (np.abs(h2) @ np.abs(ws[2])) * 1.01
    assert np.all(np.abs(y - ref) <= bound)
    before = snapshot(model)
    assert ActivationPrecisionPass(plan)(model).modified is False
    assert snapshot(model) == before


def test_fp32_node_keeps_fp32_activation() -> None:
    proto, _ = chain()
    model = to_ir(proto)
    ActivationPrecisionPass(plan_for(model, {"n0": "fp32", "n1": "int8", "n2": "int4_b32"}))(model)
    assert ops(model) == ["MatMul", "MatMul", "MatMul"]


def test_cast_style_fp8_equals_qdq_and_survives_ort_optimisations(tmp_path) -> None:
    """The ORT target writes FP8 activation rounding as Div→Cast→Cast→Mul: same numbers as Q/DQ,
    and unchanged by ORT_ENABLE_ALL (whose QDQ transforms break the Q/DQ form for FP8)."""
    from pathlib import Path

    import onnxruntime as ort

    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file
    from lpcompile.passes.activations import ActivationPrecisionPass

    ex = Path(__file__).resolve().parents[1] / "examples" / "models"
    x = np.load(ex / "digits_heldout.npz")["pixels"][:32]
    outs = {}
    for target in ("qdq", "ort"):
        res = apply_file(ex / "digits_mlp.onnx", tmp_path / f"{target}.onnx", uniform="fp8_e4m3",
                         config=ApplyConfig(target=target),
                            calib_path=ex / "digits_calib.npz")
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(res.output), so, providers=["CPUExecutionProvider"])
            outs[(target, level)] = sess.run(None, {"pixels": x})[0]
        model = ir.load(res.output)
        again = ActivationPrecisionPass(res.plan, style="cast" if target == "ort" else "qdq")(model)
        assert not again.modified  # idempotent on its own output
    ref = outs[("qdq", "ORT_DISABLE_ALL")]
    tol = 4 * 513 * 2.0**-24 * np.abs(ref).max()  # fp32 summation order only
    assert np.abs(outs[("ort", "ORT_DISABLE_ALL")] - ref).max() <= tol
    assert np.abs(outs[("ort", "ORT_ENABLE_ALL")] - ref).max() <= tol

"""apply_plan / uniform_plan / plan_nodes_for: the whole rewrite on small models.

Tolerance of the end-to-end check (3 layers): the reference runs the same roundings in numpy
(float64 products of the rounded operands). fp32 summation order changes a MatMul result by
≤ (K+1)·2⁻²⁴·(|x|@|w|); when such a result is then rounded to bf16 the two sides can round a
near-tie differently, one bf16 ulp (2⁻⁷ relative) apart, so the last layer is allowed
2⁻⁷·(|r|@|W|) plus 1e-5·max|y| for the fp32 noise of the earlier layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from pass_helpers import check, ops, parse, run, signature, snapshot, to_ir

from lpcompile.errors import PlanError
from lpcompile.formats import (
    MATMUL_LAYOUT,
    activation_scale,
    get_format,
    qdq_activation,
    qdq_weight,
    quantize_weight,
)
from lpcompile.frontend.onnx_io import save_model
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.normalize import NormalizeWeightsPass
from lpcompile.passes.pipeline import apply_plan, normalize, plan_nodes_for, uniform_plan
from lpcompile.plan import NodeAssignment, PrecisionPlan

RNG = np.random.default_rng(21)
W1 = RNG.standard_normal((32, 64)).astype(np.float32)  # Gemm transB: [N, K]
B1 = RNG.standard_normal(32).astype(np.float32)
W2 = RNG.standard_normal((32, 64)).astype(np.float32)  # MatMul: [K, N]
W3 = RNG.standard_normal((16, 64)).astype(np.float32)  # Gemm transB
X = RNG.standard_normal((4, 64)).astype(np.float32)
AMAX = 3.5


def raw_model() -> onnx.ModelProto:
    return parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[4,64] x) => (float[4,16] y) {
          h1 = Gemm<transB=1>(x, W1, B1)
          r1 = Relu(h1)
          h2 = MatMul(r1, W2)
          r2 = Relu(h2)
          y = Gemm<transB=1>(r2, W3)
        }""",
        W1=W1,
        B1=B1,
        W2=W2,
        W3=W3,
    )


def mixed_plan(model: ir.Model) -> PrecisionPlan:
    formats = {"n0": "fp8_e4m3", "n2": "int4_b32", "n4": "bf16"}
    nodes = tuple(
        NodeAssignment(
            w.name,
            w.op_type,
            w.weight,
            w.params,
            formats[w.name],
            get_format(formats[w.name]).bits_for(w.shape, w.layout),
        )
        for w in plan_nodes_for(model)
    )
    return PrecisionPlan(nodes=nodes, budget="9bits", activation_scales={"x": AMAX})


def reference(x: np.ndarray, nbits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, r2 as rounded for layer 3, W3 as rounded); ``nbits``: int4 decoded in fp32 like MatMulNBits."""
    e4 = "float8_e4m3fn"
    xq = qdq_activation(x, e4, activation_scale(AMAX, e4)).astype(np.float64)
    h1 = xq @ qdq_weight("fp8_e4m3", W1.T, MATMUL_LAYOUT) + B1
    if nbits:
        q = quantize_weight("int4_b32", W2, MATMUL_LAYOUT)
        w2 = q.codes.astype(np.float64) * np.repeat(q.scale.astype(np.float64), 32, axis=0)
    else:
        w2 = qdq_weight("int4_b32", W2, MATMUL_LAYOUT)
    h2 = np.maximum(h1, 0) @ w2
    r2 = qdq_activation(np.maximum(h2, 0).astype(np.float32), "bfloat16")
    w3 = qdq_weight("bf16", W3.T, MATMUL_LAYOUT)
    return r2.astype(np.float64) @ w3, r2, w3


@pytest.mark.parametrize("target", ["qdq", "ort"])
def test_apply_plan_end_to_end(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lpcompile.passes.targets.NBITS_MIN_ELEMENTS", 0)  # MatMulNBits even for small weights
    proto = raw_model()
    model = to_ir(proto)
    plan = mixed_plan(model)
    assert [n.name for n in plan.nodes] == ["n0", "n2", "n4"]
    out_model, log = apply_plan(model, plan, target=target)  # type: ignore[arg-type]
    assert out_model is model
    assert log[:3] == ["NormalizeWeightsPass", "QuantizeWeightsPass", "ActivationPrecisionPass"]
    assert log[-1] == "AnnotatePass"
    out = check(model)
    assert signature(out) == signature(proto)
    kinds = {n.name: (n.op_type, n.domain) for n in out.graph.node}
    assert kinds["n0"] == ("MatMul", "") and kinds["n4"] == ("MatMul", "")
    assert kinds["n2"] == (("MatMulNBits", "com.microsoft") if target == "ort" else ("MatMul", ""))
    assert {"n0/act_q", "n0/act_dq", "n0/weight_mul", "n0/bias", "n4/to_bf16", "n4/to_fp32", "n4/weight_cast"} <= set(
        kinds
    )
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in out.graph.node}
    for a in plan.nodes:
        assert meta[a.name]["lpcompile.format"] == a.format
        assert float(meta[a.name]["lpcompile.bits"]) == a.bits
    assert meta["n4/to_bf16"]["lpcompile.serves"] == "n4"
    (y,) = run(out, x=X)
    ref, r2, w3 = reference(X, nbits=target == "ort")  # MatMulNBits decodes code·scale in fp32
    bound = 2.0**-7 * (np.abs(r2) @ np.abs(w3)) + 1e-5 * np.abs(ref).max()
    assert np.all(np.abs(y - ref) <= bound)
    before = snapshot(model)
    _, log2 = apply_plan(model, plan, target=target)  # type: ignore[arg-type]
    assert log2 == []
    assert snapshot(model) == before


def test_extra_passes_run_before_cleanup() -> None:
    seen: list[list[str]] = []

    class Probe(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            seen.append(ops(model))
            return ir.passes.PassResult(model, not seen[1:])

    model = to_ir(raw_model())
    _, log = apply_plan(model, mixed_plan(model), target="tvm", extra_passes=[Probe()])
    assert "QuantizeLinear" in seen[0]  # after the activation pass (FP8 Q/DQ pairs on the tvm target)
    assert log.index("Probe") == log.index("ActivationPrecisionPass") + 1
    assert log[-1] == "AnnotatePass"


def test_unknown_node_raises_plan_error_not_pass_error() -> None:
    model = to_ir(raw_model())
    plan = PrecisionPlan(nodes=(NodeAssignment("ghost", "MatMul", "W", 1, "int8", 8.0),))
    with pytest.raises(PlanError, match="ghost"):
        apply_plan(model, plan)


def test_fp8_without_calibration_is_plan_error() -> None:
    model = to_ir(raw_model())
    normalize(model)
    plan = uniform_plan(model, "fp8_e4m3")
    with pytest.raises(PlanError, match="calibrat"):
        apply_plan(model, plan)


def test_uniform_plan_needs_normalised_model() -> None:
    model = to_ir(raw_model())
    with pytest.raises(PlanError, match="normalis"):
        uniform_plan(model, "int4")
    assert normalize(model) is True
    plan = uniform_plan(model, "int4")
    assert [n.name for n in plan.nodes] == ["n0", "n2", "n4"]
    assert {n.format for n in plan.nodes} == {"int4_b128"}
    for n, w in zip(plan.nodes, find_weight_nodes(model), strict=True):
        assert n.bits == get_format("int4_b128").bits_for(w.shape, w.layout)
        assert (n.weight, n.params, n.op_type) == (w.weight, w.params, "MatMul")


def test_plan_nodes_for_does_not_touch_the_model() -> None:
    model = to_ir(raw_model())
    before = snapshot(model)
    nodes = plan_nodes_for(model)
    assert snapshot(model) == before
    assert ops(model).count("Gemm") == 2
    NormalizeWeightsPass()(model)
    assert nodes == find_weight_nodes(model)


def test_int4_file_is_small(tmp_path: Path) -> None:
    ws = {f"W{i}": (RNG.standard_normal((512, 512)) * 0.05).astype(np.float32) for i in range(3)}
    proto = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,512] x) => (float[2,512] y) {
          h0 = MatMul(x, W0)
          h1 = MatMul(h0, W1)
          y = MatMul(h1, W2)
        }""",
        **ws,
    )
    fp32_path = tmp_path / "fp32.onnx"
    save_model(proto, fp32_path)
    fp32_size = fp32_path.stat().st_size
    for target in ("qdq", "ort"):
        model = to_ir(proto)
        apply_plan(model, uniform_plan(model, "int4_b128"), target=target)  # type: ignore[arg-type]
        path = tmp_path / f"int4_{target}.onnx"
        save_model(model, path)
        size = path.stat().st_size
        assert size <= 0.2 * fp32_size, (target, size, fp32_size)
        x = RNG.standard_normal((2, 512)).astype(np.float32)
        (y,) = run(onnx.load(str(path)), x=x)
        assert y.shape == (2, 512) and np.all(np.isfinite(y))

"""W8A8 Convs on ONNX Runtime: uint8 ``QLinearConv`` chains (passes/qlinear_conv.py), and files that compute
what they say at every ORT optimisation level.

References: the plan as written in standard Q/DQ form (target ``qdq``) run by ONNX Runtime with its
graph optimisations off, and numpy's rounding of the exposed intermediate tensor. The chain differs
from the Q/DQ form only where the int32 bias (``round(b / (s_x·s_w))``) moves a value across a rounding
boundary: at most one code there, on a small fraction of elements. No test asserts a time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pass_helpers import check, ops, parse, run, run_at_level, to_ir, with_outputs

from lpcompile.passes.pipeline import apply_plan, uniform_plan
from lpcompile.plan import PrecisionPlan

RNG = np.random.default_rng(1717)


def _weights() -> dict[str, np.ndarray]:
    w1 = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    dw = (RNG.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32)
    dw[::2] *= 1e-3  # depthwise channels of very different scales: a per-tensor re-quantization loses them
    w3 = (RNG.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32)
    w4 = (RNG.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    return {
        "W1": w1,
        "B1": RNG.standard_normal(8).astype(np.float32),
        "DW": dw,
        "B2": (RNG.standard_normal(8) * 0.01).astype(np.float32),
        "W3": w3,
        "B3": RNG.standard_normal(8).astype(np.float32),
        "W4": w4,
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        "shape": np.array([2, 8, 4, 4], np.int64),
    }


# stem → Clip(0, 6) → depthwise → Relu → MaxPool → Reshape → 1×1 → (an Add: not a chain) → 1×1 → y
TEXT = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,3,16,16] x) => (float[2,4,4,4] y) {
  c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1, B1)
  a1 = Clip(c1, lo, hi)
  c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8, strides = [2, 2]> (a1, DW, B2)
  a2 = Relu(c2)
  p2 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a2)
  r2 = Reshape(p2, shape)
  c3 = Conv <kernel_shape = [1, 1]> (r2, W3, B3)
  s3 = Add(c3, c3)
  y = Conv <kernel_shape = [1, 1]> (s3, W4)
}"""


def _model() -> tuple[onnx.ModelProto, np.ndarray]:
    x = (RNG.standard_normal((2, 3, 16, 16)) * 2).astype(np.float32)
    return parse(TEXT, **_weights()), x


def _plan(proto: onnx.ModelProto, x: np.ndarray) -> PrecisionPlan:
    """Uniform w8a8 with every Conv input's range measured on ``x`` (ORT, optimisations off)."""
    names = ["a1", "r2", "s3"]
    got = dict(zip(names, run(with_outputs(proto, names), x=x)[1:], strict=True))
    amax = {"x": float(np.abs(x).max()), **{n: float(np.abs(got[n]).max()) for n in names}}
    amax["p2"] = amax["r2"]
    return uniform_plan(to_ir(proto), "w8a8", activation_scales=amax)


def _dq_output(model: onnx.ModelProto, rounded: str) -> str:
    """The DequantizeLinear output that feeds the Conv reading the rounded tensor ``rounded``."""
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0].startswith(f"{rounded}_act"):
            return node.output[0]
    raise AssertionError(f"no activation DequantizeLinear for {rounded}")


def test_chains_become_qlinearconv_and_the_rest_stays_float() -> None:
    proto, x = _model()
    model, _ = apply_plan(to_ir(proto), _plan(proto, x), target="ort")
    out = check(model)
    names = ops(out)
    # c1 (→ Clip → the depthwise's rounding) and c2 (→ Relu → MaxPool → Reshape → c3's rounding) are
    # chains; c3 feeds an Add and y is the graph output: both stay Conv with a DQ weight
    assert names.count("QLinearConv") == 2 and names.count("Conv") == 2
    assert "MaxPool" in names and "Cast" not in names
    for node in out.graph.node:
        if node.op_type == "Conv":  # never a decoded float weight behind an activation DequantizeLinear
            producer = {o: n for n in out.graph.node for o in n.output}.get(node.input[1])
            assert producer is not None and producer.op_type == "DequantizeLinear"
    qlin = [n for n in out.graph.node if n.op_type == "QLinearConv"]
    inits = {i.name: i for i in out.graph.initializer}
    assert all(onnx.numpy_helper.to_array(inits[n.input[2]]).dtype == np.uint8 for n in qlin)  # u8s8
    assert {n.name for n in qlin} == {n.name for n in proto.graph.node if n.output[0] in ("c1", "c2")}


def test_chain_computes_the_plan() -> None:
    proto, x = _model()
    plan = _plan(proto, x)
    ort_model = check(apply_plan(to_ir(proto), plan, target="ort")[0])
    qdq_model = check(apply_plan(to_ir(proto), plan, target="qdq")[0])
    # expose the rounded input of c3 (the end of the second chain) in both files
    ort_dq, qdq_dq = _dq_output(ort_model, "r2"), _dq_output(qdq_model, "r2")
    want_y, want_r = run(with_outputs(qdq_model, [qdq_dq]), x=x)
    scale = plan.activation_scales["r2"] / 127
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got_y, got_r = run_at_level(with_outputs(ort_model, [ort_dq]), level, x=x)
        codes = np.rint((got_r - want_r) / scale)
        assert np.abs(got_r - want_r - codes * scale).max() <= 1e-5 * max(1.0, np.abs(want_r).max())
        assert np.abs(codes).max() <= 1, "more than one code from the Q/DQ form"
        assert np.mean(codes != 0) <= 0.02, np.mean(codes != 0)
        # the 1×1 Convs mix only the channels of one position: codes one step off there move y by at most
        # scale · max Σ|W3| · 2 (s3 = c3 + c3) · max Σ|W4| (1 % for the weights' own rounding)
        w = _weights()
        per_position = 1.01 * scale * 2 * np.abs(w["W3"]).sum(axis=(1, 2, 3)).max()
        per_position *= 1.01 * np.abs(w["W4"]).sum(axis=(1, 2, 3)).max()
        assert np.abs(got_y - want_y).max() <= per_position + 1e-5, (np.abs(got_y - want_y).max(), per_position)


@pytest.mark.parametrize("target", ["qdq", "ort"])
def test_w8a8_file_computes_the_same_at_every_optimisation_level(target: str) -> None:
    """ORT re-quantizes a decoded float Conv weight behind an activation DQ *per tensor*
    (WeightBiasQuantization, from ORT_ENABLE_BASIC): the written form must not offer it one."""
    proto, x = _model()
    model = check(apply_plan(to_ir(proto), _plan(proto, x), target=target)[0])
    (off,) = run_at_level(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x=x)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        (on,) = run_at_level(model, level, x=x)
        assert np.abs(on - off).max() <= 1e-4 * max(1.0, float(np.abs(off).max())), level


def test_qdq_target_stays_standard_onnx() -> None:
    proto, x = _model()
    model = check(apply_plan(to_ir(proto), _plan(proto, x), target="qdq")[0])
    assert "QLinearConv" not in ops(model)
    assert not {n.domain for n in model.graph.node} - {"", "ai.onnx"}


CNN_TEXT = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2,1,8,8] x) => (float[2,5] y) {
  c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W1, B1)
  a1 = Relu(c1)
  p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a1)
  f1 = Flatten(p1)
  m = MatMul(f1, W2)
  y = Add(m, B2)
}"""


def test_chain_runs_into_a_fused_int8_matmul() -> None:
    """Conv → Relu → MaxPool → Flatten → a w8a8 MatMul: the MatMul's uint8 input is the chain's end."""
    w = {
        "W1": (RNG.standard_normal((6, 1, 3, 3)) * 0.4).astype(np.float32),
        "B1": RNG.standard_normal(6).astype(np.float32),
        "W2": (RNG.standard_normal((96, 5)) * 0.2).astype(np.float32),
        "B2": RNG.standard_normal(5).astype(np.float32),
    }
    proto = parse(CNN_TEXT, **w)
    x = (RNG.standard_normal((2, 1, 8, 8)) * 2).astype(np.float32)
    f1 = run(with_outputs(proto, ["f1"]), x=x)[1]
    amax = {"x": float(np.abs(x).max()), "f1": float(np.abs(f1).max())}
    plan = uniform_plan(to_ir(proto), "w8a8", activation_scales=amax)
    ort_model = check(apply_plan(to_ir(proto), plan, target="ort")[0])
    assert ops(ort_model).count("QLinearConv") == 1 and ops(ort_model).count("MatMulIntegerToFloat") == 1
    assert ops(ort_model).count("QuantizeLinear") == 1  # only the image is quantized from float
    mm = next(n for n in ort_model.graph.node if n.op_type == "MatMulIntegerToFloat")
    producers = {o: n.op_type for n in ort_model.graph.node for o in n.output}
    assert producers[mm.input[0]] == "Flatten"
    (want,) = run(check(apply_plan(to_ir(proto), plan, target="qdq")[0]), x=x)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        (got,) = run_at_level(ort_model, level, x=x)
        # every code of f1 (scale s) one step off moves an output by at most s · max_j Σ_i |W2[i, j]|
        # (1 % for W2's own rounding, which can raise a weight by half its per-column step)
        bound = 1.01 * plan.activation_scales["f1"] / 127 * np.abs(w["W2"]).sum(axis=0).max()
        assert np.abs(got - want).max() <= bound + 1e-5, (np.abs(got - want).max(), bound)

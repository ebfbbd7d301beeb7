"""Numerics of the two-pass softmax: numpy reference and the ONNX function in ONNX Runtime.

Tolerances (derived from the formats):
* per element, ``|y − ref| ≤ 0.5·ulp_s(ref) + (4 + log2 N)·ulp_f32(ref)`` where ``ulp_s`` is the
  ULP of the storage dtype (output rounding: half an ULP; zero for float32 storage, where the
  float32 term covers it), ``ulp_f32`` that of the float32 compute type (Cody–Waite reduction,
  ``exp``, one division, one scaling: a few ULPs) and ``log2 N`` the depth of the pairwise
  reduction of a row of N elements; ``ref`` is the float64 softmax of the input rounded to the
  storage dtype;
* two-pass vs three-pass at the same precision:
  ``max|y2 − ref| ≤ max(max|y3 − ref|, 4·ulp_s(max ref))``;
* the ONNX function vs ORT's own Softmax: 1e-6 absolute on random data (float32; outputs ≤ 1,
  so this is ~8 float32 ULPs at 1).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh

from lpcompile.errors import LpError
from lpcompile.twopass import (
    DOMAIN,
    FUNCTION_NAME,
    X_CLAMP,
    add_function_to_model,
    function_proto,
    make_two_pass_node,
    softmax_f64,
    three_pass_softmax,
    two_pass_softmax,
    ulp,
)

DTYPES = ["float32", "float16", "bfloat16"]


def _np_dtype(name: str) -> object:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # -1e9 mask values become -inf in fp16
        return x.astype(_np_dtype(dtype)).astype(np.float64)


def _tolerance(ref: np.ndarray, dtype: str, n: int) -> np.ndarray:
    storage = 0.0 if dtype == "float32" else 0.5 * ulp(dtype, ref)
    return storage + (4 + math.log2(max(n, 2))) * ulp("float32", ref)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "random": rng.normal(size=(16, 257)) * 3,
        "pm1000": rng.choice([-1000.0, 1000.0], size=(8, 64)) + rng.normal(size=(8, 64)),
        "all_equal": np.full((4, 100), 7.25),
        "wide_range": rng.uniform(-80, 80, size=(8, 1000)),
        "single": np.array([[3.5], [-1e4], [0.0]]),
        "mask_values": np.where(rng.random((6, 50)) < 0.3, -1e9, rng.normal(size=(6, 50))),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(_cases()))
def test_two_pass_matches_float64(case: str, dtype: str) -> None:
    x = _cases()[case]
    ref = softmax_f64(_rounded(x, dtype))
    y = two_pass_softmax(x, -1, dtype).astype(np.float64)
    assert y.shape == x.shape
    assert np.isfinite(y).all()
    err = np.abs(y - ref)
    assert (err <= _tolerance(ref, dtype, x.shape[-1])).all(), err.max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(_cases()))
def test_two_pass_at_least_as_accurate_as_three_pass(case: str, dtype: str) -> None:
    x = _cases()[case]
    ref = softmax_f64(_rounded(x, dtype))
    e2 = np.abs(two_pass_softmax(x, -1, dtype).astype(np.float64) - ref).max()
    e3 = np.abs(three_pass_softmax(x, -1, dtype).astype(np.float64) - ref).max()
    assert e2 <= max(e3, 4 * ulp(dtype, ref.max())), (e2, e3)


def test_large_row_numpy_reference() -> None:
    """A single 1M-element row (numpy reference only; TVM tests stay small)."""
    x = np.random.default_rng(7).normal(size=(1, 1 << 20)) * 4
    ref = softmax_f64(_rounded(x, "float32"))
    y = two_pass_softmax(x).astype(np.float64)
    assert (np.abs(y - ref) <= _tolerance(ref, "float32", x.shape[-1])).all()
    assert abs(y.sum() - 1.0) < 1e-4


def test_relative_error_of_small_outputs_beats_three_pass() -> None:
    """The two-pass reduction t = x − n·ln2 is (nearly) exact, while x − max rounds: for outputs
    far below the maximum the three-pass relative error grows with |x − max|."""
    x = np.random.default_rng(3).uniform(-80, 80, size=(4, 2000))
    ref = softmax_f64(x.astype(np.float32).astype(np.float64))
    keep = ref > 1e-30
    rel2 = (np.abs(two_pass_softmax(x).astype(np.float64) - ref)[keep] / ulp("float32", ref[keep])).max()
    rel3 = (np.abs(three_pass_softmax(x).astype(np.float64) - ref)[keep] / ulp("float32", ref[keep])).max()
    assert rel2 <= 4 + math.log2(2000)
    assert rel2 < rel3


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_masks(dtype: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 40)) * 2
    mask = rng.random(x.shape) < 0.4
    mask[:, 0] = False
    x[mask] = -np.inf
    y = two_pass_softmax(x, -1, dtype).astype(np.float64)
    ref = softmax_f64(_rounded(x, dtype))
    assert (y[mask] == 0).all()
    assert (np.abs(y - ref) <= _tolerance(ref, dtype, 40)).all()


def test_fully_masked_row_gives_zeros() -> None:
    """Documented: a row of -inf gives zeros (ONNX Softmax and the three-pass reference: NaN)."""
    x = np.array([[-np.inf] * 5, [0.0, -np.inf, 1.0, -np.inf, 2.0]])
    y = two_pass_softmax(x)
    assert (y[0] == 0).all()
    assert np.isfinite(y).all()
    assert np.isnan(three_pass_softmax(x)[0]).all()
    assert (softmax_f64(x)[0] == 0).all()


def test_nan_propagates_to_its_row() -> None:
    x = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]])
    y = two_pass_softmax(x)
    assert np.isnan(y[0]).all()
    assert np.isfinite(y[1]).all()


def test_logits_beyond_clamp_saturate() -> None:
    """Documented: finite logits are clamped to ±X_CLAMP; huge negative mask values are exact."""
    x = np.array([[-3.4e38, 0.0, 1.0], [2 * X_CLAMP, 0.0, 0.0], [-3.4e38, -3.4e38, -3.4e38]])
    y = two_pass_softmax(x).astype(np.float64)
    np.testing.assert_allclose(y[0], softmax_f64(np.array([[-np.inf, 0.0, 1.0]]))[0], atol=1e-7)
    np.testing.assert_allclose(y[1], [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(y[2], [1 / 3] * 3, atol=1e-7)


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
def test_axes(axis: int) -> None:
    x = np.random.default_rng(11).normal(size=(3, 4, 5)) * 3
    ref = softmax_f64(_rounded(x, "float32"), axis)
    y = two_pass_softmax(x, axis).astype(np.float64)
    assert (np.abs(y - ref) <= _tolerance(ref, "float32", x.shape[axis])).all()
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, atol=1e-6)


def test_bad_axis_and_dtype() -> None:
    with pytest.raises(LpError):
        two_pass_softmax(np.zeros((2, 3)), axis=2)
    with pytest.raises(LpError):
        two_pass_softmax(np.zeros((2, 3)), dtype="int8")


def test_fp16_accumulator_does_not_overflow() -> None:
    """With fp16 intermediates the three-pass sum of a 70k row overflows (y = 0 everywhere); the
    (m, e) pair renormalises its mantissa and stays exact."""
    x = np.zeros((1, 70_000))
    y2 = two_pass_softmax(x, dtype="float16", compute_dtype="float16").astype(np.float64)
    y3 = three_pass_softmax(x, dtype="float16", compute_dtype="float16").astype(np.float64)
    expected = np.float64(np.float16(1 / 70_000))
    assert np.abs(y2 - expected).max() <= ulp("float16", expected)
    assert (y3 == 0).all()


# ----------------------------------------------------------------------------------------------
# the ONNX function in ONNX Runtime
# ----------------------------------------------------------------------------------------------


def _model(shape: tuple[int, ...], axis: int, opset: int = 21, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    nodes = [make_two_pass_node("x", "y", axis, "tp"), oh.make_node("Softmax", ["x"], ["z"], axis=axis)]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", elem, list(shape))],
        [oh.make_tensor_value_info("y", elem, list(shape)), oh.make_tensor_value_info("z", elem, list(shape))],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    assert add_function_to_model(model)
    assert not add_function_to_model(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, z = sess.run(None, {"x": x})
    return y, z


def test_function_proto_shape() -> None:
    f = function_proto()
    assert (f.domain, f.name) == (DOMAIN, FUNCTION_NAME)
    assert [a.name for a in f.attribute_proto] == ["axis"] and f.attribute_proto[0].i == -1
    assert {(o.domain, o.version) for o in f.opset_import} == {("", 21)}
    node = make_two_pass_node("a", "b", 2, "n")
    assert (node.domain, node.op_type, node.attribute[0].i) == (DOMAIN, FUNCTION_NAME, 2)
    with pytest.raises(LpError):
        function_proto(14)


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("axis", [-1, 0, 1, -2, 3])
def test_function_matches_ort_softmax(opset: int, axis: int) -> None:
    shape = (2, 3, 4, 5)
    x = (np.random.default_rng(opset + axis).normal(size=shape) * 4).astype(np.float32)
    y, z = _run(_model(shape, axis, opset), x)
    assert np.abs(y - z).max() <= 1e-6
    ref = softmax_f64(x.astype(np.float64), axis)
    assert (np.abs(y - ref) <= _tolerance(ref, "float32", shape[axis])).all()
    np.testing.assert_allclose(y, two_pass_softmax(x, axis), atol=2 * ulp("float32", 1.0))


def test_function_default_axis_attribute() -> None:
    """A node without ``axis`` uses the function's default, -1."""
    model = _model((2, 3), -1)
    del model.graph.node[0].attribute[:]
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    y, z = _run(model, x)
    assert np.abs(y - z).max() <= 1e-6


def test_function_attention_masks() -> None:
    """4-D attention scores (batch, heads, q, k) with a causal -inf mask and fully masked rows."""
    b, h, q, k = 2, 4, 8, 8
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(b, h, q, k)) * 3).astype(np.float32)
    x = np.where(np.triu(np.ones((q, k), bool), 1), -np.inf, x).astype(np.float32)
    x[1, 2, 5, :] = -np.inf  # a fully masked row
    y, z = _run(_model(x.shape, -1), x)
    ok = np.ones((b, h, q), bool)
    ok[1, 2, 5] = False
    assert np.abs(y[ok] - z[ok]).max() <= 1e-6
    assert (y[1, 2, 5] == 0).all() and np.isnan(z[1, 2, 5]).all()
    assert (y[np.isneginf(x)] == 0).all()
    assert np.isfinite(y).all()


@pytest.mark.parametrize(("elem", "dtype"), [(TensorProto.FLOAT16, "float16"), (TensorProto.BFLOAT16, "bfloat16")])
def test_function_low_precision_inputs(elem: int, dtype: str) -> None:
    """float32 → Cast(fp16/bf16) → TwoPassSoftmax → Cast(float32): the function on a low-precision
    tensor (ORT takes no bf16 numpy input, and has no bf16 Softmax on CPU)."""
    x = (np.random.default_rng(2).normal(size=(3, 64)) * 4).astype(np.float32)
    x[0, :10] = -np.inf
    x[1, 0] = 60000.0 if dtype == "float16" else 1e30  # e^x overflows fp16/bf16 (and fp32)
    graph = oh.make_graph(
        [
            oh.make_node("Cast", ["x"], ["xl"], to=elem),
            make_two_pass_node("xl", "yl", -1, "tp"),
            oh.make_node("Cast", ["yl"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    add_function_to_model(model)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    y = y.astype(np.float64)
    ref = softmax_f64(np.clip(_rounded(x, dtype), -np.inf, X_CLAMP))
    assert np.isfinite(y).all()
    assert (np.abs(y - ref) <= _tolerance(ref, dtype, x.shape[-1])).all()
    # ORT's exp and summation order differ from the reference: one storage ULP
    assert (np.abs(y - two_pass_softmax(x, -1, dtype).astype(np.float64)) <= ulp(dtype, ref)).all()

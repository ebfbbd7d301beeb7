"""ONNX Runtime sessions: exact numerics (no silent MatMulNBits), dtype handling, amax collection."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.errors import CalibrationError
from lpcompile.runtime.calibrate import collect_amax, collect_tensors
from lpcompile.runtime.ort import latency_ms, make_session, run, run_batches, session_options

logger = logging.getLogger(__name__)

K, N, BLOCK = 64, 32, 16


def _int4_dq_matmul() -> tuple[onnx.ModelProto, np.ndarray]:
    """x[B, K] @ DequantizeLinear(int4 W[K, N], blocked scales along K) and the dequantized W."""
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(K, N)).astype(ml_dtypes.int4)
    scale = (rng.random((K // BLOCK, N)) * 0.1 + 0.01).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=0, block_size=BLOCK),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "dq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        initializer=[numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    w = q.astype(np.float32) * np.repeat(scale, BLOCK, axis=0)
    return model, w


def test_session_options_exact_and_fast() -> None:
    exact = session_options("exact", threads=1)
    assert exact.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert exact.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert exact.intra_op_num_threads == 1
    fast = session_options("fast")
    assert fast.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(ValueError):
        session_options("approximate")  # type: ignore[arg-type]


def test_exact_prevents_matmulnbits_int8_activations() -> None:
    model, w = _int4_dq_matmul()
    x = np.random.default_rng(1).standard_normal((4, K)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    y_exact = run(make_session(model, "exact", threads=1), {"x": x})["y"]
    # fp32 accumulation over K=64 terms: |error| <= K * eps32 * sum|x_i w_i| (a loose bound)
    tol = K * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w)).max()
    assert np.abs(y_exact - ref).max() <= tol
    # "fast" lets ORT fuse DQ->MatMul into MatMulNBits with int8 activations (accuracy_level 4
    # by default on this ORT); its error is orders of magnitude larger. Logged, not asserted:
    # the fusion is an ORT implementation detail that may change.
    y_fast = run(make_session(model, "fast", threads=1), {"x": x})["y"]
    logger.info("exact err %.3g, fast err %.3g", np.abs(y_exact - ref).max(), np.abs(y_fast - ref).max())


def test_exact_keeps_graph_as_written(tmp_path) -> None:
    model, _ = _int4_dq_matmul()
    so = session_options("exact", threads=1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "MatMulNBits" not in ops and "MatMul" in ops


def _cast_model(in_type: int, shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["a"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["f"], ["back"], to=in_type),
        ],
        "cast",
        [helper.make_tensor_value_info("a", in_type, shape)],
        [
            helper.make_tensor_value_info("f", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("back", in_type, None),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize(
    ("onnx_type", "np_type"),
    [
        (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
        (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2),
        (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
        (TensorProto.INT4, ml_dtypes.int4),
        (TensorProto.UINT4, ml_dtypes.uint4),
    ],
)
def test_low_precision_graph_inputs_and_outputs(onnx_type: int, np_type: type) -> None:
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        a = np.array([[1, 2, 3], [4, 0, 7], [5, 6, 1]], dtype=np_type)  # odd count: packing edge
    else:
        a = np.array([[1.0, -2.5, 0.1015625], [3.0, 0.0, 7.0]]).astype(np_type)
    sess = make_session(_cast_model(onnx_type, ["n", 3]))
    out = run(sess, {"a": a})
    np.testing.assert_array_equal(out["f"], a.astype(np.float32))  # fp8/bf16/int4 -> fp32 is exact
    assert out["back"].dtype == np.dtype(np_type)
    np.testing.assert_array_equal(out["back"].astype(np.float32), a.astype(np.float32))


def test_fp8_input_from_float32_rounds_like_ml_dtypes() -> None:
    x = np.array([[0.3, -1.7, 100.0]], dtype=np.float32)
    out = run(make_session(_cast_model(TensorProto.FLOAT8E4M3FN, [1, 3])), {"a": x})
    np.testing.assert_array_equal(out["f"], x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def _mlp() -> onnx.ModelProto:
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    mlp (float[batch, 4] x, int64[batch] idx) => (float[batch, 3] y, int64[batch] idx_out) {
        h = MatMul(x, w1)
        r = Relu(h)
        y = MatMul(r, w2)
        idx_out = Identity(idx)
    }
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(3)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "w2"),
        ]
    )
    return model


def test_run_casts_dtypes_and_validates() -> None:
    model = _mlp()
    sess = make_session(ir.from_proto(model))  # onnx-ir models are accepted too
    x = np.random.default_rng(0).standard_normal((2, 4))  # float64 -> float32
    idx = np.array([1, 2], dtype=np.int32)  # int32 -> int64
    out = run(sess, {"x": x, "idx": idx})
    assert out["y"].dtype == np.float32 and out["idx_out"].dtype == np.int64
    with pytest.raises(CalibrationError, match="missing input"):
        run(sess, {"x": x})
    with pytest.raises(CalibrationError, match="unknown input"):
        run(sess, {"x": x, "idx": idx, "z": idx})
    with pytest.raises(CalibrationError, match="rank"):
        run(sess, {"x": x[0], "idx": idx})
    with pytest.raises(CalibrationError, match="axis 1"):
        run(sess, {"x": np.zeros((2, 5)), "idx": idx})
    with pytest.raises(CalibrationError, match="non-integer"):
        run(sess, {"x": x, "idx": np.array([0.5, 1.0])})


def test_run_batches_concatenates_and_latency(tmp_path) -> None:
    model = _mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    sess = make_session(path)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 2)]
    batches = [{"x": x, "idx": np.arange(len(x))} for x in xs]
    out = run_batches(sess, batches)
    whole = run(sess, {"x": np.concatenate(xs), "idx": np.arange(5)})
    np.testing.assert_allclose(out["y"], whole["y"], rtol=1e-6, atol=1e-6)
    times = latency_ms(sess, batches[0], warmup=1, repeat=3)
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_newer_ir_version_is_loaded() -> None:
    model = _mlp()
    model.ir_version = onnx.IR_VERSION  # may exceed what this ORT reads
    sess = make_session(model)
    assert {o.name for o in sess.get_outputs()} == {"y", "idx_out"}


def test_collect_amax_equals_numpy() -> None:
    model = _mlp()
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((n, 4)).astype(np.float32), "idx": np.zeros(n, np.int64)} for n in (3, 4)]
    amax = collect_amax(model, batches, ["h", "r", "x", "w1"])
    x_all = np.concatenate([b["x"] for b in batches])
    h = x_all @ w1
    assert list(amax) == ["h", "r", "x", "w1"]
    # fp32 matmul over 4 terms vs numpy fp32: within a few ULPs of amax
    assert amax["h"] == pytest.approx(float(np.abs(h).max()), rel=1e-5)
    assert amax["r"] == pytest.approx(float(np.maximum(h, 0).max()), rel=1e-5)
    assert amax["x"] == float(np.abs(x_all).max())
    assert amax["w1"] == float(np.abs(w1).max())


def test_collect_amax_ignores_nonfinite_and_unknown_names() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[n] x) => (float[n] y) {
        l = Log(x)
        y = Neg(l)
    }
    """
    model = onnx.parser.parse_model(text)
    amax = collect_amax(model, [{"x": np.array([0.0, np.e, -1.0], np.float32)}], ["l"])  # -inf, 1, nan
    assert amax["l"] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(CalibrationError, match="not in the main graph"):
        collect_amax(model, [], ["nope"])


def test_collect_tensors_one_batch() -> None:
    model = _mlp()
    x = np.ones((2, 4), np.float32)
    vals = collect_tensors(model, {"x": x, "idx": np.zeros(2, np.int64)}, ["r", "idx"])
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(vals["r"], np.maximum(x @ w1, 0), rtol=1e-6, atol=1e-6)
    assert vals["idx"].tolist() == [0, 0]


def test_large_model_route_through_external_data(monkeypatch) -> None:
    import lpcompile.runtime.ort as ort_mod

    monkeypatch.setattr(ort_mod, "EXTERNAL_THRESHOLD", 0)  # pretend every model exceeds 2 GB
    model = _mlp()
    feed = {"x": np.ones((2, 4), np.float32), "idx": np.zeros(2, np.int64)}
    for m in (model, ir.from_proto(_mlp())):
        out = run(make_session(m), feed)["y"]
        w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
        np.testing.assert_allclose(out, np.maximum(feed["x"] @ w1, 0) @ w2, rtol=1e-5, atol=1e-5)


def test_exact_numerics_match_the_reference_for_every_format(tmp_path) -> None:
    """ORT's optimisers alter FP8 Q/DQ and bf16 round trips; "exact" sessions must not."""
    from pathlib import Path

    from lpcompile.files import apply_file
    from lpcompile.formats import MATMUL_LAYOUT, activation_scale, qdq_activation, qdq_weight
    from lpcompile.plan import PrecisionPlan

    ex = Path(__file__).resolve().parents[1] / "examples" / "models"
    x = np.load(ex / "digits_heldout.npz")["pixels"][:32]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(ex / "digits_mlp.onnx")).graph.initializer}
    for fmt, element in (("fp8_e5m2", "float8_e5m2"), ("fp8_e4m3", "float8_e4m3fn"), ("bf16", "bfloat16")):
        res = apply_file(ex / "digits_mlp.onnx", tmp_path / f"{fmt}.onnx", uniform=fmt,
                            calib_path=ex / "digits_calib.npz")
        plan = PrecisionPlan.load(res.plan_path)
        h = x.reshape(len(x), -1).astype(np.float32)
        for i in range(4):
            act = "x0" if i == 0 else f"h{i - 1}"
            scale = activation_scale(plan.activation_scales.get(act, 0.0), element)
            hq = qdq_activation(h, element, scale).astype(np.float64)
            wq = qdq_weight(fmt, weights[f"fc{i}.weight"], MATMUL_LAYOUT).astype(np.float64)
            h = (hq @ wq + weights[f"fc{i}.bias"]).astype(np.float32)
            h = np.maximum(h, 0) if i < 3 else h
        y = run(make_session(str(res.output), numerics="exact"), {"pixels": x})["logits"]
        # fp32 summation-order bound over 4 layers (K <= 512), relative to the logits' scale
        assert np.abs(y - h).max() <= 4 * 513 * 2.0**-24 * np.abs(h).max(), fmt

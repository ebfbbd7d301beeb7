"""Kernel identity after ORT's optimisations (:mod:`lpcompile.runtime.ort_kernels`) and the bootstrap
interval of a latency ratio (:meth:`lpcompile.runtime.ort.LatencyComparison.ratio_interval`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lpcompile.config import ApplyConfig
from lpcompile.files import apply_file
from lpcompile.runtime.ort import LatencyComparison
from lpcompile.runtime.ort_kernels import compare_kernels, kernel_steps

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
MLP, CALIB = EXAMPLES / "digits_mlp.onnx", EXAMPLES / "digits_calib.npz"


@pytest.mark.parametrize("fmt", ["int4_b32", "int8", "nf4", "int4_b128:gptq"])
def test_decode_once_runs_the_fp32_kernels(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "m.onnx"
    apply_file(MLP, out, uniform=fmt, calib_path=CALIB, config=ApplyConfig(target="qdq"))
    c = compare_kernels(out, MLP)
    assert c.same and c.extra_ops() == {} and c.first_difference == ""
    assert c.model_ops == c.reference_ops


def test_per_run_decodes_are_reported(tmp_path: Path) -> None:
    """The ``tvm`` target keeps DequantizeLinear in the graph (TVM matches it): ORT runs it every time."""
    out = tmp_path / "m.onnx"
    apply_file(MLP, out, uniform="int4_b32", calib_path=CALIB, config=ApplyConfig(target="tvm"))
    c = compare_kernels(out, MLP)
    assert not c.same
    assert c.extra_ops().get("DequantizeLinear", 0) >= 4
    assert c.first_difference.startswith("0: ")
    d = c.to_dict()
    assert d["same_kernels"] is False and d["model_nodes"] > d["reference_nodes"]


def _matmul(n: int) -> object:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, n), np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=onnx.IR_VERSION)


def test_the_same_op_on_another_weight_shape_is_another_kernel() -> None:
    assert [str(s) for s in kernel_steps(_matmul(8))] == ["MatMul 1[4, 8]"]
    c = compare_kernels(_matmul(16), _matmul(8))
    assert not c.same and c.extra_ops() == {}  # same ops, other shapes
    assert c.first_difference == "0: MatMul 1[4, 16] | MatMul 1[4, 8]"
    assert not c.same_ops  # 64 weights against 32: other work
    assert compare_kernels(_matmul(8), _matmul(8)).same


def _gemm(trans_b: int) -> object:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = (6, 4) if trans_b else (4, 6)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=trans_b)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [
            numpy_helper.from_array(np.ones(shape, np.float32), "W"),
            numpy_helper.from_array(np.ones(6, np.float32), "b"),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=onnx.IR_VERSION)


def test_a_transposed_gemm_weight_is_the_same_work() -> None:
    """lpcompile's normaliser writes a ``transB=1`` Gemm as ``transB=0`` on ``Wᵀ``: same op, same weight size."""
    c = compare_kernels(_gemm(0), _gemm(1))
    assert not c.same and c.same_ops and c.layout_changes == 1
    assert c.to_dict()["same_ops"] is True


def _comparison(a: list[float], b: list[float]) -> LatencyComparison:
    return LatencyComparison(
        batch=1,
        threads=2,
        runs=len(a),
        numerics="fast",
        model_ms=float(np.median(a)),
        reference_ms=float(np.median(b)),
        model_times=tuple(a),
        reference_times=tuple(b),
    )


def test_ratio_interval_brackets_the_ratio_and_shrinks_with_runs() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (20, 400):
        load = rng.lognormal(0.0, 0.3, n)  # a load spike slows both runs of a round
        a = list(10.0 * load * rng.lognormal(0.0, 0.02, n))
        b = list(10.0 * load * rng.lognormal(0.0, 0.02, n))
        c = _comparison(a, b)
        lo, hi = c.ratio_interval()
        assert lo <= c.ratio <= hi
        assert c.ratio_interval() == (lo, hi)  # seeded
        widths.append(hi - lo)
    assert widths[1] < widths[0]
    assert json.loads(json.dumps(c.to_dict()))["ratio_ci95"] == [lo, hi]


def test_ratio_interval_without_times_is_nan() -> None:
    c = LatencyComparison(batch=1, threads=2, runs=5, numerics="fast", model_ms=1.0, reference_ms=1.0)
    assert all(np.isnan(v) for v in c.ratio_interval())


def test_session_pairs_widen_the_interval_to_the_spread_between_sessions() -> None:
    """Each session pair has its own offset (one session of the same model runs a few per cent faster for
    its whole life): pooled rounds alone give a narrow interval around a biased ratio, the two-stage
    bootstrap over pairs covers the truth (1.0) and is wider."""
    rng = np.random.default_rng(7)
    a: list[float] = []
    b: list[float] = []
    for offset in (0.92, 1.10, 0.95, 1.06, 0.97, 1.04):  # model session vs reference session, per pair
        load = rng.lognormal(0.0, 0.05, 100)
        a += list(10.0 * offset * load * rng.lognormal(0.0, 0.01, 100))
        b += list(10.0 * load * rng.lognormal(0.0, 0.01, 100))
    pooled = _comparison(a, b)
    paired = LatencyComparison(
        batch=1, threads=2, runs=len(a), numerics="fast", model_ms=pooled.model_ms, reference_ms=pooled.reference_ms,
        model_times=tuple(a), reference_times=tuple(b), blocks=(100,) * 6,
    )  # fmt: skip
    lo1, hi1 = pooled.ratio_interval()
    lo2, hi2 = paired.ratio_interval()
    assert hi2 - lo2 > 2 * (hi1 - lo1)
    assert lo2 <= 1.0 <= hi2
    assert paired.to_dict()["sessions"] == 6


def test_compare_latency_with_fresh_session_pairs() -> None:
    from lpcompile.runtime.ort import compare_latency

    x = np.ones((1, 4), np.float32)
    c = compare_latency(_matmul(8), _matmul(8), {"x": x}, runs=3, warmup=1, sessions=3)
    assert c.blocks == (3, 3, 3) and c.runs == 9 and len(c.model_times) == 9
    lo, hi = c.ratio_interval()
    assert lo <= c.ratio <= hi

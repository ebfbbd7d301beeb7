"""The analyzer against analytic Hessians: a single MatMul y = x·W with normalised-MSE distortion.

For L(W') = mean((xW' − xW)²)/mean((xW)²) the Gauss–Newton Hessian is exact:
diag(H)[k, n] = 2/(S·N·m)·Σ_s x_sk² (S samples, N outputs, m = mean(y0²)), and w.r.t. the input
activation diag(H)[s, k] = 2/(S·N·m)·Σ_n W_kn².
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.sensitivity import analyze_onnx
from lpcompile.formats import MATMUL_LAYOUT, qdq_activation, qdq_weight
from lpcompile.frontend.calib import CalibrationSet

S, K, N = 64, 48, 24


def _model(w: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
        [numpy_helper.from_array(w, "W")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(S, K)) * rng.uniform(0.1, 3, size=K)).astype(np.float32)
    w = rng.normal(size=(K, N)).astype(np.float32)
    return x, w


def _exact(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    m = np.mean((x64 @ w64) ** 2)
    c = 2.0 / (S * N * m)
    dw = c * np.repeat((x64**2).sum(0)[:, None], N, axis=1)
    dx = c * np.repeat((w64**2).sum(1)[None, :], S, axis=0)
    return dw, dx


@pytest.mark.parametrize(("estimator", "probes", "rel"), [("ggn", 400, 0.1), ("hvp", 400, 0.1)])
def test_predicted_loss_matches_analytic_quadratic(problem, estimator: str, probes: int, rel: float) -> None:
    x, w = problem
    calib = CalibrationSet({"x": x}, source="test")
    cfg = AnalysisConfig(
        formats=("int4_b32", "int8", "fp8_e4m3", "bf16"), probes=probes, batch_size=S, loss="mse", estimator=estimator
    )  # type: ignore[arg-type]
    table = analyze_onnx(_model(w), calib, cfg)
    (node,) = table.nodes
    dw, dx = _exact(x, w)
    # trace of the weight Hessian: Hutchinson estimate vs exact (tolerance: ~5 std errors at 400 probes)
    assert node.trace == pytest.approx(dw.sum(), rel=rel)
    for fmt in ("int4_b32", "int8"):
        delta = qdq_weight(fmt, w, MATMUL_LAYOUT).astype(np.float64) - w
        exact = 0.5 * float(np.sum(dw * delta * delta))
        assert node.candidates[fmt].predicted_loss == pytest.approx(exact, rel=rel)
    # fp8 adds the activation term: ½ Σ diag(H_x) δx²  with δx the per-tensor-scaled E4M3 rounding of x
    amax = float(np.abs(x).max())
    dxq = qdq_activation(x, "float8_e4m3fn", amax / 448.0).astype(np.float64) - x
    dwq = qdq_weight("fp8_e4m3", w, MATMUL_LAYOUT).astype(np.float64) - w
    exact_fp8 = 0.5 * float(np.sum(dw * dwq * dwq)) + 0.5 * float(np.sum(dx * dxq * dxq))
    assert node.candidates["fp8_e4m3"].predicted_loss == pytest.approx(exact_fp8, rel=rel)
    assert node.candidates["fp32"].predicted_loss == 0.0


def test_ggn_estimates_are_nonnegative_and_seeded(problem) -> None:
    x, w = problem
    calib = CalibrationSet({"x": x}, source="test")
    cfg = AnalysisConfig(formats=("int4_b128", "bf16"), probes=8, batch_size=16, loss="mse", seed=3)
    a = analyze_onnx(_model(w), calib, cfg)
    b = analyze_onnx(_model(w), calib, cfg)
    assert a.nodes[0].candidates == b.nodes[0].candidates
    assert all(c.predicted_loss >= 0 for c in a.nodes[0].candidates.values())


def test_kl_probe_covariance_is_softmax_hessian() -> None:
    import torch

    from lpcompile.analysis.losses import ggn_output_probe

    y = torch.tensor([[1.0, -0.5, 2.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(y, -1)[0]
    gen = torch.Generator().manual_seed(0)
    zs = torch.stack([ggn_output_probe(y, "kl", gen)[0] for _ in range(20000)])
    cov = zs.T @ zs / zs.shape[0]
    expected = torch.diag(p) - torch.outer(p, p)
    assert torch.allclose(cov, expected, atol=0.01)


def test_auto_loss_picks_kl_for_logits_of_any_rank() -> None:
    from lpcompile.analysis.losses import output_loss_kinds

    kinds = output_loss_kinds(
        ["logits", "last_hidden_state", "scores", "embedding"], [(2, 7, 49152), (2, 7, 384), (4, 10), (4, 384)], "auto"
    )
    assert kinds == {"logits": "kl", "last_hidden_state": "mse", "scores": "kl", "embedding": "mse"}

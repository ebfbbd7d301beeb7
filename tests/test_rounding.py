"""Rounding methods: results lie on the format's grid, and each method beats the one before it."""

from __future__ import annotations

import numpy as np
import pytest

from lpcompile.errors import FormatError
from lpcompile.formats import (
    CONV_LAYOUT,
    INT_RANGES,
    MATMUL_LAYOUT,
    WeightLayout,
    dequantize,
    get_format,
    quantize_weight,
)
from lpcompile.rounding import RoundingConfig, kron_loss, parse_method, reduction_size, round_weight, to_2d

SEED = 1234
INT_FORMATS = ("int4_b128", "int4_b64", "int4_b32", "int8")
ALL_FORMATS = (*INT_FORMATS, "fp8_e4m3", "fp8_e5m2", "bf16", "fp16")
METHODS = ("rtn", "mse", "gptq")


def _correlated(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Inputs with strongly correlated features (a random mixing of a few factors) and outliers."""
    base = rng.standard_normal((rows, k // 4)) @ rng.standard_normal((k // 4, k))
    x = base + 0.3 * rng.standard_normal((rows, k))
    x[:, : k // 16] *= 8.0  # outlier channels, as in transformers
    return x.astype(np.float32)


def _layer(k: int = 256, n: int = 96, rows: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = _correlated(rng, rows, k)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    return w, x, h


def _on_grid(fmt_name: str, q, shape: tuple[int, ...]) -> None:
    """Codes are valid codes of the format, shapes match the reference, decode is DequantizeLinear's."""
    ref = quantize_weight(
        fmt_name, np.zeros(shape, np.float32) + 1.0, MATMUL_LAYOUT if len(shape) == 2 else CONV_LAYOUT
    )
    assert q.codes.shape == shape and q.codes.dtype == ref.codes.dtype
    assert q.axis == ref.axis and q.block_size == ref.block_size
    if ref.scale is None:
        assert q.scale is None
    else:
        assert q.scale.shape == ref.scale.shape and q.scale.dtype == ref.scale.dtype
        assert np.all(np.isfinite(q.scale.astype(np.float32))) and np.all(q.scale.astype(np.float32) > 0)
    fmt = get_format(fmt_name)
    if fmt.element in INT_RANGES:
        lo, hi = INT_RANGES[fmt.element]
        assert q.codes.min() >= lo and q.codes.max() <= hi


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_codes_on_grid_and_decode_reproduces(fmt: str, method: str) -> None:
    w, _, h = _layer(k=192, n=40)
    q = round_weight(fmt, w, MATMUL_LAYOUT, method, hessian=h)
    _on_grid(fmt, q, w.shape)
    dq = dequantize(q)
    # dequantize(q) is exactly what the writer's DequantizeLinear computes: re-quantizing the
    # decoded weight with the stored scales reproduces the same codes (a fixed point of the grid)
    if q.scale is not None and get_format(fmt).element in INT_RANGES:
        from lpcompile.formats import _expand_blocks

        if q.block_size:
            full = _expand_blocks(q.scale.astype(np.float32), q.axis, q.block_size, w.shape[q.axis])
        else:
            full = q.scale.astype(np.float32).reshape(1, -1)
        np.testing.assert_array_equal(np.rint(dq / full).astype(np.int8), q.codes)
    assert np.all(np.isfinite(dq))


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_error_order_rtn_mse(fmt: str) -> None:
    """Full-range RTN ≤ reference nearest, MSE ≤ RTN (the search includes RTN's candidates)."""
    w, _, _ = _layer()
    err = {}
    err["nearest"] = float(np.sum((dequantize(quantize_weight(fmt, w, MATMUL_LAYOUT)) - w) ** 2))
    for m in ("rtn", "mse"):
        err[m] = float(np.sum((dequantize(round_weight(fmt, w, MATMUL_LAYOUT, m)) - w) ** 2))
    assert err["rtn"] <= err["nearest"] * (1 + 1e-6)
    assert err["mse"] <= err["rtn"] * (1 + 1e-6)


@pytest.mark.parametrize("fmt", ("int4_b128", "int4_b32", "int8", "fp8_e4m3"))
def test_gptq_lowers_output_error(fmt: str) -> None:
    """‖(Q−W)ᵀX‖ (the layer's output error on its calibration inputs) drops well below RTN's."""
    w, x, h = _layer()
    out = {}
    for m in ("rtn", "mse", "gptq"):
        d = dequantize(round_weight(fmt, w, MATMUL_LAYOUT, m, hessian=h)) - w
        out[m] = float(np.linalg.norm(x @ d))
    assert out["gptq"] < 0.8 * out["rtn"], out
    assert out["gptq"] < out["mse"], out


def test_gptq_without_act_order_and_small_blocks() -> None:
    w, x, h = _layer(k=160, n=32)
    base = float(np.linalg.norm(x @ (dequantize(round_weight("int4_b32", w, MATMUL_LAYOUT, "rtn")) - w)))
    for cfg in (RoundingConfig(act_order=False), RoundingConfig(block=7), RoundingConfig(damp=0.1)):
        d = dequantize(round_weight("int4_b32", w, MATMUL_LAYOUT, "gptq", hessian=h, config=cfg)) - w
        assert float(np.linalg.norm(x @ d)) < base


def test_deterministic() -> None:
    w, _, h = _layer(k=128, n=48)
    a = round_weight("int4_b64", w, MATMUL_LAYOUT, "gptq", hessian=h)
    b = round_weight("int4_b64", w.copy(), MATMUL_LAYOUT, "gptq", hessian=h.copy())
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)


def test_gptq_without_hessian_is_mse() -> None:
    w, _, _ = _layer(k=128, n=48)
    a = round_weight("int4_b64", w, MATMUL_LAYOUT, "gptq")
    b = round_weight("int4_b64", w, MATMUL_LAYOUT, "mse")
    np.testing.assert_array_equal(a.codes, b.codes)


def test_nearest_is_reference() -> None:
    w, _, _ = _layer(k=64, n=16)
    for fmt in ALL_FORMATS:
        a = round_weight(fmt, w, MATMUL_LAYOUT, "nearest")
        b = quantize_weight(fmt, w, MATMUL_LAYOUT)
        np.testing.assert_array_equal(a.codes.astype(np.float32), b.codes.astype(np.float32))


def test_conv_layout_and_flattened_hessian() -> None:
    rng = np.random.default_rng(SEED)
    w = (rng.standard_normal((24, 16, 3, 3)) * 0.1).astype(np.float32)  # [O, I, kh, kw]
    k = reduction_size(w.shape, CONV_LAYOUT)
    assert k == 16 * 9
    x = _correlated(rng, 600, k)  # unfolded patches, channel-major (I, kh, kw)
    h = x.astype(np.float64).T @ x
    w2 = to_2d(w, CONV_LAYOUT)
    assert w2.shape == (k, 24)
    np.testing.assert_array_equal(w2[:, 5], w[5].reshape(-1))
    for fmt in ("int8", "int4_b32"):
        errs = {}
        for m in ("rtn", "gptq"):
            q = round_weight(fmt, w, CONV_LAYOUT, m, hessian=h)
            _on_grid(fmt, q, w.shape)
            errs[m] = float(np.linalg.norm(x @ to_2d(dequantize(q) - w, CONV_LAYOUT)))
        assert errs["gptq"] < errs["rtn"]


def test_transposed_gemm_layout() -> None:
    w, _x, h = _layer(k=128, n=32)
    wt = np.ascontiguousarray(w.T)
    layout = WeightLayout(channel_axis=0, reduction_axis=1)
    a = round_weight("int4_b32", w, MATMUL_LAYOUT, "gptq", hessian=h)
    b = round_weight("int4_b32", wt, layout, "gptq", hessian=h)
    np.testing.assert_array_equal(a.codes, b.codes.T)
    np.testing.assert_array_equal(a.scale, b.scale.T)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_adversarial(method: str, fmt: str) -> None:
    """Zeros, ±1000, NaN and ±inf: no exception, finite decodes where the reference gives them."""
    w, _, h = _layer(k=64, n=8)
    w[:, 0] = 0.0
    w[3, 1] = 1000.0
    w[4, 1] = -1000.0
    w[5, 2] = np.nan
    w[6, 3] = np.inf
    w[7, 3] = -np.inf
    q = round_weight(fmt, w, MATMUL_LAYOUT, method, hessian=h)
    _on_grid(fmt, q, w.shape)
    dq = dequantize(q)
    assert np.all(dq[:, 0] == 0.0)
    ok = np.isfinite(w)
    ok[:, 1:4] = False  # columns sharing a scale with ±1000/inf lose their small values, as in the reference
    assert np.all(np.isfinite(dq[ok]))
    if get_format(fmt).element in INT_RANGES:
        # NaN counts as 0; ±inf saturates like the reference (an fp16 code·scale product may overflow to ±inf)
        assert dq[5, 2] == 0.0
        assert dq[6, 3] > 0 and dq[7, 3] < 0
    # away from the adversarial columns the error stays that of a normal tensor
    ref = dequantize(quantize_weight(fmt, np.where(np.isfinite(w), w, 0), MATMUL_LAYOUT))
    e_ref = float(np.sum((ref - w)[ok] ** 2))
    e = float(np.sum((dq - w)[ok] ** 2))
    assert e <= 2.0 * e_ref + 1e-12


def test_all_zero_and_huge() -> None:
    z = np.zeros((64, 8), np.float32)
    for fmt in ALL_FORMATS:
        for m in METHODS:
            q = round_weight(fmt, z, MATMUL_LAYOUT, m, hessian=np.eye(64))
            assert np.all(dequantize(q) == 0.0)
    big = np.full((64, 8), 1000.0, np.float32)
    big[::2] *= -1
    for m in METHODS:
        q = round_weight("int4_b32", big, MATMUL_LAYOUT, m, hessian=np.eye(64))
        np.testing.assert_allclose(dequantize(q), big, rtol=2.0**-10)  # fp16 scale: half an fp16 ULP


def test_singular_and_zero_hessian() -> None:
    w, x, _ = _layer(k=64, n=16)
    x[:, 10:20] = 0.0  # dead inputs
    h = x.astype(np.float64).T @ x
    q = round_weight("int4_b32", w, MATMUL_LAYOUT, "gptq", hessian=h)
    assert np.all(np.isfinite(dequantize(q)))
    q0 = round_weight("int4_b32", w, MATMUL_LAYOUT, "gptq", hessian=np.zeros((64, 64)))
    assert np.all(np.isfinite(dequantize(q0)))


def test_bad_input() -> None:
    w, _, _ = _layer(k=64, n=8)
    with pytest.raises(FormatError):
        round_weight("int4_b32", w, MATMUL_LAYOUT, "gptq", hessian=np.eye(10))
    with pytest.raises(FormatError):
        round_weight("int4_b32", w, MATMUL_LAYOUT, "bogus")
    with pytest.raises(FormatError):
        RoundingConfig(clip_min=0.0)
    assert parse_method("RNE") == "nearest"


def test_kron_loss_matches_output_error() -> None:
    """With g ≡ 1 (diag = diag(Ĥ) per column) the prediction is ½‖Xδ‖² / mean diag(XᵀX)."""
    w, x, h = _layer(k=96, n=12)
    delta = dequantize(round_weight("int4_b32", w, MATMUL_LAYOUT, "gptq", hessian=h)) - w
    mean = float(np.mean(np.diagonal(h)))
    diag = np.repeat((np.diagonal(h) / mean)[:, None], w.shape[1], axis=1)
    pred = kron_loss(delta, MATMUL_LAYOUT, diag, h)
    exact = 0.5 * float(np.sum((x.astype(np.float64) @ delta) ** 2)) / mean
    assert pred == pytest.approx(exact, rel=1e-6)
    assert kron_loss(delta, MATMUL_LAYOUT, diag) == pytest.approx(0.5 * float(np.sum(diag * delta**2)))


# ---------------------------------------------------------------------------------------------
# Integration: XᵀX from a calibration forward, and the pass writing exactly these weights
# ---------------------------------------------------------------------------------------------

TWO_LAYERS = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N,5,{k}] x, int64[N,5] attention_mask) => (float[N,5,{n}] y) {{
  h = MatMul(x, W1)
  r = Relu(h)
  y = MatMul(r, W2)
}}"""

CONV = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N,8,9,9] x) => (float[N,12,4,4] y) {{
  y = Conv <pads = [1, 0, 0, 1], strides = [2, 2]> (x, W)
}}"""


def _two_layers(k: int = 64, n: int = 32):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from pass_helpers import parse, to_ir

    rng = np.random.default_rng(SEED)
    w1 = (rng.standard_normal((k, 48)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((48, n)) * 0.1).astype(np.float32)
    x = _correlated(rng, 6 * 5, k).reshape(6, 5, k)
    mask = np.ones((6, 5), np.int64)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    return to_ir(parse(TWO_LAYERS.format(k=k, n=n), W1=w1, W2=w2)), x, mask, w1, w2


def _assert_gram(h: np.ndarray, rows: np.ndarray, rel: float = 0.0) -> None:
    """``h`` = mean of x xᵀ over ``rows``, up to fp32 summation (γ_n bound, n = rows) plus ``rel``
    (for rows that are themselves computed in fp32 by the interpreter)."""
    rows = rows.astype(np.float64)
    n = rows.shape[0]
    mag = np.abs(rows).T @ np.abs(rows) / n
    bound = ((n + 1) * 2.0**-24 + rel) * mag + 1e-30
    err = np.abs(h - rows.T @ rows / n)
    assert np.all(err <= bound), float((err / bound).max())


def test_input_hessians_match_numpy() -> None:
    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.frontend.calib import CalibrationSet

    model, x, mask, w1, _ = _two_layers()
    calib = CalibrationSet({"x": x, "attention_mask": mask}, source="test")
    hs = collect_input_hessians(model, calib, batch_size=4, use_mask=True, shrink=False)
    assert set(hs) == {"x", "r"}
    rows = x[mask.astype(bool)].astype(np.float64)
    _assert_gram(hs["x"], rows)
    r = np.maximum(rows @ w1.astype(np.float64), 0.0)
    assert hs["r"].shape == (48, 48)
    _assert_gram(hs["r"], r, rel=1e-5)
    all_rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    h_all = collect_input_hessians(model, calib, batch_size=4, use_mask=False, shrink=False)["x"]
    _assert_gram(h_all, all_rows)


def test_conv_hessian_is_im2col() -> None:
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from pass_helpers import parse, to_ir

    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.frontend.calib import CalibrationSet
    from lpcompile.graph import find_weight_nodes

    rng = np.random.default_rng(SEED)
    w = (rng.standard_normal((12, 8, 3, 3)) * 0.1).astype(np.float32)
    model = to_ir(parse(CONV.format(), W=w))
    x = rng.standard_normal((3, 8, 9, 9)).astype(np.float32)
    h = collect_input_hessians(model, CalibrationSet({"x": x}, source="test"), shrink=False)["x"]
    xp = torch.nn.functional.pad(torch.from_numpy(x), [0, 1, 1, 0])  # ONNX pads [top, left, bottom, right]
    cols = torch.nn.functional.unfold(xp, (3, 3), stride=2).transpose(1, 2).reshape(-1, 72).double().numpy()
    _assert_gram(h, cols)
    wn = find_weight_nodes(model)[0]
    # GPTQ on the layout the graph assigns (flattened blocks for a 3×3 kernel) lowers the output error
    errs = {}
    for m in ("rtn", "gptq"):
        q = round_weight("int4_b32", w, wn.layout, m, hessian=h)
        errs[m] = float(np.linalg.norm(cols @ to_2d(dequantize(q).reshape(w.shape) - w, CONV_LAYOUT)))
    assert errs["gptq"] < errs["rtn"]


@pytest.mark.parametrize("fmt", ("int4_b32", "int8", "fp8_e4m3"))
def test_pass_writes_the_rounded_weights(fmt: str) -> None:
    """QuantizeWeightsPass with rounding=gptq + hessians stores exactly round_weight's codes; ORT runs them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from pass_helpers import session

    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.frontend.calib import CalibrationSet
    from lpcompile.graph import find_weight_nodes
    from lpcompile.passes.quantize_weights import QuantizeWeightsPass
    from lpcompile.plan import NodeAssignment, PrecisionPlan

    model, x, mask, w1, w2 = _two_layers()
    calib = CalibrationSet({"x": x, "attention_mask": mask}, source="test")
    hs = collect_input_hessians(model, calib)
    nodes = find_weight_nodes(model)
    plan = PrecisionPlan(
        nodes=tuple(
            NodeAssignment(n.name, n.op_type, n.weight, n.params, fmt, get_format(fmt).bits_for(n.shape, n.layout))
            for n in nodes
        )
    )
    from lpcompile.rounding import default_method

    method = default_method(fmt, "gptq")  # a run-wide gptq rounds 8-bit formats rtn
    assert method == ("gptq" if fmt == "int4_b32" else "rtn")
    expect = {
        n.weight: round_weight(fmt, w, n.layout, method, hessian=hs[n.activation])
        for n, w in zip(nodes, (w1, w2), strict=True)
    }
    ref = session(model).run(None, {"x": x, "attention_mask": mask})[0]
    out_a = QuantizeWeightsPass(plan, rounding="gptq", hessians=hs)(model.clone() if hasattr(model, "clone") else model)
    got_a = session(out_a.model).run(None, {"x": x, "attention_mask": mask})[0]
    model2, *_ = _two_layers()
    out_b = QuantizeWeightsPass(plan, weights=expect)(model2)
    got_b = session(out_b.model).run(None, {"x": x, "attention_mask": mask})[0]
    np.testing.assert_array_equal(got_a, got_b)  # same stored weights, same graph: identical outputs
    h = np.maximum(x.astype(np.float64) @ dequantize(expect["W1"]), 0) @ dequantize(expect["W2"])
    bound = 1e-5 * np.abs(h).max() + 1e-6  # fp32 summation over K ≤ 64 of O(1) terms
    np.testing.assert_allclose(got_a, h, atol=bound)
    assert not np.array_equal(got_a, ref)


@pytest.mark.parametrize(
    "fmt", ("mxfp4", "nvfp4", "nf4", "int4_asym_b64", "int3_b32", "mxfp6_e3m2", "int8_asym", "e2m1_b32_sbf16")
)
def test_grammar_families_gptq(fmt: str) -> None:
    """rtn keeps the reference; mse/gptq keep its grid, scale type and zero points, choose block scales
    by weighted error (symmetric blocked families), and gptq lowers ‖Xδ‖."""
    w, x, h = _layer(k=128, n=16)
    ref = quantize_weight(fmt, w, MATMUL_LAYOUT)
    np.testing.assert_array_equal(dequantize(round_weight(fmt, w, MATMUL_LAYOUT, "rtn", hessian=h)), dequantize(ref))
    d = np.diagonal(h)
    wd = ((d + 1e-3 * d.mean()) / d.mean())[:, None]
    e_ref_w = float(np.sum(wd * (dequantize(ref) - w) ** 2))
    mse = round_weight(fmt, w, MATMUL_LAYOUT, "mse", hessian=h)
    assert float(np.sum(wd * (dequantize(mse) - w) ** 2)) <= e_ref_w * (1 + 1e-6)
    q = round_weight(fmt, w, MATMUL_LAYOUT, "gptq", hessian=h)
    assert q.codes.dtype == ref.codes.dtype and q.codes.shape == ref.codes.shape
    assert q.scale.dtype == ref.scale.dtype and q.scale.shape == ref.scale.shape
    if ref.zero_point is not None or not ref.block_size:
        np.testing.assert_array_equal(q.scale.astype(np.float32), ref.scale.astype(np.float32))
    if ref.zero_point is not None:
        np.testing.assert_array_equal(q.zero_point, ref.zero_point)
        lo, hi = (0, 2 ** get_format(fmt).storage_bits - 1)
        assert q.codes.min() >= lo and q.codes.max() <= hi
    assert q.tensor_scale == ref.tensor_scale
    e_ref = float(np.linalg.norm(x @ (dequantize(ref) - w)))
    e_gptq = float(np.linalg.norm(x @ (dequantize(q) - w)))
    assert e_gptq < 0.9 * e_ref, (e_gptq, e_ref)


def test_mx_scale_choice_matches_brute_force() -> None:
    """E8M0 (MXFP4) under mse/gptq: per block the OCP scale or twice it, whichever has the lower
    diag(XᵀX)-weighted nearest-rounding error — checked against an independent numpy/ml_dtypes search."""
    import ml_dtypes

    w, _, h = _layer(k=128, n=16)
    w[5, :4] *= 7.0  # push some block maxima into E2M1's saturated range (amax/scale in (6, 8))
    d = np.diagonal(h)
    wd = ((d + 1e-3 * d.mean()) / d.mean())[:, None]
    ref = quantize_weight("mxfp4", w, MATMUL_LAYOUT)
    s_ref = ref.scale.astype(np.float32)  # [K/32, N]
    expected = np.empty_like(s_ref)
    for g in range(s_ref.shape[0]):
        blk, wb = w[32 * g : 32 * (g + 1)], wd[32 * g : 32 * (g + 1)]
        errs = []
        for s in (s_ref[g], 2 * s_ref[g]):
            dec = (blk / s).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s
            errs.append(np.sum(wb * (dec - blk) ** 2, axis=0))
        expected[g] = np.where(errs[1] < errs[0], 2 * s_ref[g], s_ref[g])
    assert (expected != s_ref).any()  # the search does move some blocks
    for m in ("mse", "gptq"):
        got = round_weight("mxfp4", w, MATMUL_LAYOUT, m, hessian=h)
        np.testing.assert_array_equal(got.scale.astype(np.float32), expected)


def test_plan_suffix_selects_the_rounding() -> None:
    """A plan node whose format carries ``:gptq`` is written with GPTQ (and the pass's Hessians)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from pass_helpers import session

    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.frontend.calib import CalibrationSet
    from lpcompile.graph import find_weight_nodes
    from lpcompile.passes.quantize_weights import QuantizeWeightsPass
    from lpcompile.plan import NodeAssignment, PrecisionPlan

    model, x, mask, w1, w2 = _two_layers()
    hs = collect_input_hessians(model, CalibrationSet({"x": x, "attention_mask": mask}, source="test"))
    nodes = find_weight_nodes(model)
    fmts = ("int4_b32:gptq", "int8")
    plan = PrecisionPlan(
        nodes=tuple(
            NodeAssignment(n.name, n.op_type, n.weight, n.params, f, get_format(f).bits_for(n.shape, n.layout))
            for n, f in zip(nodes, fmts, strict=True)
        )
    )
    out = QuantizeWeightsPass(plan, hessians=hs)(model).model
    expect = {
        "W1": round_weight("int4_b32", w1, nodes[0].layout, "gptq", hessian=hs[nodes[0].activation]),
        "W2": quantize_weight("int8", w2, nodes[1].layout),
    }
    model2, *_ = _two_layers()
    ref = QuantizeWeightsPass(plan.with_nodes(plan.nodes), weights=expect)(model2).model
    feeds = {"x": x, "attention_mask": mask}
    np.testing.assert_array_equal(session(out).run(None, feeds)[0], session(ref).run(None, feeds)[0])


def test_predict_rounded_losses_scores_what_is_written() -> None:
    """Candidates 'int4_b32' and 'int4_b32:gptq' share bits; the GPTQ one is predicted (and measured) lower,
    and the weights returned are exactly the ones the pass writes for that candidate."""
    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.analysis.rounded import predict_rounded_losses, weights_for_plan
    from lpcompile.frontend.calib import CalibrationSet
    from lpcompile.graph import find_weight_nodes
    from lpcompile.plan import NodeAssignment, PrecisionPlan

    model, x, mask, _, _ = _two_layers()
    # the raw mean (no shrinkage): the prediction is then the exact in-sample output error
    hs = collect_input_hessians(model, CalibrationSet({"x": x, "attention_mask": mask}, source="test"), shrink=False)
    nodes = find_weight_nodes(model)
    # an isotropic output sensitivity: D_kn = diag(XᵀX)_k, so the prediction is ½‖Xδ‖²/rows
    diag = {n.weight: np.repeat(np.diagonal(hs[n.activation])[:, None], n.shape[1], axis=1) for n in nodes}
    cands = ("int4_b32", "int4_b32:gptq", "fp32")
    rows, weights = predict_rounded_losses(model, nodes, cands, diag, {}, set(), {}, hessians=hs)
    for r in rows:
        a, b = r.candidates["int4_b32"], r.candidates["int4_b32:gptq"]
        assert a.bits == b.bits and b.predicted_loss < a.predicted_loss
        assert r.candidates["fp32"].predicted_loss == 0.0
    n0 = nodes[0]
    rows_x = x[mask.astype(bool)].astype(np.float64)
    for name in ("int4_b32", "int4_b32:gptq"):
        q = weights[(n0.weight, name)]
        delta = dequantize(q) - np.asarray(model.graph.initializers[n0.weight].const_value.numpy())
        exact = 0.5 * float(np.sum((rows_x @ delta) ** 2)) / rows_x.shape[0]
        # with D_kn = H_kk the Kronecker prediction is ½·δᵀHδ per column: the exact mean output error
        assert rows[0].candidates[name].predicted_loss == pytest.approx(exact, rel=1e-4)
    plan = PrecisionPlan(
        nodes=tuple(NodeAssignment(n.name, n.op_type, n.weight, n.params, "int4_b32:gptq", 4.5) for n in nodes)
    )
    chosen = weights_for_plan(plan, weights)
    assert set(chosen) == {"W1", "W2"}
    np.testing.assert_array_equal(chosen["W1"].codes, weights[("W1", "int4_b32:gptq")].codes)


def test_api_analyze_and_apply_with_gptq() -> None:
    """AnalysisConfig(rounding='gptq') scores GPTQ weights; ApplyConfig(rounding='gptq') writes them."""
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.api import analyze, apply, decide
    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.frontend.calib import CalibrationSet

    model, x, mask, w1, _ = _two_layers()
    calib = CalibrationSet({"x": x, "attention_mask": mask}, source="test")
    base = analyze(
        model.clone() if hasattr(model, "clone") else model,
        calib,
        AnalysisConfig(formats=("int4_b32",), probes=4, rounding="nearest"),
    )
    model, *_ = _two_layers()
    table = analyze(model, calib, AnalysisConfig(formats=("int4_b32",), probes=4, rounding="gptq"))
    for a, b in zip(base.nodes, table.nodes, strict=True):
        assert b.candidates["int4_b32"].predicted_loss < a.candidates["int4_b32"].predicted_loss
    plan = decide(table, "4.7bits", DecideConfig(formats=("int4_b32",))).plan
    model, *_ = _two_layers()
    out = apply(model, plan, ApplyConfig(rounding="gptq"), calib).model
    hs = collect_input_hessians(_two_layers()[0], calib, batch_size=16)
    expect = round_weight("int4_b32", w1, MATMUL_LAYOUT, "gptq", hessian=hs["x"])
    codes = np.asarray(out.graph.initializers["W1_q"].const_value.numpy()).astype(np.int8)
    np.testing.assert_array_equal(codes.reshape(expect.codes.shape), expect.codes)  # stored [blocks, bs, N] or [K, N]


def test_default_method_keeps_the_search_where_it_pays() -> None:
    from lpcompile.rounding import default_method

    assert default_method("int4_b128", "gptq") == "gptq"
    assert default_method("int4_b128", "gptq", has_hessian=False) == "rtn"  # embedding tables
    assert default_method("int4_b128", "mse", has_hessian=False) == "mse"
    for fmt in ("int8", "fp8_e4m3", "bf16"):
        assert default_method(fmt, "gptq") == "rtn" and default_method(fmt, "mse") == "rtn"
    assert default_method("int8", "nearest") == "nearest"


def test_measurement_keeps_the_rounding_suffix() -> None:
    """The validator measures a ``:gptq`` candidate with GPTQ weights (keyed by the suffixed name), so
    ρ(predicted, measured) covers the rounding variants; with the writer's XᵀX it is lower than nearest."""
    from dataclasses import replace as dc_replace

    from lpcompile.analysis.input_hessians import collect_input_hessians
    from lpcompile.analysis.measure import measure_pairs
    from lpcompile.api import measure_backend
    from lpcompile.frontend.calib import CalibrationSet
    from lpcompile.graph import find_weight_nodes
    from lpcompile.passes.pipeline import apply_plan

    model, x, mask, _, _ = _two_layers()
    calib = CalibrationSet({"x": x, "attention_mask": mask}, source="test")
    hs = collect_input_hessians(model, calib)
    backend = dc_replace(
        measure_backend(), rewrite=lambda m, plan: apply_plan(m, plan, target="qdq", hessians=hs)[0]
    )
    n0 = find_weight_nodes(model)[0]
    got = measure_pairs(model, calib, [(n0, "int4_b32"), (n0, "int4_b32:gptq"), (n0, "int4:gptq")], {}, backend)
    assert set(got) == {(n0.name, "int4_b32"), (n0.name, "int4_b32:gptq"), (n0.name, "int4_b128:gptq")}
    assert 0.0 < got[(n0.name, "int4_b32:gptq")] < got[(n0.name, "int4_b32")]

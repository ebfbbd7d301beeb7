"""GPTQ on Conv layers: the XᵀX the analysis gathers is the im2col Gram matrix (strides, pads,
dilations), and GPTQ with it never loses to nearest rounding on new inputs, even when the
calibration has fewer rows than the layer has inputs (issue 19, EfficientNet-Lite0)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pass_helpers import parse, to_ir

from lpcompile.analysis.input_hessians import SHRINK, collect_input_hessians, node_hessian
from lpcompile.formats import WeightLayout, dequantize
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.graph import find_weight_nodes
from lpcompile.rounding import kron_loss, round_weight

SEED = 19

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, {cin}, H, W] x) => (float[N, {cout}, P, Q] y) {{
    y = Conv <{attrs}> (x, W)
}}
"""


def _conv_model(w: np.ndarray, attrs: str):
    return to_ir(parse(CONV.format(cin=w.shape[1], cout=w.shape[0], attrs=attrs), W=w))


def _images(rng: np.random.Generator, n: int, c: int, size: int, mix: np.ndarray) -> np.ndarray:
    """Images whose channels are correlated (``mix``: a decaying spectrum, outlier channels), and each
    image with its own channel gains: the rows (patches) of one image are not independent samples,
    which is what makes the raw XᵀX of one or two images a poor estimate for new images."""
    f = rng.standard_normal((n, size, size, c)) @ mix
    f = f * np.exp(rng.standard_normal((n, 1, 1, c)))
    return np.ascontiguousarray(f.transpose(0, 3, 1, 2)).astype(np.float32)


def _mix(rng: np.random.Generator, c: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((c, c)))
    mix = np.arange(1, c + 1)[:, None] ** -0.5 * q
    mix[:, : c // 16] *= 6.0
    return mix


def test_conv_xtx_is_im2col_with_strides_pads_dilations() -> None:
    rng = np.random.default_rng(SEED)
    w = (rng.standard_normal((6, 5, 3, 3)) * 0.1).astype(np.float32)
    model = _conv_model(w, "strides: ints = [2, 1], dilations: ints = [1, 2], pads: ints = [1, 0, 2, 3]")
    x = rng.standard_normal((3, 5, 11, 10)).astype(np.float32)
    calib = CalibrationSet({"x": x}, source="test")
    raw = collect_input_hessians(model, calib, batch_size=2, shrink=False)["x"]
    xp = torch.nn.functional.pad(torch.from_numpy(x), [0, 3, 1, 2]).double()  # ONNX pads: begins then ends
    cols = torch.nn.functional.unfold(xp, (3, 3), dilation=(1, 2), stride=(2, 1))
    rows = cols.transpose(1, 2).reshape(-1, 45).numpy()
    ref = rows.T @ rows / rows.shape[0]
    np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # the reference conv agrees with the flattened weight order (C_in, kh, kw)
    y = torch.nn.functional.conv2d(xp, torch.from_numpy(w).double(), stride=(2, 1), dilation=(1, 2))
    y_cols = (rows @ w.reshape(6, -1).T.astype(np.float64)).reshape(3, -1, 6).transpose(0, 2, 1)
    np.testing.assert_allclose(y.reshape(3, 6, -1).numpy(), y_cols, rtol=1e-9, atol=1e-9)
    # shrunk: off-diagonal times 1−δ, diagonal moved δ towards its mean
    shrunk = collect_input_hessians(model, calib, batch_size=2)["x"]
    delta = SHRINK * 45 / (SHRINK * 45 + rows.shape[0])
    exp = raw * (1 - delta)
    np.fill_diagonal(exp, (1 - delta) * np.diag(raw) + delta * np.diag(raw).mean())
    np.testing.assert_allclose(shrunk, exp, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("cin", "groups", "attrs"),
    [
        (6, 6, "strides: ints = [2, 1], dilations: ints = [1, 2], pads: ints = [1, 0, 2, 3]"),  # depthwise
        (6, 2, "pads: ints = [1, 1, 1, 1]"),  # 2 groups of 3 input channels
    ],
)
def test_grouped_conv_xtx_is_per_group_im2col(cin: int, groups: int, attrs: str) -> None:
    """A grouped Conv's output channel reads only its group's input channels: one XᵀX per group, each
    the Gram matrix of that group's own ``unfold`` rows (depthwise: ``[C, kh·kw, kh·kw]``)."""
    rng = np.random.default_rng(SEED)
    cout = 2 * groups
    w = (rng.standard_normal((cout, cin // groups, 3, 3)) * 0.1).astype(np.float32)
    model = _conv_model(w, f"group: int = {groups}, {attrs}")
    x = rng.standard_normal((3, cin, 9, 8)).astype(np.float32)
    calib = CalibrationSet({"x": x}, source="test")
    raw = collect_input_hessians(model, calib, batch_size=2, shrink=False)["x"]
    k = (cin // groups) * 9
    assert raw.shape == (groups, k, k)
    strides, dil, pads = (2, 1), (1, 2), [0, 3, 1, 2]
    if groups != cin:
        strides, dil, pads = (1, 1), (1, 1), [1, 1, 1, 1]
    xp = torch.nn.functional.pad(torch.from_numpy(x), pads).double()
    per = cin // groups
    for g in range(groups):
        cols = torch.nn.functional.unfold(xp[:, g * per : (g + 1) * per], (3, 3), dilation=dil, stride=strides)
        rows = cols.transpose(1, 2).reshape(-1, k).numpy()
        ref = rows.T @ rows / rows.shape[0]
        np.testing.assert_allclose(raw[g], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    shrunk = collect_input_hessians(model, calib, batch_size=2)["x"]
    delta = SHRINK * k / (SHRINK * k + rows.shape[0])
    for g in range(groups):
        exp = raw[g] * (1 - delta)
        np.fill_diagonal(exp, (1 - delta) * np.diag(raw[g]) + delta * np.diag(raw[g]).mean())
        np.testing.assert_allclose(shrunk[g], exp, rtol=1e-12, atol=1e-15)
    wn = find_weight_nodes(model)[0]
    assert node_hessian(wn, {"x": shrunk}) is shrunk


def test_grouped_kron_loss_and_gptq_reduce_to_the_plain_ones() -> None:
    """One group (``[1, K, K]``) is the plain ``[K, K]`` case: same prediction, same codes."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((400, 27)) @ rng.standard_normal((27, 27))
    h = x.T @ x / 400
    w = (rng.standard_normal((5, 3, 3, 3)) * 0.1).astype(np.float32)
    layout = WeightLayout(channel_axis=0, reduction_axis=1)
    diag = np.abs(rng.standard_normal(w.shape))
    for fmt in ("int4_pc", "int4_b32", "nf4_b32"):
        a = round_weight(fmt, w, layout, "gptq", hessian=h)
        b = round_weight(fmt, w, layout, "gptq", hessian=h[None])
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
        delta = dequantize(a).reshape(w.shape) - w
        assert kron_loss(delta, layout, diag, h[None]) == pytest.approx(kron_loss(delta, layout, diag, h), rel=1e-9)


def _smooth_images(rng: np.random.Generator, n: int, c: int, size: int) -> np.ndarray:
    """Spatially smooth images (neighbouring pixels correlated, as in a CNN's feature maps), each
    channel with its own smoothness and gain: a depthwise 3×3 Conv's per-channel XᵀX is far from
    diagonal, and differs between channels."""
    f = rng.standard_normal((n, c, size + 8, size + 8))
    out = np.empty((n, c, size, size))
    for ch in range(c):
        width = 0.6 + 2.5 * (ch % 5) / 4
        t = np.arange(-4, 5)
        k1 = np.exp(-0.5 * (t / width) ** 2)
        k2 = np.outer(k1, k1) / k1.sum() ** 2
        img = torch.nn.functional.conv2d(torch.from_numpy(f[:, ch : ch + 1]), torch.from_numpy(k2)[None, None])
        out[:, ch] = img[:, 0].numpy() * np.exp(rng.standard_normal())
    return out.astype(np.float32)


@pytest.mark.parametrize(("fmt", "calib_images"), [("int4_pc", 2), ("int4_b32", 2), ("int4_pc", 8)])
def test_gptq_beats_nearest_on_depthwise_conv(fmt: str, calib_images: int) -> None:
    """With the per-channel XᵀX, gptq rounds a depthwise Conv below nearest's output error on new
    images, per channel and in total (before: no XᵀX, so run-wide gptq was rtn and ``:gptq`` mse)."""
    rng = np.random.default_rng(SEED)
    c = 40
    w = (rng.standard_normal((c, 1, 3, 3)) * 0.3).astype(np.float32)
    model = _conv_model(w, f"group: int = {c}, pads: ints = [1, 1, 1, 1]")
    wn = find_weight_nodes(model)[0]
    calib = CalibrationSet({"x": _smooth_images(rng, calib_images, c, 12)}, source="test")
    h = collect_input_hessians(model, calib)["x"]
    assert h.shape == (c, 9, 9)
    held_out = _smooth_images(rng, 16, c, 12)
    err = {}
    for method in ("nearest", "gptq"):
        q = round_weight(fmt, w, wn.layout, method, hessian=node_hessian(wn, {"x": h}))
        err[method] = _depthwise_error(w, dequantize(q).reshape(w.shape), held_out)
    assert err["gptq"].sum() < 0.8 * err["nearest"].sum(), (err["gptq"].sum(), err["nearest"].sum())
    assert np.mean(err["gptq"] <= err["nearest"] * 1.0001) > 0.8


def _depthwise_error(w: np.ndarray, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per channel ``‖(Q−W)∗x‖²`` (independent reference: ``conv2d`` with ``groups``)."""
    xt = torch.from_numpy(x).double()
    c = w.shape[0]
    y = torch.nn.functional.conv2d(xt, torch.from_numpy(w).double(), padding=1, groups=c)
    yq = torch.nn.functional.conv2d(xt, torch.from_numpy(q).double(), padding=1, groups=c)
    return ((yq - y) ** 2).sum(dim=(0, 2, 3)).numpy()


def _output_error(w: np.ndarray, q: np.ndarray, x: np.ndarray, pads: list[int]) -> float:
    xt = torch.nn.functional.pad(torch.from_numpy(x).double(), pads)
    y = torch.nn.functional.conv2d(xt, torch.from_numpy(w).double())
    yq = torch.nn.functional.conv2d(xt, torch.from_numpy(q).double())
    return float(((yq - y) ** 2).sum() / (y**2).sum())


@pytest.mark.parametrize(
    ("kernel", "fmt", "calib_images"),
    [
        (1, "int4_b128", 1),  # 16 calibration rows for K = 96 inputs: the raw XᵀX has rank 16
        (1, "int4_pc", 1),
        (1, "int4_b128", 2),
        (3, "int4_b128", 1),  # 3×3: K = 864, 16 rows
        (3, "int4_b128", 16),  # 256 rows for K = 864
    ],
)
def test_gptq_never_loses_to_nearest_on_new_images(kernel: int, fmt: str, calib_images: int) -> None:
    rng = np.random.default_rng(SEED)
    cin, cout = 96, 32
    mix = _mix(rng, cin)
    w = (rng.standard_normal((cout, cin, kernel, kernel)) * 0.05).astype(np.float32)
    pad = kernel // 2
    model = _conv_model(w, f"pads: ints = [{pad}, {pad}, {pad}, {pad}]")
    wn = find_weight_nodes(model)[0]
    calib = CalibrationSet({"x": _images(rng, calib_images, cin, 4, mix)}, source="test")
    held_out = _images(rng, 16, cin, 4, mix)
    err = {}
    for name, h in (
        ("nearest", None),
        ("gptq", collect_input_hessians(model, calib)["x"]),
        ("gptq_raw", collect_input_hessians(model, calib, shrink=False)["x"]),
    ):
        q = round_weight(fmt, w, wn.layout, "nearest" if h is None else "gptq", hessian=h)
        err[name] = _output_error(w, dequantize(q).reshape(w.shape), held_out, [pad] * 4)
    assert err["gptq"] < 0.85 * err["nearest"], err
    # what the shrinkage fixes: with the raw mean of the calibration rows GPTQ fits those images and
    # loses to nearest rounding on new ones (as on EfficientNet-Lite0's classifier and deep 1×1 Convs)
    assert err["gptq_raw"] > err["nearest"], err


@pytest.mark.parametrize("fmt", ["int4_pc", "int4_b32", "int4_asym_b32", "fp8_e4m3"])
@pytest.mark.parametrize("act_order", [True, False])
def test_grouped_gptq_is_gptq_per_group(fmt: str, act_order: bool) -> None:
    """``[G, K, K]``: each group of output channels is rounded exactly as the plain ``[K, K]`` GPTQ of
    that group's channels alone (same scales, same codes)."""
    from lpcompile.rounding import RoundingConfig

    rng = np.random.default_rng(SEED)
    groups, per, k = 4, 3, 18
    hs = []
    for _ in range(groups):
        x = rng.standard_normal((60, k)) @ rng.standard_normal((k, k))
        hs.append(x.T @ x / 60)
    h = np.stack(hs)
    h[2, :, 5] = h[2, 5, :] = 0.0  # a dead input in one group
    w = (rng.standard_normal((groups * per, 2, 3, 3)) * 0.1).astype(np.float32)
    layout = WeightLayout(channel_axis=0, reduction_axis=1)
    cfg = RoundingConfig(act_order=act_order, block=8)
    q = dequantize(round_weight(fmt, w, layout, "gptq", hessian=h, config=cfg)).reshape(w.shape)
    for g in range(groups):
        sl = slice(g * per, (g + 1) * per)
        ref = dequantize(round_weight(fmt, w[sl], layout, "gptq", hessian=h[g], config=cfg)).reshape(w[sl].shape)
        np.testing.assert_allclose(q[sl], ref, rtol=0, atol=1e-6 * np.abs(ref).max())

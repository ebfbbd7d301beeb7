"""Format references against ml_dtypes, on all codes, random and adversarial data."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lpcompile.errors import FormatError
from lpcompile.formats import (
    CONV_LAYOUT,
    FLOAT_SPECS,
    MATMUL_LAYOUT,
    canonical_name,
    dequantize,
    format_names,
    get_format,
    parse_format_list,
    qdq_activation,
    qdq_weight,
    quantize_weight,
    round_to_float,
)

FP8 = [("float8_e4m3fn", ml_dtypes.float8_e4m3fn), ("float8_e5m2", ml_dtypes.float8_e5m2)]
ADVERSARIAL = np.array(
    [
        0.0,
        -0.0,
        1e-45,
        -1e-45,
        1e-40,
        2.0**-10,
        2.0**-7,
        2.0**-9,
        1.0,
        -1.0,
        447.9,
        448.0,
        464.0,
        500.0,
        -1000.0,
        1000.0,
        57344.0,
        60000.0,
        65504.0,
        1e30,
        np.inf,
        -np.inf,
        np.nan,
        3.0e-8,
        6.1e-5,
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize(("element", "dtype"), FP8)
def test_every_fp8_code_round_trips(element: str, dtype: type) -> None:
    codes = np.arange(256, dtype=np.uint8).view(dtype)
    values = codes.astype(np.float32)
    back = round_to_float(values, element)
    finite = np.isfinite(values)
    # every finite code is reproduced bit-exactly (including -0 and subnormals)
    assert np.array_equal(back.view(np.uint8)[finite], codes.view(np.uint8)[finite])
    assert np.all(np.isnan(back.astype(np.float32)[np.isnan(values)]))


@pytest.mark.parametrize(("element", "dtype"), FP8)
def test_fp8_random_and_adversarial_match_ml_dtypes(element: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    spec = FLOAT_SPECS[element]
    x = np.concatenate([rng.normal(0, 30, 5000), rng.normal(0, 1e-3, 5000), ADVERSARIAL]).astype(np.float32)
    ours = round_to_float(x, element).astype(np.float32)
    clipped = np.where(np.isnan(x), x, np.clip(x, -spec.max_value, spec.max_value)).astype(np.float32)
    ref = clipped.astype(dtype).astype(np.float32)
    assert np.array_equal(ours, ref, equal_nan=True)
    # saturation: no inf ever, ±max for out-of-range
    assert not np.any(np.isinf(ours))
    # 1000 saturates to 448 in E4M3FN and rounds to the nearest E5M2 value, 1024
    assert ours[x == 1000.0][0] == {"float8_e4m3fn": 448.0, "float8_e5m2": 1024.0}[element]


@pytest.mark.parametrize("element", ["bfloat16", "float16"])
def test_16bit_rounding_is_ml_dtypes_rne_within_half_ulp(element: str) -> None:
    rng = np.random.default_rng(1)
    spec = FLOAT_SPECS[element]
    x = np.concatenate([rng.normal(0, 100, 20000), ADVERSARIAL[np.isfinite(ADVERSARIAL)]]).astype(np.float32)
    x = x[np.abs(x) < spec.max_value]
    ours = round_to_float(x, element).astype(np.float64)
    assert np.array_equal(ours, x.astype(spec.np_dtype).astype(np.float64))
    # half-ULP bound derived from the format
    ax = np.maximum(np.abs(x.astype(np.float64)), 2.0**spec.min_exponent)
    half_ulp = 0.5 * np.exp2(np.floor(np.log2(ax)) - spec.mantissa_bits)
    assert np.all(np.abs(ours - x) <= half_ulp)


@pytest.mark.parametrize("name", ["int8", "int4_b32", "int4_b64", "int4_b128"])
@pytest.mark.parametrize("shape", [(256, 64), (100, 10), (7, 3)])
def test_int_error_within_half_scale(name: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=shape).astype(np.float32)
    w[0, 0] = 1000.0
    w[1, :] = 0.0
    q = quantize_weight(name, w, MATMUL_LAYOUT)
    lo, hi = (-128, 127) if name == "int8" else (-8, 7)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    deq = dequantize(q)
    fmt = get_format(name)
    if fmt.block_size:
        scale = np.repeat(q.scale.astype(np.float32), q.block_size, axis=0)[: shape[0]]
        # decode rounds codes*scale to fp16: allow that half-ULP on top of scale/2
        tol = scale / 2 + np.abs(deq) * 2.0**-11
    else:
        scale = np.broadcast_to(q.scale.reshape(1, -1), shape)
        tol = scale / 2 * (1 + 1e-6)
    assert np.all(np.abs(deq - w) <= tol)
    assert np.all(deq[1, :] == 0.0)


def test_int4_scales_are_fp16_and_blocked_along_reduction_axis() -> None:
    w = np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32)
    q = quantize_weight("int4_b128", w, MATMUL_LAYOUT)
    assert q.scale.dtype == np.float16 and q.scale.shape == (3, 8) and q.axis == 0 and q.block_size == 128
    conv = np.random.default_rng(3).normal(size=(16, 8, 3, 3)).astype(np.float32)
    qc = quantize_weight("int4_b32", conv, CONV_LAYOUT)
    assert qc.axis == 1 and qc.block_size == 8 and qc.scale.shape == (16, 1, 3, 3)


def test_bits_include_scale_overhead() -> None:
    assert get_format("int4_b128").bits_for((4096, 4096), MATMUL_LAYOUT) == pytest.approx(4.125)
    assert get_format("int4_b32").bits_for((4096, 4096), MATMUL_LAYOUT) == pytest.approx(4.5)
    assert get_format("int8").bits_for((384, 1536), MATMUL_LAYOUT) == pytest.approx(8 + 32 / 384)
    assert get_format("fp8_e4m3").bits_for((384, 1536), MATMUL_LAYOUT) == pytest.approx(8 + 32 / 384)
    assert get_format("bf16").bits_for((10, 10), MATMUL_LAYOUT) == 16.0
    assert get_format("fp32").bits_for((10, 10), MATMUL_LAYOUT) == 32.0
    # a ragged last block still costs a whole scale
    assert get_format("int4_b128").bits_for((130, 1), MATMUL_LAYOUT) == pytest.approx(4 + 2 * 16 / 130)


def test_fp8_weight_per_channel_reference() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.05, size=(64, 16)).astype(np.float32)
    q = quantize_weight("fp8_e4m3", w, MATMUL_LAYOUT)
    assert q.codes.dtype == ml_dtypes.float8_e4m3fn and q.scale.shape == (16,)
    amax = np.abs(w).max(axis=0)
    assert np.allclose(np.abs(q.codes.astype(np.float32)).max(axis=0), 448.0)
    assert np.allclose(q.scale, amax / 448.0)
    expected = (w / q.scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * q.scale
    assert np.array_equal(dequantize(q), expected.astype(np.float32))


def test_stochastic_rounding_is_unbiased_and_seeded() -> None:
    x = np.full(200_000, 0.3, dtype=np.float32)
    for element in ("bfloat16", "float8_e4m3fn", "float16"):
        r = round_to_float(x, element, "stochastic", np.random.default_rng(5)).astype(np.float64)
        vals = np.unique(r)
        assert len(vals) == 2  # only the two neighbours
        # mean error → 0: within 5 standard errors of the Bernoulli mean
        spread = vals[1] - vals[0]
        assert abs(r.mean() - 0.3) < 5 * spread * 0.5 / np.sqrt(x.size)
    w = np.random.default_rng(6).normal(size=(256, 32)).astype(np.float32)
    a = qdq_weight("int4_b32", w, MATMUL_LAYOUT, "stochastic", seed=7)
    b = qdq_weight("int4_b32", w, MATMUL_LAYOUT, "stochastic", seed=7)
    assert np.array_equal(a, b)
    errs = [qdq_weight("int8", w, MATMUL_LAYOUT, "stochastic", seed=s) - w for s in range(40)]
    mean_err = np.mean(errs, axis=0)
    scale = np.abs(w).max(axis=0) / 127
    # per-element mean over 40 draws: |mean| < 5σ with σ ≤ scale/2/sqrt(40)
    assert np.all(np.abs(mean_err) < 5 * scale / 2 / np.sqrt(40))


def test_activation_qdq_fp8_and_casts() -> None:
    x = np.array([0.0, 1.0, -3.5, 1000.0, 1e-9], dtype=np.float32)
    out = qdq_activation(x, "float8_e4m3fn", scale=1000.0 / 448.0)
    assert np.all(np.isfinite(out)) and abs(out[3] - 1000.0) < 1e-3
    assert np.array_equal(qdq_activation(x, "bfloat16"), x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_names_and_aliases() -> None:
    assert canonical_name("int4") == "int4_b128"
    assert parse_format_list("fp8_e4m3, int8,int4,bf16,int4") == ("fp8_e4m3", "int8", "int4_b128", "bf16")
    assert "fp8_e5m2" in format_names()
    with pytest.raises(FormatError, match="unknown format"):
        get_format("int3")


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True),
    ),
    st.sampled_from(["int8", "int4_b32", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"]),
)
def test_property_qdq_is_idempotent_and_bounded(w: np.ndarray, name: str) -> None:
    once = qdq_weight(name, w, MATMUL_LAYOUT)
    assert np.all(np.isfinite(once))
    amax = np.abs(w).max()
    assert np.abs(once).max() <= amax * (1 + 2.0**-3) + 1e-30
    if name in ("bf16", "fp16"):
        assert np.array_equal(qdq_weight(name, once, MATMUL_LAYOUT), once)

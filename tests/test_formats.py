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
    weight_rounding_key,
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
        get_format("int9")  # int3 is a grammar name now (3-bit ints per channel)


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


# ---------------------------------------------------------------------------------------------
# The format grammar (lpcompile.format_grammar): parsing, bits, bit-exact references per family
# ---------------------------------------------------------------------------------------------

from lpcompile import format_grammar as fg  # noqa: E402
from lpcompile.formats import is_classic  # noqa: E402

GRAMMAR_FAMILIES = (
    "int3_b32",
    "int6_pc",
    "int4_asym_b64",
    "int8_asym",
    "int2_asym_b16_sbf16",
    "mxfp4",
    "mxfp6_e2m3",
    "mxfp6_e3m2",
    "mxfp8_e4m3",
    "mxint8",
    "nvfp4",
    "nf4",
    "e2m1_b32_sfp16",
    "e4m3_b128_sbf16",
)


@pytest.mark.parametrize(
    ("name", "canon"),
    [
        ("int4_b128", "int4_b128"),
        ("INT8_PC", "int8"),
        ("e4m3_pc_ae4m3", "fp8_e4m3"),
        ("mxfp4", "e2m1_b32_se8m0"),
        ("nvfp4", "e2m1_b16_se4m3_t32"),
        ("nf4", "nf4_b64"),
        ("uint4_b128", "int4_asym_b128"),
        ("int8_asym", "int8_asym_pc"),
        ("w4a8", "int4_b128_ae4m3"),
        ("int4_b256", "int4_b256"),
        ("int4_b64_sfp16", "int4_b64"),
    ],
)
def test_grammar_canonical_names(name: str, canon: str) -> None:
    assert canonical_name(name) == canon
    assert get_format(name).name == canon


def test_registry_entries_unchanged_by_grammar() -> None:
    assert get_format("int8_pc") is get_format("int8")
    assert get_format("e4m3_pc_ae4m3") is get_format("fp8_e4m3")
    assert get_format("e4m3_pc").activation is None  # weight-only FP8 is a different recipe
    assert all(is_classic(get_format(n)) for n in format_names())


@pytest.mark.parametrize(
    "bad",
    [
        "int9",
        "int1_b32",
        "e3m3_b32",
        "mxfp4_pc",
        "nf4",
        "e2m1",
        "int4_b0",
        "int4_b32_pc",
        "int4_sfp8",
        "e2m1_b32_sfp32_t32",
        "int4_b32_q",
        "e2m1_asym_b32",
        "hello",
    ],
)
def test_grammar_errors_are_format_errors(bad: str) -> None:
    if bad == "nf4":  # the short name has a default block; the bare element does not need one
        get_format(bad)
        with pytest.raises(FormatError):
            fg.parse("nf4_pc")
        return
    with pytest.raises(FormatError):
        get_format(bad)


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("mxfp4", 4.25),
        ("mxfp6_e2m3", 6.25),
        ("mxfp8_e4m3", 8.25),
        ("nf4", 4.25),
        ("int4_asym_b128", 4 + 20 / 128),
        ("int3_b32", 3.5),
        ("e2m1_b32_sbf16", 4.5),
    ],
)
def test_grammar_bits_count_every_stored_bit(name: str, bits: float) -> None:
    f = get_format(name)
    shape = (1024, 64)
    assert f.nominal_bits == pytest.approx(bits)
    assert f.bits_for(shape, MATMUL_LAYOUT) == pytest.approx(bits)
    nv = get_format("nvfp4")
    assert nv.bits_for(shape, MATMUL_LAYOUT) == pytest.approx(4.5 + 32 / (1024 * 64))


@pytest.mark.parametrize(("key", "dtype"), [(m.key, m.np_dtype) for m in fg.MINIFLOATS.values()])
def test_minifloat_code_tables_match_ml_dtypes(key: str, dtype: type) -> None:
    """Every bit pattern's value (the portable decode's Gather table) equals ml_dtypes' decode."""
    table = fg.code_table(key)
    bits = fg.element_bits(key)
    ref = np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(table[finite], ref[finite])
    # every finite value encodes back to its own pattern (−0 and +0 both decode to 0)
    codes = fg.to_codes(ref[finite].astype(dtype), key)
    np.testing.assert_array_equal(table[codes], ref[finite])


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3"])
def test_mx_formats_match_ml_dtypes_cast(name: str) -> None:
    """MX: scale 2^(floor(log2 amax) − emax) as an E8M0 code; codes = saturating ml_dtypes cast of w/scale."""
    f = get_format(name)
    mf = fg.BY_ELEMENT[f.element]
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 24)) * np.exp(rng.uniform(-6, 6, (1, 24)))).astype(np.float32)
    q = quantize_weight(f, w, MATMUL_LAYOUT)
    assert q.scale.dtype == ml_dtypes.float8_e8m0fnu and q.scale.shape == (8, 24)
    blocks = w.reshape(8, 32, 24).astype(np.float64)
    amax = np.abs(blocks).max(axis=1)
    scale = np.exp2(np.floor(np.log2(amax)) - mf.emax)
    np.testing.assert_array_equal(q.scale.astype(np.float64), scale)
    expect = np.clip(blocks / scale[:, None, :], -mf.max_value, mf.max_value).astype(np.float32).astype(mf.np_dtype)
    np.testing.assert_array_equal(q.codes.astype(np.float32), expect.reshape(256, 24).astype(np.float32))
    np.testing.assert_array_equal(dequantize(q), (expect.astype(np.float64) * scale[:, None, :]).reshape(256, 24))


def test_nvfp4_two_level_scales() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    q = quantize_weight("nvfp4", w, MATMUL_LAYOUT)
    big = float(np.abs(w).max())
    assert q.tensor_scale == pytest.approx(big / (448 * 6), rel=2**-23)
    assert q.scale.dtype == ml_dtypes.float8_e4m3fn and q.scale.shape == (4, 16)
    dq = dequantize(q)
    # each element's error is at most half a step of E2M1 at its block scale, or the saturation margin
    blk_s = q.scale.astype(np.float64) * q.tensor_scale
    full = np.repeat(blk_s, 16, axis=0)
    assert np.all(np.abs(dq - w) <= full * 1.0 + np.abs(w) * 2**-3 + 1e-12)
    assert np.corrcoef(dq.ravel(), w.ravel())[0, 1] > 0.99


def test_asymmetric_ints_zero_exact_and_half_step() -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((128, 8)) + 0.7).astype(np.float32)
    w[5, 3] = 0.0
    for name in ("int4_asym_b32", "int8_asym", "int2_asym_b16_sbf16"):
        f = get_format(name)
        q = quantize_weight(f, w, MATMUL_LAYOUT)
        lo, hi = fg.int_range(f.element)
        assert q.codes.min() >= lo and q.codes.max() <= hi and q.zero_point is not None
        dq = dequantize(q)
        assert dq[5, 3] == 0.0  # zero is exactly representable (integer zero point)
        if f.scale == "per_block":
            s = np.repeat(q.scale.astype(np.float32), f.block_size, axis=0)
        else:
            s = q.scale.astype(np.float32)[None, :]
        tol = s / 2 * (1 + 2**-7) + np.abs(w) * 2**-8  # half a step (+ bf16 rounding of the product)
        assert np.all(np.abs(dq - w) <= tol)


def test_nf4_codes_are_nearest_codebook_entries() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((128, 4)).astype(np.float32)
    q = quantize_weight("nf4", w, MATMUL_LAYOUT)
    s = np.repeat(q.scale.astype(np.float64), 64, axis=0)
    table = np.asarray(fg.NF4_TABLE)
    x = w / s
    best = np.abs(x[..., None] - table).min(axis=-1)
    np.testing.assert_allclose(np.abs(x - table[q.codes]), best, atol=1e-6)
    np.testing.assert_array_equal(
        dequantize(q), (table[q.codes] * s).astype(np.float32).astype(np.float16).astype(np.float32)
    )


@pytest.mark.parametrize("name", GRAMMAR_FAMILIES)
def test_grammar_adversarial(name: str) -> None:
    w = np.tile(ADVERSARIAL[:, None], (1, 3))
    w = np.concatenate([w, np.zeros((7, 3), np.float32)], axis=0)  # 32 rows
    q = quantize_weight(name, w, MATMUL_LAYOUT)
    dq = dequantize(q)
    assert dq.shape == w.shape
    assert np.all(dq[-7:] == 0.0)
    assert not np.any(np.isnan(dq))
    zero_block = np.zeros((64, 2), np.float32)
    assert np.all(dequantize(quantize_weight(name, zero_block, MATMUL_LAYOUT)) == 0.0)


@pytest.mark.parametrize("name", GRAMMAR_FAMILIES)
def test_grammar_conv_layout_and_shapes(name: str) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 40, 3, 3)).astype(np.float32)
    f = get_format(name)
    q = quantize_weight(f, w, CONV_LAYOUT)
    dq = dequantize(q)
    assert dq.shape == w.shape and np.all(np.isfinite(dq))
    assert np.corrcoef(dq.ravel(), w.ravel())[0, 1] > 0.75  # 2-bit grids are coarse, yet correlated
    assert f.num_scales(w.shape, CONV_LAYOUT) == int(np.prod(q.scale.shape))


def test_rounding_suffix_makes_a_candidate() -> None:
    from lpcompile.formats import split_candidate

    assert canonical_name("int4:GPTQ") == "int4_b128:gptq"
    assert canonical_name("mxfp4:mse") == "e2m1_b32_se8m0:mse"
    assert canonical_name("int8:nearest") == "int8"
    assert get_format("int4_b64:gptq") is get_format("int4_b64")
    assert split_candidate("int4_b64:rtn") == ("int4_b64", "rtn")
    assert split_candidate("int4_b64") == ("int4_b64", None)
    assert parse_format_list("int4_b128:gptq,int4_b128,int8:mse") == ("int4_b128:gptq", "int4_b128", "int8:mse")
    with pytest.raises(FormatError, match="unknown rounding"):
        canonical_name("int4:fancy")


def test_formats_differing_in_activations_only_share_their_weight_rounding() -> None:
    """The analysis rounds a weight once per rounding key: equal keys must write the same weights."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    w[0, 0], w[1, 1] = np.nan, np.inf
    names = format_names()
    for a in names:
        for b in names:
            same = weight_rounding_key(get_format(a)) == weight_rounding_key(get_format(b))
            if a == b or not same:
                continue
            qa, qb = qdq_weight(a, w, MATMUL_LAYOUT), qdq_weight(b, w, MATMUL_LAYOUT)
            np.testing.assert_array_equal(qa, qb)
    key = weight_rounding_key
    assert key(get_format("int8")) == key(get_format("w8a8_dyn")) == key(get_format("w8a8"))
    assert key(get_format("bf16")) == key(get_format("bf16w")) != key(get_format("fp16w"))
    assert len({key(get_format(f"int4_b{b}")) for b in (32, 64, 128)}) == 3
    assert key(get_format("fp8_e4m3")) != key(get_format("fp8_e5m2"))


@pytest.mark.parametrize("rows", [128, 100])  # blocks that tile the reduction axis, and a padded last block
def test_blocked_int4_matches_the_expanded_scale_formula(rows: int) -> None:
    """Codes and decoded weights of per-block int4 equal the formula with the scales expanded element by
    element (the broadcast over blocks is an implementation detail)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((rows, 16)) * 3).astype(np.float32)
    w[5, 3] = 0.0
    q = quantize_weight("int4_b32", w, MATMUL_LAYOUT)
    full = np.repeat(q.scale.astype(np.float32), 32, axis=0)[:rows]
    expect = np.clip(np.rint(w / full), -8, 7)  # float32 division, as QuantizeLinear divides
    np.testing.assert_array_equal(q.codes, expect.astype(np.int8))
    decoded = (q.codes.astype(np.float32) * full).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(dequantize(q).reshape(w.shape), decoded)

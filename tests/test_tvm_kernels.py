"""lpcompile's TIR kernels on llvm against numpy / ml_dtypes references.

Tolerances:

* element codecs (FP8 quantization, bf16/fp16 rounding, Q→DQ, Cast round trips): **bit-exact**
  against ml_dtypes (``formats.round_to_float`` / ``qdq_activation``), which ONNX Runtime matches;
* GEMMs: every product of two stored values is exact in float32 (FP8: 4×4 significant bits,
  bf16: 8×8, fp16: 11×11; the int4 kernel multiplies by the exactly decoded weight), so the only
  error is the float32 accumulation (and one rounding per scale multiply). Against a float64
  reference of the *same* stored values the bound is ``(K + 3)·u·Σ|a·w|`` with ``u = 2⁻²⁴``
  (standard recursive-summation bound ``γ_K``, plus the scale multiplications).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from lpcompile.formats import MATMUL_LAYOUT, dequantize, get_format, qdq_activation, quantize_weight, round_to_float
from lpcompile.runtime.tvm.kernels import fp8_matmul, half_matmul, int4_matmul, mma
from lpcompile.runtime.tvm.kernels.common import fp8_table

U = 2.0**-24


def _gamma_ok(got: np.ndarray, ref: np.ndarray, absprod: np.ndarray, k: int) -> None:
    bound = (k + 3) * U * absprod + 1e-30
    excess = np.abs(got.astype(np.float64) - ref) / bound
    assert np.max(excess) <= 1.0, f"error {np.max(excess):.3f}× the γ_K bound"


# ----------------------------------------------------------------------------------------------
# numpy-only pieces (no TVM needed)
# ----------------------------------------------------------------------------------------------


def test_int4_packing_round_trip() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(37, 5))
    packed = int4_matmul.pack_weight(codes)
    assert packed.dtype == np.uint32 and packed.shape == (5, int4_matmul.padded_words(37))
    nib = (packed[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    u = nib.reshape(5, -1).astype(np.int16) - 8
    assert np.array_equal(u[:, :37], codes.T)
    assert np.all(u[:, 37:] == 0)  # padding decodes to weight 0


def test_matmul_nbits_repack_matches_qdq_packing() -> None:
    from lpcompile.passes.quantize_weights import pack_matmul_nbits

    rng = np.random.default_rng(1)
    w = rng.standard_normal((80, 6)).astype(np.float32)
    fmt = dataclasses.replace(get_format("int4_b32"), block_size=32)
    q = quantize_weight(fmt, w, MATMUL_LAYOUT)
    b, _ = pack_matmul_nbits(q)
    assert np.array_equal(int4_matmul.repack_matmul_nbits(b, 80, 6, 32), int4_matmul.pack_weight(q.codes))


@pytest.mark.parametrize("m, n, k", [(64, 64, 64), (70, 40, 128), (5, 130, 64)])
def test_mma_fragment_maps_compute_the_product(m: int, n: int, k: int) -> None:
    """The tensor-core kernel's tiling and PTX fragment maps, replayed in numpy, give A·Bᵀ."""
    rng = np.random.default_rng(m + n)
    a = rng.integers(-3, 4, size=(m, k)).astype(np.float64)
    b = rng.integers(-3, 4, size=(n, k)).astype(np.float64)
    for per_word in (2, 4):
        assert np.array_equal(mma.simulate_mma_gemm(a, b, per_word), a @ b.T)


def test_fragment_maps_cover_each_tile_once() -> None:
    a = {mma.fragment_a(lane, r) for lane in range(32) for r in range(4)}
    b = {mma.fragment_b(lane, r) for lane in range(32) for r in range(2)}
    c = {mma.fragment_c(lane, i) for lane in range(32) for i in range(4)}
    assert a == {(i, w) for i in range(16) for w in range(8)}
    assert b == {(j, w) for j in range(8) for w in range(8)}
    assert c == {(i, j) for i in range(16) for j in range(8)}


# ----------------------------------------------------------------------------------------------
# compiled kernels (llvm)
# ----------------------------------------------------------------------------------------------

tvm = pytest.importorskip("tvm")


def _compile(funcs: dict[str, object]) -> object:
    from lpcompile.runtime.tvm.kernels.common import as_target

    return tvm.compile(tvm.IRModule(funcs), target=as_target("llvm"))


def _t(a: np.ndarray) -> object:
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _special_values(rng: np.random.Generator, n: int) -> np.ndarray:
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-22, 14, n))).astype(np.float32)
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    ties = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)  # midpoints: round-half-even cases
    extra = np.array([0.0, -0.0, np.inf, -np.inf, 448.0, 464.0, 480.0, 1e30, 2**-9, 2**-10, 3 * 2**-10], np.float32)
    return np.concatenate([x, ties, -ties, extra]).astype(np.float32)


@pytest.mark.tvm
@pytest.mark.parametrize("element", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_quantize_and_qdq_are_bit_exact(element: str) -> None:
    rng = np.random.default_rng(2)
    x = _special_values(rng, 3000)
    k = 64
    x = np.concatenate([x, np.zeros((-x.size) % k, np.float32)]).reshape(-1, k)
    scale = np.float32(0.75)
    ex = _compile(
        {
            "qp": fp8_matmul.quantize_pack_primfunc(k, element, "llvm", "qp"),
            "qdq": fp8_matmul.qdq_primfunc(element, "llvm", "qdq"),
        }
    )
    q = _t(np.zeros((x.shape[0], fp8_matmul.padded_words(k)), np.uint32))
    ex["qp"](_t(x), _t(np.array([scale])), q)
    codes = q.numpy().view(np.uint8)[:, :k]
    ref = round_to_float(x / scale, element).view(np.uint8)
    assert np.array_equal(codes, ref)
    y = _t(np.zeros(x.size, np.float32))
    ex["qdq"](_t(x.reshape(-1)), _t(np.array([scale])), _t(fp8_table(element)), y)
    assert np.array_equal(y.numpy(), qdq_activation(x, element, float(scale)).reshape(-1))


@pytest.mark.tvm
@pytest.mark.parametrize("element", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_matmul_accumulates_exact_products(element: str) -> None:
    rng = np.random.default_rng(3)
    m, k, n = 7, 100, 19
    np_t = ml_dtypes.float8_e4m3fn if element == "float8_e4m3fn" else ml_dtypes.float8_e5m2
    a = rng.standard_normal((m, k)).astype(np.float32).astype(np_t)
    w = (rng.standard_normal((n, k)) * 4).astype(np.float32).astype(np_t)
    sa = np.array([0.37], np.float32)
    sw = rng.uniform(0.1, 2.0, n).astype(np.float32)
    ex = _compile({"mm": fp8_matmul.matmul_primfunc(k, n, element, "llvm", "mm")})
    y = _t(np.zeros((m, n), np.float32))
    ex["mm"](
        _t(fp8_matmul.pack_weight(a, element)),
        _t(fp8_matmul.pack_weight(w, element)),
        _t(sa),
        _t(sw),
        _t(fp8_table(element)),
        y,
    )
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    scale = float(sa[0]) * sw.astype(np.float64)
    _gamma_ok(y.numpy(), (a64 @ w64.T) * scale, (np.abs(a64) @ np.abs(w64).T) * scale, k)


@pytest.mark.tvm
@pytest.mark.parametrize("element", ["bfloat16", "float16"])
def test_half_round_and_matmul(element: str) -> None:
    rng = np.random.default_rng(4)
    m, k, n = 6, 90, 11
    np_t = ml_dtypes.bfloat16 if element == "bfloat16" else np.float16
    x = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-30, 10, (m, k)))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, np.inf, -np.inf]
    w = rng.standard_normal((n, k)).astype(np.float32).astype(np_t)
    one = _t(np.ones(1, np.float32))
    ex = _compile(
        {
            "rp": half_matmul.round_pack_primfunc(k, element, "llvm", "rp"),
            "rt": half_matmul.round_trip_primfunc(element, "llvm", "rt"),
            "mm": half_matmul.matmul_primfunc(k, n, element, "llvm", "mm"),
        }
    )
    h = _t(np.zeros((m, half_matmul.padded_words(k)), np.uint32))
    ex["rp"](_t(x), one, h)
    with np.errstate(over="ignore"):
        ref = x.astype(np_t)
    assert np.array_equal(h.numpy().view(np.uint16)[:, :k], ref.view(np.uint16))
    rt = _t(np.zeros(x.size, np.float32))
    ex["rt"](_t(x.reshape(-1)), one, rt)
    assert np.array_equal(rt.numpy(), ref.astype(np.float32).reshape(-1))
    # matmul on finite rounded activations
    xa = np.nan_to_num(ref.astype(np.float32), posinf=1.0, neginf=-1.0).astype(np_t)
    ex["rp"](_t(xa.astype(np.float32)), one, h)
    y = _t(np.zeros((m, n), np.float32))
    ex["mm"](h, _t(half_matmul.pack_weight(w, element)), one, _t(np.ones(n, np.float32)), y)
    a64, w64 = xa.astype(np.float64), w.astype(np.float64)
    _gamma_ok(y.numpy(), a64 @ w64.T, np.abs(a64) @ np.abs(w64).T, k)


@pytest.mark.tvm
@pytest.mark.parametrize("k, n, block", [(64, 10, 64), (200, 13, 32), (9, 5, 1), (256, 24, 128)])
def test_int4_matmul_matches_dequantize_linear(k: int, n: int, block: int) -> None:
    """fp16 scales: weights are fp16(code·scale) exactly as DequantizeLinear(fp16) → Cast."""
    rng = np.random.default_rng(k + n)
    fmt = dataclasses.replace(get_format("int4_b32"), block_size=block)
    q = quantize_weight(fmt, rng.standard_normal((k, n)).astype(np.float32), MATMUL_LAYOUT)
    w64 = dequantize(q).astype(np.float64)
    ex = _compile({"i4": int4_matmul.matmul_primfunc(k, n, q.block_size, "llvm", "i4", scale_dtype="float16")})
    for m in (1, 5):  # one compiled kernel, any batch (symbolic M)
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = _t(np.zeros((m, n), np.float32))
        ex["i4"](_t(x), _t(int4_matmul.pack_weight(q.codes)), _t(int4_matmul.pack_scales(q.scale, n, "float16")), y)
        x64 = x.astype(np.float64)
        _gamma_ok(y.numpy(), x64 @ w64, np.abs(x64) @ np.abs(w64), k)


@pytest.mark.tvm
def test_int4_matmul_fp32_scales_and_half_activations() -> None:
    """fp32 scales (MatMulNBits): weight = code·scale in fp32; fp16 activations are widened exactly."""
    rng = np.random.default_rng(5)
    k, n, block, m = 96, 7, 32, 3
    codes = rng.integers(-8, 8, size=(k, n))
    scale = rng.uniform(0.01, 0.1, size=(k // block, n)).astype(np.float32)
    w64 = (codes * np.repeat(scale, block, axis=0).astype(np.float32)).astype(np.float32).astype(np.float64)
    x = rng.standard_normal((m, k)).astype(np.float16)
    ex = _compile(
        {"i4": int4_matmul.matmul_primfunc(k, n, block, "llvm", "i4", act_dtype="float16", scale_dtype="float32")}
    )
    y = _t(np.zeros((m, n), np.float32))
    ex["i4"](_t(x), _t(int4_matmul.pack_weight(codes)), _t(int4_matmul.pack_scales(scale, n, "float32")), y)
    x64 = x.astype(np.float64)
    _gamma_ok(y.numpy(), x64 @ w64, np.abs(x64) @ np.abs(w64), k)


@pytest.mark.tvm
def test_kernels_are_opaque_and_scheduled() -> None:
    f = int4_matmul.matmul_primfunc(64, 8, 32, "llvm", "i4")
    assert int(f.attrs["op_pattern"]) == 8
    assert bool(f.attrs["tirx.is_scheduled"])

"""lpcompile's CUDA kernels and lowered models on a real GPU (skipped without one).

Tolerances as in ``test_tvm_kernels.py``: codecs bit-exact; GEMMs within ``(K + 3)·u·Σ|a·w|`` of a
float64 reference of the same stored values (tensor-core MMAs accumulate in fp32; the int4 GEMV
multiplies exact codes and applies each block scale once per 8-element word, so its reference
weights are ``code·scale`` without the fp16 rounding of DequantizeLinear — that rounding, at
most 2⁻¹¹ relative per weight, is added to the bound when comparing with the ONNX semantics).
Lowered models: same bound as the llvm lowering tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from lpcompile.formats import MATMUL_LAYOUT, dequantize, get_format, quantize_weight, round_to_float  # noqa: E402
from lpcompile.runtime.tvm.kernels import fp8_matmul, half_matmul, int4_matmul  # noqa: E402
from lpcompile.runtime.tvm.kernels.common import cuda_target, fp8_table  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.tvm]

if not tvm.cuda(0).exist:
    pytest.skip("no CUDA device", allow_module_level=True)

U = 2.0**-24
DEV = tvm.cuda(0)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def _arch() -> str:
    major, minor = (int(v) for v in DEV.compute_version.split("."))
    return f"sm_{major}{minor}"


def _compile(funcs: dict[str, object]) -> object:
    return tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(cuda_target(_arch())))


def _t(a: np.ndarray) -> object:
    return tvm.runtime.tensor(np.ascontiguousarray(a), DEV)


def _within(got: np.ndarray, ref: np.ndarray, absprod: np.ndarray, k: int, extra: float = 0.0) -> None:
    bound = ((k + 3) * U + extra) * absprod + 1e-30
    ratio = float(np.max(np.abs(got.astype(np.float64) - ref) / bound))
    assert ratio <= 1.0, f"error {ratio:.3f}× the bound"


def _fp8_ok() -> bool:
    major, minor = (int(v) for v in DEV.compute_version.split("."))
    return major * 10 + minor >= 89


@pytest.mark.parametrize("element", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("m", [1, 100])
def test_fp8_quantize_and_gemm(element: str, m: int) -> None:
    if not _fp8_ok():
        pytest.skip("FP8 MMA needs sm_89+")
    rng = np.random.default_rng(m)
    k, n = 200, 72
    x = rng.standard_normal((m, k)).astype(np.float32)
    sa = np.array([0.02], np.float32)
    np_t = ml_dtypes.float8_e4m3fn if element == "float8_e4m3fn" else ml_dtypes.float8_e5m2
    w = (rng.standard_normal((n, k)) * 8).astype(np.float32).astype(np_t)
    sw = rng.uniform(0.5, 2, n).astype(np.float32)
    ex = _compile(
        {
            "qp": fp8_matmul.quantize_pack_primfunc(k, element, cuda_target(_arch()), "qp"),
            "mm": fp8_matmul.matmul_primfunc(k, n, element, cuda_target(_arch()), "mm"),
        }
    )
    q = _t(np.zeros((m, fp8_matmul.padded_words(k)), np.uint32))
    ex["qp"](_t(x), _t(sa), q)
    codes = q.numpy().view(np.uint8)[:, :k]
    assert np.array_equal(codes, round_to_float(x / sa[0], element).view(np.uint8))
    y = _t(np.zeros((m, n), np.float32))
    ex["mm"](q, _t(fp8_matmul.pack_weight(w, element)), _t(sa), _t(sw), y)
    a64 = codes.view(np_t).astype(np.float64)
    w64 = w.astype(np.float64)
    s = float(sa[0]) * sw.astype(np.float64)
    _within(y.numpy(), (a64 @ w64.T) * s, (np.abs(a64) @ np.abs(w64).T) * s, k)


@pytest.mark.parametrize("element", ["bfloat16", "float16"])
def test_half_round_and_gemm(element: str) -> None:
    rng = np.random.default_rng(7)
    m, k, n = 70, 136, 100
    np_t = ml_dtypes.bfloat16 if element == "bfloat16" else np.float16
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32).astype(np_t)
    ex = _compile(
        {
            "rp": half_matmul.round_pack_primfunc(k, element, cuda_target(_arch()), "rp"),
            "mm": half_matmul.matmul_primfunc(k, n, element, cuda_target(_arch()), "mm"),
        }
    )
    one = _t(np.ones(1, np.float32))
    h = _t(np.zeros((m, half_matmul.padded_words(k)), np.uint32))
    ex["rp"](_t(x), one, h)
    assert np.array_equal(h.numpy().view(np.uint16)[:, :k], x.astype(np_t).view(np.uint16))
    y = _t(np.zeros((m, n), np.float32))
    ex["mm"](h, _t(half_matmul.pack_weight(w, element)), one, _t(np.ones(n, np.float32)), y)
    a64, w64 = x.astype(np_t).astype(np.float64), w.astype(np.float64)
    _within(y.numpy(), a64 @ w64.T, np.abs(a64) @ np.abs(w64).T, k)


@pytest.mark.parametrize("rows", [1, 4, None])
@pytest.mark.parametrize("act", ["float32", "float16"])
def test_int4_gemv_and_gemm(rows: int | None, act: str) -> None:
    rng = np.random.default_rng(11)
    k, n, block = 640, 200, 128
    m = rows or 150
    fmt = dataclasses.replace(get_format("int4_b128"), block_size=block)
    q = quantize_weight(fmt, rng.standard_normal((k, n)).astype(np.float32), MATMUL_LAYOUT)
    x = rng.standard_normal((m, k)).astype(np.float16 if act == "float16" else np.float32)
    f = int4_matmul.matmul_primfunc(k, n, block, cuda_target(_arch()), "i4", act_dtype=act, rows=rows)
    ex = _compile({"i4": f})
    y = _t(np.zeros((m, n), np.float32))
    ex["i4"](_t(x), _t(int4_matmul.pack_weight(q.codes)), _t(int4_matmul.pack_scales(q.scale, n, "float16")), y)
    x64 = x.astype(np.float64)
    w_dq = dequantize(q).astype(np.float64)  # fp16(code·scale), the ONNX semantics
    gemv = rows is not None
    extra = 2.0**-11 if gemv else 0.0  # the GEMV skips the fp16 rounding of code·scale
    _within(y.numpy(), x64 @ w_dq, np.abs(x64) @ np.abs(w_dq), k, extra)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4", "bf16"])
def test_lowered_digits_mlp_on_gpu_matches_ort(tmp_path: Path, fmt: str) -> None:
    if fmt.startswith("fp8") and not _fp8_ok():
        pytest.skip("FP8 MMA needs sm_89+")
    from lpcompile.files import apply_file
    from lpcompile.runtime.tvm.build import load_compiled, lower_model, reference_outputs

    model = tmp_path / "mlp.lp.onnx"
    apply_file(EXAMPLES / "digits_mlp.onnx", model, uniform=fmt, calib_path=EXAMPLES / "digits_calib.npz")
    lib = lower_model(model, tmp_path / "mlp.cuda.so", target="cuda", arch=_arch()).output
    inputs = {"pixels": np.load(EXAMPLES / "digits_calib.npz")["pixels"][:32].astype(np.float32)}
    got = load_compiled(lib).run(inputs)["logits"]
    ref = reference_outputs(model, inputs)["logits"]
    assert np.max(np.abs(got - ref)) <= 4 * 515 * U * np.max(np.abs(ref))


def test_fp8_table_decodes_like_ml_dtypes() -> None:
    """Sanity for the decode table the LLVM kernels and Q/DQ kernels share."""
    t = fp8_table("float8_e4m3fn")
    assert t[0x7E] == 448.0 and np.isnan(t[0x7F]) and t[0x01] == 2.0**-9

"""lpcompile's CUDA kernels and lowered models on a real GPU (skipped without one), and a CPU
rehearsal of ``benchmarks/kernels.py`` (the Python part of ``benchmarks/gpu_check.sh``).

Tolerances as in ``test_tvm_kernels.py``: codecs bit-exact; GEMMs within ``(K + 3)·u·Σ|a·w|`` of a
float64 reference of the same stored values (tensor-core MMAs accumulate in fp32; the int4 GEMV
multiplies exact codes and applies each block scale once per 8-element word, so its reference
weights are ``code·scale`` without the fp16 rounding of DequantizeLinear — that rounding, at
most 2⁻¹¹ relative per weight, is added to the bound when comparing with the ONNX semantics).
Softmax: the per-element bounds of ``test_tvm_softmax.py``. Lowered models: same bound as the llvm
lowering tests (``L·(K + 3)·u·max|ref|``).

The ``gpu`` tests skip cleanly where TVM, its compiler or a CUDA device is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ml_dtypes
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from lpcompile.formats import MATMUL_LAYOUT, dequantize, get_format, quantize_weight, round_to_float  # noqa: E402
from lpcompile.runtime.tvm.kernels import fp8_matmul, half_matmul, int4_matmul  # noqa: E402
from lpcompile.runtime.tvm.kernels.common import cuda_target, fp8_table  # noqa: E402
from lpcompile.twopass import softmax_f64, ulp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
U = 2.0**-24
F = TypeVar("F", bound=Callable[..., Any])
HAS_COMPILER = not getattr(getattr(tvm, "base", None), "_RUNTIME_ONLY", False)
HAS_CUDA = bool(tvm.cuda(0).exist)
DEV = tvm.cuda(0)

needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.tvm,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
    pytest.mark.skipif(not HAS_COMPILER, reason="TVM runtime only (no compiler)"),
]


def gpu(f: F) -> F:
    """Mark a test ``gpu`` + ``tvm`` and skip it without a CUDA device or TVM's compiler."""
    for mark in reversed(needs_gpu):
        f = mark(f)
    return f


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


@gpu
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


@gpu
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


@gpu
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


@gpu
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


@gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4", "bf16"])
def test_lowered_digits_cnn_on_gpu_matches_ort(tmp_path: Path, fmt: str) -> None:
    from lpcompile.config import ApplyConfig, Target
    from lpcompile.files import apply_file
    from lpcompile.runtime.tvm.build import load_compiled, lower_model, reference_outputs

    model = tmp_path / "cnn.lp.onnx"
    apply_file(
        EXAMPLES / "digits_cnn.onnx",
        model,
        uniform=fmt,
        calib_path=EXAMPLES / "digits_calib.npz",
        config=ApplyConfig(target=Target.TVM),
    )
    lib = lower_model(model, tmp_path / "cnn.cuda.so", target="cuda", arch=_arch()).output
    inputs = {"pixels": np.load(EXAMPLES / "digits_calib.npz")["pixels"][:32].astype(np.float32)}
    got = load_compiled(lib).run(inputs)["logits"]
    ref = reference_outputs(model, inputs)["logits"]
    assert np.max(np.abs(got - ref)) <= 3 * (288 + 3) * U * np.max(np.abs(ref))


def _softmax_tol(x: np.ndarray, ref: np.ndarray, dtype: str, three_pass: bool) -> np.ndarray:
    """``0.5·ulp_s(ref) + (6 + log2 N)·ulp_f32(ref) + 2^-126`` (+ ``0.5·ulp_f32(x − max)·ref`` for
    the three-pass kernel), as ``test_tvm_softmax.py``."""
    storage = 0.0 if dtype == "float32" else 0.5 * ulp(dtype, ref)
    tol = storage + (6 + math.log2(max(x.shape[-1], 2))) * ulp("float32", ref) + 2.0**-126
    if three_pass:
        d = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        tol = tol + 0.5 * ulp("float32", d) * ref
    return tol


@gpu
@pytest.mark.parametrize("kind", ["two-pass", "three-pass"])
@pytest.mark.parametrize(
    ("rows", "cols", "dtype"), [(4, 1000, "float32"), (3, 70_000, "float32"), (2, 5000, "bfloat16")]
)
def test_softmax_on_gpu(kind: str, rows: int, cols: int, dtype: str) -> None:
    from lpcompile.runtime.tvm.softmax import build_softmax

    rng = np.random.default_rng(cols)
    np_t = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32).astype(np_t)
    y = build_softmax(kind, rows, cols, dtype, target=cuda_target(_arch()))(x).astype(np.float64)
    ref = softmax_f64(x.astype(np.float64))
    assert np.isfinite(y).all()
    assert (np.abs(y - ref) <= _softmax_tol(x.astype(np.float32), ref, dtype, kind == "three-pass")).all()


def test_fp8_table_decodes_like_ml_dtypes() -> None:
    """Sanity for the decode table the LLVM kernels and Q/DQ kernels share."""
    t = fp8_table("float8_e4m3fn")
    assert t[0x7E] == 448.0 and np.isnan(t[0x7F]) and t[0x01] == 2.0**-9


@pytest.mark.tvm
@pytest.mark.skipif(not HAS_COMPILER, reason="TVM runtime only (no compiler)")
def test_kernels_benchmark_cpu_rehearsal(tmp_path: Path) -> None:
    """``benchmarks/kernels.py rehearse``: the CUDA bundle (small shapes) builds, every reference is
    computed, the device steps say SKIPPED, the CPU shadow (the device code path on LLVM builds)
    passes every check and times every benchmark row beside its baseline, and JSON + Markdown are
    written. (nvcc on the same CUDA C is left to
    ``test_tvm_cuda_codegen.py`` and ``gpu_check.sh --dry-run``, to keep this test short.)"""
    script = str(ROOT / "benchmarks" / "kernels.py")
    cmd = [sys.executable, script, "rehearse", "--out", str(tmp_path), "--no-cnn", "--no-nvcc"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["gpu"] is False
    families = {r["family"] for r in result["kernels"]}
    assert {"int4_gemv", "fp8_gemm", "bf16_gemm", "softmax2", "softmax3", "fp8_quantize", "bf16_round"} <= families
    for row in result["kernels"]:
        assert row["device_check"] == "SKIPPED (no GPU)" and "error" not in row, row
        assert row["tolerance"]
    shadow = result["cpu_shadow"]  # the device code path on LLVM builds (checks, rotation, timing, baselines)
    assert len(shadow["kernels"]) >= 10 and all(r["device_check"] == "ok" for r in shadow["kernels"]), shadow
    timed = [r for r in shadow["kernels"] if r["timed"]]
    assert timed and all(r["lpcompile_ms"] > 0 and r["baseline_ms"] > 0 for r in timed), timed
    assert (tmp_path / "bundle" / "kernels.so").is_file() and (tmp_path / "bundle" / "kernels.cu").is_file()
    table = (tmp_path / "kernels.md").read_text()
    assert "| int4 GEMV 1×512×256 | SKIPPED (no GPU) | – | torch fp16 F.linear |" in table

"""TVM TIR softmax kernels (two-pass and three-pass) on llvm; CUDA source generation.

Tolerance per element: ``|y − ref| ≤ 0.5·ulp_s(ref) + (6 + log2 N)·ulp_f32(ref) + 2^−126``:
output rounding to the storage dtype (half an ULP; none for float32), float32 arithmetic with a
degree-5 polynomial ``exp`` (a few ULPs) and an N-element reduction (tree of lanes and chunks,
serial within a lane: bounded here by log2 N ULPs on these data), and the kernels' flush of
results below 2^−126 to zero. ``ref`` is the float64 softmax of the input rounded to the storage
dtype. The three-pass kernel rounds ``d = x − max`` first, an absolute error of half an ULP of
``|d|`` in the exponent, so its bound adds ``0.5·ulp_f32(|d|)·ref`` (the two-pass reduction
``t = x − n·ln2`` is exact up to a few ULPs of ``t``, which is why it is the more accurate one).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("tvm")

from lpcompile.errors import UsageError
from lpcompile.runtime.tvm.softmax import (
    build_softmax,
    plan_softmax,
    three_pass_softmax_primfunc,
    two_pass_softmax_primfunc,
)
from lpcompile.twopass import X_CLAMP, softmax_f64, two_pass_softmax, ulp

pytestmark = pytest.mark.tvm


def _np_dtype(name: str) -> object:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _ref(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        xs = x.astype(_np_dtype(dtype)).astype(np.float64)
    return softmax_f64(np.clip(xs, -np.inf, X_CLAMP))


def _tol(ref: np.ndarray, dtype: str) -> np.ndarray:
    storage = 0.0 if dtype == "float32" else 0.5 * ulp(dtype, ref)
    n = ref.shape[-1]
    return storage + (6 + math.log2(max(n, 2))) * ulp("float32", ref) + 2.0**-126


def _tol3(x: np.ndarray, ref: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        xs = x.astype(_np_dtype(dtype)).astype(np.float64)
        d = np.abs(np.nan_to_num(xs - xs.max(axis=-1, keepdims=True), neginf=0.0))
    return _tol(ref, dtype) + 0.5 * ulp("float32", d) * ref


def _data(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, cols)) * 4).astype(np.float32)
    if cols > 4:
        x[0, ::3] = -np.inf  # masked elements
    if rows > 2:
        x[2] += 1000.0  # large logits: e^x overflows float32
    return x


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kernels_match_float64(dtype: str) -> None:
    x = _data(3, 1000)
    ref = _ref(x, dtype)
    errs = {}
    for kind in ("two-pass", "three-pass"):
        y = build_softmax(kind, 3, 1000, dtype)(x)
        assert y.dtype == _np_dtype(dtype)
        y = y.astype(np.float64)
        assert np.isfinite(y).all()
        assert (y[np.isneginf(x)] == 0).all()
        err = np.abs(y - ref)
        tol = _tol(ref, dtype) if kind == "two-pass" else _tol3(x, ref, dtype)
        assert (err <= tol).all(), (kind, err.max())
        errs[kind] = err.max()
    # two-pass at least as accurate as three-pass at the same precision (or within 4 ULPs at max y)
    assert errs["two-pass"] <= max(errs["three-pass"], 4 * ulp(dtype, ref.max()))


@pytest.mark.parametrize(("rows", "cols"), [(2, 77), (1, 1), (4, 64)])
def test_tails_and_tiny_rows(rows: int, cols: int) -> None:
    x = np.random.default_rng(cols).normal(size=(rows, cols)).astype(np.float32) * 3
    ref = _ref(x, "float32")
    for kind, tol in (("two-pass", _tol(ref, "float32")), ("three-pass", _tol3(x, ref, "float32"))):
        y = build_softmax(kind, rows, cols)(x).astype(np.float64)
        assert (np.abs(y - ref) <= tol).all(), kind


def test_chunked_rows_merge_partials() -> None:
    """Rows split into column chunks (the path of 1M/16M rows): per-chunk partials are merged."""
    rows, cols = 2, 20_011
    plan = plan_softmax(rows, cols, chunks=5)
    assert plan.chunks == 5
    x = np.random.default_rng(4).normal(size=(rows, cols)).astype(np.float32) * 5
    x[1, : cols // 2] = -np.inf  # whole chunks masked
    ref = _ref(x, "float32")
    for kind, tol in (("two-pass", _tol(ref, "float32")), ("three-pass", _tol3(x, ref, "float32"))):
        y = build_softmax(kind, rows, cols, plan=plan)(x).astype(np.float64)
        assert (np.abs(y - ref) <= tol).all(), kind


def test_two_pass_special_values() -> None:
    """Same semantics as the numpy reference / ONNX function: masked rows → zeros, clamp."""
    x = np.zeros((6, 64), np.float32)
    x[0] = -np.inf  # fully masked: zeros (the three-pass kernel, like Softmax, gives NaN)
    x[1] = np.where(np.arange(64) % 2, 1000.0, -1000.0)
    x[2] = 7.25  # all equal
    x[3, 5] = -3.4e38  # finfo.min mask value
    x[4, 0] = 3.0e38  # beyond the clamp: saturates
    x[5] = np.linspace(-100, 100, 64)
    y = build_softmax("two-pass", 6, 64)(x).astype(np.float64)
    assert (y[0] == 0).all()
    ref = _ref(x[1:], "float32")
    assert (np.abs(y[1:] - ref) <= _tol(ref, "float32")).all()
    ny = two_pass_softmax(x).astype(np.float64)
    assert (np.abs(y - ny) <= _tol(ny, "float32")).all()
    assert np.isnan(build_softmax("three-pass", 6, 64)(x)[0]).all()


def test_primfunc_api() -> None:
    f2 = two_pass_softmax_primfunc(4, 128, "float16")
    f3 = three_pass_softmax_primfunc(4, 128, "float16")
    assert str(f2.attrs["global_symbol"]) == "two_pass_softmax"
    assert str(f3.attrs["global_symbol"]) == "three_pass_softmax"
    with pytest.raises(UsageError):
        two_pass_softmax_primfunc(4, 128, "int8")
    with pytest.raises(UsageError):
        build_softmax("one-pass", 4, 128)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        two_pass_softmax_primfunc(4, 128, plan=plan_softmax(2, 128))


def test_plans_are_shared() -> None:
    p = plan_softmax(1, 1 << 24, workers=2)
    assert p.chunks == 1024 and p.chunk * p.chunks >= 1 << 24 and p.chunk % p.lanes == 0
    assert plan_softmax(1, 1 << 16, workers=2).chunks == 8
    assert plan_softmax(1, 1024, workers=2).chunks == 1
    assert plan_softmax(4096, 1024, workers=2).chunks == 1
    assert plan_softmax(1, 1 << 20, gpu=True).chunk == 256 * 16


_CUDA_SCRIPT = textwrap.dedent(
    """
    import re, sys
    from lpcompile.runtime.tvm.softmax import build_softmax
    for dtype in ("float32", "bfloat16"):
        for kind in ("two-pass", "three-pass"):
            src = build_softmax(kind, 2, 5000, dtype, target={"kind": "cuda", "arch": "sm_90"}).source()
            names = sorted(set(re.findall(r"__global__ void __launch_bounds__\\(\\d+\\) (\\w+)\\(", src)))
            print(dtype, kind, len(names), "nv_bfloat16" in src, "__syncthreads" in src)
    """
)


def test_cuda_source_generation() -> None:
    """CUDA source for sm_90 is generated without a GPU (in a subprocess: CUDA builds can crash)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CUDA_SCRIPT], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        if re.search(r"nvcc|cuda.*(not found|toolkit)|NVRTC", proc.stderr, re.IGNORECASE):
            pytest.skip(f"no CUDA toolchain: {proc.stderr.strip().splitlines()[-1]}")
        pytest.fail(proc.stderr[-2000:])
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    kernels = {(d, k): int(n) for d, k, n, _, _ in lines}
    assert kernels[("float32", "two-pass")] == 3  # partial (m, e), per-row merge, write
    assert kernels[("float32", "three-pass")] == 5  # max, merge, sum, merge, write
    assert all(sync == "True" for *_, sync in lines)
    assert [bf for d, _, _, bf, _ in lines if d == "bfloat16"] == ["True", "True"]


@pytest.mark.gpu
def test_cuda_kernels_run() -> None:
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA device")
    x = _data(3, 5000)
    ref = _ref(x, "float32")
    for kind, tol in (("two-pass", _tol(ref, "float32")), ("three-pass", _tol3(x, ref, "float32"))):
        y = build_softmax(kind, 3, 5000, target="cuda")(x).astype(np.float64)
        assert (np.abs(y - ref) <= tol).all(), kind

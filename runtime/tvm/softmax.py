"""TVM TIR kernels for the two-pass softmax and the three-pass softmax it replaces.

Both kernels softmax a ``(rows, cols)`` buffer along ``cols``; input and output in ``float32``,
``float16`` or ``bfloat16``, all arithmetic in float32. Both share everything but the
algorithm, so that a timing compares algorithms, not schedules:

* the work split: a row is cut into ``chunks`` column chunks; the ``rows × chunks`` tasks run in
  parallel (CPU: ``T.parallel``; CUDA: one thread block each), each writes a per-chunk partial,
  and a per-row combine step merges the partials (the three-pass kernel merges partial maxima
  and partial sums the same way);
* the vectorisation (CPU: ``lanes`` float32 lanes of independent accumulators, a scalar tail);
* the ``exp``: Cody–Waite reduction ``n = round(x·log2 e)``, ``t = x − n·ln2_hi − n·ln2_lo``,
  a degree-5 minimax polynomial for ``e^t`` on ``[−ln2/2, ln2/2]`` and ``2^k`` built from the
  exponent bits (:func:`_exp2i`, flushes results below 2^−126 to zero).

Two-pass (Dukhan & Ablavatski): pass 1 reads ``x`` and reduces per-lane pairs ``(m, e)``,
``e' = max(e, n)``, ``m ← m·2^(e−e') + p·2^(n−e')``; lanes, then chunks, are merged the same
way; pass 2 reads ``x`` again and writes ``y = p·(1/m)·2^(n−e)``: two reads, one write, no max
pass. Three-pass: a max pass, a sum-of-``exp(x − max)`` pass, a write pass that recomputes the
``exp``: three reads, one write. Semantics of the two-pass kernel are those of
:mod:`lpcompile.twopass` (inputs clamped to ±16384, ``−inf`` contributes 0, fully masked rows
give zeros); the three-pass kernel is the textbook algorithm (NaN for a fully masked row).

Use :func:`build_softmax` to get a compiled :class:`SoftmaxKernel`; the ``*_primfunc``
functions return the TIR for other lowering code.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lpcompile.errors import LpError, UsageError

logger = logging.getLogger(__name__)

Kind = Literal["two-pass", "three-pass"]
DTYPES = ("float32", "float16", "bfloat16")

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375
_LN2_LO = 0.6931471805599453 - 0.693359375
_CLAMP = 16384.0
_E_ID = -1.0e9
"""Exponent of the identity pair (0, −1e9): any 2^(−1e9 − e) flushes to 0."""
_NEG_BIG = -3.4028234663852886e38
"""−FLT_MAX: ``x < _NEG_BIG`` detects ``−inf``."""
# e^t = 1 + t·(C1 + t·(C2 + t·(C3 + t·(C4 + t·C5)))) on [−ln2/2, ln2/2]  (XNNPACK "p5" coefficients)
_C1 = float.fromhex("0x1.FFFFF6p-1")
_C2 = float.fromhex("0x1.FFFDC6p-2")
_C3 = float.fromhex("0x1.555A80p-3")
_C4 = float.fromhex("0x1.573A1Ap-5")
_C5 = float.fromhex("0x1.0F9F9Cp-7")
_MAGIC = 12583039.0
"""0x1.8000FEp23: ``bits(k + _MAGIC) << 23`` is the float 2^k for integer −127 ≤ k ≤ 0 (k = −127: 0.0)."""
_THREE_PASS_DMIN = -104.0
"""x − max is clamped here in the three-pass exp: e^−104 < 2^−149, so the result is 0 anyway."""


# ----------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxPlan:
    """How a ``(rows, cols)`` softmax is split: ``chunks`` column chunks of ``chunk`` columns per row
    (the last may be shorter); CPU tasks use ``lanes`` float32 lanes, CUDA blocks ``threads``."""

    rows: int
    cols: int
    chunks: int
    chunk: int
    lanes: int
    threads: int


def plan_softmax(
    rows: int,
    cols: int,
    *,
    gpu: bool = False,
    lanes: int = 64,
    threads: int = 256,
    chunks: int | None = None,
    workers: int | None = None,
) -> SoftmaxPlan:
    """Choose the chunking (the same plan is used for both kernels).

    CPU: enough tasks to keep ``4 × workers`` threads busy, but no chunk under 4096 columns.
    CUDA: chunks of ``threads × 16`` columns (at least one block per row).
    """
    if rows < 1 or cols < 1:
        raise UsageError(f"softmax shape must be positive, got ({rows}, {cols})")
    if lanes < 1 or threads < 1 or threads & (threads - 1):
        raise UsageError(f"lanes must be >= 1 and threads a power of two, got {lanes}, {threads}")
    if chunks is None:
        if gpu:
            chunks = math.ceil(cols / (threads * 16))
        else:
            workers = workers or os.cpu_count() or 1
            want = math.ceil(4 * workers / rows) if rows < 4 * workers else 1
            chunks = max(1, min(want, cols // 4096))
    chunks = max(1, min(chunks, cols))
    unit = 1 if gpu else lanes
    chunk = math.ceil(math.ceil(cols / chunks) / unit) * unit
    chunks = math.ceil(cols / chunk)
    return SoftmaxPlan(rows, cols, chunks, chunk, lanes, threads)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"unsupported softmax dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


# ----------------------------------------------------------------------------------------------
# scalar/vector building blocks (PrimExpr -> PrimExpr, used inside the TVMScript bodies)
# ----------------------------------------------------------------------------------------------


def _f(v: float) -> Any:
    from tvm import tirx

    return tirx.const(v, "float32")


def _exp2i(k: Any) -> Any:
    """2^k for an integer-valued float32 ``k ≤ 0`` (k < −126 gives 0), from the exponent bits."""
    from tvm import tirx

    b = tirx.reinterpret("int32", tirx.max(k, _f(-127.0)) + _f(_MAGIC))
    return tirx.reinterpret("float32", tirx.shift_left(b, tirx.const(23, "int32")))


def _poly(t: Any) -> Any:
    """e^t for t in [−ln2/2, ln2/2] (degree-5 minimax, Horner)."""
    return _f(1.0) + t * (_f(_C1) + t * (_f(_C2) + t * (_f(_C3) + t * (_f(_C4) + t * _f(_C5)))))


def _reduce(v: Any, n: Any) -> Any:
    """t = v − n·ln2 (Cody–Waite, ``n·ln2_hi`` exact for |n| < 2^15)."""
    return v - n * _f(_LN2_HI) - n * _f(_LN2_LO)


def _load(buf: Any, *idx: Any) -> Any:
    from tvm import tirx

    v = buf[idx]
    return v if buf.dtype == "float32" else tirx.Cast("float32", v)


# ----------------------------------------------------------------------------------------------
# CPU (llvm) kernels
# ----------------------------------------------------------------------------------------------


def _two_pass_cpu(plan: SoftmaxPlan, dtype: str) -> Any:
    from tvm.script import tirx as T

    R, C, K, CH, W = plan.rows, plan.cols, plan.chunks, plan.chunk, plan.lanes
    CLAMP, NEG_BIG, LOG2E = _f(_CLAMP), _f(_NEG_BIG), _f(_LOG2E)

    @T.prim_func(private=True)
    def two_pass(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        PM = T.alloc_buffer((R, K), "float32")
        PE = T.alloc_buffer((R, K), "float32")
        INV = T.alloc_buffer((R,), "float32")
        EE = T.alloc_buffer((R,), "float32")
        # pass 1: one read of x -> per-chunk (m, e)
        for task in T.parallel(R * K):
            r: T.int32 = task // K
            k: T.int32 = task % K
            lo: T.int32 = k * CH
            ln: T.int32 = T.min(CH, C - lo)
            am = T.alloc_buffer((W,), "float32", scope="local")
            ae = T.alloc_buffer((W,), "float32", scope="local")
            for v in T.vectorized(W):
                am[v] = T.float32(0)
                ae[v] = T.float32(_E_ID)
            for i in range(ln // W):
                for v in T.vectorized(W):
                    xv = _load(X, r, lo + i * W + v)
                    xc = T.min(T.max(xv, -CLAMP), CLAMP)
                    n = T.round(xc * LOG2E)
                    p = T.Select(xv < NEG_BIG, T.float32(0), _poly(_reduce(xc, n)))
                    en = T.max(ae[v], n)
                    am[v] = am[v] * _exp2i(ae[v] - en) + p * _exp2i(n - en)
                    ae[v] = en
            for j in range(ln % W):
                xv = _load(X, r, lo + (ln // W) * W + j)
                xc = T.min(T.max(xv, -CLAMP), CLAMP)
                n = T.round(xc * LOG2E)
                p = T.Select(xv < NEG_BIG, T.float32(0), _poly(_reduce(xc, n)))
                en = T.max(ae[j], n)
                am[j] = am[j] * _exp2i(ae[j] - en) + p * _exp2i(n - en)
                ae[j] = en
            # merge the lanes
            cm = T.alloc_buffer((1,), "float32", scope="local")
            ce = T.alloc_buffer((1,), "float32", scope="local")
            cm[0] = am[0]
            ce[0] = ae[0]
            for v in range(1, W):
                en = T.max(ce[0], ae[v])
                cm[0] = cm[0] * _exp2i(ce[0] - en) + am[v] * _exp2i(ae[v] - en)
                ce[0] = en
            PM[r, k] = cm[0]
            PE[r, k] = ce[0]
        # merge the chunks of each row
        for r in T.parallel(R):
            cm = T.alloc_buffer((1,), "float32", scope="local")
            ce = T.alloc_buffer((1,), "float32", scope="local")
            cm[0] = PM[r, 0]
            ce[0] = PE[r, 0]
            for k in range(1, K):
                en = T.max(ce[0], PE[r, k])
                cm[0] = cm[0] * _exp2i(ce[0] - en) + PM[r, k] * _exp2i(PE[r, k] - en)
                ce[0] = en
            # m >= 0.707 unless the row is fully masked (m = 0, every p = 0): y = 0 there
            INV[r] = T.float32(1) / T.max(cm[0], T.float32(0.5))
            EE[r] = ce[0]
        # pass 2: second read of x, one write of y
        for task in T.parallel(R * K):
            r: T.int32 = task // K
            k: T.int32 = task % K
            lo: T.int32 = k * CH
            ln: T.int32 = T.min(CH, C - lo)
            for i in range(ln // W):
                for v in T.vectorized(W):
                    xv = _load(X, r, lo + i * W + v)
                    xc = T.min(T.max(xv, -CLAMP), CLAMP)
                    n = T.round(xc * LOG2E)
                    p = T.Select(xv < NEG_BIG, T.float32(0), _poly(_reduce(xc, n)))
                    Y[r, lo + i * W + v] = T.Cast(dtype, p * INV[r] * _exp2i(n - EE[r]))
            for j in range(ln % W):
                xv = _load(X, r, lo + (ln // W) * W + j)
                xc = T.min(T.max(xv, -CLAMP), CLAMP)
                n = T.round(xc * LOG2E)
                p = T.Select(xv < NEG_BIG, T.float32(0), _poly(_reduce(xc, n)))
                Y[r, lo + (ln // W) * W + j] = T.Cast(dtype, p * INV[r] * _exp2i(n - EE[r]))

    return two_pass


def _three_pass_cpu(plan: SoftmaxPlan, dtype: str) -> Any:
    from tvm.script import tirx as T

    R, C, K, CH, W = plan.rows, plan.cols, plan.chunks, plan.chunk, plan.lanes
    LOG2E, DMIN = _f(_LOG2E), _f(_THREE_PASS_DMIN)

    @T.prim_func(private=True)
    def three_pass(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        PMX = T.alloc_buffer((R, K), "float32")
        PS = T.alloc_buffer((R, K), "float32")
        MX = T.alloc_buffer((R,), "float32")
        INV = T.alloc_buffer((R,), "float32")
        # pass 1: max
        for task in T.parallel(R * K):
            r: T.int32 = task // K
            k: T.int32 = task % K
            lo: T.int32 = k * CH
            ln: T.int32 = T.min(CH, C - lo)
            am = T.alloc_buffer((W,), "float32", scope="local")
            for v in T.vectorized(W):
                am[v] = T.float32("-inf")
            for i in range(ln // W):
                for v in T.vectorized(W):
                    am[v] = T.max(am[v], _load(X, r, lo + i * W + v))
            for j in range(ln % W):
                am[j] = T.max(am[j], _load(X, r, lo + (ln // W) * W + j))
            cm = T.alloc_buffer((1,), "float32", scope="local")
            cm[0] = am[0]
            for v in range(1, W):
                cm[0] = T.max(cm[0], am[v])
            PMX[r, k] = cm[0]
        for r in T.parallel(R):
            cm = T.alloc_buffer((1,), "float32", scope="local")
            cm[0] = PMX[r, 0]
            for k in range(1, K):
                cm[0] = T.max(cm[0], PMX[r, k])
            MX[r] = cm[0]
        # pass 2: sum of exp(x - max)
        for task in T.parallel(R * K):
            r: T.int32 = task // K
            k: T.int32 = task % K
            lo: T.int32 = k * CH
            ln: T.int32 = T.min(CH, C - lo)
            acc = T.alloc_buffer((W,), "float32", scope="local")
            for v in T.vectorized(W):
                acc[v] = T.float32(0)
            for i in range(ln // W):
                for v in T.vectorized(W):
                    d = T.max(_load(X, r, lo + i * W + v) - MX[r], DMIN)
                    n = T.round(d * LOG2E)
                    acc[v] = acc[v] + _poly(_reduce(d, n)) * _exp2i(n)
            for j in range(ln % W):
                d = T.max(_load(X, r, lo + (ln // W) * W + j) - MX[r], DMIN)
                n = T.round(d * LOG2E)
                acc[j] = acc[j] + _poly(_reduce(d, n)) * _exp2i(n)
            cs = T.alloc_buffer((1,), "float32", scope="local")
            cs[0] = acc[0]
            for v in range(1, W):
                cs[0] = cs[0] + acc[v]
            PS[r, k] = cs[0]
        for r in T.parallel(R):
            cs = T.alloc_buffer((1,), "float32", scope="local")
            cs[0] = PS[r, 0]
            for k in range(1, K):
                cs[0] = cs[0] + PS[r, k]
            INV[r] = T.float32(1) / cs[0]
        # pass 3: recompute exp(x - max), write
        for task in T.parallel(R * K):
            r: T.int32 = task // K
            k: T.int32 = task % K
            lo: T.int32 = k * CH
            ln: T.int32 = T.min(CH, C - lo)
            for i in range(ln // W):
                for v in T.vectorized(W):
                    d = T.max(_load(X, r, lo + i * W + v) - MX[r], DMIN)
                    n = T.round(d * LOG2E)
                    Y[r, lo + i * W + v] = T.Cast(dtype, _poly(_reduce(d, n)) * _exp2i(n) * INV[r])
            for j in range(ln % W):
                d = T.max(_load(X, r, lo + (ln // W) * W + j) - MX[r], DMIN)
                n = T.round(d * LOG2E)
                Y[r, lo + (ln // W) * W + j] = T.Cast(dtype, _poly(_reduce(d, n)) * _exp2i(n) * INV[r])

    return three_pass

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
Both kernels flush results below 2^−126 to zero, and neither propagates NaN inputs (LLVM's
min/max return the non-NaN operand, so a NaN acts as a masked element; the ONNX function and the
numpy reference do propagate NaN).

TVM 0.27 notes (worked around here): a ``v = expr`` binding inside ``T.vectorized`` gives every
lane the last lane's value, so vector bodies bind with Let expressions (:func:`_let`); scalar
bindings and ``"local"``-scope buffers inside ``T.parallel`` become heap workspaces, so tasks use
small default-scope buffers (stack, registers) and inline index arithmetic; TVM's bf16 cast
legalisation duplicates Let nodes, so bf16 is converted with explicit bit operations.

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
MAX_CPU_CHUNK = 16384
"""Longest column chunk of one CPU task (256 serial terms per lane at 64 lanes)."""
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

    CPU: enough tasks to keep ``4 × workers`` threads busy, but no chunk under 4096 columns and
    none over :data:`MAX_CPU_CHUNK` (which bounds the serial accumulation per lane to
    ``MAX_CPU_CHUNK / lanes`` terms, and with it the summation error of long rows).
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
            chunks = max(1, min(want, cols // 4096), math.ceil(cols / MAX_CPU_CHUNK))
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


def _let(value: Any, body: Any, dtype: str = "float32") -> Any:
    """``body(v)`` with ``v`` bound to ``value`` by a Let expression.

    (TVM 0.27 vectorises a ``v = expr`` statement inside ``T.vectorized`` wrongly: every lane gets
    the last lane's value. Let expressions are vectorised correctly.)
    """
    from tvm import tirx

    var = tirx.Var("v", dtype)
    return tirx.Let(var, value, body(var))


def _tp_n(xv: Any) -> Any:
    """Two-pass exponent n = round(clamp(x)·log2 e) (a float32 integer)."""
    from tvm import tirx

    xc = tirx.min(tirx.max(xv, _f(-_CLAMP)), _f(_CLAMP))
    return tirx.round(xc * _f(_LOG2E))


def _tp_pn(xv: Any, body: Any) -> Any:
    """``body(p, n)`` with e^x = p·2^n (two-pass decomposition; p = 0 for x = −inf)."""
    from tvm import tirx

    def with_x(x: Any) -> Any:
        xc = tirx.min(tirx.max(x, _f(-_CLAMP)), _f(_CLAMP))
        return _let(
            xc,
            lambda c: _let(
                tirx.round(c * _f(_LOG2E)),
                lambda n: _let(
                    tirx.Select(x < _f(_NEG_BIG), _f(0.0), _let(_reduce(c, n), _poly)),
                    lambda p: body(p, n),
                ),
            ),
        )

    return _let(xv, with_x)


def _pair_m(m1: Any, e1: Any, m2: Any, e2: Any) -> Any:
    """Mantissa of (m1, e1) ⊕ (m2, e2) = (m1·2^(e1−e') + m2·2^(e2−e'), e' = max(e1, e2))."""
    from tvm import tirx

    return _let(tirx.max(e1, e2), lambda en: m1 * _exp2i(e1 - en) + m2 * _exp2i(e2 - en))


def _tp_accumulate(m: Any, e: Any, xv: Any) -> Any:
    """Mantissa of the pair (m, e) ⊕ (p, n) for e^x = p·2^n; the exponent is max(e, _tp_n(x))."""
    return _tp_pn(xv, lambda p, n: _pair_m(m, e, p, n))


def _tp_write(xv: Any, inv_m: Any, e: Any, dtype: str) -> Any:
    """y = p·(1/m)·2^(n − e), cast to the output dtype."""

    return _cast_out(_tp_pn(xv, lambda p, n: p * inv_m * _exp2i(n - e)), dtype)


def _cast_out(value: Any, dtype: str) -> Any:
    """Cast a float32 result to the output dtype, binding it first: the bf16 legalisation expands
    the cast into an expression that uses its operand several times, and a Let node must not be
    duplicated (the vectoriser rejects a Let var bound twice)."""
    from tvm import tirx

    if dtype == "float32":
        return value
    if dtype == "bfloat16":
        # round to nearest even on the bits (TVM's own bf16 cast legalisation trips the vectoriser)
        def rne(bits: Any) -> Any:
            one = tirx.const(1, "uint32")
            rounded = bits + tirx.const(0x7FFF, "uint32") + (tirx.shift_right(bits, tirx.const(16, "uint32")) & one)
            return tirx.reinterpret(
                "bfloat16", tirx.Cast("uint16", tirx.shift_right(rounded, tirx.const(16, "uint32")))
            )

        return _let(tirx.reinterpret("uint32", value), rne, "uint32")
    return _let(value, lambda y: tirx.Cast(dtype, y))


def _exp_shifted(xv: Any, mx: Any) -> Any:
    """e^(x − max) with the same reduction, polynomial and 2^n as the two-pass kernel."""
    from tvm import tirx

    return _let(
        tirx.max(xv - mx, _f(_THREE_PASS_DMIN)),
        lambda d: _let(tirx.round(d * _f(_LOG2E)), lambda n: _let(_reduce(d, n), _poly) * _exp2i(n)),
    )


def _load(buf: Any, *idx: Any) -> Any:
    from tvm import tirx

    v = buf[idx]
    if buf.dtype == "float32":
        return v
    if buf.dtype == "bfloat16":
        bits = tirx.Cast("uint32", tirx.reinterpret("uint16", v))
        return tirx.reinterpret("float32", tirx.shift_left(bits, tirx.const(16, "uint32")))
    return tirx.Cast("float32", v)


class _Split:
    """Index arithmetic of a plan: task ``b`` = (row ``b // K``, chunk ``b % K``)."""

    def __init__(self, plan: SoftmaxPlan) -> None:
        self.K, self.CH, self.C = plan.chunks, plan.chunk, plan.cols

    def row(self, b: Any) -> Any:
        return b // self.K

    def base(self, b: Any) -> Any:
        return b % self.K * self.CH

    def length(self, b: Any) -> Any:
        from tvm import tirx

        return tirx.min(self.CH, self.C - b % self.K * self.CH)


# ----------------------------------------------------------------------------------------------
# CPU (llvm) kernels: T.parallel over rows × chunks, T.vectorized over `lanes` accumulators.
# Per-task buffers use the default ("global") scope: TVM keeps those below 1 KiB on the stack
# (alloca, promoted to registers), while "local" scope would become a heap workspace.
# ----------------------------------------------------------------------------------------------


def _two_pass_cpu(plan: SoftmaxPlan, dtype: str) -> Any:
    from tvm.script import tirx as T

    R, C, K, W = plan.rows, plan.cols, plan.chunks, plan.lanes
    sp = _Split(plan)

    @T.prim_func(private=True)
    def two_pass(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        PM = T.alloc_buffer((R * K,), "float32")
        PE = T.alloc_buffer((R * K,), "float32")
        INV = T.alloc_buffer((R,), "float32")
        EE = T.alloc_buffer((R,), "float32")
        # pass 1: one read of x -> per-chunk (m, e)
        for b in T.parallel(R * K):
            am = T.alloc_buffer((W,), "float32")
            ae = T.alloc_buffer((W,), "float32")
            for v in T.vectorized(W):
                am[v] = T.float32(0)
                ae[v] = T.float32(_E_ID)
            for i in range(sp.length(b) // W):
                for v in T.vectorized(W):
                    am[v] = _tp_accumulate(am[v], ae[v], _load(X, sp.row(b), sp.base(b) + i * W + v))
                    ae[v] = T.max(ae[v], _tp_n(_load(X, sp.row(b), sp.base(b) + i * W + v)))
            for j in range(sp.length(b) % W):
                am[j] = _tp_accumulate(am[j], ae[j], _load(X, sp.row(b), sp.base(b) + sp.length(b) // W * W + j))
                ae[j] = T.max(ae[j], _tp_n(_load(X, sp.row(b), sp.base(b) + sp.length(b) // W * W + j)))
            cm = T.alloc_buffer((1,), "float32")
            ce = T.alloc_buffer((1,), "float32")
            cm[0] = am[0]
            ce[0] = ae[0]
            for v in range(1, W):
                cm[0] = _pair_m(cm[0], ce[0], am[v], ae[v])
                ce[0] = T.max(ce[0], ae[v])
            PM[b] = cm[0]
            PE[b] = ce[0]
        # merge the chunks of each row
        for r in T.parallel(R):
            cm = T.alloc_buffer((1,), "float32")
            ce = T.alloc_buffer((1,), "float32")
            cm[0] = PM[r * K]
            ce[0] = PE[r * K]
            for k in range(1, K):
                cm[0] = _pair_m(cm[0], ce[0], PM[r * K + k], PE[r * K + k])
                ce[0] = T.max(ce[0], PE[r * K + k])
            # m >= 0.707 unless the row is fully masked (m = 0 and every p = 0): y = 0 there
            INV[r] = T.float32(1) / T.max(cm[0], T.float32(0.5))
            EE[r] = ce[0]
        # pass 2: second read of x, one write of y
        for b in T.parallel(R * K):
            for i in range(sp.length(b) // W):
                for v in T.vectorized(W):
                    Y[sp.row(b), sp.base(b) + i * W + v] = _tp_write(
                        _load(X, sp.row(b), sp.base(b) + i * W + v), INV[sp.row(b)], EE[sp.row(b)], dtype
                    )
            for j in range(sp.length(b) % W):
                Y[sp.row(b), sp.base(b) + sp.length(b) // W * W + j] = _tp_write(
                    _load(X, sp.row(b), sp.base(b) + sp.length(b) // W * W + j),
                    INV[sp.row(b)],
                    EE[sp.row(b)],
                    dtype,
                )

    return two_pass


def _three_pass_cpu(plan: SoftmaxPlan, dtype: str) -> Any:
    from tvm.script import tirx as T

    R, C, K, W = plan.rows, plan.cols, plan.chunks, plan.lanes
    sp = _Split(plan)

    @T.prim_func(private=True)
    def three_pass(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        PMX = T.alloc_buffer((R * K,), "float32")
        PS = T.alloc_buffer((R * K,), "float32")
        MX = T.alloc_buffer((R,), "float32")
        INV = T.alloc_buffer((R,), "float32")
        # pass 1: max
        for b in T.parallel(R * K):
            am = T.alloc_buffer((W,), "float32")
            for v in T.vectorized(W):
                am[v] = T.float32("-inf")
            for i in range(sp.length(b) // W):
                for v in T.vectorized(W):
                    am[v] = T.max(am[v], _load(X, sp.row(b), sp.base(b) + i * W + v))
            for j in range(sp.length(b) % W):
                am[j] = T.max(am[j], _load(X, sp.row(b), sp.base(b) + sp.length(b) // W * W + j))
            cm = T.alloc_buffer((1,), "float32")
            cm[0] = am[0]
            for v in range(1, W):
                cm[0] = T.max(cm[0], am[v])
            PMX[b] = cm[0]
        for r in T.parallel(R):
            cm = T.alloc_buffer((1,), "float32")
            cm[0] = PMX[r * K]
            for k in range(1, K):
                cm[0] = T.max(cm[0], PMX[r * K + k])
            MX[r] = cm[0]
        # pass 2: sum of exp(x - max)
        for b in T.parallel(R * K):
            acc = T.alloc_buffer((W,), "float32")
            for v in T.vectorized(W):
                acc[v] = T.float32(0)
            for i in range(sp.length(b) // W):
                for v in T.vectorized(W):
                    acc[v] = acc[v] + _exp_shifted(_load(X, sp.row(b), sp.base(b) + i * W + v), MX[sp.row(b)])
            for j in range(sp.length(b) % W):
                acc[j] = acc[j] + _exp_shifted(
                    _load(X, sp.row(b), sp.base(b) + sp.length(b) // W * W + j), MX[sp.row(b)]
                )
            cs = T.alloc_buffer((1,), "float32")
            cs[0] = acc[0]
            for v in range(1, W):
                cs[0] = cs[0] + acc[v]
            PS[b] = cs[0]
        for r in T.parallel(R):
            cs = T.alloc_buffer((1,), "float32")
            cs[0] = PS[r * K]
            for k in range(1, K):
                cs[0] = cs[0] + PS[r * K + k]
            INV[r] = T.float32(1) / cs[0]
        # pass 3: recompute exp(x - max), write
        for b in T.parallel(R * K):
            for i in range(sp.length(b) // W):
                for v in T.vectorized(W):
                    Y[sp.row(b), sp.base(b) + i * W + v] = _cast_out(
                        _exp_shifted(_load(X, sp.row(b), sp.base(b) + i * W + v), MX[sp.row(b)]) * INV[sp.row(b)],
                        dtype,
                    )
            for j in range(sp.length(b) % W):
                Y[sp.row(b), sp.base(b) + sp.length(b) // W * W + j] = _cast_out(
                    _exp_shifted(_load(X, sp.row(b), sp.base(b) + sp.length(b) // W * W + j), MX[sp.row(b)])
                    * INV[sp.row(b)],
                    dtype,
                )

    return three_pass


# ----------------------------------------------------------------------------------------------
# CUDA kernels: one thread block of `threads` threads per (row, chunk); each thread strides over
# the chunk; a shared-memory tree merges the threads. Three launches per pass structure:
# partials, per-row merge (one block per row), write.
# ----------------------------------------------------------------------------------------------


def _two_pass_gpu(plan: SoftmaxPlan, dtype: str) -> Any:
    from tvm.script import tirx as T

    R, C, K, NT = plan.rows, plan.cols, plan.chunks, plan.threads
    LOG_NT = NT.bit_length() - 1
    sp = _Split(plan)
    CH = plan.chunk

    @T.prim_func(private=True)
    def two_pass(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        PM = T.alloc_buffer((R * K,), "float32")
        PE = T.alloc_buffer((R * K,), "float32")
        INV = T.alloc_buffer((R,), "float32")
        EE = T.alloc_buffer((R,), "float32")
        # pass 1: per-(row, chunk) (m, e)
        for b in T.thread_binding(R * K, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.alloc_buffer((NT,), "float32", scope="shared")
                se = T.alloc_buffer((NT,), "float32", scope="shared")
                am = T.alloc_buffer((1,), "float32", scope="local")
                ae = T.alloc_buffer((1,), "float32", scope="local")
                am[0] = T.float32(0)
                ae[0] = T.float32(_E_ID)
                for i in range(T.ceildiv(CH, NT)):
                    if i * NT + tx < sp.length(b):
                        am[0] = _tp_accumulate(am[0], ae[0], _load(X, sp.row(b), sp.base(b) + i * NT + tx))
                        ae[0] = T.max(ae[0], _tp_n(_load(X, sp.row(b), sp.base(b) + i * NT + tx)))
                sm[tx] = am[0]
                se[tx] = ae[0]
                T.tvm_storage_sync("shared")
                for s in T.unroll(LOG_NT):
                    if tx < T.shift_right(NT, s + 1):
                        am[0] = _pair_m(
                            sm[tx], se[tx], sm[tx + T.shift_right(NT, s + 1)], se[tx + T.shift_right(NT, s + 1)]
                        )
                        ae[0] = T.max(se[tx], se[tx + T.shift_right(NT, s + 1)])
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, s + 1):
                        sm[tx] = am[0]
                        se[tx] = ae[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    PM[b] = sm[0]
                    PE[b] = se[0]
        # merge the chunks: one block per row
        for r in T.thread_binding(R, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.alloc_buffer((NT,), "float32", scope="shared")
                se = T.alloc_buffer((NT,), "float32", scope="shared")
                am = T.alloc_buffer((1,), "float32", scope="local")
                ae = T.alloc_buffer((1,), "float32", scope="local")
                am[0] = T.float32(0)
                ae[0] = T.float32(_E_ID)
                for i in range(T.ceildiv(K, NT)):
                    if i * NT + tx < K:
                        am[0] = _pair_m(am[0], ae[0], PM[r * K + i * NT + tx], PE[r * K + i * NT + tx])
                        ae[0] = T.max(ae[0], PE[r * K + i * NT + tx])
                sm[tx] = am[0]
                se[tx] = ae[0]
                T.tvm_storage_sync("shared")
                for s in T.unroll(LOG_NT):
                    if tx < T.shift_right(NT, s + 1):
                        am[0] = _pair_m(
                            sm[tx], se[tx], sm[tx + T.shift_right(NT, s + 1)], se[tx + T.shift_right(NT, s + 1)]
                        )
                        ae[0] = T.max(se[tx], se[tx + T.shift_right(NT, s + 1)])
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, s + 1):
                        sm[tx] = am[0]
                        se[tx] = ae[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    INV[r] = T.float32(1) / T.max(sm[0], T.float32(0.5))
                    EE[r] = se[0]
        # pass 2: write
        for b in T.thread_binding(R * K, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                for i in range(T.ceildiv(CH, NT)):
                    if i * NT + tx < sp.length(b):
                        Y[sp.row(b), sp.base(b) + i * NT + tx] = _tp_write(
                            _load(X, sp.row(b), sp.base(b) + i * NT + tx), INV[sp.row(b)], EE[sp.row(b)], dtype
                        )

    return two_pass


def _three_pass_gpu(plan: SoftmaxPlan, dtype: str) -> Any:
    from tvm.script import tirx as T

    R, C, K, NT = plan.rows, plan.cols, plan.chunks, plan.threads
    LOG_NT = NT.bit_length() - 1
    sp = _Split(plan)
    CH = plan.chunk

    @T.prim_func(private=True)
    def three_pass(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        PMX = T.alloc_buffer((R * K,), "float32")
        PS = T.alloc_buffer((R * K,), "float32")
        MX = T.alloc_buffer((R,), "float32")
        INV = T.alloc_buffer((R,), "float32")
        # pass 1: partial max
        for b in T.thread_binding(R * K, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.alloc_buffer((NT,), "float32", scope="shared")
                am = T.alloc_buffer((1,), "float32", scope="local")
                am[0] = T.float32("-inf")
                for i in range(T.ceildiv(CH, NT)):
                    if i * NT + tx < sp.length(b):
                        am[0] = T.max(am[0], _load(X, sp.row(b), sp.base(b) + i * NT + tx))
                sm[tx] = am[0]
                T.tvm_storage_sync("shared")
                for s in T.unroll(LOG_NT):
                    if tx < T.shift_right(NT, s + 1):
                        am[0] = T.max(sm[tx], sm[tx + T.shift_right(NT, s + 1)])
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, s + 1):
                        sm[tx] = am[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    PMX[b] = sm[0]
        for r in T.thread_binding(R, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.alloc_buffer((NT,), "float32", scope="shared")
                am = T.alloc_buffer((1,), "float32", scope="local")
                am[0] = T.float32("-inf")
                for i in range(T.ceildiv(K, NT)):
                    if i * NT + tx < K:
                        am[0] = T.max(am[0], PMX[r * K + i * NT + tx])
                sm[tx] = am[0]
                T.tvm_storage_sync("shared")
                for s in T.unroll(LOG_NT):
                    if tx < T.shift_right(NT, s + 1):
                        am[0] = T.max(sm[tx], sm[tx + T.shift_right(NT, s + 1)])
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, s + 1):
                        sm[tx] = am[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    MX[r] = sm[0]
        # pass 2: partial sums of exp(x - max)
        for b in T.thread_binding(R * K, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.alloc_buffer((NT,), "float32", scope="shared")
                am = T.alloc_buffer((1,), "float32", scope="local")
                am[0] = T.float32(0)
                for i in range(T.ceildiv(CH, NT)):
                    if i * NT + tx < sp.length(b):
                        am[0] = am[0] + _exp_shifted(_load(X, sp.row(b), sp.base(b) + i * NT + tx), MX[sp.row(b)])
                sm[tx] = am[0]
                T.tvm_storage_sync("shared")
                for s in T.unroll(LOG_NT):
                    if tx < T.shift_right(NT, s + 1):
                        am[0] = sm[tx] + sm[tx + T.shift_right(NT, s + 1)]
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, s + 1):
                        sm[tx] = am[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    PS[b] = sm[0]
        for r in T.thread_binding(R, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                sm = T.alloc_buffer((NT,), "float32", scope="shared")
                am = T.alloc_buffer((1,), "float32", scope="local")
                am[0] = T.float32(0)
                for i in range(T.ceildiv(K, NT)):
                    if i * NT + tx < K:
                        am[0] = am[0] + PS[r * K + i * NT + tx]
                sm[tx] = am[0]
                T.tvm_storage_sync("shared")
                for s in T.unroll(LOG_NT):
                    if tx < T.shift_right(NT, s + 1):
                        am[0] = sm[tx] + sm[tx + T.shift_right(NT, s + 1)]
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, s + 1):
                        sm[tx] = am[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    INV[r] = T.float32(1) / sm[0]
        # pass 3: write
        for b in T.thread_binding(R * K, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                for i in range(T.ceildiv(CH, NT)):
                    if i * NT + tx < sp.length(b):
                        Y[sp.row(b), sp.base(b) + i * NT + tx] = _cast_out(
                            _exp_shifted(_load(X, sp.row(b), sp.base(b) + i * NT + tx), MX[sp.row(b)]) * INV[sp.row(b)],
                            dtype,
                        )

    return three_pass


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def cpu_target() -> dict[str, str]:
    """The LLVM target for this machine's CPU (``{"kind": "llvm", "mcpu": <host cpu>}``)."""
    from tvm.target import codegen

    try:
        cpu = codegen.llvm_get_system_cpu()
    except Exception:  # pragma: no cover - exotic hosts
        cpu = "generic"
    return {"kind": "llvm", "mcpu": cpu}


def _as_target(target: Any) -> Any:
    import tvm

    if isinstance(target, str) and target == "llvm":
        target = cpu_target()
    elif isinstance(target, str) and target == "cuda":
        target = {"kind": "cuda", "arch": "sm_90"}
    try:
        return tvm.target.Target(target)
    except Exception as exc:
        raise UsageError(f"invalid TVM target {target!r}: {exc}") from exc


def _is_gpu(target: Any) -> bool:
    return str(target.kind.name) in ("cuda", "rocm", "vulkan", "metal", "opencl", "webgpu")


def _primfunc(kind: Kind, rows: int, cols: int, dtype: str, target: Any, plan: SoftmaxPlan | None) -> Any:
    _check_dtype(dtype)
    tgt = _as_target(target)
    gpu = _is_gpu(tgt)
    plan = plan or plan_softmax(rows, cols, gpu=gpu)
    if (plan.rows, plan.cols) != (rows, cols):
        raise UsageError(f"plan is for ({plan.rows}, {plan.cols}), not ({rows}, {cols})")
    builders = {
        ("two-pass", False): _two_pass_cpu,
        ("two-pass", True): _two_pass_gpu,
        ("three-pass", False): _three_pass_cpu,
        ("three-pass", True): _three_pass_gpu,
    }
    if (kind, gpu) not in builders:
        raise UsageError(f"unknown softmax kind {kind!r}; expected 'two-pass' or 'three-pass'")
    name = kind.replace("-", "_") + "_softmax"
    return builders[(kind, gpu)](plan, dtype).with_attr("global_symbol", name)


def two_pass_softmax_primfunc(
    rows: int,
    cols: int,
    dtype: str = "float32",
    *,
    target: Any = "llvm",
    plan: SoftmaxPlan | None = None,
) -> Any:
    """TIR PrimFunc ``two_pass_softmax(X: (rows, cols) dtype, Y: (rows, cols) dtype)``.

    Args:
        rows, cols: static shape; the softmax runs along ``cols``.
        dtype: "float32", "float16" or "bfloat16" (arithmetic and the (m, e) pairs are float32).
        target: decides the schedule: CPU (T.parallel + T.vectorized) for llvm, thread blocks
            for cuda. "llvm" means this host's CPU.
        plan: the work split (default :func:`plan_softmax`).
    """
    return _primfunc("two-pass", rows, cols, dtype, target, plan)


def three_pass_softmax_primfunc(
    rows: int,
    cols: int,
    dtype: str = "float32",
    *,
    target: Any = "llvm",
    plan: SoftmaxPlan | None = None,
) -> Any:
    """TIR PrimFunc ``three_pass_softmax(X, Y)``: max pass, sum-of-exp pass, write pass, with the
    same schedule and ``exp`` as :func:`two_pass_softmax_primfunc`."""
    return _primfunc("three-pass", rows, cols, dtype, target, plan)


@dataclass(frozen=True)
class SoftmaxKernel:
    """A compiled softmax kernel: ``kernel(x)`` runs it on a numpy array (CPU targets, or CUDA
    where a GPU exists); ``kernel.function`` is the packed function ``f(X, Y)`` on TVM tensors."""

    kind: Kind
    dtype: str
    plan: SoftmaxPlan
    target: Any
    executable: Any = field(repr=False)
    entry: str

    @property
    def is_gpu(self) -> bool:
        return _is_gpu(self.target)

    @property
    def module(self) -> Any:
        """The runnable runtime module (JIT-linked if the target needs it)."""
        return self.executable.jit() if self.is_gpu else self.executable.mod

    @property
    def function(self) -> Any:
        return self.module[self.entry]

    def device(self) -> Any:
        import tvm

        return tvm.cuda(0) if self.is_gpu else tvm.cpu(0)

    def source(self, fmt: str | None = None) -> str:
        """Generated source: CUDA C for cuda targets, else ``fmt`` ("asm" default, or "ll")."""
        if self.is_gpu:
            for mod in self.executable.mod.imports:
                try:
                    return str(mod.inspect_source(fmt or "cuda"))
                except Exception:  # pragma: no cover - try the next import
                    continue
            raise LpError("no CUDA source in the compiled module")
        return str(self.executable.mod.inspect_source(fmt or "asm"))

    def tensors(self, x: np.ndarray) -> tuple[Any, Any]:
        """(input, output) TVM tensors on the kernel's device for ``x``."""
        import tvm

        shape = (self.plan.rows, self.plan.cols)
        if tuple(x.shape) != shape:
            raise UsageError(f"kernel is for shape {shape}, got {tuple(x.shape)}")
        dev = self.device()
        xt = tvm.runtime.tensor(np.ascontiguousarray(x.astype(_np_dtype(self.dtype))), dev)
        yt = tvm.runtime.empty(shape, self.dtype, dev)
        return xt, yt

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xt, yt = self.tensors(x)
        self.function(xt, yt)
        return yt.numpy()


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def build_softmax(
    kind: Kind,
    rows: int,
    cols: int,
    dtype: str = "float32",
    target: Any = "llvm",
    *,
    plan: SoftmaxPlan | None = None,
) -> SoftmaxKernel:
    """Compile the ``kind`` ("two-pass" or "three-pass") softmax for ``(rows, cols)`` ``dtype``.

    ``target``: "llvm" (this host's CPU), "cuda" (sm_90), a target dict such as
    ``{"kind": "cuda", "arch": "sm_90"}``, or a ``tvm.target.Target``. CUDA source can be
    generated without a GPU (``kernel.source()``); running it needs one.
    """
    import tvm

    func = _primfunc(kind, rows, cols, dtype, target, plan)
    tgt = _as_target(target)
    name = str(func.attrs["global_symbol"])
    try:
        ex = tvm.compile(tvm.IRModule({name: func}), target=tgt)
    except Exception as exc:
        raise LpError(f"TVM build of the {kind} softmax for {tgt.kind.name} failed: {exc}") from exc
    real_plan = plan or plan_softmax(rows, cols, gpu=_is_gpu(tgt))
    logger.debug("built %s softmax %s on %s", kind, real_plan, tgt.kind.name)
    return SoftmaxKernel(kind, dtype, real_plan, tgt, ex, name)


__all__ = [
    "DTYPES",
    "SoftmaxKernel",
    "SoftmaxPlan",
    "build_softmax",
    "cpu_target",
    "plan_softmax",
    "three_pass_softmax_primfunc",
    "two_pass_softmax_primfunc",
]

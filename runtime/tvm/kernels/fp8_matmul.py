"""FP8 (E4M3FN / E5M2) kernels: activation quantization and the W8A8 GEMM with fp32 accumulation.

The rewritten ONNX computes ``MatMul(DQ(Q(x, sa)), DQ(Wq, sw))``. The kernels compute the same
product with the scales factored out of the sum::

    y[m, n] = (Σ_k dec(qa[m, k]) · dec(wq[n, k])) · sa · sw[n]

Every product ``dec(a)·dec(w)`` of two FP8 values is exact in float32 (4 × 4 significant bits),
so the only rounding is the fp32 accumulation, as in the ONNX model (which additionally rounds
``dec(a)·sa`` and ``dec(w)·sw`` before multiplying: a difference of ≤ 3 fp32 ULPs per term).

* :func:`quantize_pack_primfunc` — ``x[M, K]`` float32 → codes packed 4 per ``uint32`` word
  ``[M, KW]`` (``QuantizeLinear(saturate=1)``: ``x / sa`` rounded to nearest even, saturated;
  bit-exact to ONNX Runtime / ml_dtypes), zero codes in the K padding;
* :func:`qdq_primfunc` — the Q→DQ pair as one elementwise kernel (for activations of ops
  without an FP8 kernel, e.g. Conv);
* :func:`matmul_primfunc` — the GEMM: on CUDA the tensor-core kernel of :mod:`.mma`
  (``mma.sync.m16n8k32.f32.e4m3.e4m3.f32``, native on sm_89+); on LLVM a reference loop that
  decodes codes through the 256-entry table (TVM's LLVM fp8 conversion is not used).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lpcompile.runtime.tvm.kernels import mma
from lpcompile.runtime.tvm.kernels.common import check_fp8, f32_to_fp8, finish, fp8_codes, is_cuda, u32

logger = logging.getLogger(__name__)

PER_WORD = 4
BLOCK = 256
"""CUDA threads per block of the elementwise kernels."""


def padded_words(k: int) -> int:
    """Packed words per row (K padded to whole tensor-core stages)."""
    return mma.padded_words(k, PER_WORD)


def pack_weight(codes_nk: np.ndarray, element: str) -> np.ndarray:
    """FP8 weight codes ``[N, K]`` (ml_dtypes array or uint8 bits) → ``uint32 [N, KW]`` (zero padded)."""
    bits = fp8_codes(codes_nk, element) if codes_nk.dtype != np.uint8 else np.ascontiguousarray(codes_nk)
    n, k = bits.shape
    kw = padded_words(k)
    out = np.zeros((n, kw * PER_WORD), dtype=np.uint8)
    out[:, :k] = bits
    return np.ascontiguousarray(out).view(np.uint32)


def _code(x: Any, s: Any, element: str) -> Any:
    return f32_to_fp8(x / s, element)


def quantize_pack_primfunc(k: int, element: str, target: Any, name: str) -> Any:
    """``(X[M, k] f32, SA[1] f32, Q[M, KW] u32)``: quantize and pack 4 codes per word."""
    from tvm.script import tirx as T

    check_fp8(element)
    kw = padded_words(k)

    def word(X: Any, m: Any, w: Any, s: Any) -> Any:
        from tvm import tirx

        out = u32(0)
        for j in range(PER_WORD):
            kk = w * PER_WORD + j
            c = tirx.Cast("uint32", _code(X[m, tirx.min(kk, k - 1)], s, element))
            c = tirx.Select(kk < k, c, u32(0))
            out = tirx.bitwise_or(out, tirx.shift_left(c, u32(8 * j)))
        return out

    if is_cuda(target):

        @T.prim_func(private=True)
        def qp_cuda(x: T.handle, sa: T.handle, q: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, k), "float32")
            SA = T.match_buffer(sa, (1,), "float32")
            Q = T.match_buffer(q, (M, kw), "uint32")
            for b in T.thread_binding(T.ceildiv(M * kw, T.int64(BLOCK)), thread="blockIdx.x"):
                for t in T.thread_binding(BLOCK, thread="threadIdx.x"):
                    if b * BLOCK + t < M * kw:
                        Q[(b * BLOCK + t) // kw, (b * BLOCK + t) % kw] = word(
                            X, (b * BLOCK + t) // kw, (b * BLOCK + t) % kw, SA[0]
                        )

        return finish(qp_cuda, name)

    @T.prim_func(private=True)
    def qp_cpu(x: T.handle, sa: T.handle, q: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, k), "float32")
        SA = T.match_buffer(sa, (1,), "float32")
        Q = T.match_buffer(q, (M, kw), "uint32")
        for m in T.parallel(M):
            for w in range(kw):
                Q[m, w] = word(X, m, w, SA[0])

    return finish(qp_cpu, name)


def qdq_primfunc(element: str, target: Any, name: str) -> Any:
    """``(X[L] f32, SA[1] f32, TAB[256] f32, Y[L] f32)``: ``Y = TAB[Q(X / SA)] · SA`` (flattened)."""
    from tvm.script import tirx as T

    check_fp8(element)

    def value(X: Any, i: Any, s: Any, TAB: Any) -> Any:
        from tvm import tirx

        return TAB[tirx.Cast("int32", _code(X[i], s, element))] * s

    if is_cuda(target):

        @T.prim_func(private=True)
        def qdq_cuda(x: T.handle, sa: T.handle, tab: T.handle, y: T.handle):
            L = T.int64()
            X = T.match_buffer(x, (L,), "float32")
            SA = T.match_buffer(sa, (1,), "float32")
            TAB = T.match_buffer(tab, (256,), "float32")
            Y = T.match_buffer(y, (L,), "float32")
            for b in T.thread_binding(T.ceildiv(L, T.int64(BLOCK)), thread="blockIdx.x"):
                for t in T.thread_binding(BLOCK, thread="threadIdx.x"):
                    if b * BLOCK + t < L:
                        Y[b * BLOCK + t] = value(X, b * BLOCK + t, SA[0], TAB)

        return finish(qdq_cuda, name)

    @T.prim_func(private=True)
    def qdq_cpu(x: T.handle, sa: T.handle, tab: T.handle, y: T.handle):
        L = T.int64()
        X = T.match_buffer(x, (L,), "float32")
        SA = T.match_buffer(sa, (1,), "float32")
        TAB = T.match_buffer(tab, (256,), "float32")
        Y = T.match_buffer(y, (L,), "float32")
        for i in T.parallel(L):
            Y[i] = value(X, i, SA[0], TAB)

    return finish(qdq_cpu, name)


def needs_table(target: Any) -> bool:
    """Whether :func:`matmul_primfunc` for ``target`` takes the decode table argument."""
    return not is_cuda(target)


def matmul_primfunc(k: int, n: int, element: str, target: Any, name: str) -> Any:
    """The FP8 GEMM ``(A[M, KW] u32, W[n, KW] u32, SA[1] f32, SW[n] f32, [TAB[256] f32,] Y[M, n] f32)``.

    ``TAB`` (the decode table, :func:`~.common.fp8_table`) is an argument of the LLVM kernel
    only (:func:`needs_table`); the CUDA kernel feeds the codes to the tensor cores.
    """
    from tvm.script import tirx as T

    check_fp8(element)
    kw = padded_words(k)
    if is_cuda(target):
        return mma.mma_gemm_primfunc(element, kw, n, scaled=True, name=name)

    def dec(TAB: Any, word: Any, j: int) -> Any:
        from tvm import tirx

        return TAB[tirx.Cast("int32", tirx.bitwise_and(tirx.shift_right(word, u32(8 * j)), u32(0xFF)))]

    def accumulate(acc: Any, TAB: Any, a_word: Any, w_word: Any) -> Any:
        """``acc + Σ_j dec(a_j)·dec(w_j)`` over the 4 codes of a word, in order."""
        for j in range(PER_WORD):
            acc = acc + dec(TAB, a_word, j) * dec(TAB, w_word, j)
        return acc

    @T.prim_func(private=True)
    def fp8_cpu(a: T.handle, w: T.handle, sa: T.handle, sw: T.handle, tab: T.handle, y: T.handle):
        M = T.int64()
        A = T.match_buffer(a, (M, kw), "uint32")
        W = T.match_buffer(w, (n, kw), "uint32")
        SA = T.match_buffer(sa, (1,), "float32")
        SW = T.match_buffer(sw, (n,), "float32")
        TAB = T.match_buffer(tab, (256,), "float32")
        Y = T.match_buffer(y, (M, n), "float32")
        for mn in T.parallel(M * n):
            acc: T.float32 = T.float32(0)
            for q in range(kw):
                acc = accumulate(acc, TAB, A[mn // n, q], W[mn % n, q])
            Y[mn // n, mn % n] = acc * SA[0] * SW[mn % n]

    return finish(fp8_cpu, name)

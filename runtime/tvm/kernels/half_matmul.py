"""bf16 / fp16 kernels: activation rounding and the W16A16 GEMM with fp32 accumulation.

The rewritten ONNX computes ``MatMul(Cast_f32(Cast_h(x)), Cast_f32(W_h))``: both operands are
16-bit values, the product of two of them is exact in float32 and the sum is fp32. The kernels:

* :func:`round_pack_primfunc` — ``x[M, K]`` float32 → 16-bit values (round to nearest even,
  bit-exact to ml_dtypes / ONNX Runtime Cast) packed two per ``uint32`` word ``[M, KW]``, zero
  in the K padding. bf16 rounding is done on the integer bit pattern; fp16 by TVM's IEEE cast
  (exact on LLVM and CUDA) and stored as bits;
* :func:`matmul_primfunc` — the GEMM: CUDA through the tensor-core kernel of :mod:`.mma`
  (``mma.sync.m16n8k16.f32.bf16.bf16.f32`` / ``.f16.f16``); LLVM a reference loop decoding the
  halves from the words.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lpcompile.runtime.tvm.kernels import mma
from lpcompile.runtime.tvm.kernels.common import check_half, f32_to_bf16, finish, half_storage, is_cuda, u32

logger = logging.getLogger(__name__)

PER_WORD = 2
BLOCK = 256


def padded_words(k: int) -> int:
    return mma.padded_words(k, PER_WORD)


def pack_weight(w_nk: np.ndarray, element: str) -> np.ndarray:
    """16-bit weight ``[N, K]`` (bf16/fp16 array, or float32 to be rounded) → ``uint32 [N, KW]``."""
    bits = half_storage(w_nk, element).view(np.uint16)
    n, k = bits.shape
    kw = padded_words(k)
    out = np.zeros((n, kw * PER_WORD), dtype=np.uint16)
    out[:, :k] = bits
    return np.ascontiguousarray(out).view(np.uint32)


def _bits(v: Any, element: str) -> Any:
    from tvm import tirx

    if element == "bfloat16":
        return tirx.Cast("uint32", f32_to_bf16(v))
    return tirx.Cast("uint32", tirx.reinterpret("uint16", tirx.Cast("float16", v)))


def _to_f32(bits16: Any, element: str) -> Any:
    from tvm import tirx

    if element == "bfloat16":
        return tirx.reinterpret("float32", tirx.shift_left(bits16, u32(16)))
    return tirx.Cast("float32", tirx.reinterpret("float16", tirx.Cast("uint16", bits16)))


def round_pack_primfunc(k: int, element: str, target: Any, name: str) -> Any:
    """``(X[M, k] f32, S[1] f32, H[M, KW] u32)``: ``round_h(X / S[0])`` packed two values per word.

    ``S = [1]`` is the activation Cast round trip of the ONNX model (x / 1 is exact). (The scale
    argument also keeps the call from looking like a reshape to Relax's dataflow rewrites.)
    """
    from tvm.script import tirx as T

    check_half(element)
    kw = padded_words(k)

    def word(X: Any, m: Any, w: Any, s: Any) -> Any:
        from tvm import tirx

        out = u32(0)
        for j in range(PER_WORD):
            kk = w * PER_WORD + j
            c = tirx.Select(kk < k, _bits(X[m, tirx.min(kk, k - 1)] / s, element), u32(0))
            out = tirx.bitwise_or(out, tirx.shift_left(c, u32(16 * j)))
        return out

    if is_cuda(target):

        @T.prim_func(private=True)
        def rp_cuda(x: T.handle, sa: T.handle, h: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, k), "float32")
            SA = T.match_buffer(sa, (1,), "float32")
            H = T.match_buffer(h, (M, kw), "uint32")
            for b in T.thread_binding(T.ceildiv(M * kw, T.int64(BLOCK)), thread="blockIdx.x"):
                for t in T.thread_binding(BLOCK, thread="threadIdx.x"):
                    if b * BLOCK + t < M * kw:
                        H[(b * BLOCK + t) // kw, (b * BLOCK + t) % kw] = word(
                            X, (b * BLOCK + t) // kw, (b * BLOCK + t) % kw, SA[0]
                        )

        return finish(rp_cuda, name)

    @T.prim_func(private=True)
    def rp_cpu(x: T.handle, sa: T.handle, h: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, k), "float32")
        SA = T.match_buffer(sa, (1,), "float32")
        H = T.match_buffer(h, (M, kw), "uint32")
        for m in T.parallel(M):
            for w in range(kw):
                H[m, w] = word(X, m, w, SA[0])

    return finish(rp_cpu, name)


def matmul_primfunc(k: int, n: int, element: str, target: Any, name: str) -> Any:
    """The 16-bit GEMM ``(A[M, KW] u32, W[n, KW] u32, SA[1] f32, SW[n] f32, Y[M, n] f32)``.

    ``SA``/``SW`` are output scales (ones for a plain bf16/fp16 MatMul) so that the CUDA kernel
    is the same tensor-core GEMM as the FP8 one.
    """
    from tvm.script import tirx as T

    check_half(element)
    kw = padded_words(k)
    if is_cuda(target):
        return mma.mma_gemm_primfunc(element, kw, n, scaled=True, name=name)

    def half(word: Any, j: int) -> Any:
        from tvm import tirx

        return _to_f32(tirx.bitwise_and(tirx.shift_right(word, u32(16 * j)), u32(0xFFFF)), element)

    def accumulate(acc: Any, a_word: Any, w_word: Any) -> Any:
        for j in range(PER_WORD):
            acc = acc + half(a_word, j) * half(w_word, j)
        return acc

    @T.prim_func(private=True)
    def half_cpu(a: T.handle, w: T.handle, sa: T.handle, sw: T.handle, y: T.handle):
        M = T.int64()
        A = T.match_buffer(a, (M, kw), "uint32")
        W = T.match_buffer(w, (n, kw), "uint32")
        SA = T.match_buffer(sa, (1,), "float32")
        SW = T.match_buffer(sw, (n,), "float32")
        Y = T.match_buffer(y, (M, n), "float32")
        for mn in T.parallel(M * n):
            acc: T.float32 = T.float32(0)
            for q in range(kw):
                acc = accumulate(acc, A[mn // n, q], W[mn % n, q])
            Y[mn // n, mn % n] = acc * SA[0] * SW[mn % n]

    return finish(half_cpu, name)


def round_trip_primfunc(element: str, target: Any, name: str) -> Any:
    """``(X[L] f32, S[1] f32, Y[L] f32)``: ``Y = f32(round_h(X / S)) · S`` — with ``S = [1]`` an
    activation Cast round trip, exactly.

    Used for rounded activations that feed ops without a 16-bit kernel (TVM's own fused
    ``astype`` chains may fold the round trip away).
    """
    from tvm.script import tirx as T

    check_half(element)

    def value(X: Any, i: Any, s: Any) -> Any:
        return _to_f32(_bits(X[i] / s, element), element) * s

    if is_cuda(target):

        @T.prim_func(private=True)
        def rt_cuda(x: T.handle, sa: T.handle, y: T.handle):
            L = T.int64()
            X = T.match_buffer(x, (L,), "float32")
            SA = T.match_buffer(sa, (1,), "float32")
            Y = T.match_buffer(y, (L,), "float32")
            for b in T.thread_binding(T.ceildiv(L, T.int64(BLOCK)), thread="blockIdx.x"):
                for t in T.thread_binding(BLOCK, thread="threadIdx.x"):
                    if b * BLOCK + t < L:
                        Y[b * BLOCK + t] = value(X, b * BLOCK + t, SA[0])

        return finish(rt_cuda, name)

    @T.prim_func(private=True)
    def rt_cpu(x: T.handle, sa: T.handle, y: T.handle):
        L = T.int64()
        X = T.match_buffer(x, (L,), "float32")
        SA = T.match_buffer(sa, (1,), "float32")
        Y = T.match_buffer(y, (L,), "float32")
        for i in T.parallel(L):
            Y[i] = value(X, i, SA[0])

    return finish(rt_cpu, name)

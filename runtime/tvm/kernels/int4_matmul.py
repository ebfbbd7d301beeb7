"""int4 weight-only kernels: packed 4-bit weights with blocked scales × fp32/fp16/bf16 activations.

Storage (:func:`pack_weight`): the weight ``W[K, N]`` is stored transposed and packed,
``Wp[N, KW]`` ``uint32`` with eight 4-bit codes per word along K (element ``k`` in word
``k // 8``, bits ``4·(k % 8)``, low nibble first) in offset binary ``u = code + 8`` (the
MatMulNBits convention, so its bytes repack without arithmetic); K is padded to whole 32-element
tiles with ``u = 8`` (weight 0). Scales ``S[N, NB]`` (``NB = ⌈K / block⌉``) are float16 (the
QDQ pattern) or float32 (MatMulNBits). The dequantized weight never exists in global memory:
kernels read the packed words and decode in registers.

Decoding a nibble without an int→float conversion: ``reinterpret_f32(0x4B000000 | u) = 2^23 + u``
exactly, so ``code = that − (2^23 + 8)`` costs one LOP3 and one FADD.

Numerics:

* ``scale_dtype="float16"`` follows ``DequantizeLinear`` (fp16 output) → ``Cast``: every weight
  is ``fp16(code · scale)`` (one rounding; the product is exact in fp32) widened to fp32. The LLVM
  kernel and the CUDA GEMM reproduce this exactly. The CUDA GEMV factors the scale out of each
  8-element word (``Σ x·code`` then ``· scale``) and so skips that fp16 rounding: a difference
  of at most half an fp16 ULP (2⁻¹¹ relative) per weight from the ONNX model.
* ``scale_dtype="float32"`` follows MatMulNBits: ``code · scale`` in fp32.
* Accumulation is fp32 everywhere.

Kernels (:func:`matmul_primfunc` picks one):

* LLVM: parallel loops, the reference;
* CUDA GEMV (static ``M ≤ 8``): 4 warps per block, each warp 4 output columns; the activation
  rows are staged once per block in shared memory (as fp32); consecutive lanes read
  consecutive packed words (coalesced), one per column, and the matching 8 activations once
  (two 16-byte shared loads) for all four columns; a warp-shuffle reduction finishes each
  column;
* CUDA GEMM: 64 × 64 output tiles, 256 threads with 4 × 4 register tiles, K in stages of 32;
  each thread unpacks one packed word per stage into the shared-memory weight tile.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lpcompile.errors import UsageError
from lpcompile.runtime.tvm.kernels.common import STORAGE_DTYPES, f32, finish, is_cuda, load_as_f32, u32

logger = logging.getLogger(__name__)

PER_WORD = 8
TILE_K = 32
WORDS_PER_TILE = TILE_K // PER_WORD
GEMV_MAX_ROWS = 8
_MAGIC_BITS = 0x4B000000
_MAGIC = float(2**23 + 8)
SMEM_LIMIT = 48 * 1024


def padded_words(k: int) -> int:
    return -(-k // TILE_K) * WORDS_PER_TILE


def pack_weight(codes_kn: np.ndarray) -> np.ndarray:
    """Signed int4 codes ``[K, N]`` (any integer dtype, values in [-8, 7]) → ``uint32 [N, KW]``."""
    codes = np.asarray(codes_kn).astype(np.int16)
    if codes.ndim != 2:
        raise UsageError(f"int4 weight must be 2-D [K, N], got shape {codes.shape}")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise UsageError("int4 codes must lie in [-8, 7]")
    k, n = codes.shape
    kw = padded_words(k)
    u = np.full((n, kw * PER_WORD), 8, dtype=np.uint32)
    u[:, :k] = (codes.T + 8).astype(np.uint32)
    u = u.reshape(n, kw, PER_WORD)
    shifts = (4 * np.arange(PER_WORD, dtype=np.uint32))[None, None, :]
    return np.ascontiguousarray(np.bitwise_or.reduce(u << shifts, axis=2).astype(np.uint32))


def pack_scales(scale: np.ndarray, n: int, scale_dtype: str) -> np.ndarray:
    """Block scales ``[NB, N]`` (QDQ layout) → ``[N, NB]`` in ``scale_dtype``."""
    s = np.asarray(scale)
    if s.ndim != 2 or s.shape[1] != n:
        raise UsageError(f"int4 scales must be [blocks, {n}], got {s.shape}")
    return np.ascontiguousarray(s.T.astype(np.float16 if scale_dtype == "float16" else np.float32))


def repack_matmul_nbits(b: np.ndarray, k: int, n: int, block: int) -> np.ndarray:
    """MatMulNBits ``B`` (uint8 ``[N, n_blocks, block/2]``, zero point 8) → ``uint32 [N, KW]``."""
    b = np.asarray(b, dtype=np.uint8).reshape(n, -1)
    lo = b & 0x0F
    hi = b >> 4
    u = np.empty((n, b.shape[1] * 2), dtype=np.int16)
    u[:, 0::2] = lo
    u[:, 1::2] = hi
    codes = u[:, :k] - 8
    return pack_weight(codes.T)


def _nibble_code(word: Any, j: int) -> Any:
    """Signed code of nibble ``j`` of an offset-binary word, as an exact float32."""
    from tvm import tirx

    bits = tirx.bitwise_or(tirx.bitwise_and(tirx.shift_right(word, u32(4 * j)), u32(0xF)), u32(_MAGIC_BITS))
    return tirx.reinterpret("float32", bits) - f32(_MAGIC)


def _weight(code: Any, scale: Any, scale_dtype: str) -> Any:
    """DequantizeLinear value of one code: fp16(code · scale) for fp16 scales, else fp32 product."""
    from tvm import tirx

    prod = code * tirx.Cast("float32", scale)
    if scale_dtype == "float16":
        return tirx.Cast("float32", tirx.Cast("float16", prod))
    return prod


def _check(k: int, n: int, block: int, act_dtype: str, scale_dtype: str) -> tuple[int, int]:
    if act_dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"int4 kernel activations must be float32, float16 or bfloat16, not {act_dtype!r}")
    if scale_dtype not in ("float16", "float32"):
        raise UsageError(f"int4 scales must be float16 or float32, not {scale_dtype!r}")
    if k < 1 or n < 1 or block < 1:
        raise UsageError(f"bad int4 matmul shape K={k}, N={n}, block={block}")
    return padded_words(k), -(-k // block)


def matmul_primfunc(
    k: int,
    n: int,
    block: int,
    target: Any,
    name: str,
    *,
    act_dtype: str = "float32",
    scale_dtype: str = "float16",
    rows: int | None = None,
) -> Any:
    """``(X[M, k] act, Wp[n, KW] u32, S[n, NB] scale_dtype, Y[M, n] f32)``.

    Args:
        k, n: reduction and output sizes; ``block`` the scale block along k.
        target: LLVM or CUDA target (decides the kernel).
        act_dtype: ``float32`` / ``float16`` / ``bfloat16`` (passed as uint16 bits).
        scale_dtype: ``float16`` (QDQ semantics) or ``float32`` (MatMulNBits semantics).
        rows: the static row count when known; CUDA uses the GEMV kernel for ``rows ≤ 8``.
    """
    _check(k, n, block, act_dtype, scale_dtype)
    if is_cuda(target):
        if rows is not None and rows <= GEMV_MAX_ROWS:
            return _gemv_cuda(k, n, block, name, act_dtype, scale_dtype, rows)
        return _gemm_cuda(k, n, block, name, act_dtype, scale_dtype)
    return _cpu(k, n, block, name, act_dtype, scale_dtype)


def _cpu(k: int, n: int, block: int, name: str, act_dtype: str, scale_dtype: str) -> Any:
    from tvm import tirx
    from tvm.script import tirx as T

    kw, nb = padded_words(k), -(-k // block)
    store = STORAGE_DTYPES[act_dtype]
    full = k // PER_WORD

    def word_terms(acc: Any, X: Any, S: Any, m: Any, nn: Any, word: Any, q: Any, guard: bool) -> Any:
        for j in range(PER_WORD):
            kk = q * PER_WORD + j
            w = _weight(_nibble_code(word, j), S[nn, tirx.min(kk // block, nb - 1)], scale_dtype)
            x = load_as_f32(X, m, tirx.min(kk, k - 1))
            term = x * w
            acc = acc + (tirx.Select(kk < k, term, f32(0.0)) if guard else term)
        return acc

    @T.prim_func(private=True)
    def int4_cpu(x: T.handle, wp: T.handle, s: T.handle, y: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, k), store)
        Wp = T.match_buffer(wp, (n, kw), "uint32")
        S = T.match_buffer(s, (n, nb), scale_dtype)
        Y = T.match_buffer(y, (M, n), "float32")
        for mn in T.parallel(M * n):
            acc: T.float32 = T.float32(0)
            for q in range(full):
                acc = word_terms(acc, X, S, mn // n, mn % n, Wp[mn % n, q], q, False)
            for q in range(full, -(-k // PER_WORD)):
                acc = word_terms(acc, X, S, mn // n, mn % n, Wp[mn % n, q], q, True)
            Y[mn // n, mn % n] = acc

    return finish(int4_cpu, name)


GEMV_WARPS = 4
GEMV_COLS = 4
GEMV_VEC = 4


def _gemv_cuda(k: int, n: int, block: int, name: str, act_dtype: str, scale_dtype: str, rows: int) -> Any:
    from tvm import tirx
    from tvm.script import tirx as T

    kw, nb = padded_words(k), -(-k // block)
    kp = kw * PER_WORD
    store = STORAGE_DTYPES[act_dtype]
    threads = GEMV_WARPS * 32
    cols_per_block = GEMV_WARPS * GEMV_COLS
    span = 32 * GEMV_VEC  # words a warp covers per iteration
    iters = -(-kw // span)
    stage = -(-(rows * kp) // threads)
    word_scale = block % PER_WORD == 0
    if rows * kp * 4 > SMEM_LIMIT:
        raise UsageError(f"int4 GEMV: {rows} rows × K={k} do not fit in shared memory; use the GEMM kernel")

    def word_dot(xr: Any, word: Any, k0: Any, S: Any, nn: Any) -> Any:
        """Σ_j xr[j] · code_j (· scale per element when blocks are not word aligned)."""
        part = None
        for j in range(PER_WORD):
            term = xr[j] * _nibble_code(word, j)
            if not word_scale:
                term = term * tirx.Cast("float32", S[nn, tirx.min((k0 + j) // block, nb - 1)])
            part = term if part is None else part + term
        if word_scale:
            part = part * tirx.Cast("float32", S[nn, tirx.min(k0 // block, nb - 1)])
        return part

    def col(bx: Any, tid: Any, c: Any) -> Any:
        """Output column ``c`` of this warp, clamped into range (results of clamped columns are dropped)."""
        return tirx.min(bx * cols_per_block + (tid // 32) * GEMV_COLS + c, n - 1)

    @T.prim_func(private=True)
    def int4_gemv(x: T.handle, wp: T.handle, s: T.handle, y: T.handle):
        X = T.match_buffer(x, (rows, k), store)
        Wp = T.match_buffer(wp, (n, kw), "uint32")
        S = T.match_buffer(s, (n, nb), scale_dtype)
        Y = T.match_buffer(y, (rows, n), "float32")
        for bx in T.thread_binding(-(-n // cols_per_block), thread="blockIdx.x"):
            for tid in T.thread_binding(threads, thread="threadIdx.x"):
                xs = T.alloc_buffer((rows * kp,), "float32", scope="shared")
                wv = T.alloc_buffer((GEMV_COLS,), "uint32", scope="local")
                xr = T.alloc_buffer((PER_WORD,), "float32", scope="local")
                acc = T.alloc_buffer((rows * GEMV_COLS,), "float32", scope="local")
                red = T.alloc_buffer((1,), "float32", scope="local")
                for i in range(stage):
                    if i * threads + tid < rows * kp:
                        xs[i * threads + tid] = T.if_then_else(
                            (i * threads + tid) % kp < k,
                            load_as_f32(X, (i * threads + tid) // kp, T.min((i * threads + tid) % kp, k - 1)),
                            T.float32(0),
                        )
                T.tvm_storage_sync("shared")
                for i in T.unroll(rows * GEMV_COLS):
                    acc[i] = T.float32(0)
                for it in range(iters):
                    for v in T.unroll(GEMV_VEC):
                        if it * span + v * 32 + tid % 32 < kw:
                            # one packed word per column (coalesced across the warp) ...
                            for c in T.unroll(GEMV_COLS):
                                wv[c] = Wp[col(bx, tid, c), it * span + v * 32 + tid % 32]
                            # ... against the same 8 activations (two 16-byte shared loads) per row
                            for m in T.unroll(rows):
                                for h in T.vectorized(PER_WORD):
                                    xr[h] = xs[m * kp + (it * span + v * 32 + tid % 32) * PER_WORD + h]
                                for c in T.unroll(GEMV_COLS):
                                    acc[m * GEMV_COLS + c] = acc[m * GEMV_COLS + c] + word_dot(
                                        xr, wv[c], (it * span + v * 32 + tid % 32) * PER_WORD, S, col(bx, tid, c)
                                    )
                for i in T.unroll(rows * GEMV_COLS):
                    red[0] = acc[i]
                    for off in T.unroll(5):
                        red[0] = red[0] + T.tvm_warp_shuffle_down(
                            T.tvm_warp_activemask(), red[0], T.shift_right(16, off), 32, 32
                        )
                    if tid % 32 == 0 and bx * cols_per_block + (tid // 32) * GEMV_COLS + i % GEMV_COLS < n:
                        Y[i // GEMV_COLS, bx * cols_per_block + (tid // 32) * GEMV_COLS + i % GEMV_COLS] = red[0]

    return finish(int4_gemv, name)


GEMM_BM = 64
GEMM_BN = 64
GEMM_THREADS = 256
GEMM_PAD = 4


def _gemm_cuda(k: int, n: int, block: int, name: str, act_dtype: str, scale_dtype: str) -> Any:
    from tvm.script import tirx as T

    kw, nb = padded_words(k), -(-k // block)
    store = STORAGE_DTYPES[act_dtype]
    xs_stride = GEMM_BM + GEMM_PAD
    ws_stride = GEMM_BN + GEMM_PAD
    x_per_thread = GEMM_BM * TILE_K // GEMM_THREADS

    @T.prim_func(private=True)
    def int4_gemm(x: T.handle, wp: T.handle, s: T.handle, y: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, k), store)
        Wp = T.match_buffer(wp, (n, kw), "uint32")
        S = T.match_buffer(s, (n, nb), scale_dtype)
        Y = T.match_buffer(y, (M, n), "float32")
        for bx in T.thread_binding(-(-n // GEMM_BN), thread="blockIdx.x"):
            for by in T.thread_binding(T.ceildiv(M, T.int64(GEMM_BM)), thread="blockIdx.y"):
                for tid in T.thread_binding(GEMM_THREADS, thread="threadIdx.x"):
                    Xs = T.alloc_buffer((TILE_K * xs_stride,), "float32", scope="shared")
                    Ws = T.alloc_buffer((TILE_K * ws_stride,), "float32", scope="shared")
                    acc = T.alloc_buffer((16,), "float32", scope="local")
                    a = T.alloc_buffer((4,), "float32", scope="local")
                    b = T.alloc_buffer((4,), "float32", scope="local")
                    word = T.alloc_buffer((1,), "uint32", scope="local")
                    for i in T.unroll(16):
                        acc[i] = T.float32(0)
                    for kt in range(kw // WORDS_PER_TILE):
                        # activations: 64 rows × 32 k, k-major in shared memory
                        for e in T.unroll(x_per_thread):
                            Xs[((e * GEMM_THREADS + tid) % TILE_K) * xs_stride + (e * GEMM_THREADS + tid) // TILE_K] = (
                                T.if_then_else(
                                    T.Cast("int64", by) * GEMM_BM + (e * GEMM_THREADS + tid) // TILE_K < M
                                    and kt * TILE_K + (e * GEMM_THREADS + tid) % TILE_K < k,
                                    load_as_f32(
                                        X,
                                        T.min(
                                            T.Cast("int64", by) * GEMM_BM + (e * GEMM_THREADS + tid) // TILE_K, M - 1
                                        ),
                                        T.min(kt * TILE_K + (e * GEMM_THREADS + tid) % TILE_K, k - 1),
                                    ),
                                    T.float32(0),
                                )
                            )
                        # weights: one packed word per thread, unpacked in registers
                        word[0] = T.if_then_else(
                            bx * GEMM_BN + tid // WORDS_PER_TILE < n,
                            Wp[
                                T.min(bx * GEMM_BN + tid // WORDS_PER_TILE, n - 1),
                                kt * WORDS_PER_TILE + tid % WORDS_PER_TILE,
                            ],
                            T.uint32(0x88888888),
                        )
                        for j in T.unroll(PER_WORD):
                            Ws[((tid % WORDS_PER_TILE) * PER_WORD + j) * ws_stride + tid // WORDS_PER_TILE] = _weight_j(
                                word[0],
                                j,
                                kt * TILE_K + (tid % WORDS_PER_TILE) * PER_WORD + j,
                                S,
                                T.min(bx * GEMM_BN + tid // WORDS_PER_TILE, n - 1),
                                block,
                                nb,
                                scale_dtype,
                            )
                        T.tvm_storage_sync("shared")
                        for kk in range(TILE_K):
                            for i in T.unroll(4):
                                a[i] = Xs[kk * xs_stride + (tid // 16) * 4 + i]
                                b[i] = Ws[kk * ws_stride + (tid % 16) * 4 + i]
                            for i in T.unroll(4):
                                for j in T.unroll(4):
                                    acc[i * 4 + j] = acc[i * 4 + j] + a[i] * b[j]
                        T.tvm_storage_sync("shared")
                    for i in T.unroll(4):
                        for j in T.unroll(4):
                            if (
                                T.Cast("int64", by) * GEMM_BM + (tid // 16) * 4 + i < M
                                and bx * GEMM_BN + (tid % 16) * 4 + j < n
                            ):
                                Y[
                                    T.Cast("int64", by) * GEMM_BM + (tid // 16) * 4 + i,
                                    bx * GEMM_BN + (tid % 16) * 4 + j,
                                ] = acc[i * 4 + j]

    return finish(int4_gemm, name)


def _weight_j(word: Any, j: Any, kk: Any, S: Any, nn: Any, block: int, nb: int, scale_dtype: str) -> Any:
    """Weight of nibble ``j`` (a loop variable) of ``word`` at reduction index ``kk``."""
    from tvm import tirx

    bits = tirx.bitwise_or(
        tirx.bitwise_and(tirx.shift_right(word, tirx.Cast("uint32", j * 4)), u32(0xF)), u32(_MAGIC_BITS)
    )
    code = tirx.reinterpret("float32", bits) - f32(_MAGIC)
    return _weight(code, S[nn, tirx.min(kk // block, nb - 1)], scale_dtype)

"""A tensor-core GEMM on 32-bit words, shared by the FP8 and the bf16/fp16 kernel families.

``C[M, N] (float32) = A[M, K] · B[N, K]ᵀ`` where both operands arrive packed in ``uint32``
words along K: four FP8 codes or two 16-bit values per word, the first element in the low
bits (the byte order of the unpacked array, so packing is a plain ``view``). In words, both
``mma.sync.m16n8k32`` (8-bit operands) and ``mma.sync.m16n8k16`` (16-bit operands) consume an
A tile of 16 rows × 8 words and a B tile of 8 columns × 8 words, and their register fragments
are the same function of the lane (PTX ISA "Matrix Fragments for mma.m16n8k16 / m16n8k32"):

* A: register ``r`` of lane ``l`` holds word ``(r // 2) * 4 + l % 4`` of row ``l // 4 + (r % 2) * 8``;
* B: register ``r`` holds word ``r * 4 + l % 4`` of column ``l // 4``;
* C: float ``i`` holds row ``l // 4 + (i // 2) * 8``, column ``(l % 4) * 2 + i % 2``.

:func:`fragment_a` / :func:`fragment_b` / :func:`fragment_c` are those maps; the kernel uses
them and :func:`simulate_mma_gemm` (numpy) replays the kernel's data movement with them, so the
tile bookkeeping is tested on machines without a GPU.

Schedule (written directly as warp-level TIR: TVM 0.27's ``sch.tensorize`` crashes in this
wheel — any ``tvm.ir.save_json`` of a PrimExpr segfaults — so the ``T.ptx_legacy.mma``
intrinsic is placed by hand): a thread block of 4 warps computes a 64 × 64 tile of C, each
warp a 32 × 32 quadrant (2 × 4 MMA tiles, 32 float accumulators per lane). K advances in
stages of 16 words (two MMA k-steps): the block copies the A and B stage tiles to shared
memory with 16-byte vector loads (rows padded to 20 words: fragment reads are free of bank
conflicts), then every warp loads its fragments and issues 8 MMAs per k-step. Rows beyond
``M`` and columns beyond ``N`` read zeros; K must be a multiple of 16 words (the Relax
lowering pads the packed operands).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from lpcompile.errors import UsageError
from lpcompile.runtime.tvm.kernels.common import finish

logger = logging.getLogger(__name__)

WARP = 32
BM = 64
BN = 64
BKW = 16
"""Words of K per shared-memory stage (two MMA k-steps)."""
STRIDE = BKW + 4
"""Shared-memory row stride in words (padding against bank conflicts, 16-byte aligned)."""
THREADS = 128
KSTEP = 8
"""Words of K per MMA."""


@dataclass(frozen=True)
class MmaKind:
    """One MMA flavour: PTX shape and operand type names."""

    shape: str
    a_type: str
    b_type: str
    per_word: int


MMA_KINDS: dict[str, MmaKind] = {
    "float8_e4m3fn": MmaKind("m16n8k32", "e4m3", "e4m3", 4),
    "float8_e5m2": MmaKind("m16n8k32", "e5m2", "e5m2", 4),
    "bfloat16": MmaKind("m16n8k16", "bf16", "bf16", 2),
    "float16": MmaKind("m16n8k16", "fp16", "fp16", 2),
}


def fragment_a(lane: Any, r: int) -> tuple[Any, Any]:
    """(row, word) of A register ``r`` of ``lane`` within a 16 × 8-word tile."""
    return lane // 4 + (r % 2) * 8, (r // 2) * 4 + lane % 4


def fragment_b(lane: Any, r: int) -> tuple[Any, Any]:
    """(column, word) of B register ``r`` of ``lane`` within an 8-column × 8-word tile."""
    return lane // 4, r * 4 + lane % 4


def fragment_c(lane: Any, i: int) -> tuple[Any, Any]:
    """(row, column) of accumulator ``i`` of ``lane`` within a 16 × 8 tile."""
    return lane // 4 + (i // 2) * 8, (lane % 4) * 2 + i % 2


def padded_words(k: int, per_word: int) -> int:
    """Words per row after padding K to whole stages."""
    words = -(-k // per_word)
    return -(-words // BKW) * BKW


def mma_gemm_primfunc(element: str, kw: int, n: int, *, scaled: bool, name: str) -> Any:
    """CUDA PrimFunc ``(A[M, kw] u32, B[n, kw] u32, [SA[1] f32, SB[n] f32,] C[M, n] f32)``.

    ``scaled`` multiplies each output by ``SA[0] · SB[col]`` (FP8 dequantization scales).
    """
    from tvm.script import tirx as T

    if element not in MMA_KINDS:
        raise UsageError(f"no tensor-core MMA for {element!r}")
    if kw % BKW:
        raise UsageError(f"packed K ({kw} words) must be a multiple of {BKW}")
    kind = MMA_KINDS[element]
    nblk = -(-n // BN)
    stages = kw // BKW

    def a_frag(lane: Any, r: int) -> tuple[Any, Any]:
        return fragment_a(lane, r)

    def b_frag(lane: Any, r: int) -> tuple[Any, Any]:
        return fragment_b(lane, r)

    def c_frag(lane: Any, i: int) -> tuple[Any, Any]:
        return fragment_c(lane, i)

    @T.prim_func(private=True)
    def gemm(a: T.handle, b: T.handle, sa: T.handle, sb: T.handle, c: T.handle):
        M = T.int64()
        A = T.match_buffer(a, (M, kw), "uint32")
        B = T.match_buffer(b, (n, kw), "uint32")
        SA = T.match_buffer(sa, (1,), "float32")
        SB = T.match_buffer(sb, (n,), "float32")
        C = T.match_buffer(c, (M, n), "float32")
        for bx in T.thread_binding(nblk, thread="blockIdx.x"):
            for by in T.thread_binding(T.ceildiv(M, T.int64(BM)), thread="blockIdx.y"):
                for tid in T.thread_binding(THREADS, thread="threadIdx.x"):
                    As = T.alloc_buffer((BM * STRIDE,), "uint32", scope="shared")
                    Bs = T.alloc_buffer((BN * STRIDE,), "uint32", scope="shared")
                    acc = T.alloc_buffer((32,), "float32", scope="local")
                    af = T.alloc_buffer((8,), "uint32", scope="local")
                    bf = T.alloc_buffer((8,), "uint32", scope="local")
                    for i in T.unroll(32):
                        acc[i] = T.float32(0)
                    for s in range(stages):
                        # global -> shared: 64 rows × 16 words per operand, 8 words per thread
                        for h in T.unroll(2):
                            for v in T.vectorized(4):
                                As[(tid // 2) * STRIDE + (tid % 2) * 8 + h * 4 + v] = T.if_then_else(
                                    T.Cast("int64", by) * BM + tid // 2 < M,
                                    A[
                                        T.min(T.Cast("int64", by) * BM + tid // 2, M - 1),
                                        s * BKW + (tid % 2) * 8 + h * 4 + v,
                                    ],
                                    T.uint32(0),
                                )
                                Bs[(tid // 2) * STRIDE + (tid % 2) * 8 + h * 4 + v] = T.if_then_else(
                                    bx * BN + tid // 2 < n,
                                    B[T.min(bx * BN + tid // 2, n - 1), s * BKW + (tid % 2) * 8 + h * 4 + v],
                                    T.uint32(0),
                                )
                        T.tvm_storage_sync("shared")
                        for ks in T.unroll(BKW // KSTEP):
                            for mi in T.unroll(2):
                                for r in T.unroll(4):
                                    af[mi * 4 + r] = As[
                                        ((tid // WARP) // 2 * 32 + mi * 16 + a_frag(tid % WARP, r)[0]) * STRIDE
                                        + ks * KSTEP
                                        + a_frag(tid % WARP, r)[1]
                                    ]
                            for ni in T.unroll(4):
                                for r in T.unroll(2):
                                    bf[ni * 2 + r] = Bs[
                                        ((tid // WARP) % 2 * 32 + ni * 8 + b_frag(tid % WARP, r)[0]) * STRIDE
                                        + ks * KSTEP
                                        + b_frag(tid % WARP, r)[1]
                                    ]
                            for mi in T.unroll(2):
                                for ni in T.unroll(4):
                                    T.evaluate(
                                        T.ptx_legacy.mma(
                                            kind.shape,
                                            "row",
                                            "col",
                                            kind.a_type,
                                            kind.b_type,
                                            "fp32",
                                            af.data,
                                            mi * 4,
                                            bf.data,
                                            ni * 2,
                                            acc.data,
                                            (mi * 4 + ni) * 4,
                                            False,
                                            dtype="float32",
                                        )
                                    )
                        T.tvm_storage_sync("shared")
                    # epilogue: accumulators -> C (optionally scaled)
                    for mi in T.unroll(2):
                        for ni in T.unroll(4):
                            for i in T.unroll(4):
                                if (
                                    T.Cast("int64", by) * BM
                                    + (tid // WARP) // 2 * 32
                                    + mi * 16
                                    + c_frag(tid % WARP, i)[0]
                                    < M
                                    and bx * BN + (tid // WARP) % 2 * 32 + ni * 8 + c_frag(tid % WARP, i)[1] < n
                                ):
                                    C[
                                        T.Cast("int64", by) * BM
                                        + (tid // WARP) // 2 * 32
                                        + mi * 16
                                        + c_frag(tid % WARP, i)[0],
                                        bx * BN + (tid // WARP) % 2 * 32 + ni * 8 + c_frag(tid % WARP, i)[1],
                                    ] = T.if_then_else(
                                        scaled,
                                        acc[(mi * 4 + ni) * 4 + i]
                                        * SA[0]
                                        * SB[bx * BN + (tid // WARP) % 2 * 32 + ni * 8 + c_frag(tid % WARP, i)[1]],
                                        acc[(mi * 4 + ni) * 4 + i],
                                    )

    return finish(gemm, name)


def simulate_mma_gemm(a_vals: np.ndarray, b_vals: np.ndarray, per_word: int) -> np.ndarray:
    """Replay the kernel's tiling and fragment maps on float64 element values (numpy).

    ``a_vals[M, K]`` and ``b_vals[N, K]`` are the decoded operands with K a multiple of
    ``BKW · per_word``; returns ``A · Bᵀ``. Each MMA is evaluated element-wise from the lanes'
    registers exactly as the PTX fragment layout defines it, so a wrong fragment map or tile
    offset in the kernel shows up here as a wrong product.
    """
    m, k = a_vals.shape
    n = b_vals.shape[0]
    kw = k // per_word
    aw = a_vals.reshape(m, kw, per_word)
    bw = b_vals.reshape(n, kw, per_word)
    out = np.zeros((m, n), dtype=np.float64)
    for by in range(-(-m // BM)):
        for bx in range(-(-n // BN)):
            for s in range(kw // BKW):
                a_s = np.zeros((BM, BKW, per_word))
                b_s = np.zeros((BN, BKW, per_word))
                rows = min(BM, m - by * BM)
                cols = min(BN, n - bx * BN)
                a_s[:rows] = aw[by * BM : by * BM + rows, s * BKW : (s + 1) * BKW]
                b_s[:cols] = bw[bx * BN : bx * BN + cols, s * BKW : (s + 1) * BKW]
                for warp in range(THREADS // WARP):
                    wm, wn = warp // 2 * 32, warp % 2 * 32
                    for ks in range(BKW // KSTEP):
                        for mi in range(2):
                            for ni in range(4):
                                tile = np.zeros((16, 8))
                                regs_a = {}
                                regs_b = {}
                                for lane in range(WARP):
                                    for r in range(4):
                                        row, word = fragment_a(lane, r)
                                        regs_a[lane, r] = a_s[wm + mi * 16 + row, ks * KSTEP + word]
                                    for r in range(2):
                                        col, word = fragment_b(lane, r)
                                        regs_b[lane, r] = b_s[wn + ni * 8 + col, ks * KSTEP + word]
                                # the MMA: element (i, j) = Σ_k A[i, k] B[k, j], rebuilt from registers
                                a_tile = np.zeros((16, KSTEP, per_word))
                                b_tile = np.zeros((8, KSTEP, per_word))
                                for (lane, r), vals in regs_a.items():
                                    row, word = fragment_a(lane, r)
                                    a_tile[row, word] = vals
                                for (lane, r), vals in regs_b.items():
                                    col, word = fragment_b(lane, r)
                                    b_tile[col, word] = vals
                                tile = a_tile.reshape(16, -1) @ b_tile.reshape(8, -1).T
                                for lane in range(WARP):
                                    for i in range(4):
                                        row, col = fragment_c(lane, i)
                                        gr = by * BM + wm + mi * 16 + row
                                        gc = bx * BN + wn + ni * 8 + col
                                        if gr < m and gc < n:
                                            out[gr, gc] += tile[row, col]
    return out

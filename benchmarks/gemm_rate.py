"""What torch's CPU GEMM reaches on this machine, in fp32 and bf16: the ceiling the analysis' probe backward
passes run against (issue 18). Times the two GEMMs of a linear layer's backward (``A·B`` and ``Cᵀ·A``) of a
SmolLM2 MLP shape, 1024 tokens × 576 × 1536 by default, and prints GFLOP/s (median of ``--repeats``).

    python benchmarks/gemm_rate.py [--tokens 1024] [--k 576] [--n 1536] [--threads 2] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    flop = 2 * 2 * args.tokens * args.k * args.n
    print(f"load {os.getloadavg()[0]:.2f}, {args.threads} threads, {args.tokens}x{args.k}x{args.n}")
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(args.tokens, args.k, dtype=dt)
        b = torch.randn(args.k, args.n, dtype=dt)
        c = torch.randn(args.tokens, args.n, dtype=dt)
        for _ in range(3):
            a @ b, c.T @ a
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a @ b, c.T @ a
            times.append(time.perf_counter() - t0)
        print(f"{str(dt).removeprefix('torch.'):9s} {flop / statistics.median(times) / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()

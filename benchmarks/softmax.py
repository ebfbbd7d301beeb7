"""Two-pass vs three-pass softmax: TVM llvm kernels timed side by side.

For each shape (default: single rows of 1K, 64K, 1M and 16M elements and a 4096×1024 batch) both
kernels are compiled with the same plan (chunks, lanes, exp), warmed up, and timed in
alternating samples (median and min of ``--repeats`` samples; a sample loops a kernel until it
has run ≥ 2 ms). Also measured with the same split: a read-only pass and a read+write pass,
giving the memory-traffic floors ``read + copy`` (two-pass) and ``2·read + copy``
(three-pass). Max abs error of each kernel is against a float64 softmax.

    python benchmarks/softmax.py [--json-out benchmarks/softmax.json] [--sizes 1K,64K,1M,16M]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lpcompile.io_utils import atomic_write_text
from lpcompile.twopass import softmax_f64

logger = logging.getLogger(__name__)

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_shape(text: str) -> tuple[int, int]:
    """``16M`` → (1, 16·2^20); ``4096x1K`` → (4096, 1024)."""

    def num(t: str) -> int:
        t = t.strip().upper()
        if t and t[-1] in _SUFFIX:
            return int(float(t[:-1]) * _SUFFIX[t[-1]])
        return int(t)

    if "X" in text.upper():
        r, c = text.upper().split("X", 1)
        return num(r), num(c)
    return 1, num(text)


def _floor_kernels(plan: Any, dtype: str) -> tuple[Any, Any]:
    """(read pass, read+write pass) with the plan's parallel split and vector width."""
    from tvm.script import tirx as T

    R, C, K, CH, W = plan.rows, plan.cols, plan.chunks, plan.chunk, plan.lanes

    @T.prim_func(private=True)
    def read(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        P = T.alloc_buffer((R * K,), "float32")
        for b in T.parallel(R * K):
            acc = T.alloc_buffer((W,), "float32")
            for v in T.vectorized(W):
                acc[v] = T.float32(0)
            for i in range(T.min(CH, C - b % K * CH) // W):
                for v in T.vectorized(W):
                    acc[v] = T.max(acc[v], T.Cast("float32", X[b // K, b % K * CH + i * W + v]))
            P[b] = acc[0]
            for v in range(1, W):
                P[b] = T.max(P[b], acc[v])
        Y[0, 0] = T.Cast(dtype, P[0])

    @T.prim_func(private=True)
    def copy(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"tir.noalias": True})
        for b in T.parallel(R * K):
            for i in range(T.min(CH, C - b % K * CH) // W):
                for v in T.vectorized(W):
                    Y[b // K, b % K * CH + i * W + v] = X[b // K, b % K * CH + i * W + v] * T.Cast(
                        dtype, T.float32(0.5)
                    )

    return read.with_attr("global_symbol", "read"), copy.with_attr("global_symbol", "copy")


def _calibrate(fn: Callable[[], None], min_sample_s: float) -> int:
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    return max(1, int(np.ceil(min_sample_s / once)))


def _sample(fn: Callable[[], None], number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def bench_shape(rows: int, cols: int, dtype: str, repeats: int, min_sample_s: float, seed: int) -> dict[str, Any]:
    import tvm

    from lpcompile.runtime.tvm.softmax import build_softmax, cpu_target, plan_softmax

    plan = plan_softmax(rows, cols)
    kernels = {kind: build_softmax(kind, rows, cols, dtype, plan=plan) for kind in ("two-pass", "three-pass")}
    read_f, copy_f = _floor_kernels(plan, dtype)
    floor_ex = tvm.compile(tvm.IRModule({"read": read_f, "copy": copy_f}), target=cpu_target())
    x = (np.random.default_rng(seed).normal(size=(rows, cols)) * 4).astype(np.float32)
    xt, yt = kernels["two-pass"].tensors(x)
    calls: dict[str, Callable[[], None]] = {
        "two-pass": lambda: kernels["two-pass"].function(xt, yt),
        "three-pass": lambda: kernels["three-pass"].function(xt, yt),
        "read": lambda: floor_ex.mod["read"](xt, yt),
        "copy": lambda: floor_ex.mod["copy"](xt, yt),
    }
    numbers = {k: _calibrate(f, min_sample_s) for k, f in calls.items()}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            samples[k].append(_sample(calls[k], numbers[k]))
    ref = softmax_f64(kernels["two-pass"].tensors(x)[0].numpy().astype(np.float64))
    errs = {k: float(np.abs(kern(x).astype(np.float64) - ref).max()) for k, kern in kernels.items()}
    med = {k: float(np.median(v)) for k, v in samples.items()}
    mn = {k: float(np.min(v)) for k, v in samples.items()}
    return {
        "rows": rows,
        "cols": cols,
        "elements": rows * cols,
        "megabytes": rows * cols * np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize / 1e6,
        "plan": {"chunks": plan.chunks, "chunk": plan.chunk, "lanes": plan.lanes},
        "samples": repeats,
        "calls_per_sample": numbers,
        "two_pass_ms": {"median": med["two-pass"] * 1e3, "min": mn["two-pass"] * 1e3},
        "three_pass_ms": {"median": med["three-pass"] * 1e3, "min": mn["three-pass"] * 1e3},
        "ratio_three_over_two": {
            "median": med["three-pass"] / med["two-pass"],
            "min": mn["three-pass"] / mn["two-pass"],
        },
        "floor_ms": {
            "read_min": mn["read"] * 1e3,
            "copy_min": mn["copy"] * 1e3,
            "two_pass_min": (mn["read"] + mn["copy"]) * 1e3,
            "three_pass_min": (2 * mn["read"] + mn["copy"]) * 1e3,
        },
        "max_abs_err": {"two_pass": errs["two-pass"], "three_pass": errs["three-pass"]},
    }


def _machine() -> dict[str, Any]:
    from lpcompile.runtime.tvm.softmax import cpu_target

    return {
        "cpu": platform.processor() or platform.machine(),
        "llvm_mcpu": cpu_target()["mcpu"],
        "cores": os.cpu_count(),
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS", "default"),
        "loadavg_start": list(os.getloadavg()),
    }


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'shape':>14} {'MB':>7} {'two ms med/min':>17} {'three ms med/min':>17} "
        f"{'3p/2p med':>9} {'3p/2p min':>9} {'floor 2p/3p ms':>15} {'err two':>9} {'err three':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        shape = f"{r['rows']}x{r['cols']}"
        lines.append(
            f"{shape:>14} {r['megabytes']:7.3f} "
            f"{r['two_pass_ms']['median']:8.3f}/{r['two_pass_ms']['min']:<8.3f} "
            f"{r['three_pass_ms']['median']:8.3f}/{r['three_pass_ms']['min']:<8.3f} "
            f"{r['ratio_three_over_two']['median']:9.2f} {r['ratio_three_over_two']['min']:9.2f} "
            f"{r['floor_ms']['two_pass_min']:7.3f}/{r['floor_ms']['three_pass_min']:<7.3f} "
            f"{r['max_abs_err']['two_pass']:9.2e} {r['max_abs_err']['three_pass']:9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1K,64K,1M,16M,4096x1K", help="comma list: 16M (one row) or RxC")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=15, help="timed samples per kernel (median/min)")
    ap.add_argument("--min-sample-ms", type=float, default=2.0, help="each sample loops for at least this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS (default: all cores)")
    ap.add_argument("--json-out", default="benchmarks/softmax.json")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import tvm  # noqa: F401
    except ImportError:
        print("apache-tvm is not installed", file=sys.stderr)
        return 2
    shapes = [parse_shape(s) for s in args.sizes.split(",") if s.strip()]
    machine = _machine()
    results = []
    for rows, cols in shapes:
        logger.info("benchmarking %dx%d %s ...", rows, cols, args.dtype)
        results.append(bench_shape(rows, cols, args.dtype, args.repeats, args.min_sample_ms / 1e3, args.seed))
    machine["loadavg_end"] = list(os.getloadavg())
    print(_table(results))
    print(f"machine: {machine}")
    payload = {"benchmark": "softmax two-pass vs three-pass (TVM llvm)", "dtype": args.dtype, "machine": machine}
    payload["results"] = results
    atomic_write_text(args.json_out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

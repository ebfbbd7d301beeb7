"""lpcompile's TVM kernels against torch half-precision matmuls on the same GPU (issue 5).

    python benchmarks/kernels.py [--repeats 20] [--json-out benchmarks/kernels.json]

On a CUDA machine it builds each kernel for the GPU's architecture and times, side by side in
one run (median of ``--repeats`` samples, each a batch of launches):

==============================  ==========================================  ====================
case                            lpcompile kernel                            baseline
==============================  ==========================================  ====================
int4 GEMV 1×4096×4096           packed int4 (block 128, fp16 scales), fp16  torch fp16 matmul
int4 GEMV 1×4096×11008          activations, GEMV kernel                    torch fp16 matmul
fp8 GEMM 4096³                  E4M3 × E4M3 → fp32 (tensor-core MMA)        torch bf16 matmul
bf16 GEMM 4096³                 bf16 × bf16 → fp32 (tensor-core MMA)        torch bf16 matmul
==============================  ==========================================  ====================

and checks each result against a float64 reference of the same stored (quantized) values:
relative error ``‖y − y64‖ / ‖y64‖`` (GEMMs on the first 256 rows). Goals (H100/H200): int4 GEMV
≥ 3× faster than fp16 torch, fp8 GEMM ≥ 1.5× faster than bf16 torch, both within 1 % error.
Results go to the "Kernels (issue 5)" section of ``benchmarks/RESULTS.md`` (other sections are
kept) and to JSON. The baseline is torch on CUDA when available, else cuBLAS through TVM's
contrib library when the TVM build has it, else the speed-up column stays empty.

Without a GPU it runs the LLVM correctness part (the same kernel families at small shapes, on
the CPU, against the float64 reference) and exits 0 saying that no timing was possible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lpcompile.io_utils import atomic_write_text

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
SECTION = "## Kernels (issue 5)"
GOALS = {"int4_gemv": 3.0, "fp8_gemm": 1.5}
ERROR_GOAL = 0.01


@dataclasses.dataclass
class Case:
    """One benchmark case: how to build the kernel, its inputs, reference and baseline."""

    name: str
    family: str
    m: int
    k: int
    n: int
    baseline: str  # "float16" | "bfloat16"


def cases(small: bool) -> list[Case]:
    if small:
        return [
            Case("int4 GEMV 1×512×256", "int4_gemv", 1, 512, 256, "float16"),
            Case("int4 GEMM 96×256×160", "int4_gemm", 96, 256, 160, "float16"),
            Case("fp8 E4M3 GEMM 96×256×160", "fp8_gemm", 96, 256, 160, "bfloat16"),
            Case("bf16 GEMM 96×256×160", "bf16_gemm", 96, 256, 160, "bfloat16"),
        ]
    return [
        Case("int4 GEMV 1×4096×4096", "int4_gemv", 1, 4096, 4096, "float16"),
        Case("int4 GEMV 1×4096×11008", "int4_gemv", 1, 4096, 11008, "float16"),
        Case("fp8 E4M3 GEMM 4096³", "fp8_gemm", 4096, 4096, 4096, "bfloat16"),
        Case("bf16 GEMM 4096³", "bf16_gemm", 4096, 4096, 4096, "bfloat16"),
    ]


@dataclasses.dataclass
class Prepared:
    """A built kernel with device arguments, the output tensor and its float64 reference."""

    func: Any
    args: list[Any]
    out: Any
    ref: np.ndarray
    ref_rows: int


def prepare(case: Case, target: Any, device: Any, rng: np.random.Generator) -> Prepared:
    import tvm

    from lpcompile.formats import MATMUL_LAYOUT, get_format, quantize_weight
    from lpcompile.runtime.tvm.kernels import fp8_matmul, half_matmul, int4_matmul
    from lpcompile.runtime.tvm.kernels.common import fp8_table, is_cuda

    m, k, n = case.m, case.k, case.n

    def t(a: np.ndarray) -> Any:
        return tvm.runtime.tensor(np.ascontiguousarray(a), device)

    rows = min(m, 256)
    if case.family.startswith("int4"):
        fmt = dataclasses.replace(get_format("int4_b128"), block_size=128)
        q = quantize_weight(fmt, rng.standard_normal((k, n)).astype(np.float32), MATMUL_LAYOUT)
        x = rng.standard_normal((m, k)).astype(np.float16)
        gemv = case.family == "int4_gemv"
        f = int4_matmul.matmul_primfunc(k, n, 128, target, "kernel", act_dtype="float16", rows=m if gemv else None)
        out = t(np.zeros((m, n), np.float32))
        args = [t(x), t(int4_matmul.pack_weight(q.codes)), t(int4_matmul.pack_scales(q.scale, n, "float16")), out]
        w = q.codes.astype(np.float64) * np.repeat(q.scale.astype(np.float64), 128, axis=0)[:k]
        ref = x[:rows].astype(np.float64) @ w
    elif case.family == "fp8_gemm":
        e = "float8_e4m3fn"
        a = (rng.standard_normal((m, k)) * 64).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        wq = (rng.standard_normal((n, k)) * 64).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        sa = np.array([0.01], np.float32)
        sw = rng.uniform(0.001, 0.01, n).astype(np.float32)
        f = fp8_matmul.matmul_primfunc(k, n, e, target, "kernel")
        out = t(np.zeros((m, n), np.float32))
        args = [t(fp8_matmul.pack_weight(a, e)), t(fp8_matmul.pack_weight(wq, e)), t(sa), t(sw)]
        if not is_cuda(target):
            args.append(t(fp8_table(e)))
        args.append(out)
        ref = (a[:rows].astype(np.float64) @ wq.astype(np.float64).T) * float(sa[0]) * sw.astype(np.float64)
    else:
        e = "bfloat16"
        a = rng.standard_normal((m, k)).astype(np.float32).astype(ml_dtypes.bfloat16)
        wq = rng.standard_normal((n, k)).astype(np.float32).astype(ml_dtypes.bfloat16)
        f = half_matmul.matmul_primfunc(k, n, e, target, "kernel")
        out = t(np.zeros((m, n), np.float32))
        args = [
            t(half_matmul.pack_weight(a, e)),
            t(half_matmul.pack_weight(wq, e)),
            t(np.ones(1, np.float32)),
            t(np.ones(n, np.float32)),
            out,
        ]
        ref = a[:rows].astype(np.float64) @ wq.astype(np.float64).T
    ex = tvm.compile(tvm.IRModule({"kernel": f}), target=target)
    return Prepared(ex["kernel"], args, out, ref, rows)


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out[: ref.shape[0]].astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-300))


def median_ms(run: Callable[[], None], sync: Callable[[], None], repeats: int, min_ms: float = 20.0) -> float:
    """Median per-call time: each sample loops ``run`` until ``min_ms`` has passed."""
    run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    single = max(time.perf_counter() - t0, 1e-6)
    number = max(1, int(min_ms / 1000 / single))
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(number):
            run()
        sync()
        samples.append((time.perf_counter() - t0) / number * 1000)
    return float(np.median(samples))


def torch_baseline(case: Case, repeats: int) -> tuple[float | None, str]:
    """Median ms of ``x @ W`` in the baseline dtype with torch on CUDA (None when unavailable)."""
    try:
        import torch
    except ImportError:
        return None, "torch missing"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA"
    dtype = torch.float16 if case.baseline == "float16" else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(case.m, case.k, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(case.k, case.n, device="cuda", dtype=dtype, generator=gen)
    ms = median_ms(lambda: torch.matmul(x, w), torch.cuda.synchronize, repeats)
    return ms, f"torch {torch.__version__} {case.baseline}"


def run_gpu(repeats: int) -> dict[str, Any]:
    import tvm

    dev = tvm.cuda(0)
    major, minor = (int(v) for v in dev.compute_version.split("."))
    arch = f"sm_{major}{minor}"
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    rng = np.random.default_rng(0)
    rows = []
    for case in cases(small=False):
        if case.family == "fp8_gemm" and major * 10 + minor < 89:
            rows.append({"case": case.name, "error": f"FP8 MMA needs sm_89+, this GPU is {arch}"})
            continue
        prep = prepare(case, target, dev, rng)
        ms = median_ms(lambda p=prep: p.func(*p.args), dev.sync, repeats)
        err = rel_error(prep.out.numpy(), prep.ref)
        base_ms, base = torch_baseline(case, repeats)
        speedup = base_ms / ms if base_ms else None
        goal = GOALS.get(case.family)
        rows.append(
            {
                "case": case.name,
                "family": case.family,
                "m": case.m,
                "k": case.k,
                "n": case.n,
                "lpcompile_ms": ms,
                "baseline": base,
                "baseline_ms": base_ms,
                "speedup": speedup,
                "rel_error": err,
                "goal_speedup": goal,
                "meets_goal": None if goal is None or speedup is None else bool(speedup >= goal and err <= ERROR_GOAL),
            }
        )
        print(
            f"{case.name}: {ms:.4f} ms, baseline {base_ms if base_ms is None else f'{base_ms:.4f} ms'} "
            f"({base}), speed-up {speedup if speedup is None else f'{speedup:.2f}×'}, rel. error {err:.2e}"
        )
    return {
        "device": dev.device_name,
        "arch": arch,
        "repeats": repeats,
        "rows": rows,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_cpu_correctness() -> list[dict[str, Any]]:
    import tvm

    from lpcompile.runtime.tvm.kernels.common import as_target

    rng = np.random.default_rng(0)
    target = as_target("llvm")
    rows = []
    for case in cases(small=True):
        prep = prepare(case, target, tvm.cpu(0), rng)
        prep.func(*prep.args)
        err = rel_error(prep.out.numpy(), prep.ref)
        rows.append({"case": case.name + " (llvm)", "rel_error": err, "ok": err <= ERROR_GOAL})
        print(f"{case.name} (llvm): rel. error vs float64 {err:.2e}")
    return rows


def section(result: dict[str, Any]) -> str:
    lines = [
        SECTION,
        "",
        f"Device: **{result['device']}** ({result['arch']}), {result['date']}; median of "
        f"{result['repeats']} samples; baseline and lpcompile timed in the same run.",
        "",
        "| case | lpcompile ms | baseline | baseline ms | speed-up | goal | rel. error vs fp64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | – | – | – | – | – | {r['error']} |")
            continue
        sp = "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        goal = (
            "–"
            if r["goal_speedup"] is None
            else f"≥ {r['goal_speedup']}× " + ("✓" if r["meets_goal"] else "✗" if r["meets_goal"] is not None else "?")
        )
        base_ms = "–" if r["baseline_ms"] is None else f"{r['baseline_ms']:.4f}"
        lines.append(
            f"| {r['case']} | {r['lpcompile_ms']:.4f} | {r['baseline']} | {base_ms} | {sp} | {goal} | "
            f"{r['rel_error']:.2e} |"
        )
    lines += ["", "Command: `python benchmarks/kernels.py`.", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = BENCH_DIR / "RESULTS.md") -> None:
    """Replace this section of RESULTS.md (or append it), keeping every other section."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip() + "\n\n" + text
    else:
        nxt = re.search(r"^## ", old[start + len(SECTION) :], re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(old)
        new = old[:start] + text + ("\n" + old[end:] if nxt else "")
    atomic_write_text(path, new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json-out", default=str(BENCH_DIR / "kernels.json"))
    p.add_argument("--no-results-md", action="store_true", help="do not touch benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    try:
        import tvm
    except ImportError:
        print("Apache TVM is not installed (pip install 'lpcompile[tvm]'); nothing to benchmark.")
        return 0
    if not tvm.cuda(0).exist:
        print("No CUDA device: running the LLVM correctness part only (no timings).")
        rows = run_cpu_correctness()
        ok = all(r["ok"] for r in rows)
        print("all kernel families within 1 % of the float64 reference" if ok else "ERROR: a kernel is off")
        return 0 if ok else 1
    result = run_gpu(args.repeats)
    atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    if not args.no_results_md:
        write_section(section(result))
        print(f"wrote {BENCH_DIR / 'RESULTS.md'} ({SECTION[3:]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

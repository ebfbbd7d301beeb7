"""A fixed set of kernel instances, for code inspection, GPU tests and benchmarks.

:func:`suite` names one PrimFunc per kernel family and shape; :func:`build_sources` compiles a
suite for a CUDA target and returns the generated CUDA C. ``python -m
lpcompile.runtime.tvm.kernel_suite OUT.cu [--arch sm_90] [--small]`` does that in a child
process (how tests and benchmarks use it: TVM CUDA builds are kept out of the caller's process).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpcompile.runtime.tvm.kernels import fp8_matmul, half_matmul, int4_matmul

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelCase:
    """One kernel instance: its family, shape and a builder ``make(target, name) -> PrimFunc``."""

    name: str
    family: str
    m: int | None
    k: int
    n: int
    make: Callable[[Any, str], Any]


def suite(small: bool = True) -> list[KernelCase]:
    """Kernel instances: small shapes (fast builds, tests) or the benchmark shapes."""
    if small:
        shapes = {"gemv": (1, 512, 256), "gemm": (128, 256, 128)}
    else:
        shapes = {"gemv": (1, 4096, 4096), "gemv_wide": (1, 4096, 11008), "gemm": (4096, 4096, 4096)}
    cases: list[KernelCase] = []
    for tag, (m, k, n) in shapes.items():
        if tag.startswith("gemv"):
            for act in ("float16", "float32"):
                cases.append(
                    KernelCase(
                        f"int4_gemv_{act}_{k}x{n}",
                        "int4_gemv",
                        m,
                        k,
                        n,
                        lambda t, nm, k=k, n=n, m=m, act=act: int4_matmul.matmul_primfunc(
                            k, n, 128, t, nm, act_dtype=act, scale_dtype="float16", rows=m
                        ),
                    )
                )
            continue
        cases.append(
            KernelCase(
                f"int4_gemm_{m}x{k}x{n}",
                "int4_gemm",
                None,
                k,
                n,
                lambda t, nm, k=k, n=n: int4_matmul.matmul_primfunc(k, n, 128, t, nm, act_dtype="float16"),
            )
        )
        for element, short in (("float8_e4m3fn", "e4m3"), ("float8_e5m2", "e5m2")):
            cases.append(
                KernelCase(
                    f"fp8_{short}_gemm_{m}x{k}x{n}",
                    f"fp8_{short}",
                    None,
                    k,
                    n,
                    lambda t, nm, k=k, n=n, e=element: fp8_matmul.matmul_primfunc(k, n, e, t, nm),
                )
            )
            cases.append(
                KernelCase(
                    f"fp8_{short}_quantize_{k}",
                    "fp8_quantize",
                    None,
                    k,
                    0,
                    lambda t, nm, k=k, e=element: fp8_matmul.quantize_pack_primfunc(k, e, t, nm),
                )
            )
        for element, short in (("bfloat16", "bf16"), ("float16", "fp16")):
            cases.append(
                KernelCase(
                    f"{short}_gemm_{m}x{k}x{n}",
                    short,
                    None,
                    k,
                    n,
                    lambda t, nm, k=k, n=n, e=element: half_matmul.matmul_primfunc(k, n, e, t, nm),
                )
            )
            cases.append(
                KernelCase(
                    f"{short}_round_{k}",
                    f"{short}_round",
                    None,
                    k,
                    0,
                    lambda t, nm, k=k, e=element: half_matmul.round_pack_primfunc(k, e, t, nm),
                )
            )
    return cases


def build(target: Any, small: bool = True) -> Any:
    """Compile the suite for ``target`` into one module (``tvm.compile`` of a TIR ``IRModule``)."""
    import tvm

    from lpcompile.runtime.tvm.kernels.common import as_target

    tgt = as_target(target)
    funcs = {c.name: c.make(tgt, c.name) for c in suite(small)}
    return tvm.compile(tvm.IRModule(funcs), target=tgt)


def build_sources(arch: str = "sm_90", small: bool = True, source_only: bool = True) -> str:
    """The CUDA C of the suite compiled for ``arch``.

    ``source_only`` replaces TVM's CUDA compile callback for this process by one that returns the
    source unchanged (the module is then not runnable): inspection compiles the source itself.
    """
    from lpcompile.runtime.tvm.build import cuda_source

    if source_only:
        _skip_device_compile()
    return cuda_source(build({"kind": "cuda", "arch": arch}, small))


def _skip_device_compile() -> None:
    import tvm.support.nvcc  # noqa: F401  (registers the default callback first; ours overrides it)
    import tvm_ffi

    def source_as_binary(code: str) -> bytes:
        return code.encode("utf-8")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", source_as_binary, override=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write the CUDA source")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--large", action="store_true", help="benchmark shapes instead of the small ones")
    args = p.parse_args(argv)
    src = build_sources(args.arch, small=not args.large)
    Path(args.out).write_text(src)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lpcompile lower MODEL.lp.onnx --target cuda|llvm|mlir -o OUT``: compile a rewritten model."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from lpcompile.console import Output
from lpcompile.errors import UsageError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("lower", help="compile a rewritten model with TVM (cuda, llvm) or emit MLIR")
    p.add_argument("model", help="rewritten ONNX model (from `lpcompile apply`)")
    p.add_argument(
        "--target",
        choices=["llvm", "cuda", "mlir"],
        default="llvm",
        help="llvm: CPU shared library (correctness path); cuda: GPU library; mlir: MLIR text",
    )
    p.add_argument("--arch", help="CUDA architecture (default sm_90)")
    p.add_argument("-o", "--output", required=True, help="output file (.so for llvm/cuda, .mlir for mlir)")
    p.add_argument("--emit-source", metavar="DIR", help="also write the generated source (.cu [+ .ptx] or .ll)")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,..",
        help="static shape for an input with symbolic dims; repeatable",
    )
    p.add_argument(
        "--mlir-level", default="linalg", help="MLIR level for --target mlir (torch, linalg, stablehlo, ...)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.io_utils import OutputSession

    out = Output(quiet=args.quiet, json=args.json)
    if args.emit_source and Path(args.emit_source).exists() and not Path(args.emit_source).is_dir():
        raise UsageError(f"--emit-source {args.emit_source} is a file; give a folder for the generated source")
    if args.target == "mlir":
        with OutputSession(inputs=[args.model]) as session:
            session.declare(args.output)
            return _run_mlir(args, out)
    if args.target != "cuda" and args.arch:
        raise UsageError("--arch applies to --target cuda only")
    if importlib.util.find_spec("tvm") is None:
        raise UsageError("--target llvm/cuda needs Apache TVM: pip install 'lpcompile[tvm]'")
    from lpcompile.runtime.tvm.build import lower_model, meta_path_for, parse_shapes

    shapes = parse_shapes(args.shape)
    with OutputSession(inputs=[args.model]) as session:
        # the library and its metadata are written together or not at all; sources are guarded as written
        session.declare(args.output, meta_path_for(args.output))
        result = lower_model(
            args.model,
            args.output,
            target=args.target,
            arch=args.arch,
            emit_source=args.emit_source,
            shapes=shapes,
        )
    out.table("kernel calls", ["node", "kernel", "shape"], [(k["node"], k["kind"], k["shape"]) for k in result.kernels])
    out.line(
        f"wrote {result.output} and {result.meta.name} ({len(result.kernels)} lpcompile kernel call(s), "
        f"{result.folded} weight decode(s) folded into fp32 constants)"
    )
    for src in result.sources:
        out.line(f"source: {src}")
    out.emit_json(
        {
            "output": str(result.output),
            "meta": str(result.meta),
            "target": result.target,
            "kernels": list(result.kernels),
            "folded": result.folded,
            "sources": [str(s) for s in result.sources],
        }
    )
    return 0


def _run_mlir(args: argparse.Namespace, out: Output) -> int:
    from lpcompile.runtime.mlir import lower_to_mlir

    result = lower_to_mlir(args.model, args.output, args.mlir_level)
    out.line(f"wrote {args.output}")
    out.emit_json(
        {
            "output": str(args.output),
            "target": "mlir",
            "level": args.mlir_level,
            "result": str(result) if result is not None else None,
        }
    )
    return 0

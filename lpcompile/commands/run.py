"""``lpcompile run MODEL.so --inputs data.npz [-o out.npz]``: run a module built by ``lpcompile lower``."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np

from lpcompile.console import Output
from lpcompile.errors import UsageError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run a compiled module (from `lpcompile lower`) on inputs from an .npz")
    p.add_argument("module", help="compiled module (.so with its .meta.json beside it)")
    p.add_argument("--inputs", required=True, help=".npz with one array per model input")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.add_argument(
        "--reference",
        metavar="MODEL.onnx",
        help="also run this ONNX model in ONNX Runtime (graph as written) and report the difference",
    )
    return p


def run(args: argparse.Namespace) -> int:
    out = Output(quiet=args.quiet, json=args.json)
    if importlib.util.find_spec("tvm") is None:
        raise UsageError("running a compiled module needs Apache TVM: pip install 'lpcompile[tvm]'")
    from lpcompile.runtime.tvm.build import compare_with_onnx, load_compiled, load_inputs, save_outputs

    model = load_compiled(args.module)
    inputs = load_inputs(args.inputs, model.input_names)
    outputs = model.run(inputs)
    rows = [
        (
            name,
            "x".join(map(str, a.shape)) or "scalar",
            str(a.dtype),
            float(np.nanmin(a)) if a.size else None,
            float(np.nanmax(a)) if a.size else None,
        )
        for name, a in outputs.items()
    ]
    out.table("outputs", ["name", "shape", "dtype", "min", "max"], rows)
    payload: dict[str, object] = {"outputs": {n: list(a.shape) for n, a in outputs.items()}}
    if args.output:
        save_outputs(args.output, outputs)
        out.line(f"wrote {args.output}")
        payload["output_file"] = args.output
    if args.reference:
        diffs = compare_with_onnx(args.reference, inputs, outputs)
        out.table(
            "vs ONNX Runtime",
            ["output", "max |diff|", "max |ref|"],
            [(n, d["max_abs_diff"], d["max_abs_ref"]) for n, d in diffs.items()],
        )
        payload["reference"] = diffs
    out.emit_json(payload)
    return 0

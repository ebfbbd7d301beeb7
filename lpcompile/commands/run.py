"""``lpcompile run MODEL.so --inputs data.npz [-o out.npz]``: run a module built by ``lpcompile lower``."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from lpcompile.console import Output
from lpcompile.errors import ModelLoadError, UsageError


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
    from lpcompile.io_utils import OutputSession

    out = Output(quiet=args.quiet, json=args.json)
    if importlib.util.find_spec("tvm") is None:
        raise UsageError("running a compiled module needs Apache TVM: pip install 'lpcompile[tvm]'")
    from lpcompile.runtime.tvm.build import (
        compare_with_onnx,
        load_compiled,
        load_inputs,
        meta_path_for,
        read_module_meta,
        save_outputs,
    )

    if not Path(args.module).is_file():
        raise ModelLoadError(f"compiled module not found: {args.module}")
    inputs_in = [args.module, meta_path_for(args.module), args.inputs, args.reference]
    with OutputSession(inputs=inputs_in, models=[args.reference]) as session:
        session.declare(args.output)  # never over the module, its metadata, the inputs or the reference
        _check_input_headers(args.inputs, read_module_meta(args.module))
        model = load_compiled(args.module)  # checks the library's size and hash before loading it
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
            payload["output_file"] = args.output
    if args.output:
        out.line(f"wrote {args.output}")
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


def _check_input_headers(path: str, meta: dict) -> None:
    """Compare the .npz headers with the module's input shapes before any array is inflated."""
    from lpcompile.errors import LpError
    from lpcompile.frontend.npz_safe import npz_headers

    if not Path(path).is_file():
        raise UsageError(f"inputs file not found: {path}")
    headers = npz_headers(path)
    infos = {i["name"]: i for i in meta.get("inputs", [])}
    by_name = dict(headers)
    if len(infos) == 1 and len(headers) == 1 and not set(infos) & set(headers):
        by_name = {next(iter(infos)): next(iter(headers.values()))}
    for name, info in infos.items():
        h = by_name.get(name)
        if h is None:
            continue  # load_inputs names what is missing
        want = info.get("shape") or []
        if want and len(want) != len(h.shape):
            raise LpError(f"input {name!r} has rank {len(h.shape)}, the model expects {len(want)}")
        for w, g in zip(want, h.shape, strict=False):
            if isinstance(w, int) and w > 0 and w != g:
                raise LpError(f"input {name!r} has shape {list(h.shape)}, the model expects {want}")

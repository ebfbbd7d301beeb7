"""``lpcompile run MODEL.so --inputs data.npz [-o out.npz]``: run a module built by ``lpcompile lower``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lpcompile.console import Output
from lpcompile.errors import LpError, ModelLoadError, UsageError

if TYPE_CHECKING:
    from lpcompile.frontend.npz_safe import ArrayHeader

logger = logging.getLogger(__name__)

DEFAULT_MAX_INPUT_MB = 256.0
"""What ``run`` reads at once by default: the input arrays, or one batch of them with ``--batch-size``."""


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
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="run N samples (rows along axis 0) at a time, reading the inputs in batches, so memory is bounded "
        "by one batch whatever the file's size (needs inputs with a dynamic first dimension)",
    )
    p.add_argument(
        "--max-input-mb",
        type=float,
        default=DEFAULT_MAX_INPUT_MB,
        metavar="MB",
        help=f"refuse inputs whose arrays take more than this in memory, or with --batch-size one batch of them "
        f"(default {DEFAULT_MAX_INPUT_MB:g}); checked from the .npy headers before anything inflates",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.io_utils import OutputSession

    out = Output(quiet=args.quiet, json=args.json)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
    if not args.max_input_mb > 0:
        raise UsageError(f"--max-input-mb must be positive, not {args.max_input_mb}")
    if importlib.util.find_spec("tvm") is None:
        raise UsageError("running a compiled module needs Apache TVM: pip install 'lpcompile[tvm]'")
    from lpcompile.runtime.tvm.build import (
        OnnxComparison,
        load_compiled,
        meta_path_for,
        read_module_meta,
        save_outputs,
    )

    if not Path(args.module).is_file():
        raise ModelLoadError(f"compiled module not found: {args.module}")
    inputs_in = [args.module, meta_path_for(args.module), args.inputs, args.reference]
    with OutputSession(inputs=inputs_in, models=[args.reference]) as session:
        session.declare(args.output)  # never over the module, its metadata, the inputs or the reference
        meta = read_module_meta(args.module)
        headers = _headers(args.inputs)  # read once; nothing inflates before every check below has passed
        names = _input_names(args.inputs, headers, meta, batched=args.batch_size is not None)
        limit = int(args.max_input_mb * 1024**2)
        batches = _batches(args.inputs, headers, names, args.batch_size, limit, meta)
        model = load_compiled(args.module)  # checks the library's size and hash before loading it
        diffs = OnnxComparison(args.reference) if args.reference else None
        parts: dict[str, list[np.ndarray]] = {}
        for i, feed in enumerate(batches):
            result = model.run(feed)
            if i == 0 and args.batch_size is not None:
                _check_output_room(args.inputs, headers[next(iter(names.values()))].shape[0], result)
            if diffs is not None:
                diffs.add(feed, result)
            for name, a in result.items():
                parts.setdefault(name, []).append(a)
        outputs = {n: a[0] if len(a) == 1 else np.concatenate(a, axis=0) for n, a in parts.items()}
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
    if diffs is not None:
        table = diffs.result()
        out.table(
            "vs ONNX Runtime",
            ["output", "max |diff|", "max |ref|"],
            [(n, d["max_abs_diff"], d["max_abs_ref"]) for n, d in table.items()],
        )
        payload["reference"] = table
    out.emit_json(payload)
    return 0


def _headers(path: str) -> dict[str, ArrayHeader]:
    """The ``.npy`` headers of the inputs file (nothing inflated), each problem one line."""
    from lpcompile.frontend.npz_safe import NpzError, npz_headers

    if not Path(path).is_file():
        raise UsageError(f"inputs file not found: {path}")
    try:
        return npz_headers(path)
    except NpzError as exc:
        raise LpError(str(exc)) from None


def _batches(
    path: str,
    headers: Mapping[str, ArrayHeader],
    names: Mapping[str, str],
    batch_size: int | None,
    limit: int,
    meta: Mapping[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    """The module's feeds: the whole file at once, or ``batch_size`` rows at a time, within ``limit`` bytes.

    Every size check happens here, from the headers, before the module is loaded or any array inflates.
    """
    from lpcompile.frontend.npz_safe import NpzError, human_bytes, iter_npz_batches, read_npz

    used = [headers[n] for n in names.values()]
    if batch_size is None:
        total = sum(h.nbytes for h in used)
        if total > limit:
            raise LpError(
                f"{Path(path).name} holds {human_bytes(total)} of input arrays, more than `run` reads at once "
                f"({human_bytes(limit)}, --max-input-mb); pass --batch-size N to run it N samples at a time, "
                "or raise --max-input-mb"
            )
        try:
            arrays = read_npz(path, names=list(names.values()), max_bytes=limit)
        except NpzError as exc:
            raise LpError(str(exc)) from None
        return iter([{model_name: arrays[file_name] for model_name, file_name in names.items()}])
    for info in meta.get("inputs", []):
        lead = (info.get("shape") or [None])[0]
        if isinstance(lead, int) and lead > 0 and lead != batch_size:
            raise UsageError(
                f"input {info['name']!r} has a fixed first dimension {lead}; --batch-size must be {lead} "
                "or the module lowered with a dynamic batch"
            )
    per_batch = sum(h.bytes_for(batch_size) for h in used)
    if per_batch > limit:
        raise LpError(
            f"one batch of {batch_size} samples of {Path(path).name} takes {human_bytes(per_batch)}, more than "
            f"--max-input-mb ({human_bytes(limit)}); use a smaller --batch-size"
        )
    return _renamed(iter_npz_batches(path, list(names.values()), batch_size, max_bytes=limit), names)


def _renamed(batches: Iterator[dict[str, np.ndarray]], names: Mapping[str, str]) -> Iterator[dict[str, np.ndarray]]:
    from lpcompile.frontend.npz_safe import NpzError

    try:
        for batch in batches:
            yield {model_name: batch[file_name] for model_name, file_name in names.items()}
    except NpzError as exc:
        raise LpError(str(exc)) from None


def _check_output_room(path: str, rows: int, first: Mapping[str, np.ndarray]) -> None:
    """Refuse, after the first batch, outputs whose projected size for all ``rows`` exceeds the memory budget."""
    from lpcompile.frontend.npz_safe import human_bytes, memory_budget

    got = max((a.shape[0] if a.ndim else 1) for a in first.values()) if first else 0
    projected = int(sum(a.nbytes for a in first.values()) / max(got, 1) * rows)
    budget = memory_budget()
    if projected > budget:
        raise LpError(
            f"the outputs for all {rows:,} samples would take {human_bytes(projected)}, more than the "
            f"{human_bytes(budget)} of memory this run may use; split {Path(path).name} into smaller files"
        )
    logger.info("batch 1: %d samples, outputs for all %d about %s", got, rows, human_bytes(projected))


def _input_names(
    path: str, headers: Mapping[str, ArrayHeader], meta: Mapping[str, Any], *, batched: bool
) -> dict[str, str]:
    """Model input name → array name in the ``.npz``, with the headers checked against the module's shapes.

    With ``batched`` the first dimension is not compared (it is cut into batches).
    """
    infos = {i["name"]: i for i in meta.get("inputs", [])}
    if all(n in headers for n in infos):
        names = {n: n for n in infos}
    elif len(infos) == 1 and len(headers) == 1:
        names = {next(iter(infos)): next(iter(headers))}
    else:
        raise LpError(f"{Path(path).name} holds {', '.join(sorted(headers))}; the model takes {', '.join(infos)}")
    for name, info in infos.items():
        h = headers[names[name]]
        want = info.get("shape") or []
        if want and len(want) != len(h.shape):
            raise LpError(f"input {name!r} has rank {len(h.shape)}, the model expects {len(want)}")
        for axis, (w, g) in enumerate(zip(want, h.shape, strict=False)):
            if batched and axis == 0:
                continue
            if isinstance(w, int) and w > 0 and w != g:
                raise LpError(f"input {name!r} has shape {list(h.shape)}, the model expects {want}")
    return names

"""``lpcompile analyze MODEL -o SENS.json [--validate]``: Hessian sensitivity of every (node, format)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpcompile.commands._args import add_analysis_args, analysis_config
from lpcompile.console import Output, StageProgress


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="estimate the sensitivity of every (node, format); write a .sens.json")
    p.add_argument("model", help="input ONNX model")
    p.add_argument("-o", "--output", help="sensitivity file (default MODEL.sens.json)")
    p.add_argument(
        "--validate",
        action="store_true",
        help="measure each (node, format) alone in ORT and report Spearman ρ(predicted, measured)",
    )
    add_analysis_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.files import analyze_file, default_output
    from lpcompile.io_utils import OutputSession

    out = Output(quiet=args.quiet, json=args.json)
    target = Path(args.output) if args.output else default_output(args.model, ".sens.json")
    with OutputSession(inputs=[args.model, args.calib]) as session:  # io_utils guard (issue 15)
        session.declare(target)
        with StageProgress(out) as progress:
            table = analyze_file(
                args.model, args.calib, analysis_config(args), validate=args.validate, progress=progress
            )
        table.save(target)
    fmts = [f for f in table.formats if f != "fp32"]
    rows = []
    for n in table.nodes:
        # a format a node cannot take (e.g. FP8 on an embedding table) has no candidate: shown as empty
        rows.append((n.name, n.params, n.trace, *(_loss(n.candidates.get(f)) for f in fmts)))
    out.table(
        f"predicted loss per (node, format) — {table.method}, loss {table.loss}, {table.num_samples} samples",
        ["node", "params", "Tr(H)", *fmts],
        rows,
    )
    if table.validation:
        v = table.validation
        per = ", ".join(f"{f}: {r}" for f, r in (v.get("per_format") or {}).items())
        out.line(f"Spearman ρ(predicted, measured) = {v.get('spearman')} over {v.get('pairs')} pairs ({per})")
    out.line(f"wrote {target} ({table.timings.get('total_s', 0.0):.1f}s)")
    out.emit_json(
        {
            "output": str(target),
            "validation": table.validation,
            "timings": dict(table.timings),
            "nodes": len(table.nodes),
        }
    )
    return 0


def _loss(candidate: object) -> float | None:
    return getattr(candidate, "predicted_loss", None)

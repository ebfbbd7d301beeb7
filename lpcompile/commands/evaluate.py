"""``lpcompile eval MODEL --reference REF``: output distortion of a rewritten model vs its fp32 source."""

from __future__ import annotations

import argparse

from lpcompile.console import Output


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="compare a rewritten model with its reference in ONNX Runtime")
    p.add_argument("model", help="rewritten ONNX model")
    p.add_argument("--reference", required=True, help="the fp32 reference model")
    p.add_argument("--calib", help="inputs: .npz or folder keyed by input name (required unless --synthetic)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--synthetic", action="store_true", help="without --calib, compare on synthetic inputs (can mislead)"
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="SPEC",
        help="synthetic input shape: NAME=1x3x224x224 or NAME=batch:1,width:320 (repeatable)",
    )
    p.add_argument(
        "--outputs", metavar="NAME[,NAME]", help="outputs the distortion covers (default: float outputs of weights)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.analysis.losses import parse_outputs
    from lpcompile.evaluate import evaluate
    from lpcompile.frontend.calib import load_calibration
    from lpcompile.frontend.input_spec import parse_input_shapes

    out = Output(quiet=args.quiet, json=args.json)
    calib = load_calibration(args.calib, args.reference) if args.calib else None
    report = evaluate(
        args.model,
        args.reference,
        calib,
        batch_size=args.batch_size,
        synthetic=args.synthetic,
        input_shapes=parse_input_shapes(args.input_shape),
        outputs=parse_outputs(args.outputs),
    )
    rows = []
    for name, m in report.outputs.items():
        d = m.to_dict()
        top1 = d.get("top1") if d.get("exact") is None else f"{d['exact']:.4g} (exact)"
        rows.append((name, m.kind, d.get("sqnr_db"), d.get("cosine"), d.get("max_abs"), top1, d.get("kl")))
    out.table(
        f"{args.model} vs {args.reference} on {report.num_samples} sample(s)"
        + (" (synthetic inputs)" if report.synthetic else ""),
        ["output", "kind", "SQNR dB", "cosine", "max |err|", "top-1 agree", "KL"],
        rows,
    )
    if report.distortion is not None:
        out.line(f"distortion {report.distortion:.4g} — {report.loss}")
    out.emit_json(report.to_dict())
    return 0

"""``lpcompile eval MODEL --reference REF``: output distortion of a rewritten model vs its fp32 source."""

from __future__ import annotations

import argparse

from lpcompile.console import Output


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="compare a rewritten model with its reference in ONNX Runtime")
    p.add_argument("model", help="rewritten ONNX model")
    p.add_argument("--reference", required=True, help="the fp32 reference model")
    p.add_argument("--calib", help="inputs .npz or folder (synthetic from the signature when absent)")
    p.add_argument("--batch-size", type=int, default=8)
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.evaluate import evaluate
    from lpcompile.frontend.calib import load_calibration

    out = Output(quiet=args.quiet, json=args.json)
    calib = load_calibration(args.calib) if args.calib else None
    report = evaluate(args.model, args.reference, calib, batch_size=args.batch_size)
    rows = []
    for name, m in report.outputs.items():
        d = m.to_dict()
        rows.append((name, d.get("sqnr_db"), d.get("cosine"), d.get("max_abs"), d.get("top1"), d.get("kl")))
    out.table(
        f"{args.model} vs {args.reference} on {report.num_samples} sample(s)"
        + (" (synthetic inputs)" if report.synthetic else ""),
        ["output", "SQNR dB", "cosine", "max |err|", "top-1 agree", "KL"],
        rows,
    )
    out.emit_json(report.to_dict())
    return 0

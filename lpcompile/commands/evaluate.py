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
    p.add_argument(
        "--latency",
        action="store_true",
        help="also time both models in ONNX Runtime CPU (median batch-1 latency, interleaved, same process)",
    )
    p.add_argument("--latency-batch", type=int, default=1, metavar="N", help="also time batches of N samples")
    p.add_argument("--latency-runs", type=int, default=20, metavar="R", help="timed runs per model (default 20)")
    p.add_argument(
        "--latency-sessions", type=int, default=1, metavar="S",
        help="repeat the timing with S fresh session pairs (R runs each); the interval then covers the spread "
        "between sessions (default 1)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for --latency (default 2)")
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
    result = report.to_dict()
    if getattr(args, "latency", False):
        result["latency"] = _latency(args, calib, out)
    out.emit_json(result)
    return 0


def _latency(args: argparse.Namespace, calib: object, out: Output) -> list[dict[str, object]]:
    """Time the model against its reference at batch 1 (and ``--latency-batch``); print a table."""
    from lpcompile.runtime.ort import compare_latency, latency_inputs
    from lpcompile.runtime.ort_kernels import compare_kernels

    sizes = sorted({1, max(1, int(args.latency_batch))})
    rows, results = [], []
    kernels = compare_kernels(args.model, args.reference)
    for b in sizes:
        feed = latency_inputs(args.reference, calib, b)
        c = compare_latency(
            args.model, args.reference, feed, threads=args.threads, runs=args.latency_runs,
            sessions=max(1, args.latency_sessions),
        )  # fmt: skip
        lo, hi = c.ratio_interval()
        results.append({**c.to_dict(), **kernels.to_dict()})
        rows.append(
            (c.batch, c.threads, c.runs, f"{c.reference_ms:.3f}", f"{c.model_ms:.3f}", f"{c.ratio:.2f}x",
             f"{lo:.2f}-{hi:.2f}")
        )
    out.table(
        "ONNX Runtime CPU latency (median, runs interleaved with the reference in one process, ORT_ENABLE_ALL)",
        ["batch", "threads", "runs", "reference ms", "model ms", "ratio", "95% interval"],
        rows,
    )
    if kernels.same:
        out.line("kernels: the same as the reference's after ORT's optimisations (weights decoded once at load)")
    else:
        extra = ", ".join(f"{k} x{v}" for k, v in kernels.extra_ops().items()) or "a different graph"
        out.line(f"kernels: not the reference's ({extra}; first difference at node {kernels.first_difference})")
    return results

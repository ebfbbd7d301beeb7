"""``lpcompile demo``: the main job on the embedded digits MLP, next to uniform int4.

Compiles the example model at ``--budget`` (default 4.5 bits, GPTQ-style rounding) with its calibration data, then
evaluates the result and a uniform-int4 baseline on held-out digits (distortion against fp32
and accuracy against the true labels).
"""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from pathlib import Path

import numpy as np

from lpcompile.commands._tables import print_plan
from lpcompile.console import Output, StageProgress

logger = logging.getLogger(__name__)


def _examples_dir(out: Path) -> Path:
    """The example models shipped inside the package (``lpcompile/data``), else trained into ``out``."""
    shipped = Path(str(resources.files("lpcompile") / "data"))
    if (shipped / "digits_mlp.onnx").exists():
        return shipped
    from lpcompile.examples import build_digits

    logger.warning("example models not found beside the package; training them into %s", out)
    build_digits(out)
    return out


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="compile the embedded digits model and compare with uniform int4")
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--out", default="out/demo", help="folder for the outputs (default: %(default)s)")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument(
        "--rounding",
        choices=["nearest", "rtn", "mse", "gptq"],
        default="gptq",
        help="weight rounding of the compiled model (default: %(default)s; uniform int4 stays nearest)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.evaluate import evaluate
    from lpcompile.files import apply_file, compile_file
    from lpcompile.frontend.calib import load_calibration
    from lpcompile.runtime.ort import make_session, run_batches

    out = Output(quiet=args.quiet, json=args.json)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    ex = _examples_dir(folder)
    model = ex / f"digits_{args.model}.onnx"
    calib, heldout = ex / "digits_calib.npz", ex / "digits_heldout.npz"
    labels = np.load(ex / "digits_heldout_labels.npy")
    with StageProgress(out) as progress:
        result = compile_file(
            model,
            args.budget,
            out=folder / f"digits_{args.model}.lp.onnx",
            calib_path=calib,
            config=AnalysisConfig(batch_size=64, probes=32, rounding=args.rounding),
            force=True,
            progress=progress,
        )
    print_plan(out, result.plan, result.table)
    int4 = apply_file(model, folder / f"digits_{args.model}.int4.onnx", uniform="int4", force=True)
    held = load_calibration(heldout)
    rows, payload = [], {}
    for name, path, bits in (
        ("fp32", model, 32.0),
        ("uniform int4", int4.output, int4.plan.achieved_bits),
        (f"lpcompile {args.budget}", result.applied.output, result.plan.achieved_bits),
    ):
        logits = run_batches(make_session(str(path)), [held.arrays])["logits"]
        acc = float((logits.argmax(-1) == labels).mean())
        rep = evaluate(str(path), str(model), held).outputs["logits"]
        rows.append((name, bits, acc, rep.top1, rep.kl, rep.sqnr_db))
        payload[name] = {
            "bits": bits,
            "accuracy": acc,
            "top1_agreement": rep.top1,
            "kl": rep.kl,
            "sqnr_db": rep.sqnr_db,
        }
    out.table(
        f"digits {args.model}: {len(labels)} held-out images",
        ["model", "bits/weight", "accuracy", "top-1 vs fp32", "KL vs fp32", "SQNR dB"],
        rows,
    )
    out.line(f"outputs in {folder}/ (model, plan JSON); open the model in Netron to see the precision map")
    out.emit_json(payload)
    return 0

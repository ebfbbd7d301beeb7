"""``lpcompile apply MODEL [PLAN] [--uniform FMT] -o OUT``: rewrite a model by a precision plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpcompile.commands._args import add_int8_residuals_arg, add_target_args
from lpcompile.config import Rounding
from lpcompile.console import Output
from lpcompile.plan import PrecisionPlan


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("apply", help="rewrite a model by a precision plan (or one uniform format)")
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument("plan", nargs="?", help="precision plan JSON (from `lpcompile plan`)")
    p.add_argument("--uniform", metavar="FORMAT", help="one format for every weighted node, e.g. int4")
    p.add_argument("-o", "--output", help="output model (default MODEL.lp.onnx); the plan goes beside it")
    p.add_argument("--calib", help="calibration .npz or folder (FP8 activation scales)")
    add_target_args(p, softmax_default=None)
    add_int8_residuals_arg(p)
    p.add_argument(
        "--rounding",
        "--weight-rounding",
        dest="rounding",
        choices=[r.value for r in Rounding],
        default=Rounding.NEAREST.value,
        help="weight rounding: nearest (half to even), stochastic (seeded), rtn (full code range), mse (clip "
        "search), gptq (error-compensated with the layers' input XᵀX from --calib) (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a previous output (an input is never replaced)")
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.config import ApplyConfig
    from lpcompile.files import apply_file, default_output, plan_path_for
    from lpcompile.io_utils import OutputSession

    out = Output(quiet=args.quiet, json=args.json)
    config = ApplyConfig(  # checks the seed
        target=args.target, rounding=args.rounding, seed=args.seed, int8_residuals=args.int8_residuals
    )
    target = Path(args.output) if args.output else default_output(args.model)
    # io_utils guard (issue 15): outputs never replace an input or its external data; locked; temp files
    # removed on SIGINT/SIGTERM. defer=False: apply_file stats its outputs before returning.
    with OutputSession(inputs=[args.model, args.plan, args.calib], defer=False) as session:
        session.declare(target)
        session.declare(plan_path_for(target), may_replace=args.plan)  # the same plan, completed
        plan = PrecisionPlan.load(args.plan) if args.plan else None
        result = apply_file(
            args.model,
            args.output,
            plan=plan,
            uniform=args.uniform,
            calib_path=args.calib,
            config=config,
            softmax=args.softmax,
            force=args.force,
            plan_path=args.plan,
        )
    rows = [(n.name, n.op_type, n.params, n.format, n.bits) for n in result.plan.nodes]
    out.table("precision map", ["node", "op", "params", "format", "bits"], rows)
    ratio = result.output_bytes / max(result.input_bytes, 1)
    out.line(
        f"wrote {result.output} ({result.output_bytes:,} bytes, {ratio:.3f}× input) and {result.plan_path}; "
        f"average {result.plan.achieved_bits:.4g} bits/weight"
    )
    out.emit_json(
        {
            "output": str(result.output),
            "plan": str(result.plan_path),
            "achieved_bits": result.plan.achieved_bits,
            "input_bytes": result.input_bytes,
            "output_bytes": result.output_bytes,
            "modified_by": list(result.modified_by),
            "softmax_substituted": list(result.softmax_substituted),
            "checks": result.checks.to_list(),
        }
    )
    return 0

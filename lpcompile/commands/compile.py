"""``lpcompile MODEL --budget B``: analyse, solve and rewrite in one go."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lpcompile.commands._args import (
    add_analysis_args,
    add_int8_residuals_arg,
    add_keep_arg,
    add_objective_arg,
    add_target_args,
    analysis_config,
    budget_arg,
    keep_rules,
)
from lpcompile.commands._tables import plan_rows, print_plan
from lpcompile.console import Output, StageProgress
from lpcompile.errors import UsageError

if TYPE_CHECKING:
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.files import CompileResult
    from lpcompile.guard import GuardResult


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compile", help="analyse + plan + apply (also: lpcompile MODEL --budget B)")
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument(
        "--budget", help="average bits per weight (4.5bits, 4.5) or size (12MB); or give --max-loss alone"
    )
    p.add_argument("-o", "--output", help="output model (default MODEL.lp.onnx); the plan goes beside it")
    add_analysis_args(p)
    add_keep_arg(p)
    add_target_args(p)
    add_int8_residuals_arg(p)
    add_objective_arg(p)
    p.add_argument("--validate", action="store_true", help="also measure every (node, format) in ORT (slow)")
    p.add_argument("--report", metavar="HTML", help="write a self-contained HTML report")
    p.add_argument("--force", action="store_true", help="replace a previous output (an input is never replaced)")
    g = p.add_argument_group("quality guard (lpcompile.guard)")
    g.add_argument(
        "--max-loss",
        type=float,
        metavar="D",
        help="loss bound D: without --budget, the fewest bits whose predicted loss is <= D; and the distortion "
        "above which the written model is flagged on held-out samples (default 0.1: KL in nats / normalised MSE)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the quality guard fires, or when the model has no weight left to quantize",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.files import compile_file, default_output, plan_path_for
    from lpcompile.io_utils import OutputSession

    out = Output(quiet=args.quiet, json=args.json)
    if args.budget is None and args.max_loss is None:
        raise UsageError("give --budget B or --max-loss D (the fewest bits within a predicted loss)")
    if args.budget is not None:
        budget_arg(args.budget)
    target = Path(args.output) if args.output else default_output(args.model)
    config = analysis_config(args)
    decide_config = DecideConfig(
        keep=tuple(keep_rules(args)), softmax=args.softmax, target=args.target, max_loss=args.max_loss,
        objective=args.objective, int8_residuals=args.int8_residuals,
    )
    apply_config = ApplyConfig(
        target=args.target, seed=config.seed, rounding=config.rounding, int8_residuals=args.int8_residuals
    )
    # io_utils guard (issue 15); defer=False: compile_file stats its outputs before returning
    if args.strict:
        _refuse_nothing_to_do(args.model)
    session = OutputSession(inputs=[args.model, args.calib], defer=False)
    with session, StageProgress(out) as progress:
        session.declare(target, plan_path_for(target), args.report)
        result = compile_file(
            args.model,
            args.budget,
            out=args.output,
            calib_path=args.calib,
            config=config,
            decide_config=decide_config,
            apply_config=apply_config,
            validate=args.validate,
            force=args.force,
            progress=progress,
        )
        if args.report:
            from lpcompile.commands._tables import write_report

            write_report(args.report, result.plan, result.table)
    guard = _guard(args, config, result)
    print_plan(out, result.plan, result.table)
    if result.table.validation:
        out.line(f"validation: Spearman ρ(predicted, measured) = {result.table.validation.get('spearman')}")
    out.line(
        f"wrote {result.applied.output} and {result.applied.plan_path}: {result.plan.achieved_bits:.4g} bits/weight "
        f"(budget {args.budget or f'max-loss {args.max_loss}'}), {result.applied.output_bytes:,} bytes; "
        f"analysis {result.timings['analyze_s']:.1f}s, total {result.timings['total_s']:.1f}s"
    )
    if args.report:
        out.line(f"report: {args.report}")
    out.emit_json(
        {
            "output": str(result.applied.output),
            "plan": str(result.applied.plan_path),
            "budget": args.budget,
            "achieved_bits": result.plan.achieved_bits,
            "predicted_loss": result.plan.predicted_loss,
            "validation": result.table.validation,
            "timings": dict(result.timings),
            "nodes": plan_rows(result.plan, result.table),
            "checks": result.applied.checks.to_list(),
            "guard": guard.to_dict(),
        }
    )
    return guard.exit_code


def _refuse_nothing_to_do(model_path: str) -> None:
    """With ``--strict``, a model with no weight left to quantize (already quantized, recurrent only,
    graph-input weights) is a failure, not a silent copy (the warning names what is kept and why)."""
    from lpcompile.errors import LpError
    from lpcompile.files import load_normalized
    from lpcompile.graph import weight_coverage

    coverage = weight_coverage(load_normalized(model_path))
    if coverage.nothing_to_do:
        raise LpError(f"--strict: {coverage.outcome()}")


def _guard(args: argparse.Namespace, config: AnalysisConfig, result: CompileResult) -> GuardResult:
    """The quality guard on the compile's held-out samples: the last quarter of --calib, or fresh synthetic
    inputs (seed + 1), both chosen by :func:`lpcompile.files.compile_file`."""
    from lpcompile.guard import check_quality

    _release_compile_memory()
    return check_quality(
        result.applied.output,
        args.model,
        result.heldout,
        plan=result.plan,
        table=result.table,
        max_loss=args.max_loss,
        strict=args.strict,
        outputs=config.outputs,
        batch_size=config.batch_size,
    )


def _release_compile_memory() -> None:
    """Before the guard's ONNX Runtime sessions: collect the compile's model (onnx-ir graphs are reference
    cycles, freed only by the collector) and hand the freed heap back to the OS."""
    import gc

    from lpcompile.analysis.sensitivity import trim_heap

    gc.collect()
    trim_heap()

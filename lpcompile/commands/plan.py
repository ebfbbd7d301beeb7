"""``lpcompile plan SENS.json --budget B | --sweep A:B:S``: solve budgets from a saved analysis."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lpcompile.commands._args import add_keep_arg, add_objective_arg, add_target_args, budget_arg, keep_rules
from lpcompile.commands._tables import plan_rows, print_plan
from lpcompile.console import Output
from lpcompile.errors import UsageError
from lpcompile.formats import parse_format_list

if TYPE_CHECKING:
    from lpcompile.analysis.table import SensitivityTable

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="choose formats for a budget from a sensitivity file (no re-analysis)")
    p.add_argument("sensitivity", help=".sens.json from `lpcompile analyze`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="average bits per weight (4.5bits, 4.5) or size (12MB)")
    g.add_argument("--sweep", metavar="A:B:S", help="Pareto table over budgets A..B step S (bits)")
    g.add_argument(
        "--max-loss", type=float, metavar="D", help="the fewest bits whose predicted loss is <= D (instead of a budget)"
    )
    p.add_argument("-o", "--output", help="plan JSON (default SENS→.plan.json; not written for --sweep)")
    p.add_argument("--formats", help="restrict to these formats (default: all in the table)")
    p.add_argument(
        "--model",
        help="the model the table was analysed from, read for the weights' layouts so bits are counted as "
        "--target stores them (default: the table's model file, next to the table or in the current folder)",
    )
    add_target_args(p)
    add_objective_arg(p)
    add_keep_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.analysis.table import SensitivityTable
    from lpcompile.api import decide, decide_sweep
    from lpcompile.config import DecideConfig
    from lpcompile.io_utils import OutputSession
    from lpcompile.solver import parse_sweep

    out = Output(quiet=args.quiet, json=args.json)
    if args.budget:
        budget_arg(args.budget)
    table = _retargeted(SensitivityTable.load(args.sensitivity), args)
    formats = parse_format_list(args.formats) if args.formats else None
    config = DecideConfig(
        formats=formats, keep=tuple(keep_rules(args)), softmax=args.softmax, target=args.target, max_loss=args.max_loss,
        objective=args.objective,
    )
    if args.sweep:
        if args.output:
            raise UsageError("--sweep prints a table; -o applies to --budget only")
        sols, front = decide_sweep(table, parse_sweep(args.sweep), config)
        params = {n.name: n.params for n in table.nodes}
        rows = []
        for s in sols:
            mix: dict[str, int] = {}
            for name, fmt in s.assignments.items():
                mix[fmt] = mix.get(fmt, 0) + params[name]
            total = sum(mix.values()) or 1
            rows.append(
                (
                    str(s.budget),
                    s.achieved_bits,
                    s.predicted_loss,
                    "yes" if id(s) in front else "",
                    ", ".join(f"{f} {100 * v / total:.0f}%" for f, v in sorted(mix.items())),
                )
            )
        out.table(
            "Pareto sweep (predicted loss vs bits)", ["budget", "achieved bits", "predicted loss", "front", "mix"], rows
        )
        out.emit_json(
            [
                {
                    "budget": str(s.budget),
                    "achieved_bits": s.achieved_bits,
                    "predicted_loss": s.predicted_loss,
                    "assignments": s.assignments,
                }
                for s in sols
            ]
        )
        return 0
    target = args.output or _default_plan_path(args.sensitivity)
    inputs = [args.sensitivity, *([args.model] if args.model else [])]
    with OutputSession(inputs=inputs) as session:  # io_utils guard (issue 15): -o never replaces an input
        session.declare(target)
        decision = decide(table, args.budget, config)
        plan, solution = decision.plan, decision.solution
        plan.save(target)
    print_plan(out, plan, table)
    out.line(
        f"wrote {target}: {plan.achieved_bits:.4g} bits/weight, predicted loss {plan.predicted_loss:.4g} "
        f"({solution.status})"
    )
    out.emit_json(
        {
            "output": target,
            "achieved_bits": plan.achieved_bits,
            "predicted_loss": plan.predicted_loss,
            "status": solution.status,
            "nodes": plan_rows(plan, table),
        }
    )
    return 0


def _model_path(table: SensitivityTable, args: argparse.Namespace) -> Path | None:
    """``--model``, else the table's model file found next to the table or in the current folder."""
    if args.model:
        path = Path(args.model)
        if not path.is_file():
            raise UsageError(f"--model {args.model}: no such file")
        return path
    if not table.model:
        return None
    for folder in (Path(args.sensitivity).parent, Path.cwd()):
        path = folder / Path(table.model).name
        if path.is_file():
            return path
    return None


def _retargeted(table: SensitivityTable, args: argparse.Namespace) -> SensitivityTable:
    """The table with its candidates' bits as ``--target`` writes them (issue 13: plan bits = file bits).

    The analysis counts each format's own storage (``Format.bits_for``), which is what ``qdq`` and
    ``tvm`` write for fp32 weights; ``ort`` writes large int4 MatMul weights as MatMulNBits with fp32
    scales, and a kept fp16 weight stores 16 bits. Recounting needs the model's layouts: without the
    model (or with a same-named file that is another model), ``--target ort`` is refused, and the
    other targets keep the table's counts (a warning); a model named by ``--model`` must match.
    """
    from lpcompile.feasibility import retarget_saved_table
    from lpcompile.files import load_normalized

    path = _model_path(table, args)
    if path is None:
        if args.target == "ort":
            raise UsageError(
                f"--target ort counts MatMulNBits' fp32 scales from the model's layouts: the table's model "
                f"{table.model!r} is not next to the table; give it with --model"
            )
        logger.warning(
            "model %r not found: bits as the analysis counted them (give --model to count them as target %s "
            "stores them)", table.model, args.target,
        )
        return table
    try:
        return retarget_saved_table(table, load_normalized(path), str(args.target))
    except UsageError as exc:
        if args.model or args.target == "ort":  # the model was named, or the counts must change: refuse
            raise
        logger.warning("%s is not the table's model (%s): bits as the analysis counted them", path, exc)
        return table


def _default_plan_path(sens: str) -> str:
    return sens[: -len(".sens.json")] + ".plan.json" if sens.endswith(".sens.json") else sens + ".plan.json"

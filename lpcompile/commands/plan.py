"""``lpcompile plan SENS.json --budget B | --sweep A:B:S``: solve budgets from a saved analysis."""

from __future__ import annotations

import argparse

from lpcompile.commands._args import add_keep_arg, add_objective_arg, add_target_args, budget_arg, keep_rules
from lpcompile.commands._tables import plan_rows, print_plan
from lpcompile.console import Output
from lpcompile.errors import UsageError
from lpcompile.formats import parse_format_list


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
    table = SensitivityTable.load(args.sensitivity)
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
    with OutputSession(inputs=[args.sensitivity]) as session:  # io_utils guard (issue 15)
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


def _default_plan_path(sens: str) -> str:
    return sens[: -len(".sens.json")] + ".plan.json" if sens.endswith(".sens.json") else sens + ".plan.json"

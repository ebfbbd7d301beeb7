"""``lpcompile report PLAN.json [--sensitivity SENS.json] -o report.html``: the self-contained HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpcompile.console import Output
from lpcompile.plan import PrecisionPlan


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write a self-contained HTML report (plots, per-node table) for a plan")
    p.add_argument("plan", help="plan JSON (MODEL.lp.plan.json from `lpcompile compile/plan/apply`)")
    p.add_argument(
        "--sensitivity",
        metavar="SENS.json",
        help="the .sens.json it was solved from: adds Tr(H), all candidate losses and the Pareto sweep",
    )
    p.add_argument("-o", "--output", help="HTML file (default: PLAN with .html instead of .json)")
    return p


def run(args: argparse.Namespace) -> int:
    from lpcompile.analysis.table import SensitivityTable
    from lpcompile.io_utils import OutputSession
    from lpcompile.report.html import write_report

    out = Output(quiet=args.quiet, json=args.json)
    target = Path(args.output) if args.output else _default_output(Path(args.plan))
    with OutputSession(inputs=[args.plan, args.sensitivity]) as session:
        session.declare(target)  # never over the plan or the sensitivity file, checked before any work
        _prevalidate(args.plan, "plan")
        plan = PrecisionPlan.load(args.plan)
        if args.sensitivity:
            _prevalidate(args.sensitivity, "sensitivity file")
        table = SensitivityTable.load(args.sensitivity) if args.sensitivity else None
        path = write_report(target, plan, table)
    size = path.stat().st_size
    out.line(f"wrote {path} ({size:,} bytes): {plan.achieved_bits:.4g} bits/weight over {len(plan.nodes)} nodes")
    out.emit_json(
        {"output": str(path), "bytes": size, "achieved_bits": plan.achieved_bits, "sensitivity": args.sensitivity}
    )
    return 0


def _default_output(plan: Path) -> Path:
    name = plan.name[: -len(".json")] if plan.name.endswith(".json") else plan.name
    return plan.with_name(name + ".html")


def _prevalidate(path: str, what: str) -> None:
    """Size, nesting depth, node count and duplicate names, before the file is turned into objects."""
    from lpcompile.io_utils import check_plan_limits, read_json_bounded

    data = read_json_bounded(path, what)
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        check_plan_limits(data, what=what)

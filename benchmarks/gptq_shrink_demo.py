"""The digits demo (``lpcompile demo``'s compile: 4.5 bits, gptq, 32 probes) at several XᵀX shrinkage
constants ``c`` (:data:`lpcompile.analysis.input_hessians.SHRINK`; 0 = the raw mean; ``lw``: the
Ledoit–Wolf rule, :data:`~lpcompile.analysis.input_hessians.SHRINK_RULE`), held-out KL,
SQNR, top-1 and accuracy against fp32 on the 397 held-out digits (issue 19).

    nice -n 10 python benchmarks/gptq_shrink_demo.py --shrink 0,0.5,1,2 --json-out benchmarks/gptq_shrink_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from lpcompile.analysis import input_hessians
    from lpcompile.analysis.config import AnalysisConfig
    from lpcompile.evaluate import evaluate
    from lpcompile.files import compile_file
    from lpcompile.frontend.calib import load_calibration
    from lpcompile.runtime.ort import make_session, run_batches

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shrink", default="0,0.5,1,2")
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    ex = ROOT / "lpcompile/data"
    model = ex / f"digits_{args.model}.onnx"
    held = load_calibration(ex / "digits_heldout.npz")
    labels = np.load(ex / "digits_heldout_labels.npy")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in (v.strip() for v in args.shrink.split(",")):
            input_hessians.SHRINK_RULE = "ledoit_wolf" if c == "lw" else "constant"
            input_hessians.SHRINK = 2.0 if c == "lw" else float(c)  # lw: the constant rule where lw has no estimate
            t0 = time.time()
            res = compile_file(
                model,
                args.budget,
                out=Path(tmp) / f"digits_{c}.onnx",
                calib_path=ex / "digits_calib.npz",
                config=AnalysisConfig(batch_size=64, probes=32, rounding="gptq"),
                force=True,
            )
            logits = run_batches(make_session(str(res.applied.output)), [held.arrays])["logits"]
            rep = evaluate(str(res.applied.output), str(model), held).outputs["logits"]
            row = {
                "shrink": c,
                "bits": res.plan.achieved_bits,
                "kl": rep.kl,
                "sqnr_db": rep.sqnr_db,
                "top1_agreement": rep.top1,
                "accuracy": float((logits.argmax(-1) == labels).mean()),
                "formats": {a.name: a.format for a in res.plan.nodes},
                "seconds": time.time() - t0,
            }
            rows.append(row)
            print(
                f"c={c:<5s} bits {row['bits']:.3f}  KL {row['kl']:.3e}  SQNR {row['sqnr_db']:.2f} dB  "
                f"top1 {row['top1_agreement']:.4f}  acc {row['accuracy']:.4f}  {row['formats']}",
                flush=True,
            )
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()

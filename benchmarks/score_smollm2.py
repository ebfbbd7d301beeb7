"""Quality of written SmolLM2-135M files against the fp32 model: perplexity, KL and top-1 agreement on the
bench's Lee test windows (``bench_smollm2.smollm2_task``, 8 × 256 tokens by default), ONNX Runtime, 2 threads.

    python benchmarks/score_smollm2.py OUT.onnx [OUT2.onnx ...] [--eval-windows 8] [--json-out scores.json]

For compiles made with other flags (e.g. ``--probes 4``) scored side by side with the default one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_smollm2 import smollm2_task
from harness import setup_logging


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    setup_logging()
    from lpcompile.io_utils import atomic_write_text
    from lpcompile.runtime.ort import make_session

    task = smollm2_task(eval_windows=args.eval_windows)
    ref = task.collect(make_session(str(task.model), threads=2))
    rows = []
    print(f"{'file':48s} {'ppl':>8s} {'KL':>9s} {'top1=':>7s}")
    for f in args.files:
        s = task.score(task.collect(make_session(str(f), threads=2)), ref)
        rows.append({"file": str(f), **s})
        print(f"{f!s:48s} {s['ppl']:8.3f} {s['kl']:9.4f} {s['top1_agree']:7.4f}")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps({"loadavg": os.getloadavg(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Streamed vs whole-graph analysis: the worst relative difference of any predicted loss (per-probe seeding).

    python benchmarks/streamed_equiv.py MODEL CALIB [--segment-bytes 8e6] [--rounding nearest]
                                        [--samples 16] [--probes 8]

Both analyses run in this process on the same normalised model and calibration samples; the wall time of
each, the streamed table's segment count, the worst relative difference over (node, candidate) pairs and
whether the activation ranges agree are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.sensitivity import analyze_onnx
from lpcompile.analysis.streamed import analyze_streamed
from lpcompile.files import load_calib_for, load_normalized


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("calib")
    p.add_argument("--segment-bytes", type=float, default=8e6)
    p.add_argument("--rounding", default="nearest")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--probes", type=int, default=8)
    args = p.parse_args()
    model = load_normalized(args.model)
    calib = load_calib_for(model, args.calib, num_samples=args.samples)
    cfg = AnalysisConfig(seeding="per-probe", probes=args.probes, rounding=args.rounding, max_samples=args.samples)
    t = time.perf_counter()
    whole = analyze_onnx(model, calib, cfg)
    t_whole = time.perf_counter() - t
    t = time.perf_counter()
    streamed = analyze_streamed(model, calib, cfg, segment_bytes=int(args.segment_bytes)).table
    t_streamed = time.perf_counter() - t
    worst = 0.0
    for x, y in zip(whole.nodes, streamed.nodes, strict=True):
        for f, c in x.candidates.items():
            rel = abs(c.predicted_loss - y.candidates[f].predicted_loss) / max(abs(c.predicted_loss), 1e-30)
            worst = max(worst, rel)
    amax_equal = all(
        abs(v - streamed.activation_amax.get(k, 0.0)) <= 1e-6 * abs(v) for k, v in whole.activation_amax.items()
    )
    print(f"whole {t_whole:.1f} s, streamed {t_streamed:.1f} s ({streamed.timings['segments']:.0f} segments)")
    print(f"worst relative difference {worst:.3g}; activation ranges equal: {amax_equal}")


if __name__ == "__main__":
    main()

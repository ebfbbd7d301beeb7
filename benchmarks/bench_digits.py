"""Smoke benchmark on the embedded digits MLP (seconds): lpcompile vs uniform int4 and ORT RTN.

python benchmarks/bench_digits.py [--methods lpcompile,uniform-int4_b128,ort-rtn-b32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import classifier_scores, run_batched
from harness import ROOT, Metric, Task, common_args, run_from_args, setup_logging

MODELS = ROOT / "examples" / "models"


def digits_task(models: Path = MODELS) -> Task:
    """The digits MLP, calibrated on ``digits_calib.npz``, scored on the held-out digits with labels."""
    x = np.load(models / "digits_heldout.npz")["pixels"].astype(np.float32)
    labels = np.load(models / "digits_heldout_labels.npy")

    def collect(sess: object) -> dict[str, np.ndarray]:
        return run_batched(sess, {"pixels": x}, 128)

    def score(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
        return classifier_scores(out["logits"], ref["logits"], labels)

    return Task(
        name="digits_mlp",
        model=models / "digits_mlp.onnx",
        calib=models / "digits_calib.npz",
        collect=collect,
        score=score,
        metrics=(
            Metric("kl", "KL", False, "{:.2e}"),
            Metric("accuracy", "acc", True, "{:.3f}"),
            Metric("top1_agree", "top1=", True, "{:.3f}"),
        ),
        latency_feed={"pixels": x[:1]},
        analysis={"probes": 16, "batch_size": 64},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    args = p.parse_args()
    setup_logging()
    run_from_args(digits_task(), args)


if __name__ == "__main__":
    main()

"""Metrics and batching shared by the benchmark tasks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lpcompile.metrics import kl_divergence, top1_agreement


def run_batched(
    sess: object, inputs: Mapping[str, np.ndarray], batch: int, outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run ``sess`` over ``inputs`` (samples on axis 0) in batches; concatenate each output."""
    from lpcompile.runtime.ort import run_batches

    n = next(iter(inputs.values())).shape[0]
    return run_batches(sess, ({k: v[i : i + batch] for k, v in inputs.items()} for i in range(0, n, batch)), outputs)


def classifier_scores(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 agreement with fp32, top-5 agreement (fp32's top-1 within the top 5), KL(fp32 ‖ q) and,
    with labels, accuracy."""
    out = {
        "top1_agree": top1_agreement(ref_logits, logits),
        "kl": kl_divergence(ref_logits, logits),
    }
    if logits.shape[-1] > 5:
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        out["top5_agree"] = float(np.mean(np.any(top5 == np.argmax(ref_logits, -1)[:, None], axis=1)))
    if labels is not None:
        out["accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    return out

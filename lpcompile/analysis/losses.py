"""Output-distortion losses, identical in torch (for Hessians) and numpy (for measurements).

With no labels the loss of a perturbed model is the distortion of its own outputs against the
fp32 outputs: KL(p_fp32 ‖ p) for classifier-like outputs, and the normalised MSE
``mean((y − y0)²) / mean(y0²)`` otherwise, summed over outputs. Both are zero with zero gradient
at the fp32 point, so their Hessian there is the Gauss–Newton matrix and ½·δᵀHδ predicts the
loss of a weight perturbation δ. With labels (``ce``), the task cross-entropy is used instead.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

LossKind = Literal["auto", "kl", "mse"]
_CLASSIFIER_NAME = re.compile(r"logit|prob|score|class", re.IGNORECASE)


def output_loss_kinds(names: Sequence[str], shapes: Sequence[tuple[int, ...]], kind: LossKind) -> dict[str, str]:
    """Choose ``kl`` or ``mse`` per output.

    ``auto``: KL for rank-2 outputs that look like class scores (by name, or a 10/100/1000-class
    width) and for higher-rank outputs named like logits/probabilities (language-model
    ``[B, T, V]``); normalised MSE otherwise.
    """
    out: dict[str, str] = {}
    for name, shape in zip(names, shapes, strict=True):
        if kind != "auto":
            out[name] = kind
        elif (
            len(shape) == 2 and shape[-1] >= 2 and (_CLASSIFIER_NAME.search(name) or shape[-1] in (10, 100, 1000, 1001))
        ) or (len(shape) >= 3 and shape[-1] >= 2 and _CLASSIFIER_NAME.search(name)):
            out[name] = "kl"
        else:
            out[name] = "mse"
    return out


def torch_distortion(
    outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], kinds: Mapping[str, str]
) -> torch.Tensor:
    """Σ over outputs of the distortion of ``outputs`` against fixed ``reference`` tensors."""
    total = torch.zeros((), dtype=torch.float64)
    for name, kind in kinds.items():
        y = outputs[name].to(torch.float64)
        y0 = reference[name].to(torch.float64).detach()
        if kind == "kl":
            logp0 = torch.log_softmax(y0, dim=-1)
            logp = torch.log_softmax(y, dim=-1)
            total = total + (logp0.exp() * (logp0 - logp)).sum(-1).mean()
        else:
            denom = (y0 * y0).mean().clamp_min(1e-30)
            total = total + ((y - y0) ** 2).mean() / denom
    return total


def numpy_distortion(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], kinds: Mapping[str, str]
) -> float:
    """The numpy twin of :func:`torch_distortion` (float64)."""
    total = 0.0
    for name, kind in kinds.items():
        y = np.asarray(outputs[name], dtype=np.float64)
        y0 = np.asarray(reference[name], dtype=np.float64)
        if kind == "kl":
            logp0 = _log_softmax(y0)
            logp = _log_softmax(y)
            total += float(np.mean(np.sum(np.exp(logp0) * (logp0 - logp), axis=-1)))
        else:
            denom = max(float(np.mean(y0 * y0)), 1e-30)
            total += float(np.mean((y - y0) ** 2)) / denom
    return total


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def ggn_output_probe(y_ref: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A random vector z on the output space with Cov(z) = M, the Hessian of the distortion at y_ref.

    Then g = Jᵀz (one backward pass) satisfies E[g ⊙ g] = diag(JᵀMJ), the Gauss–Newton diagonal.
    For the normalised MSE, M = 2/(N·mean(y0²))·I; for KL(p0‖softmax(y)) averaged over B samples,
    M = (diag(p) − ppᵀ)/B per sample, and z = (diag(√p) − p√pᵀ)u/√B with u Rademacher.
    """
    y0 = y_ref.detach().to(torch.float64)
    u = torch.randint(0, 2, y0.shape, generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    if kind == "kl":
        p = torch.softmax(y0, dim=-1)
        a = p.sqrt()
        samples = y0.numel() // y0.shape[-1]
        z = a * u - p * (a * u).sum(-1, keepdim=True)
        return (z / math.sqrt(max(samples, 1))).to(y_ref.dtype)
    denom = float((y0 * y0).mean().clamp_min(1e-30))
    return (u * math.sqrt(2.0 / (y0.numel() * denom))).to(y_ref.dtype)

"""Analyzer settings (kept free of torch imports so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lpcompile.formats import get_format

DEFAULT_FORMATS = ("fp8_e4m3", "int8", "int4_b128", "int4_b64", "int4_b32", "bf16")


@dataclass(frozen=True)
class AnalysisConfig:
    """Knobs of the analyzer.

    Attributes:
        formats: candidate formats (fp32 is always added as the lossless fallback).
        probes: total Hutchinson probes (Hessian-vector products), spread over the batches.
        batch_size: calibration samples per batch.
        max_samples: use at most this many calibration samples (None: all).
        seed: seeds the probes.
        method: ``diag`` (½ΣH_iiδ_i²) or ``trace`` (HAWQ-v2 ½·Tr/n·‖δ‖²).
        loss: ``auto``, ``kl`` or ``mse`` (see :func:`lpcompile.analysis.losses.output_loss_kinds`).
        activations: include the activation-rounding term for formats that round activations.
        estimator: how the Hessian diagonal is estimated: ``ggn`` (output-space probes z with
            Cov(z) = M on the Gauss–Newton factorisation H = JᵀMJ, one backward per probe) or
            ``hvp`` (classic Hutchinson v ⊙ Hv with Hessian-vector products by double backward).
        outputs: the graph outputs the distortion loss is defined on (``--outputs``); None: every
            floating output that depends on weights (see :func:`lpcompile.analysis.losses.choose_outputs`).
        input_shapes: ``--input-shape`` values for synthetic inputs
            (:func:`lpcompile.frontend.input_spec.parse_input_shape` syntax).
    """

    formats: tuple[str, ...] = DEFAULT_FORMATS
    probes: int = 16
    batch_size: int = 8
    max_samples: int | None = None
    seed: int = 0
    method: Literal["diag", "trace"] = "diag"
    loss: Literal["auto", "kl", "mse"] = "auto"
    activations: bool = True
    estimator: Literal["ggn", "hvp"] = "ggn"
    outputs: tuple[str, ...] | None = None
    input_shapes: tuple[str, ...] = ()


def candidate_formats(config: AnalysisConfig) -> tuple[str, ...]:
    """Canonical candidate names, fp32 appended when missing."""
    names = tuple(dict.fromkeys(get_format(f).name for f in config.formats))
    return names if "fp32" in names else (*names, "fp32")

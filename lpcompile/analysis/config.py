"""Analyzer settings (kept free of torch imports so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lpcompile.formats import canonical_name

#: ``stream="auto"`` streams the analysis of models with more weight bytes than this (SmolLM2-135M's 0.54 GB:
#: the whole-graph analysis peaked at 12.8 GB there, the streamed compile at 2 GB; issue 18, wave 6)
STREAM_AUTO_BYTES = 256 << 20

DEFAULT_FORMATS = ("fp8_e4m3", "int8", "int4_b128", "int4_b64", "int4_b32", "bf16", "bf16w", "w8a8_dyn")


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
        probe_tol: convergence mode (``--probe-tol``): draw probes in rounds, the same number on every
            calibration batch, until each node's Hessian-trace estimate has a relative standard error
            ≤ this (or ``max_probes`` is reached); None: exactly ``probes`` probes (the default).
        max_probes: the most probes convergence mode draws in all (``--max-probes``).
        seeding: ``sequential`` (one generator seeded with ``seed`` feeds every probe in order, the
            historical mode), ``per-probe`` (probe j on batch b has its own generator seeded from
            (seed, b, j), so any process can draw it: what sharded runs use) or ``auto`` (per-probe
            when ``workers`` > 1 or ``ray`` is set, else sequential).
        device: where the torch interpretation runs: ``cpu``, ``cuda`` or ``auto`` (cuda when present).
        workers: local worker processes for the probe passes (``--workers``); 1: in this process.
        ray: run the probe passes as Ray tasks (``--ray [ADDRESS]``): ``"local"`` starts a local Ray,
            anything else is passed to ``ray.init(address=...)``; None: no Ray.
        shard_dir: a folder every worker can read, where the driver writes the normalised model for
            the workers (``--shard-dir``; a shared file system for a multi-machine Ray cluster);
            None: a temporary folder on this machine.
        rounding: how the weights of candidates without a ``:rounding`` suffix are rounded when their
            loss is predicted (``nearest``, ``rtn``, ``mse``, ``gptq``; see :mod:`lpcompile.rounding`);
            ``mse``/``gptq`` gather the layers' input ``XᵀX`` from the calibration data.
        stream: the segment-streamed analysis (:mod:`lpcompile.analysis.streamed`): one segment of
            the graph in memory at a time, the same estimates as the full-model GGN with per-probe
            seeding. ``auto``: streamed when the weights exceed :data:`STREAM_AUTO_BYTES` and the
            settings allow it (``ggn``, no ``--probe-tol``, not sharded).
        segment_mb: weight megabytes per streamed segment (None: the weights / 16, 16–512 MB).
        probe_dtype: the arithmetic of the streamed analysis' probe passes (``--probe-dtype``): ``float32``,
            or ``bfloat16`` (their matrix products in bf16 with fp32 accumulation, under torch autocast; the
            reference outputs the probes are drawn from, the activation values and ``XᵀX`` still come from an
            fp32 forward). Streamed analysis only (``auto`` streams when it is bf16).
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
    probe_tol: float | None = None
    max_probes: int = 256
    seeding: Literal["auto", "sequential", "per-probe"] = "auto"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    workers: int = 1
    ray: str | None = None
    shard_dir: str | None = None
    rounding: str = "nearest"
    stream: Literal["auto", "on", "off"] = "auto"
    segment_mb: float | None = None
    probe_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        from lpcompile.errors import UsageError

        if self.probe_tol is not None and not (0.0 < self.probe_tol < 1.0):
            raise UsageError(f"--probe-tol must be in (0, 1), not {self.probe_tol}")
        if self.max_probes < 1:
            raise UsageError(f"--max-probes must be at least 1, not {self.max_probes}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {self.workers}")
        if self.seeding not in ("auto", "sequential", "per-probe"):
            raise UsageError(f"unknown seeding {self.seeding!r} (auto, sequential, per-probe)")
        if self.device not in ("cpu", "cuda", "auto"):
            raise UsageError(f"--device: unknown value {self.device!r} (cpu, cuda, auto)")
        if self.seeding == "sequential" and self.sharded:
            raise UsageError("sequential seeding cannot be sharded: use seeding='per-probe' with --workers/--ray")
        if self.stream not in ("auto", "on", "off"):
            raise UsageError(f"--stream: unknown value {self.stream!r} (auto, on, off)")
        if self.probe_dtype not in ("float32", "bfloat16"):
            raise UsageError(f"--probe-dtype: unknown value {self.probe_dtype!r} (float32, bfloat16)")
        if self.probe_dtype != "float32" and self.stream == "off":
            raise UsageError("--probe-dtype bfloat16 runs in the streamed analysis: drop --stream off")
        if self.segment_mb is not None and not self.segment_mb > 0:
            raise UsageError(f"--segment-mb must be positive, not {self.segment_mb}")

    @property
    def sharded(self) -> bool:
        """True when the probe passes run in worker processes or Ray tasks."""
        return self.workers > 1 or self.ray is not None

    @property
    def effective_seeding(self) -> Literal["sequential", "per-probe"]:
        """The seeding mode a run uses (``auto`` resolved)."""
        if self.seeding == "auto":
            return "per-probe" if self.sharded else "sequential"
        return self.seeding


def candidate_formats(config: AnalysisConfig) -> tuple[str, ...]:
    """Canonical candidate names (a ``:rounding`` suffix kept), fp32 appended when missing."""
    names = tuple(dict.fromkeys(canonical_name(f) for f in config.formats))
    return names if "fp32" in names else (*names, "fp32")

"""The quality guard: after writing, measure the written model and say loudly when it is ruined.

:func:`check_quality` runs the written model and its fp32 reference in ONNX Runtime on held-out
calibration samples (samples the analysis did not see; fresh synthetic samples when there is
no real data) and measures the *distortion* — the analysis loss of
:mod:`lpcompile.analysis.losses` on the outputs that matter: KL (nats, averaged over positions,
padding masked) for class scores, normalised MSE ``Σ(y−y0)²/Σy0²`` for other outputs, summed over
outputs. When it exceeds the threshold the guard fires:

* **Threshold**: ``max_loss`` when given (``--max-loss``), else :data:`DEFAULT_MAX_DISTORTION`
  = 0.1. For a classifier that is a mean KL of 0.1 nats — top-1 agreement typically drops below
  ~90 % around there; for a regression/embedding output it is an output SQNR of 10 dB (cosine
  ≈ 0.95). The example models (:mod:`lpcompile.examples`) stay far below it at 4.25–6 bits.
* **Worst nodes**: the nodes whose chosen format the analysis predicts to cost the most loss.
* **Suggested budget**: the smallest budget on a sweep (current budget + 0.25-bit steps up to
  16 bits) at which the predicted loss, scaled by measured ÷ predicted at the written plan, meets
  the threshold.
* ``strict`` (``--strict``): the caller exits 1 (:meth:`GuardResult.exit_code`).

The guard never changes the written files.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpcompile.errors import LpError, UsageError
from lpcompile.frontend.calib import CalibrationSet

logger = logging.getLogger(__name__)

DEFAULT_MAX_DISTORTION = 0.1
"""Distortion above which the guard fires when no ``max_loss`` is given (see the module docstring)."""
SWEEP_STEP_BITS = 0.25
SWEEP_MAX_BITS = 16.0
WORST_NODES = 3

#: a model file bigger than this (its weights embedded) is measured from a temporary copy with external data
LEAN_REFERENCE_BYTES = 256 << 20

PredictAt = Callable[[float], float | None]
"""Predicted loss of the plan the solver picks at a budget in bits per weight (None: infeasible)."""


@dataclass(frozen=True)
class GuardResult:
    """What the guard measured and concluded.

    Attributes:
        distortion: measured distortion of the written model on the held-out samples.
        threshold: the limit it was compared with.
        threshold_source: ``"default"`` or ``"--max-loss"``.
        fired: ``distortion > threshold`` (or not finite).
        num_samples: held-out samples measured.
        synthetic: whether those samples were synthetic.
        loss: how the distortion is defined (outputs, loss per output, masking).
        predicted: the analysis' predicted loss of the written plan, when known.
        worst_nodes: ``(node, format, predicted loss)`` of the costliest choices, worst first.
        suggested_budget: e.g. ``"5.25bits"``, when the sweep predicts one that meets the threshold.
        top1: the lowest top-1 agreement over class-score outputs, when there are any.
        strict: the caller should fail (exit 1) when fired.
    """

    distortion: float
    threshold: float
    threshold_source: str
    fired: bool
    num_samples: int
    synthetic: bool
    loss: str = ""
    predicted: float | None = None
    worst_nodes: tuple[tuple[str, str, float], ...] = ()
    suggested_budget: str | None = None
    top1: float | None = None
    strict: bool = False

    @property
    def exit_code(self) -> int:
        """1 when ``strict`` and fired, else 0."""
        return 1 if (self.strict and self.fired) else 0

    def message(self) -> str:
        """One line for the log: the verdict, the numbers, the worst nodes and the suggestion."""
        data = f"{self.num_samples} held-out {'synthetic ' if self.synthetic else ''}sample(s)"
        top1 = f", top-1 agreement {self.top1:.1%}" if self.top1 is not None else ""
        if not self.fired:
            return (
                f"quality guard: distortion {self.distortion:.4g} ≤ {self.threshold:g} ({self.threshold_source}) "
                f"on {data}{top1}"
            )
        text = (
            f"QUALITY WARNING: the written model's distortion is {self.distortion:.4g} on {data}, above "
            f"{self.threshold:g} ({self.threshold_source}){top1}"
        )
        if self.worst_nodes:
            text += "; most damaging: " + ", ".join(f"{n} ({f}, {loss:.3g})" for n, f, loss in self.worst_nodes)
        if self.suggested_budget:
            text += f"; the sweep predicts --budget {self.suggested_budget} meets it"
        elif self.predicted is not None:
            text += f"; no budget up to {SWEEP_MAX_BITS:g} bits is predicted to meet it: keep the worst nodes in fp32"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "distortion": self.distortion if math.isfinite(self.distortion) else str(self.distortion),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "fired": self.fired,
            "num_samples": self.num_samples,
            "synthetic": self.synthetic,
            "loss": self.loss,
            "predicted": self.predicted,
            "worst_nodes": [{"name": n, "format": f, "predicted_loss": v} for n, f, v in self.worst_nodes],
            "suggested_budget": self.suggested_budget,
            "top1": self.top1,
            "strict": self.strict,
        }

    def log(self) -> None:
        """WARNING when fired, INFO otherwise."""
        (logger.warning if self.fired else logger.info)("%s", self.message())


def _node_losses(plan: Any, table: Any) -> list[tuple[str, str, float]]:
    """``(node, format, predicted loss)`` per plan node (table candidates first, plan figures else)."""
    by_name = {n.name: n for n in getattr(table, "nodes", ())} if table is not None else {}
    out = []
    for a in getattr(plan, "nodes", ()):
        loss = None
        node = by_name.get(a.name)
        if node is not None and a.format in node.candidates:
            loss = node.candidates[a.format].predicted_loss
        if loss is None:
            loss = getattr(a, "predicted_loss", None)
        if loss is not None and math.isfinite(loss):
            out.append((a.name, a.format, float(loss)))
    return out


def table_sweep(table: Any, formats: Sequence[str] | None = None, keep: Sequence[Any] = ()) -> PredictAt:
    """A :data:`PredictAt` over a sensitivity table (the solver, as ``--budget`` runs it)."""
    from lpcompile.budget import parse_budget
    from lpcompile.errors import BudgetError
    from lpcompile.solver import solve
    from lpcompile.solver.items import solver_items

    items = solver_items(table, formats, keep)

    def predict(bits: float) -> float | None:
        try:
            return float(solve(items, parse_budget(f"{bits:g}bits")).predicted_loss)
        except BudgetError:
            return None

    return predict


def suggest_budget(predict_at: PredictAt, current_bits: float, threshold: float, scale: float = 1.0) -> str | None:
    """The smallest budget above ``current_bits`` whose predicted loss × ``scale`` is ≤ ``threshold``."""
    bits = math.floor(current_bits / SWEEP_STEP_BITS) * SWEEP_STEP_BITS
    while bits < SWEEP_MAX_BITS:
        bits += SWEEP_STEP_BITS
        predicted = predict_at(bits)
        if predicted is not None and predicted * scale <= threshold:
            return f"{bits:g}bits"
    return None


def check_quality(
    written: Any,
    reference: Any,
    heldout: CalibrationSet,
    *,
    plan: Any = None,
    table: Any = None,
    max_loss: float | None = None,
    strict: bool = False,
    outputs: Sequence[str] | None = None,
    batch_size: int = 8,
    predict_at: PredictAt | None = None,
) -> GuardResult:
    """Measure the written model on held-out samples and judge it (see the module docstring).

    Args:
        written: the written model (path, onnx-ir model or proto).
        reference: its fp32 source.
        heldout: samples the analysis did not use (e.g. the tail of :func:`lpcompile.frontend.calib.split`,
            or ``synthesize(model, seed=seed + 1)`` without real data).
        plan: the plan the model was written by (for the worst nodes and the current bits).
        table: the sensitivity table (predicted losses per candidate; enables the budget sweep).
        max_loss: the threshold (``--max-loss``); default :data:`DEFAULT_MAX_DISTORTION`.
        strict: record that the caller exits 1 when the guard fires (``--strict``).
        outputs: the outputs the loss covers (``--outputs``), as in the analysis.
        batch_size: samples per run (a fixed batch in the model overrides it).
        predict_at: predicted loss at a budget (default: :func:`table_sweep` of ``table``).

    Raises:
        UsageError: a ``max_loss`` that is not a positive finite number.
    """
    from lpcompile.evaluate import evaluate

    if max_loss is not None and not (math.isfinite(max_loss) and max_loss > 0):
        raise UsageError(f"--max-loss must be a positive number, not {max_loss}")
    threshold = DEFAULT_MAX_DISTORTION if max_loss is None else float(max_loss)
    source = "default" if max_loss is None else "--max-loss"
    if heldout.num_samples == 0:
        raise LpError("the quality guard needs at least one held-out sample")
    with lean_model_file(written) as w, lean_model_file(reference) as r:
        report = evaluate(w, r, heldout, batch_size=batch_size, outputs=tuple(outputs) if outputs else None)
    distortion = float(report.distortion if report.distortion is not None else math.nan)
    fired = not math.isfinite(distortion) or distortion > threshold
    top1s = [m.top1 for name, m in report.outputs.items() if m.top1 is not None and name in report.loss_outputs]
    losses = _node_losses(plan, table)
    predicted = math.fsum(v for _, _, v in losses) if losses else None
    worst = tuple(sorted(losses, key=lambda t: -t[2])[:WORST_NODES]) if fired else ()
    suggestion = None
    if fired and (predict_at is not None or table is not None) and plan is not None:
        try:
            sweep = predict_at or table_sweep(table)
            current = float(getattr(plan, "achieved_bits", 0.0) or 0.0)
            scale = distortion / predicted if predicted and math.isfinite(distortion) and predicted > 0 else 1.0
            suggestion = suggest_budget(sweep, current, threshold, max(scale, 1.0))
        except LpError as exc:  # the sweep is advice: never let it hide the verdict
            logger.info("budget sweep for the guard failed: %s", exc)
    result = GuardResult(
        distortion=distortion,
        threshold=threshold,
        threshold_source=source,
        fired=fired,
        num_samples=report.num_samples,
        synthetic=report.synthetic,
        loss=report.loss,
        predicted=predicted,
        worst_nodes=worst,
        suggested_budget=suggestion,
        top1=min(top1s) if top1s else None,
        strict=strict,
    )
    result.log()
    return result


@contextlib.contextmanager
def lean_model_file(model: Any) -> Iterator[Any]:
    """A model file whose weights are embedded and above :data:`LEAN_REFERENCE_BYTES`, as a temporary copy
    with its weights in external data (removed afterwards); anything else as it is.

    :func:`lpcompile.evaluate.evaluate` reads a file's graph, names and metadata as a protobuf and lets ONNX
    Runtime read the weights from the path: with embedded weights that protobuf holds them all (SmolLM2-135M:
    541 MB) beside the session's own copy, for the whole measurement. The copy holds the same tensors.
    """
    if not isinstance(model, str | os.PathLike) or not Path(model).is_file():
        yield model
        return
    path = Path(model)
    if path.stat().st_size <= LEAN_REFERENCE_BYTES:
        yield model
        return
    import onnx

    from lpcompile.frontend.onnx_io import load_proto

    # (the file was checked when the compile read it: onnx.checker would hold a second copy of the weights here)
    proto = load_proto(path, check=False)
    with tempfile.TemporaryDirectory(prefix="lpcompile-guard-") as folder:
        copy = Path(folder) / path.name
        onnx.save_model(
            proto, str(copy), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + ".data", size_threshold=1024,
        )
        del proto
        gc.collect()
        logger.info("measuring %s from a copy with external data (%s)", path.name, copy)
        yield copy


def heldout_split(
    calib: CalibrationSet, fraction: float = 0.25, minimum: int = 4
) -> tuple[CalibrationSet, CalibrationSet]:
    """Split calibration data into (analysis, held-out) for the guard.

    The last ``fraction`` of the samples (at least ``minimum``, a multiple of a fixed batch) is
    held out when at least as many remain for the analysis; otherwise all samples are used for
    both and the guard's figure is an in-sample one (logged).
    """
    n = calib.num_samples
    unit = calib.fixed_batch or 1
    held = max(minimum, round(n * fraction))
    held = int(math.ceil(held / unit) * unit)
    if n - held < held:
        logger.info("too few calibration samples (%d) to hold some out: the guard measures in-sample", n)
        return calib, calib
    return calib.subset(0, n - held), calib.subset(n - held, n)


__all__: Sequence[str] = [
    "DEFAULT_MAX_DISTORTION",
    "GuardResult",
    "check_quality",
    "heldout_split",
    "suggest_budget",
    "table_sweep",
]

"""Evaluate a rewritten model against its reference: same inputs, ORT "exact" numerics, metrics.

* **Real inputs by default.** Without calibration data, :func:`evaluate` refuses unless
  ``synthetic=True`` (``--synthetic``): numbers on synthetic inputs can mislead (an integer input
  synthesised as zeros makes a damaged recogniser look perfect).
* **Metrics by output kind** (:func:`lpcompile.metrics.output_kind`, the rule the analysis loss
  uses): top-1 and KL for classifiers, per-position top-1 and KL for sequence outputs (padding
  left out where the model has an attention-mask input), neither for embeddings and other
  tensors, the fraction of identical elements for integer outputs.
* **The distortion** — the analysis loss (:mod:`lpcompile.analysis.losses`) on the outputs that
  matter (``outputs``, default: floating outputs that depend on weights) — is reported too; the
  quality guard (:mod:`lpcompile.guard`) reads it.
* **Fixed batches** in the reference are honoured (batches of exactly that size).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir

from lpcompile.errors import LpError, UsageError
from lpcompile.frontend.calib import (
    CalibrationSet,
    batches,
    check_against_model,
    model_input_specs,
    synthesize,
)
from lpcompile.frontend.input_spec import ShapeOverride
from lpcompile.frontend.onnx_io import load_proto
from lpcompile.metrics import OutputMetrics, compare_outputs
from lpcompile.runtime.ort import make_session, run

SYNTHETIC_REFUSAL = (
    "eval compares on real inputs: give --calib DATA (an .npz keyed by input name), or --synthetic to accept "
    "synthetic inputs, whose numbers can mislead"
)

logger = logging.getLogger(__name__)

ACHIEVED_BITS_KEY = "lpcompile.achieved_bits"

ModelLike = str | os.PathLike[str] | ir.Model | onnx.ModelProto


@dataclass(frozen=True)
class EvalReport:
    """Output distortion of a model against its reference.

    Attributes:
        outputs: metrics per output name, in the reference's output order.
        num_samples: how many input samples both models ran.
        synthetic: whether the inputs were synthetic.
        achieved_bits: the rewritten model's ``lpcompile.achieved_bits`` metadata, if present.
        distortion: the analysis loss (KL / normalised MSE summed over ``loss_outputs``) of the
            model against the reference on these inputs.
        loss: how the distortion is defined (:meth:`lpcompile.analysis.losses.LossSpec.describe`).
        loss_outputs: the outputs the distortion covers.
    """

    outputs: dict[str, OutputMetrics]
    num_samples: int
    synthetic: bool
    achieved_bits: float | None = None
    distortion: float | None = None
    loss: str = ""
    loss_outputs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite metrics as ``"inf"``/``"-inf"``/``"nan"`` strings)."""
        d = self.distortion
        return {
            "num_samples": self.num_samples,
            "synthetic": self.synthetic,
            "achieved_bits": self.achieved_bits,
            "distortion": d if d is None or math.isfinite(d) else str(d),
            "loss": self.loss,
            "loss_outputs": list(self.loss_outputs),
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _to_proto(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    return load_proto(model)


def _graph_and_source(model: ModelLike) -> tuple[onnx.ModelProto, ModelLike]:
    """The proto ``evaluate`` reads names, shapes and metadata from, and what its session loads.

    A file is read without its external data (ONNX Runtime reads that itself from the path), so a
    multi-gigabyte model is not held twice, once as a proto and once in the session.
    """
    if isinstance(model, (onnx.ModelProto, ir.Model)):
        proto = _to_proto(model)
        return proto, proto
    return load_proto(model, external_data=False), model


def _io_names(proto: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in inits]
    outputs = [o.name for o in proto.graph.output]
    return inputs, outputs


def achieved_bits(proto: onnx.ModelProto) -> float | None:
    """The model-level ``lpcompile.achieved_bits`` metadata as a float, or None."""
    for prop in proto.metadata_props:
        if prop.key == ACHIEVED_BITS_KEY:
            try:
                value = float(prop.value)
            except ValueError:
                logger.warning("ignoring unparsable %s=%r", ACHIEVED_BITS_KEY, prop.value)
                return None
            return value if math.isfinite(value) else None
    return None


def evaluate(
    model: ModelLike,
    reference: ModelLike,
    calib: CalibrationSet | None = None,
    batch_size: int = 8,
    *,
    synthetic: bool = False,
    input_shapes: tuple[ShapeOverride, ...] = (),
    outputs: tuple[str, ...] | None = None,
    num_samples: int = 16,
    seed: int = 0,
) -> EvalReport:
    """Run ``model`` and ``reference`` on the same inputs and compare every output.

    Args:
        model: the rewritten model (path, onnx-ir model or proto).
        reference: the fp32 reference.
        calib: inputs (checked and laid out for the reference: sample axes, fixed batch).
        batch_size: samples per run (a fixed batch dim in the reference overrides it).
        synthetic: without ``calib``, synthesise ``num_samples`` inputs (seeded by ``seed``, shapes
            by ``input_shapes``) instead of refusing.
        input_shapes: ``--input-shape`` values for synthetic inputs.
        outputs: the outputs the distortion covers (default: floating outputs that depend on weights).
        num_samples: synthetic samples.
        seed: seed of the synthetic inputs.

    Raises:
        UsageError: no ``calib`` and not ``synthetic``; unknown ``outputs``.
        LpError: the two models differ in input or output names; CalibrationError when the
            data does not match the inputs.
    """
    from lpcompile.analysis.losses import choose_outputs, model_output_kinds, numpy_distortion

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    (test_proto, test_src), (ref_proto, ref_src) = _graph_and_source(model), _graph_and_source(reference)
    t_in, t_out = _io_names(test_proto)
    r_in, r_out = _io_names(ref_proto)
    if sorted(t_in) != sorted(r_in):
        raise LpError(f"models take different inputs: {t_in} vs reference {r_in}")
    if sorted(t_out) != sorted(r_out):
        raise LpError(f"models produce different outputs: {t_out} vs reference {r_out}")
    ref_session = make_session(ref_src, numerics="exact")  # a reference that cannot run fails first
    if calib is None and not synthetic:
        raise UsageError(SYNTHETIC_REFUSAL)
    specs = model_input_specs(ref_proto)
    if calib is None:
        calib = synthesize(ref_proto, num_samples=num_samples, seed=seed, input_shapes=input_shapes)
    else:
        calib = check_against_model(calib, specs)
    if calib.fixed_batch is not None and calib.fixed_batch != batch_size:
        logger.info("reference has a fixed batch of %d: evaluating in batches of that size", calib.fixed_batch)
    axes = output_sample_axes(ref_proto)
    # one session at a time: peak memory is the bigger model's, not the sum of both
    ref_out = _run_all(ref_session, calib, batch_size, r_out, axes)
    del ref_session
    test_out = _run_all(make_session(test_src, numerics="exact"), calib, batch_size, r_out, axes)
    spec = choose_outputs(ref_proto, outputs, shapes={k: v.shape for k, v in ref_out.items()})
    mask_name = next((o.mask for o in spec.outputs if o.mask), None)
    mask = _batched(calib, mask_name, batch_size) if mask_name else None
    masks = spec.masks({mask_name: mask} if mask_name else {}, {k: v.shape for k, v in ref_out.items()})
    distortion = numpy_distortion(test_out, ref_out, spec.kinds(), masks)
    logger.info("distortion %.4g on %s", distortion, spec.describe())
    return EvalReport(
        outputs=compare_outputs(ref_out, test_out, model_output_kinds(ref_proto, ref_out), mask),
        num_samples=calib.num_samples,
        synthetic=calib.synthetic,
        achieved_bits=achieved_bits(test_proto),
        distortion=distortion,
        loss=spec.describe(),
        loss_outputs=spec.names,
    )


def output_sample_axes(proto: onnx.ModelProto) -> dict[str, int]:
    """Per output, the axis holding the samples: where the inputs' batch symbol sits (a recurrent
    state ``[2, batch, 128]`` → 1), else 0."""
    from lpcompile.frontend.input_spec import batch_symbol

    sym = batch_symbol(model_input_specs(proto))
    axes = {}
    for o in proto.graph.output:
        dims = [d.dim_param for d in o.type.tensor_type.shape.dim] if o.type.tensor_type.HasField("shape") else []
        axes[o.name] = dims.index(sym) if sym is not None and sym in dims else 0
    return axes


def _run_all(session: Any, calib: CalibrationSet, batch_size: int, names: list[str], axes: dict[str, int]) -> dict:
    """Every batch through ``session``, each output concatenated along its sample axis."""
    import numpy as np

    parts = [run(session, b, names) for b in batches(calib, batch_size)]
    if not parts:
        raise LpError("no input batches to run")
    out = {}
    for name in names:
        arrays = [p[name] for p in parts]
        axis = axes.get(name, 0)
        out[name] = (
            np.stack(arrays) if arrays[0].ndim == 0 else np.concatenate(arrays, axis=min(axis, arrays[0].ndim - 1))
        )
    return out


def _batched(calib: CalibrationSet, name: str, batch_size: int) -> Any:
    """The input ``name`` over the batches that were run (a fixed batch may drop a short tail)."""
    import numpy as np

    parts = [b[name] for b in batches(calib, batch_size)]
    return np.concatenate(parts, axis=0) if parts else None

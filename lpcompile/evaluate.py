"""Evaluate a rewritten model against its reference: same inputs, ORT "exact" numerics, metrics."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir

from lpcompile.errors import LpError
from lpcompile.frontend.calib import (
    CalibrationSet,
    batches,
    check_against_model,
    fixed_batch_size,
    model_input_specs,
    synthesize,
)
from lpcompile.frontend.onnx_io import load_proto
from lpcompile.metrics import OutputMetrics, compare_outputs
from lpcompile.runtime.ort import make_session, run_batches

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
    """

    outputs: dict[str, OutputMetrics]
    num_samples: int
    synthetic: bool
    achieved_bits: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite metrics as ``"inf"``/``"-inf"``/``"nan"`` strings)."""
        return {
            "num_samples": self.num_samples,
            "synthetic": self.synthetic,
            "achieved_bits": self.achieved_bits,
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
) -> EvalReport:
    """Run ``model`` and ``reference`` on the same inputs and compare every output.

    Args:
        model: the rewritten model (path, onnx-ir model or proto).
        reference: the fp32 reference.
        calib: inputs; synthesised from the reference's input signature when None.
        batch_size: samples per run (a fixed batch dim in the reference overrides it).

    Raises:
        LpError: the two models differ in input or output names; CalibrationError when the
            data does not match the inputs.
    """
    test_proto, ref_proto = _to_proto(model), _to_proto(reference)
    t_in, t_out = _io_names(test_proto)
    r_in, r_out = _io_names(ref_proto)
    if sorted(t_in) != sorted(r_in):
        raise LpError(f"models take different inputs: {t_in} vs reference {r_in}")
    if sorted(t_out) != sorted(r_out):
        raise LpError(f"models produce different outputs: {t_out} vs reference {r_out}")
    specs = model_input_specs(ref_proto)
    if calib is None:
        calib = synthesize(ref_proto)
    else:
        check_against_model(calib, specs)
    fixed = fixed_batch_size(specs)
    if fixed is not None and fixed != batch_size:
        logger.info("reference has a fixed batch of %d: evaluating in batches of %d", fixed, fixed)
        batch_size = fixed
    ref_session = make_session(ref_proto, numerics="exact")
    test_session = make_session(test_proto, numerics="exact")
    ref_out = run_batches(ref_session, batches(calib, batch_size), outputs=r_out)
    test_out = run_batches(test_session, batches(calib, batch_size), outputs=r_out)
    return EvalReport(
        outputs=compare_outputs(ref_out, test_out),
        num_samples=calib.num_samples,
        synthetic=calib.synthetic,
        achieved_bits=achieved_bits(test_proto),
    )

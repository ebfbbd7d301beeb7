"""Measured sensitivity: quantize one node to one format, run ONNX Runtime, measure the loss.

This is both the analyzer's validator (Spearman ρ between predicted and measured losses, overall
and per format) and its fallback when the torch interpreter cannot evaluate a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.analysis.losses import choose_outputs, numpy_distortion
from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.formats import canonical_name, get_format
from lpcompile.frontend.calib import CalibrationSet, batches, dynamic_sequence_inputs, trim_padding
from lpcompile.graph import WeightNode, candidate_nodes, find_weight_nodes, tied_groups
from lpcompile.plan import NodeAssignment, PrecisionPlan

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MeasureBackend:
    """How the measurement rewrites and runs a model (handed in by the caller: analysis does not
    import the passes or the runtime).

    Attributes:
        rewrite: ``rewrite(model, plan) -> model``: the model with one plan applied (a fresh copy).
        session: ``session(model) -> run`` where ``run(batch) -> {output: array}`` (exact numerics).
        amax: ``amax(model, batches, tensors) -> {tensor: max |x|}`` over calibration batches.
    """

    rewrite: Callable[[ir.Model, PrecisionPlan], ir.Model]
    session: Callable[[ir.Model], Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]]
    amax: Callable[..., dict[str, float]]


class _Runner:
    """Runs a (rewritten) model on the fixed calibration batches and scores its distortion."""

    def __init__(self, model: ir.Model, calib: CalibrationSet, batch_size: int, loss: str,
                 backend: MeasureBackend, outputs: Sequence[str] | None = None) -> None:
        self.backend = backend
        dynamic = dynamic_sequence_inputs(model)
        self.batches = [trim_padding(b, dynamic) for b in batches(calib, batch_size)]
        ref_run = backend.session(model)
        self.refs = [dict(ref_run(b)) for b in self.batches]
        shapes = {k: tuple(v.shape) for k, v in self.refs[0].items()}
        spec = choose_outputs(model, outputs, loss, shapes=shapes)  # type: ignore[arg-type]
        self.kinds = spec.kinds()
        self.masks = [
            spec.masks(b, {k: ref[k].shape for k in self.kinds}) for b, ref in zip(self.batches, self.refs, strict=True)
        ]
        sizes = np.array([batch_len(b) for b in self.batches], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    def loss_of(self, model: ir.Model) -> float:
        run = self.backend.session(model)
        total = 0.0
        for b, ref, w, m in zip(self.batches, self.refs, self.weights, self.masks, strict=True):
            total += float(w) * numpy_distortion(dict(run(b)), ref, self.kinds, m)
        return total


def batch_len(b: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: axis 0 of its first input of rank ≥ 1 (scalars are shared by all samples)."""
    return next((int(v.shape[0]) for v in b.values() if np.ndim(v) >= 1), 1 if b else 0)


def measure_pairs(
    model: ir.Model,
    calib: CalibrationSet,
    pairs: Sequence[tuple[WeightNode, str]],
    activation_amax: Mapping[str, float],
    backend: MeasureBackend,
    *,
    batch_size: int = 8,
    loss: str = "auto",
    progress: Progress | None = None,
    outputs: Sequence[str] | None = None,
) -> dict[tuple[str, str], float]:
    """Loss increase of quantizing each node alone to each format, measured on ``backend``.

    ``outputs``: the outputs the loss covers (``--outputs``; default as in the Hessian analysis).
    """
    runner = _Runner(model, calib, batch_size, loss, backend, outputs)
    blob = ir.to_proto(model).SerializeToString()
    out: dict[tuple[str, str], float] = {}
    for i, (node, fmt_name) in enumerate(pairs):
        fmt = get_format(fmt_name)
        name = canonical_name(fmt_name)  # the candidate: a ``:rounding`` suffix is kept (the plan rounds by it)
        if fmt.is_identity:
            out[(node.name, name)] = 0.0
            continue
        one = PrecisionPlan(
            nodes=(
                NodeAssignment(
                    name=node.name,
                    op_type=node.op_type,
                    weight=node.weight,
                    params=node.params,
                    format=name,
                    bits=fmt.bits_for(node.shape, node.layout),
                ),
            ),
            softmax="keep",
            activation_scales={node.activation: activation_amax.get(node.activation, 0.0)},
        )
        fresh = ir.from_proto(onnx.load_from_string(blob))
        out[(node.name, name)] = runner.loss_of(backend.rewrite(fresh, one))
        if progress:
            progress(i + 1, len(pairs))
    return out


def spearman_report(table: SensitivityTable) -> dict[str, object]:
    """Spearman ρ between predicted and measured losses, overall and per format (fp32 excluded)."""
    pred, meas, per_fmt = [], [], {}
    for n in table.nodes:
        for f, c in n.candidates.items():
            if f == "fp32" or c.predicted_loss is None or c.measured_loss is None:
                continue
            pred.append(c.predicted_loss)
            meas.append(c.measured_loss)
            per_fmt.setdefault(f, ([], []))
            per_fmt[f][0].append(c.predicted_loss)
            per_fmt[f][1].append(c.measured_loss)

    def rho(a: list[float], b: list[float]) -> float | None:
        if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
            return None
        from scipy.stats import spearmanr  # lazy: scipy.stats costs ~23 MB of RSS that compile does not need

        r = float(spearmanr(a, b).statistic)
        return None if math.isnan(r) else round(r, 4)

    return {
        "spearman": rho(pred, meas),
        "per_format": {f: rho(a, b) for f, (a, b) in sorted(per_fmt.items())},
        "pairs": len(pred),
    }


def validate(
    table: SensitivityTable,
    model: ir.Model,
    calib: CalibrationSet,
    backend: MeasureBackend,
    *,
    batch_size: int = 8,
    loss: str = "auto",
    progress: Progress | None = None,
    outputs: Sequence[str] | None = None,
) -> SensitivityTable:
    """Fill ``measured_loss`` for every (node, format) and attach the Spearman report."""
    nodes = {n.name: n for n in find_weight_nodes(model)}
    pairs = [(nodes[n.name], f) for n in table.nodes for f in n.candidates if f != "fp32"]
    measured = measure_pairs(
        model, calib, pairs, table.activation_amax, backend, batch_size=batch_size, loss=loss, progress=progress,
        outputs=outputs,
    )
    new_nodes = tuple(
        replace(
            n,
            candidates={
                f: replace(c, measured_loss=measured.get((n.name, f), 0.0 if f == "fp32" else None))
                for f, c in n.candidates.items()
            },
        )
        for n in table.nodes
    )
    validated = replace(table, nodes=new_nodes)
    return validated.with_validation(spearman_report(validated), new_nodes)


def analyze_by_measurement(
    model: ir.Model,
    calib: CalibrationSet,
    formats: Sequence[str],
    backend: MeasureBackend,
    *,
    batch_size: int = 8,
    loss: str = "auto",
    progress: Progress | None = None,
    outputs: Sequence[str] | None = None,
) -> SensitivityTable:
    """Fallback analysis without gradients: every (node, format) measured on ``backend``."""
    nodes = find_weight_nodes(model)
    fmts = tuple(dict.fromkeys([*(get_format(f).name for f in formats), "fp32"]))
    acts = sorted({n.activation for n in nodes})
    amax = backend.amax(ir.to_proto(model), batches(calib, batch_size), acts) if acts else {}
    offered = candidate_nodes(nodes, fmts)
    pairs = [(n, f) for n in nodes for f in offered[n.name]]
    measured = measure_pairs(
        model, calib, pairs, amax, backend, batch_size=batch_size, loss=loss, progress=progress, outputs=outputs
    )
    groups = tied_groups(nodes)
    table_nodes = tuple(
        NodeSensitivity.of(
            n,
            {
                f: Candidate(
                    bits=get_format(f).bits_for(n.shape, n.layout),
                    predicted_loss=measured[(n.name, f)],
                    measured_loss=measured[(n.name, f)],
                )
                for f in offered[n.name]
            },
            group=groups.get(n.name),
        )
        for n in nodes
    )
    return SensitivityTable(
        nodes=table_nodes,
        formats=fmts,
        method="measured",
        loss=loss,
        calib=calib.source,
        num_samples=int(sum(batch_len(b) for b in batches(calib, batch_size))),
        synthetic_calib=calib.synthetic,
        activation_amax=amax,
    )

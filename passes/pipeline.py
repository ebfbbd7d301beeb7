"""The apply pipeline: normalise → weights → activations → [extra] → cleanup → annotate.

Plan node names are the names *after* :class:`NormalizeWeightsPass` (a Gemm keeps its name as
the MatMul that replaces it, so they are stable). :func:`apply_plan` accepts a raw or an
already-normalised model (normalising twice is a no-op); :func:`uniform_plan` needs a
normalised model (use :func:`normalize` or :func:`plan_nodes_for` first).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from lpcompile.errors import LpError, PlanError
from lpcompile.formats import canonical_name, get_format
from lpcompile.graph import WeightNode, find_weight_nodes
from lpcompile.passes.activations import ActivationPrecisionPass
from lpcompile.passes.annotate import AnnotatePass
from lpcompile.passes.cleanup import CleanupPass
from lpcompile.passes.normalize import NormalizeWeightsPass, needs_normalization
from lpcompile.passes.opset import default_opset, min_ir_version
from lpcompile.passes.qlinear_add import QLinearAddPass, RoundResidualsPass
from lpcompile.passes.qlinear_conv import QLinearConvChainPass
from lpcompile.passes.quantize_weights import QuantizeWeightsPass
from lpcompile.passes.targets import activation_style
from lpcompile.passes.w8a8 import FuseW8A8MatMulPass
from lpcompile.plan import NodeAssignment, PrecisionPlan

logger = logging.getLogger(__name__)


class _Recorded(ir.passes.InPlacePass):
    """Runs an in-place pass and records its name when it modified the model."""

    def __init__(self, inner: ir.passes.PassBase, log: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.log = log

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner(model)
        if result.model is not model:
            raise PlanError(f"pass {type(self.inner).__name__} is not in place; apply_plan needs in-place passes")
        if result.modified:
            self.log.append(type(self.inner).__name__)
        return ir.passes.PassResult(model, result.modified)


def apply_plan(
    model: ir.Model,
    plan: PrecisionPlan,
    *,
    target: Literal["qdq", "ort", "tvm"] = "qdq",
    rounding: str = "nearest",
    seed: int | None = None,
    extra_passes: Sequence[ir.passes.PassBase] = (),
    hessians: Mapping[str, np.ndarray] | None = None,
    int8_residuals: bool = False,
) -> tuple[ir.Model, list[str]]:
    """Rewrite ``model`` in place by ``plan``; return it and the names of the passes that changed it.

    Args:
        model: the model (raw or already normalised).
        plan: the precision plan (node names after normalisation).
        target: ``"qdq"`` (standard ops only), ``"ort"`` (int4 MatMul → MatMulNBits) or ``"tvm"``
            (DequantizeLinear patterns for the TVM lowering); see :mod:`lpcompile.passes.targets`.
        rounding: default weight rounding (:mod:`lpcompile.rounding`; a plan format's ``:rounding`` wins).
        seed: seed of stochastic rounding.
        extra_passes: in-place passes run after the activation pass and before cleanup
            (e.g. the two-pass softmax).
        hessians: ``XᵀX`` per activation tensor for ``mse``/``gptq`` rounding
            (:func:`lpcompile.analysis.input_hessians.collect_input_hessians`).
        int8_residuals: on ``ort``, round residual ``Add`` s between w8a8 Convs and write them as
            ``QLinearAdd`` (:mod:`lpcompile.passes.qlinear_add`).
    """
    residual = int8_residuals and target == "ort"
    log: list[str] = []
    passes: list[ir.passes.PassBase] = [
        NormalizeWeightsPass(),
        QuantizeWeightsPass(plan, target=target, rounding=rounding, seed=seed, hessians=hessians),
        ActivationPrecisionPass(plan, style=activation_style(target)),
        *([RoundResidualsPass()] if residual else []),
        *([FuseW8A8MatMulPass(), QLinearConvChainPass()] if target == "ort" else []),
        *([QLinearAddPass()] if residual else []),
        *([FuseW8A8MatMulPass(standard=True)] if target == "qdq" else []),
        *extra_passes,
        CleanupPass(),
        AnnotatePass(plan),
    ]
    manager = ir.passes.PassManager([_Recorded(p, log) for p in passes], steps=1)
    try:
        result = manager(model)
    except ir.passes.PassError as exc:
        # Surface our own one-line errors (PlanError, LpError) instead of the wrapped PassError.
        cause = exc.__cause__
        while cause is not None:
            if isinstance(cause, LpError):
                raise cause from None
            cause = cause.__cause__
        raise
    if _fit_ir_version(result.model):
        log.append("ir_version")
    return result.model, log


# Low-precision types need IR >= 10 (int4/uint4; float8 needs 9); opset 21 needs IR 10.
_MIN_IR_FOR_TYPES = 10


def _fit_ir_version(model: ir.Model) -> bool:
    """Write the lowest IR version the model's opsets and types need, so runtimes that lag the
    onnx package (ONNX Runtime 1.31 reads IR <= 13; onnx 1.23 writes 14) load the output."""
    opset = default_opset(model)
    if opset is None:
        return False
    wanted = max(min_ir_version(opset), _MIN_IR_FOR_TYPES)
    if model.ir_version > wanted:
        model.ir_version = wanted
        return True
    return False


def normalize(model: ir.Model) -> bool:
    """Run :class:`NormalizeWeightsPass` on ``model`` in place; return whether it changed."""
    return NormalizeWeightsPass()(model).modified


def plan_nodes_for(model: ir.Model) -> list[WeightNode]:
    """The weighted nodes a plan for ``model`` names (as after normalisation), without changing it."""
    if not needs_normalization(model):
        return find_weight_nodes(model)
    clone = model.clone()
    normalize(clone)
    return find_weight_nodes(clone)


def uniform_plan(model: ir.Model, fmt: str, *, activation_scales: dict[str, float] | None = None) -> PrecisionPlan:
    """A plan with every weighted node of a *normalised* model at format ``fmt``.

    Bits are ``Format.bits_for(shape, layout)`` per node. Raises ``PlanError`` when the model
    still has Gemm weights or weight Constants (normalise it first).
    """
    if needs_normalization(model):
        raise PlanError(
            "uniform_plan needs a normalised model: run NormalizeWeightsPass (passes.pipeline.normalize) first"
        )
    name = canonical_name(fmt)
    f = get_format(name)
    nodes = tuple(
        NodeAssignment(
            name=w.name,
            op_type=w.op_type,
            weight=w.weight,
            params=w.params,
            format=name,
            bits=f.bits_for(w.shape, w.layout),
        )
        for w in find_weight_nodes(model)
    )
    return PrecisionPlan(nodes=nodes, activation_scales=dict(activation_scales or {}))

"""Library entry points the CLI calls: apply a plan to a file, calibrate what a plan needs.

Each function takes paths or in-memory objects, never parses command lines and never prints;
the CLI modules under ``lpcompile.commands`` turn their results into tables and JSON.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from lpcompile.checks import ModelCheck, check_model
from lpcompile.errors import LpError, UsageError
from lpcompile.formats import get_format
from lpcompile.frontend.calib import CalibrationSet, check_against_model, load_calibration, synthesize
from lpcompile.frontend.onnx_io import load_model, save_model
from lpcompile.graph import WeightNode, find_weight_nodes
from lpcompile.io_utils import check_outputs
from lpcompile.plan import PrecisionPlan, validate_against

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply_to_file` wrote and how the model changed."""

    output: Path
    plan_path: Path
    plan: PrecisionPlan
    modified_by: tuple[str, ...]
    input_bytes: int
    output_bytes: int
    softmax_substituted: tuple[str, ...]
    checks: ModelCheck = field(default_factory=ModelCheck)


def check_output_path(model_path: str | os.PathLike[str], out: str | os.PathLike[str], force: bool,
                      inputs: Sequence[str | os.PathLike[str] | None] = (),
                      plan_input: str | os.PathLike[str] | None = None) -> Path:
    """Refuse to write the model or its plan over an input (unless ``force``) or onto a directory.

    ``inputs`` are the command's other input files (calibration data), protected too. The plan
    written beside ``out`` may replace ``plan_input`` (the plan the model is rewritten by: the
    output plan is that plan, completed), but the model may not.
    """
    out = Path(out)
    check_outputs([out], [model_path, plan_input, *inputs], force=force)
    check_outputs([plan_path_for(out)], [model_path, *inputs], force=force)
    return out


def default_output(model_path: str | os.PathLike[str], suffix: str = ".lp.onnx") -> Path:
    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + suffix)


def plan_path_for(output: Path) -> Path:
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(stem + ".plan.json")


def load_calib_for(model: ir.Model, calib_path: str | os.PathLike[str] | None, seed: int = 0,
                   num_samples: int = 16) -> CalibrationSet:
    """Calibration data for ``model``: the user's file/folder checked against the inputs, or synthetic."""
    if calib_path is None:
        return synthesize(model, num_samples=num_samples, seed=seed)
    calib = load_calibration(calib_path)
    check_against_model(calib, model)
    return calib


def fp8_activation_tensors(plan: PrecisionPlan, nodes: Sequence[WeightNode]) -> list[str]:
    """Activation tensors that an FP8 format in ``plan`` quantizes with a calibrated scale."""
    by_name = {n.name: n for n in nodes}
    out: list[str] = []
    for a in plan.nodes:
        act = get_format(a.format).activation
        if act and act.startswith("float8") and a.name in by_name:
            out.append(by_name[a.name].activation)
    return sorted(set(out))


def calibrate_plan(model: ir.Model, plan: PrecisionPlan, calib: CalibrationSet, batch_size: int = 16) -> PrecisionPlan:
    """Fill ``plan.activation_scales`` (calibrated amax) for every FP8 activation still missing one."""
    from lpcompile.frontend.calib import batches
    from lpcompile.runtime.calibrate import collect_amax

    needed = [t for t in fp8_activation_tensors(plan, find_weight_nodes(model)) if t not in plan.activation_scales]
    if not needed:
        return plan
    amax = collect_amax(ir.to_proto(model), batches(calib, batch_size), needed)
    logger.info("calibrated %d activation tensor(s) on %s", len(amax), calib.source)
    return replace(plan, activation_scales={**plan.activation_scales, **amax})


def normalized_model(model_path: str | os.PathLike[str]) -> ir.Model:
    """Load and normalise (Gemm → MatMul, Constant weights → initializers)."""
    from lpcompile.passes.normalize import NormalizeWeightsPass

    model = load_model(model_path)
    NormalizeWeightsPass()(model)
    return model


def apply_to_file(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    plan: PrecisionPlan | None = None,
    uniform: str | None = None,
    calib_path: str | os.PathLike[str] | None = None,
    target: str = "qdq",
    softmax: str | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    force: bool = False,
    plan_path: str | os.PathLike[str] | None = None,
    log_checks: bool = True,
) -> ApplyResult:
    """Rewrite ``model_path`` by a plan (or one uniform format) and write model + plan atomically.

    Args:
        model_path: the fp32 ONNX model (never modified).
        out: output path (default ``MODEL.lp.onnx``); refused when it is the input unless ``force``.
        plan: the precision plan; exactly one of ``plan`` and ``uniform`` is given.
        uniform: one format for every weighted node (baselines).
        calib_path: calibration data for FP8 activation scales (synthetic when absent).
        target: ``"qdq"`` (standard DequantizeLinear everywhere) or ``"ort"`` (int4 MatMul weights
            as com.microsoft MatMulNBits).
        softmax: ``auto`` / ``two-pass`` / ``keep``; ``None`` keeps the plan's setting.
        rounding: weight rounding, ``nearest`` or ``stochastic`` (seeded).
        seed: seed for synthetic calibration data and stochastic rounding.
        force: allow ``out`` to equal the input.
        plan_path: the file ``plan`` was read from: the output model may not replace it (the
            output plan may: it is the same plan, completed).
        log_checks: log the model checks (:mod:`lpcompile.checks`); compile has logged them already.
    """
    from lpcompile.passes.pipeline import apply_plan, uniform_plan

    if (plan is None) == (uniform is None):
        raise UsageError("give either a plan file or --uniform FORMAT")
    if target not in ("qdq", "ort"):
        raise UsageError(f"unknown target {target!r}; use qdq or ort")
    out_path = check_output_path(model_path, out or default_output(model_path), force, [calib_path], plan_path)
    model = normalized_model(model_path)
    nodes = find_weight_nodes(model)
    checks = check_model(model)
    if log_checks:
        checks.log()
    if uniform is not None:
        plan = uniform_plan(model, uniform)
    if plan is None:  # unreachable after the check above; keeps type checkers honest
        raise UsageError("no plan")
    validate_against(plan, [n.name for n in nodes])
    plan = with_model_facts(plan, nodes)
    plan = pin_fp32(plan, checks.keep_fp32)
    if softmax is not None:
        plan = replace(plan, softmax=softmax)
    plan = replace(plan, model=Path(model_path).name)
    if fp8_activation_tensors(plan, nodes):
        plan = calibrate_plan(model, plan, load_calib_for(model, calib_path, seed=seed))
    extra = _softmax_passes(plan)
    try:
        rewritten, modified = apply_plan(model, plan, target=target, rounding=rounding, seed=seed, extra_passes=extra)
    except ir.passes.PassError as exc:
        if os.environ.get("LPCOMPILE_DEBUG"):
            raise
        raise LpError(f"internal error while rewriting the model: {_root_cause(exc)} "
                      "(set LPCOMPILE_DEBUG=1 for a traceback)") from exc
    substituted = tuple(getattr(extra[0], "substituted", ())) if extra else ()
    data_path = save_model(rewritten, out_path)
    plan_out = plan_path_for(out_path)
    plan.save(plan_out)
    return ApplyResult(
        output=out_path,
        plan_path=plan_out,
        plan=plan,
        modified_by=tuple(modified),
        input_bytes=_file_bytes(Path(model_path)),
        output_bytes=out_path.stat().st_size + (data_path.stat().st_size if data_path else 0),
        softmax_substituted=substituted,
        checks=checks,
    )


def pin_fp32(plan: PrecisionPlan, names: frozenset[str] | set[str]) -> PrecisionPlan:
    """``plan`` with the nodes in ``names`` set to fp32 (a warning for each one the plan had lower)."""
    changed = [n.name for n in plan.nodes if n.name in names and n.format != "fp32"]
    if not changed:
        return plan
    logger.info("kept in fp32 (NaN/Inf weights) despite the plan: %s", ", ".join(changed))
    fp32 = get_format("fp32")
    nodes = tuple(
        replace(n, format="fp32", bits=float(fp32.storage_bits),
                predicted_loss=0.0 if n.predicted_loss is not None else None)
        if n.name in changed
        else n
        for n in plan.nodes
    )
    return replace(plan, nodes=nodes)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def with_model_facts(plan: PrecisionPlan, nodes: Sequence[WeightNode]) -> PrecisionPlan:
    """Fill each plan node's op type, weight, parameter count and bits from the model.

    A hand-written plan may give only ``name`` and ``format``; the written plan and the node
    metadata always carry the real figures (bits = the format's cost on that tensor, scales
    included).
    """
    by_name = {n.name: n for n in nodes}
    filled = []
    for a in plan.nodes:
        n = by_name[a.name]
        bits = get_format(a.format).bits_for(n.shape, n.layout)
        filled.append(replace(a, op_type=n.op_type, weight=n.weight, params=n.params, bits=bits))
    return plan.with_nodes(filled)


def _softmax_passes(plan: PrecisionPlan) -> list[object]:
    try:
        from lpcompile.passes.softmax_two_pass import TwoPassSoftmaxPass
    except ImportError:  # pragma: no cover - the pass ships with the package
        return []
    low = frozenset(n.name for n in plan.nodes if n.format != "fp32")
    return [TwoPassSoftmaxPass(plan.softmax, low)]


def _file_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)

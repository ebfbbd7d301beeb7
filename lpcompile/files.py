"""Thin file wrappers around :mod:`lpcompile.api`: load, check outputs, write atomically.

``analyze_file``, ``apply_file`` and ``compile_file`` are what the commands call. They load and
normalise the model once, call the in-memory API and write the model with its plan beside it
(``OUT.plan.json``); no input is ever overwritten unless ``force`` names a previous output.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lpcompile.analysis.config import AnalysisConfig
from lpcompile.analysis.table import SensitivityTable
from lpcompile.api import Applied, Decision, analyze, apply, decide, decide_uniform, missing_scales
from lpcompile.budget import parse_budget
from lpcompile.checks import ModelCheck, check_model
from lpcompile.config import ApplyConfig, DecideConfig
from lpcompile.errors import UsageError
from lpcompile.formats import needs_input_hessians
from lpcompile.frontend.calib import CalibrationSet, calibration_for
from lpcompile.frontend.onnx_io import EXTERNAL_THRESHOLD, StreamedTensor, load_model, model_bytes_estimate, save_model
from lpcompile.graph import find_weight_nodes
from lpcompile.guard import heldout_split
from lpcompile.io_utils import check_outputs
from lpcompile.plan import PrecisionPlan

logger = logging.getLogger(__name__)

#: a model whose initializers are embedded in its file and total more than this many bytes is read from a
#: temporary external-data copy, one weight at a time (:func:`spill_embedded_weights`)
SPILL_EMBEDDED_BYTES = 256 << 20
#: ``model.meta`` key holding the temporary folder of the spilled weights (removed with the model, or at exit)
SPILLED_META = "lpcompile.spilled_weights"
#: initializers below this many bytes stay in memory (as their own protobuf copies)
_SPILL_MIN_TENSOR = 4096

__all__ = [
    "ApplyResult",
    "CompileResult",
    "analyze_file",
    "apply_file",
    "compile_file",
    "default_output",
    "load_calib_for",
    "load_normalized",
    "plan_path_for",
]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply_file` wrote and how the model changed."""

    output: Path
    plan_path: Path
    plan: PrecisionPlan
    modified_by: tuple[str, ...]
    input_bytes: int
    output_bytes: int
    softmax_substituted: tuple[str, ...]
    checks: ModelCheck = field(default_factory=ModelCheck)


@dataclass(frozen=True)
class CompileResult:
    """Everything ``lpcompile MODEL --budget B`` produced."""

    table: SensitivityTable
    decision: Decision
    applied: ApplyResult
    timings: Mapping[str, float]
    calib: CalibrationSet  # the calibration data analysis and apply used (loaded once)
    heldout: CalibrationSet  # what the quality guard measures (guard.heldout_split of calib, or synthetic)

    @property
    def plan(self) -> PrecisionPlan:
        """The plan as written (the decision, with the written file's figures)."""
        return self.applied.plan


def default_output(model_path: str | os.PathLike[str], suffix: str = ".lp.onnx") -> Path:
    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + suffix)


def plan_path_for(output: Path) -> Path:
    stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(stem + ".plan.json")


def check_output_path(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    plan_input: str | os.PathLike[str] | None = None,
) -> Path:
    """Refuse to write the model or its plan over an input (unless ``force``) or onto a directory.

    ``inputs`` are the command's other input files (calibration data), protected too. The plan
    written beside ``out`` may replace ``plan_input`` (the plan the model is rewritten by: the
    output plan is that plan, completed), but the model may not.
    """
    out = Path(out)
    check_outputs([out], [model_path, plan_input, *inputs], force=force)
    check_outputs([plan_path_for(out)], [model_path, *inputs], force=force)
    return out


def load_normalized(model_path: str | os.PathLike[str]) -> ir.Model:
    """Load a model and normalise it (Gemm → MatMul, Constant weights → initializers)."""
    from lpcompile.passes.normalize import NormalizeWeightsPass

    model = load_model(model_path)
    NormalizeWeightsPass()(model)
    return model


def spill_for_streaming(model: ir.Model, config: AnalysisConfig) -> int:
    """:func:`spill_embedded_weights` when the analysis of ``model`` streams (it reads one segment's weights
    at a time; the whole-graph analysis needs every weight inline); return the bytes moved."""
    from lpcompile.api import use_streamed

    return spill_embedded_weights(model, SPILL_EMBEDDED_BYTES) if use_streamed(model, config) else 0


def spill_embedded_weights(model: ir.Model, limit: int = SPILL_EMBEDDED_BYTES) -> int:
    """Move the weights embedded in the model's protobuf to a temporary file; return the bytes moved.

    onnx-ir keeps an embedded initializer as a view of the loaded protobuf, so the whole file stays
    resident until the compile ends (SmolLM2-135M: 513 MiB, a quarter of issue 18's memory bound). Above
    ``limit`` bytes of embedded initializers, each one of at least 4 KiB is written to
    ``weights.data`` in a temporary folder and becomes a
    :class:`~lpcompile.frontend.onnx_io.StreamedTensor` (read from the file on each access, owned by the
    reader), as the weights of a model with big external data are; smaller ones and tensor attributes
    become their own protobuf copies, so nothing refers to the loaded protobuf and it is freed. The
    folder lives as long as the model (``model.meta[SPILLED_META]``). Values and the bytes written for
    the model are unchanged (:func:`write_outputs` decides inline or external data as it would have).
    """
    from onnx_ir.serde import TensorProtoTensor

    in_memory = (TensorProtoTensor, ir.Tensor)  # (external data up to 1 GB is read into ir.Tensors on load)
    embedded = [v for g in model.graphs() for v in g.initializers.values() if isinstance(v.const_value, in_memory)]
    total = sum(v.const_value.nbytes for v in embedded if v.const_value is not None)
    if total <= limit:
        return 0
    folder = tempfile.TemporaryDirectory(prefix="lpcompile-weights-")
    location = "weights.data"
    moved = 0
    with open(Path(folder.name) / location, "wb") as f:
        for v in embedded:
            t = v.const_value
            if not isinstance(t, in_memory):
                continue
            if t.nbytes < _SPILL_MIN_TENSOR or t.dtype.bitwidth < 8 or t.dtype == ir.DataType.STRING:
                if isinstance(t, TensorProtoTensor):
                    v.const_value = _own_proto(t)
                continue
            data = t.tobytes()
            offset = f.tell()
            f.write(data)
            v.const_value = StreamedTensor(
                location, offset, len(data), t.dtype, shape=t.shape, name=t.name or "", doc_string=t.doc_string,
                metadata_props=dict(t.metadata_props) if t.metadata_props else None, base_dir=folder.name,
            )
            moved += len(data)
            del data
    for g in model.graphs():
        for node in g:
            for name, attr in list(node.attributes.items()):
                tensors = attr.type == ir.AttributeType.TENSORS
                if isinstance(attr.value, TensorProtoTensor):
                    node.attributes[name] = ir.Attr(name, attr.type, _own_proto(attr.value), doc_string=attr.doc_string)
                elif tensors and any(isinstance(x, TensorProtoTensor) for x in attr.value or ()):
                    copies = [_own_proto(x) if isinstance(x, TensorProtoTensor) else x for x in attr.value]
                    node.attributes[name] = ir.Attr(name, attr.type, copies, doc_string=attr.doc_string)
    model.meta[SPILLED_META] = folder
    gc.collect()  # the loaded protobuf goes once nothing views it
    logger.info("%.0f MB of embedded weights moved to %s, read one at a time", moved / 1e6, folder.name)
    return moved


def _own_proto(t: object) -> ir.TensorProtocol:
    """A tensor of its own protobuf copy (not a view of the loaded model's message)."""
    import onnx
    from onnx_ir.serde import TensorProtoTensor

    proto = onnx.TensorProto()
    proto.CopyFrom(t.raw)  # type: ignore[attr-defined]
    return TensorProtoTensor(proto)


def load_calib_for(
    model: ir.Model,
    calib_path: str | os.PathLike[str] | None,
    seed: int = 0,
    num_samples: int = 16,
    input_shapes: Sequence[str] = (),
    max_samples: int | None = None,
) -> CalibrationSet:
    """Calibration data for ``model``: the user's file/folder checked and laid out for its inputs
    (sample axes, fixed batch), or synthetic inputs at sizes the model runs at (``input_shapes``:
    ``--input-shape`` values); see :func:`lpcompile.frontend.calib.calibration_for`. ``max_samples``
    (``--max-samples``) bounds what is read from the user's data."""
    from lpcompile.frontend.input_spec import parse_input_shapes

    return calibration_for(
        model,
        calib_path,
        input_shapes=parse_input_shapes(input_shapes),
        num_samples=num_samples,
        seed=seed,
        max_samples=max_samples,
    )


def synthetic_heldout(model: ir.Model, calib: CalibrationSet, seed: int) -> CalibrationSet:
    """Fresh synthetic inputs (``seed`` + 1) at the sizes the synthetic ``calib`` runs at, for the quality guard.

    Made from the compile's own model before it is rewritten: no second read of the model and no ONNX Runtime
    session to find sizes (reading the file again and probing it held two more copies of the weights: the bare
    compile of SmolLM2 peaked at 3.0 GB in the guard).
    """
    from lpcompile.frontend.calib import synthesize
    from lpcompile.frontend.input_spec import ShapeOverride

    shapes = calib.shapes.inputs if calib.shapes is not None else ()
    fixed = tuple(
        ShapeOverride(r.name, sizes=tuple((axis, d) for axis, d in enumerate(r.shape) if axis != r.sample_axis))
        for r in shapes
    )
    return synthesize(model, num_samples=16, seed=seed + 1, input_shapes=fixed, probe=not fixed)


def analysis_calib(
    model: ir.Model, calib_path: str | os.PathLike[str] | None, config: AnalysisConfig
) -> CalibrationSet:
    """The calibration data an analysis of ``model`` runs on (synthetic: at least one batch, seeded)."""
    return load_calib_for(
        model,
        calib_path,
        seed=config.seed,
        num_samples=max(16, config.batch_size),
        input_shapes=config.input_shapes,
        max_samples=config.max_samples,
    )


def analyze_file(
    model_path: str | os.PathLike[str],
    calib_path: str | os.PathLike[str] | None,
    config: AnalysisConfig | None = None,
    *,
    validate: bool = False,
    progress: Progress | None = None,
    model: ir.Model | None = None,
    calib: CalibrationSet | None = None,
    hessians: MutableMapping[str, np.ndarray] | None = None,
) -> SensitivityTable:
    """Load (unless ``model`` is the already normalised model and ``calib`` its calibration data), analyse;
    the table records the file name (``hessians``: see :func:`lpcompile.api.analyze`)."""
    from lpcompile.frontend.torch_export import module_paths_from_metadata

    config = config or AnalysisConfig()
    if model is None:
        model = load_normalized(model_path)
        spill_for_streaming(model, config)
    check_model(model).log()
    calib = calib if calib is not None else analysis_calib(model, calib_path, config)
    table = analyze(
        model, calib, config, validate=validate, progress=progress, module_paths=module_paths_from_metadata(model),
        hessians=hessians,
    )
    return replace(table, model=Path(model_path).name)


def write_outputs(
    applied: Applied, out_path: Path, model_path: str | os.PathLike[str], spilled: bool = False
) -> tuple[Path, int]:
    """Write the rewritten model (and external data) and its plan; return the plan path and total bytes.

    ``spilled``: the model's embedded weights were moved to a temporary file (:func:`spill_embedded_weights`):
    the output is written inline or with external data as it would have been without that.
    """
    external = model_bytes_estimate(applied.model) > EXTERNAL_THRESHOLD if spilled else None
    data_path = save_model(applied.model, out_path, external=external)
    plan_out = plan_path_for(out_path)
    applied.plan.save(plan_out)
    return plan_out, out_path.stat().st_size + (data_path.stat().st_size if data_path else 0)


def apply_file(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    plan: PrecisionPlan | None = None,
    uniform: str | None = None,
    calib_path: str | os.PathLike[str] | None = None,
    config: ApplyConfig | None = None,
    softmax: str | None = None,
    force: bool = False,
    plan_path: str | os.PathLike[str] | None = None,
    model: ir.Model | None = None,
    log_checks: bool = True,
    calib: CalibrationSet | None = None,
    hessians: Mapping[str, np.ndarray] | None = None,
) -> ApplyResult:
    """Rewrite ``model_path`` by a plan (or one uniform format) and write model + plan atomically.

    Args:
        model_path: the fp32 ONNX model (never modified).
        out: output path (default ``MODEL.lp.onnx``); refused when it is an input unless ``force``.
        plan: the precision plan; exactly one of ``plan`` and ``uniform`` is given.
        uniform: one format for every weighted node (baselines): decided here by
            :func:`lpcompile.api.decide_uniform`.
        calib_path: calibration data for FP8 activation scales the plan lacks (synthetic when absent).
        config: target, rounding, seed.
        softmax: softmax mode of a ``uniform`` plan (``auto`` when None); a plan file keeps its own.
        force: allow ``out`` to replace a previous output.
        plan_path: the file ``plan`` was read from: the output model may not replace it (the output
            plan may: it is the same plan, completed).
        model: the already loaded, normalised model (loaded from ``model_path`` when None).
        calib: the calibration data already loaded for this model (loaded from ``calib_path`` when
            None and the plan needs it): FP8 scales and the XᵀX of ``mse``/``gptq`` rounding come from it,
            so a compile writes the weights its analysis scored.
        log_checks: log the model checks (compile has logged them already).
        hessians: the layer inputs' ``XᵀX`` the analysis gathered (compile): not gathered again.
    """
    config = config or ApplyConfig()
    if (plan is None) == (uniform is None):
        raise UsageError("give either a plan file or --uniform FORMAT")
    if plan is not None and softmax is not None and softmax != plan.softmax:
        raise UsageError(
            f"--softmax {softmax} contradicts the plan's softmax mode {plan.softmax!r}: the plan decides; "
            "edit the plan (or re-plan with --softmax)"
        )
    out_path = check_output_path(model_path, out or default_output(model_path), force, [calib_path], plan_path)
    model = model if model is not None else load_normalized(model_path)
    checks = check_model(model)
    if log_checks:
        checks.log()
    if uniform is not None:
        plan = decide_uniform(model, uniform, softmax=softmax or "auto", target=config.target)
    if plan is None:  # unreachable after the check above; keeps type checkers honest
        raise UsageError("no plan")
    plan = replace(plan, model=Path(model_path).name)
    wants_calib = missing_scales(model, plan) or needs_input_hessians(
        config.rounding.value, [n.format for n in plan.nodes]
    )
    if not wants_calib:
        calib = None
    elif calib is None:
        calib = load_calib_for(model, calib_path, seed=config.seed)
    spilled = model.meta.get(SPILLED_META) is not None
    applied = apply(model, plan, config, calib, hessians=hessians)
    plan_out, out_bytes = write_outputs(applied, out_path, model_path, spilled)
    return ApplyResult(
        output=out_path,
        plan_path=plan_out,
        plan=applied.plan,
        modified_by=applied.modified_by,
        input_bytes=_file_bytes(Path(model_path)),
        output_bytes=out_bytes,
        softmax_substituted=applied.softmax_substituted,
        checks=checks,
    )


def compile_file(
    model_path: str | os.PathLike[str],
    budget: str | None,
    *,
    out: str | os.PathLike[str] | None = None,
    calib_path: str | os.PathLike[str] | None = None,
    config: AnalysisConfig | None = None,
    decide_config: DecideConfig | None = None,
    apply_config: ApplyConfig | None = None,
    validate: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """``lpcompile MODEL --budget B``: load once, analyse, decide, apply; writes OUT and OUT.plan.json.

    ``budget=None`` with ``decide_config.max_loss`` solves the dual: the fewest bits whose predicted
    loss stays within the bound.
    """
    config = config or AnalysisConfig()
    decide_config = decide_config or DecideConfig()
    apply_config = apply_config or ApplyConfig(
        target=decide_config.target,
        seed=config.seed,
        rounding=config.rounding,
        int8_residuals=decide_config.int8_residuals,
    )
    t0 = time.perf_counter()
    if budget is None and decide_config.max_loss is None:
        raise UsageError("give a budget (--budget) or a loss bound (--max-loss)")
    if budget is not None:
        parse_budget(budget)  # fail fast on a malformed budget or output path, before minutes of analysis
    check_output_path(model_path, out or default_output(model_path), force, [calib_path])
    model = load_normalized(model_path)
    spill_for_streaming(model, config)
    from lpcompile.feasibility import check_budget, retarget_table  # issue 13: fail before analysis

    target = decide_config.target.value
    if budget is not None:
        check_budget(model, budget, decide_config.formats or config.formats, target)
    calib = analysis_calib(model, calib_path, config)  # loaded once: analysis, apply and the caller share it
    # the guard's held-out samples: the last quarter of the user's data, or fresh synthetic inputs
    heldout = synthetic_heldout(model, calib, config.seed) if calib.synthetic else heldout_split(calib)[1]
    from lpcompile.analysis.input_hessians import HessianStore

    hessians = HessianStore()  # the XᵀX the analysis gathers for mse/gptq: apply rounds with the same ones
    table = analyze_file(
        model_path, calib_path, config, validate=validate, progress=progress, model=model, calib=calib,
        hessians=hessians,
    )
    table = retarget_table(table, find_weight_nodes(model), target)  # bits as the target stores them
    t1 = time.perf_counter()
    decision = decide(table, budget, decide_config)
    t2 = time.perf_counter()
    applied = apply_file(
        model_path, out, plan=decision.plan, calib_path=calib_path, config=apply_config, force=force,
        model=model, log_checks=False, calib=calib, hessians=hessians,
    )
    hessians.close()
    t3 = time.perf_counter()
    return CompileResult(
        table=table,
        decision=decision,
        applied=applied,
        timings={"analyze_s": t1 - t0, "plan_s": t2 - t1, "apply_s": t3 - t2, "total_s": t3 - t0},
        calib=calib,
        heldout=heldout,
    )


def _file_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)

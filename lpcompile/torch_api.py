"""The Python API for PyTorch users: ``lpcompile.compile(module, example_inputs, budget="4.5bits")``.

The module is exported (``torch.export`` → ``torch.onnx.export(dynamo=True)``, normalised so
Linear/Gemm become MatMul; :mod:`lpcompile.frontend.torch_export`), analysed, solved and rewritten
exactly like an ONNX file (:mod:`lpcompile.api`), and the result carries the rewritten ONNX
model, its plan, and hooks to save it, report on it and lower it to MLIR.

Analysis on the module (``analysis="module"``, the default) runs the one sensitivity driver with the
module adapter (:mod:`lpcompile.frontend.torch_module`): exact autograd on the ``nn.Module`` itself,
the same probes, batches and formulas as the ONNX path. When the module cannot be mirrored, the
ONNX export is analysed instead, with a warning.

Names. Plan rows, node metadata (``lpcompile.module_path``) and the report carry the PyTorch
module path (``encoder.layer.0.attention.self.query``) next to the ONNX node name, and ``keep``
rules match either.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.analysis.config import DEFAULT_FORMATS, AnalysisConfig
from lpcompile.analysis.table import SensitivityTable
from lpcompile.errors import CalibrationError, UsageError
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.frontend.torch_export import ExportedModule
from lpcompile.plan import PrecisionPlan
from lpcompile.solver import KeepRule, Solution

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["TorchCompileResult", "compile"]

Progress = Callable[[str, int, int], None]
Analysis = Literal["module", "onnx"]
# --------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class TorchCompileResult:
    """What :func:`compile` produced.

    Attributes:
        plan: the precision plan (node names of the ONNX export, with module paths).
        model: the rewritten ONNX model (QDQ/Cast, per-node ``lpcompile.*`` metadata).
        table: the sensitivity table the plan was solved from (reusable for other budgets).
        solution: the solver's answer.
        exported: the fp32 export (normalised ``ir.Model``) and its name maps.
        calib: the calibration data the analysis used.
        example_inputs: the example inputs by ONNX input name (the shapes MLIR is emitted for).
        analysis: ``"module"`` (autograd on the module) or ``"onnx"`` (the ONNX interpretation).
        timings: seconds per stage.
    """

    plan: PrecisionPlan
    model: onnx.ModelProto
    table: SensitivityTable
    solution: Solution
    exported: ExportedModule
    calib: CalibrationSet
    example_inputs: Mapping[str, np.ndarray]
    analysis: str
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def reference_model(self) -> onnx.ModelProto:
        """The fp32 export (normalised), as a proto."""
        return ir.to_proto(self.exported.model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the rewritten model to ``path`` and its plan beside it (``<stem>.plan.json``), each
        atomically; return the model path."""
        from lpcompile.files import plan_path_for
        from lpcompile.frontend.onnx_io import save_model

        out = Path(path)
        if out.is_dir():
            raise UsageError(f"output {out} is a directory; give a file name")
        save_model(self.model, out)
        self.plan.save(plan_path_for(out))
        return out

    def write_report(self, path: str | os.PathLike[str]) -> Path:
        """Write the HTML report (plots of sensitivities, bits, Pareto front) to ``path``."""
        from lpcompile.report.html import write_report

        return Path(write_report(path, self.plan, self.table))

    def run(self, inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the rewritten model in ONNX Runtime (exact numerics) on ``inputs`` (default: the examples)."""
        from lpcompile.runtime.ort import make_session, run

        return run(make_session(self.model, numerics="exact"), dict(inputs or self.example_inputs))

    def evaluate(self, calib: CalibrationSet | None = None, batch_size: int = 8) -> Any:
        """Compare the rewritten model with the fp32 export in ONNX Runtime (an ``EvalReport``)."""
        from lpcompile.evaluate import evaluate

        return evaluate(self.model, self.reference_model, calib or self.calib, batch_size=batch_size)

    def to_mlir(self, level: str = "linalg", path: str | os.PathLike[str] | None = None) -> Any:
        """MLIR of the rewritten model through torch-mlir (``torch``, ``linalg``, ``stablehlo`` or
        ``tosa``), for the example input shapes, with the plan's precisions as element types; written
        to ``path`` when given. Returns the ``torch_mlir.ir.Module``."""
        from lpcompile.runtime.mlir import import_onnx, write_module

        module = import_onnx(self.model, level, example_inputs=self.example_inputs)
        if path is not None:
            write_module(module, path)
        return module


# --------------------------------------------------------------------------------------------
# compile


def compile(
    module: torch.nn.Module,
    example_inputs: Any,
    budget: str = "4.5bits",
    calib: Any = None,
    formats: Sequence[str] | None = None,
    seed: int = 0,
    *,
    keep: Sequence[str | KeepRule] = (),
    config: AnalysisConfig | None = None,
    analysis: Analysis = "module",
    target: Literal["qdq", "ort"] = "qdq",
    softmax: str = "auto",
    dynamic_shapes: Any = "batch",
    progress: Progress | None = None,
) -> TorchCompileResult:
    """Compile a PyTorch module to mixed precision within ``budget``.

    Args:
        module: an fp32 ``torch.nn.Module`` (put in eval mode while compiling; its training flag is
            restored).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs; they fix
            the export's static dims (see ``dynamic_shapes``) and the shapes MLIR is emitted for.
        budget: ``4.5bits``, ``4.5`` or a size such as ``12MB``.
        calib: calibration data: ``None`` (synthetic inputs from the export's signature), a path
            (``.npz`` / folder), a :class:`CalibrationSet`, a dict ``{input name: array}``, or
            tensors shaped like ``example_inputs`` with the samples on axis 0.
        formats: candidate formats (default ``fp8_e4m3, int8, int4_b128, bf16``; fp32 always).
        seed: seeds the probes, synthetic data and stochastic rounding (overrides ``config.seed``).
        keep: ``--keep`` rules (``REGEX``, ``REGEX=FMT``, ``REGEX=!FMT``) matched against node names
            and module paths.
        config: analyzer settings (probes, batch size, method...).
        analysis: ``"module"`` (exact autograd on the module) or ``"onnx"`` (interpret the export).
        target: ``qdq`` (standard ops) or ``ort`` (int4 MatMul as com.microsoft MatMulNBits).
        softmax: ``auto`` / ``two-pass`` / ``keep``.
        dynamic_shapes: ``"batch"`` (axis 0 of every input, and the sequence axis of 2-D integer
            inputs such as token ids, exported dynamic), ``None`` (static) or a ``torch.export`` spec.
        progress: ``progress(stage, done, total)`` callback.

    Raises:
        ExportError: the module does not export. BudgetError: the budget is infeasible.
        LpError: other failures (bad calibration data, formats, rules).
    """
    from lpcompile.api import analyze, apply, decide, finite_table
    from lpcompile.budget import parse_budget
    from lpcompile.checks import check_model
    from lpcompile.config import ApplyConfig, DecideConfig
    from lpcompile.frontend.calib import fixed_batch_size
    from lpcompile.frontend.torch_export import export_module
    from lpcompile.frontend.torch_module import ModuleAnalysisUnsupported, analyze_module
    from lpcompile.solver import parse_keep

    if analysis not in ("module", "onnx"):
        raise UsageError(f"analysis must be 'module' or 'onnx', not {analysis!r}")
    parse_budget(budget)  # fail before the export
    rules = tuple(r if isinstance(r, KeepRule) else parse_keep(r) for r in keep)
    decide_cfg = DecideConfig(formats=tuple(formats) if formats is not None else None, keep=rules,
                              softmax=softmax, target=target)  # type: ignore[arg-type]
    apply_cfg = ApplyConfig(target=target, seed=seed)  # type: ignore[arg-type]
    cfg = config or AnalysisConfig()
    cfg = replace(cfg, seed=seed, formats=tuple(formats) if formats is not None else cfg.formats or DEFAULT_FORMATS)

    t0 = time.perf_counter()
    exported = export_module(
        module,
        example_inputs,
        dynamic_shapes=dynamic_shapes,
        progress=(lambda s: progress(s, 0, 1)) if progress else None,
    )
    examples = _example_arrays(module, example_inputs, exported)
    fixed = fixed_batch_size(exported.model)
    if fixed is not None and fixed != cfg.batch_size:
        logger.warning(
            "the export has a static batch of %d (give example inputs with a batch of 2 or more for a "
            "dynamic one): analysing in batches of %d",
            fixed,
            fixed,
        )
        cfg = replace(cfg, batch_size=fixed)
    data = calibration_set(calib, exported, examples, cfg)
    t1 = time.perf_counter()

    used = analysis
    table: SensitivityTable | None = None
    if analysis == "module":
        try:
            stage = (lambda done, total: progress("hessian", done, total)) if progress else None
            table = analyze_module(module, exported, data, cfg, example_inputs, progress=stage)
            table = finite_table(table, check_model(exported.model).keep_fp32)
        except ModuleAnalysisUnsupported as exc:
            logger.warning("%s; analysing the ONNX export instead", exc)
            used = "onnx"
    if table is None:
        table = analyze(exported.model, data, cfg, progress=progress, module_paths=exported.module_paths)
    table = replace(table, model=type(module).__name__)
    t2 = time.perf_counter()
    decision = decide(table, budget, decide_cfg)
    plan = replace(
        decision.plan,
        metadata={**decision.plan.metadata, "frontend": {"source": "torch", "module": type(module).__name__,
                                                         "analysis": used}},
    )
    t3 = time.perf_counter()
    applied = apply(exported.model.clone(), plan, replace(apply_cfg, batch_size=cfg.batch_size), data)
    t4 = time.perf_counter()
    return TorchCompileResult(
        plan=applied.plan,
        model=ir.to_proto(applied.model),
        table=table,
        solution=decision.solution,
        exported=exported,
        calib=data,
        example_inputs=examples,
        analysis=used,
        timings={
            "export_s": exported.export_s,
            "analyze_s": t2 - t1,
            "plan_s": t3 - t2,
            "apply_s": t4 - t3,
            "total_s": t4 - t0,
        },
    )


def _example_arrays(module: Any, example_inputs: Any, exported: ExportedModule) -> dict[str, np.ndarray]:
    import torch

    from lpcompile.frontend.torch_export import flatten_inputs

    _, _, leaves, pos, _ = flatten_inputs(module, example_inputs)
    tensors = [leaves[i] for i in pos]
    return {
        name: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        for name, t in zip(exported.input_names, tensors, strict=True)
    }


def calibration_set(
    calib: Any, exported: ExportedModule, examples: Mapping[str, np.ndarray], config: AnalysisConfig
) -> CalibrationSet:
    """Calibration data in any accepted form, checked against the export's inputs."""
    import torch

    from lpcompile.frontend.calib import check_against_model, load_calibration, synthesize

    model = exported.model
    if calib is None:
        return synthesize(model, num_samples=max(16, config.batch_size), seed=config.seed)
    if isinstance(calib, str | os.PathLike):
        data = load_calibration(calib)
    elif isinstance(calib, CalibrationSet):
        data = calib
    elif isinstance(calib, Mapping) and all(isinstance(k, str) for k in calib) and set(calib) <= set(examples):
        data = CalibrationSet({k: _np(v) for k, v in calib.items()}, source="in memory")
    else:
        tensors = (
            [calib]
            if isinstance(calib, torch.Tensor | np.ndarray)
            else list(calib.values() if isinstance(calib, Mapping) else calib)
        )
        if len(tensors) != len(exported.input_names):
            raise CalibrationError(
                f"calibration data holds {len(tensors)} tensor(s); the module takes {len(exported.input_names)} "
                f"({', '.join(exported.input_names)})"
            )
        data = CalibrationSet(
            {n: _np(t) for n, t in zip(exported.input_names, tensors, strict=True)}, source="in memory"
        )
    check_against_model(data, model)
    return data


def _np(x: Any) -> np.ndarray:
    import torch

    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

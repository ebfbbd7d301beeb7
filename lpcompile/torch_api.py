"""The Python API for PyTorch users: ``lpcompile.compile(module, example_inputs, budget="4.5bits")``.

The module is exported (``torch.export`` → ``torch.onnx.export(dynamo=True)``, normalised so
Linear/Gemm become MatMul; :mod:`lpcompile.frontend.torch_export`), analysed, solved and rewritten
exactly like an ONNX file (:mod:`lpcompile.compiler`), and the result carries the rewritten ONNX
model, its plan, and hooks to save it, report on it and lower it to MLIR.

Analysis on the module (``analysis="module"``, the default). The Gauss–Newton diagonal is
estimated by exact autograd on the ``nn.Module`` itself (backward, or double backward, through the
module's own forward; no ONNX interpretation), with ``torch.func.functional_call`` swapping each
quantizable weight for a leaf tensor and hooks adding zero perturbation leaves where the
activation formats round. Everything else is the ONNX path's
(:func:`lpcompile.analysis.sensitivity.analyze_hessian`): the same calibration batches, loss,
probe count and spreading, the same estimator functions (``config.estimator``: output-space
``ggn`` probes or ``hvp`` Rademacher probes) fed from one generator seeded with ``config.seed`` in
the same order, with weight leaves held in the ONNX orientation (the module sees their transpose
where the export folded one), and the same prediction formulas. For a given seed both paths draw
the *same probes* and so estimate the same diagonal up to float rounding, not just up to
Hutchinson noise. Activations are perturbed as the ONNX path perturbs them (for all their uses):
at the inputs of the quantizable ``Linear``/``Conv`` modules when only they consume the tensor,
else at the output of the module that produces it, when that module runs once and hands its
output object to the consumers; failing that, at the quantizable consumers only (logged; the
rewrite rounds exactly that input). ``scaled_dot_product_attention`` runs with the math backend
during analysis (the fused CPU kernels do not support double backward). When a weight cannot be
traced back to a parameter (an exporter rewrite) or an activation to a module call, the analysis
falls back to the ONNX path with a warning.

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
from lpcompile.errors import CalibrationError, LpError, UsageError
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.frontend.torch_export import ExportedModule, ParamRef
from lpcompile.plan import PrecisionPlan
from lpcompile.solver import KeepRule, Solution

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["TorchCompileResult", "analyze_module", "compile"]

Progress = Callable[[str, int, int], None]
Analysis = Literal["module", "onnx"]
_ACT_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class ModuleAnalysisUnsupported(LpError):
    """The module-level analysis cannot mirror this export (callers fall back to the ONNX path)."""


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
        from lpcompile.frontend.onnx_io import save_model
        from lpcompile.workflow import plan_path_for

        out = Path(path)
        if out.is_dir():
            raise UsageError(f"output {out} is a directory; give a file name")
        save_model(self.model, out)
        self.plan.save(plan_path_for(out))
        return out

    def write_report(self, path: str | os.PathLike[str]) -> Path:
        """Write the HTML report (plots of sensitivities, bits, Pareto front) to ``path``."""
        try:
            from lpcompile.report.html import write_report
        except ImportError as exc:  # the report module is optional
            raise LpError(f"the HTML report is not available: {exc}") from None
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
    from lpcompile.budget import parse_budget
    from lpcompile.compiler import analyze_model, plan_from_table
    from lpcompile.frontend.calib import fixed_batch_size
    from lpcompile.frontend.torch_export import export_module
    from lpcompile.solver import parse_keep

    if analysis not in ("module", "onnx"):
        raise UsageError(f"analysis must be 'module' or 'onnx', not {analysis!r}")
    parse_budget(budget)  # fail before the export
    rules = [r if isinstance(r, KeepRule) else parse_keep(r) for r in keep]
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
    data = _calibration(calib, exported, examples, cfg)
    t1 = time.perf_counter()

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    used = analysis
    table: SensitivityTable | None = None
    if analysis == "module":
        try:
            table = analyze_module(module, exported, data, cfg, example_inputs, progress=stage("hessian"))
        except ModuleAnalysisUnsupported as exc:
            logger.warning("%s; analysing the ONNX export instead", exc)
            used = "onnx"
    if table is None:
        table = analyze_model(exported.model, data, cfg, progress=progress, module_paths=exported.module_paths)
    table = _checked(exported.model, table)
    table = replace(table, model=type(module).__name__)
    t2 = time.perf_counter()
    plan, solution = plan_from_table(table, budget, formats=cfg.formats, keep=rules, softmax=softmax)
    plan = replace(
        plan,
        metadata={**plan.metadata, "frontend": {"source": "torch", "module": type(module).__name__, "analysis": used}},
    )
    t3 = time.perf_counter()
    rewritten, plan = _apply(exported.model, plan, data, target=target, seed=seed, batch_size=cfg.batch_size)
    t4 = time.perf_counter()
    return TorchCompileResult(
        plan=plan,
        model=rewritten,
        table=table,
        solution=solution,
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


def _checked(model: ir.Model, table: SensitivityTable) -> SensitivityTable:
    """The model checks of ``analyze_file`` (NaN/Inf weights stay fp32; non-finite sensitivities fail)."""
    try:
        from lpcompile.checks import check_model
        from lpcompile.compiler import finite_table
    except ImportError:  # older trees without model checks
        return table
    checks = check_model(model)
    checks.log()
    return finite_table(table, checks.keep_fp32)


def _apply(
    model: ir.Model, plan: PrecisionPlan, calib: CalibrationSet, *, target: str, seed: int, batch_size: int
) -> tuple[onnx.ModelProto, PrecisionPlan]:
    """Rewrite a copy of the normalised export by ``plan`` (what ``apply_to_file`` does, in memory)."""
    from lpcompile.graph import find_weight_nodes
    from lpcompile.passes.pipeline import apply_plan
    from lpcompile.plan import validate_against
    from lpcompile.workflow import _softmax_passes, calibrate_plan, fp8_activation_tensors

    work = model.clone()
    nodes = find_weight_nodes(work)
    validate_against(plan, [n.name for n in nodes])
    if fp8_activation_tensors(plan, nodes):
        plan = calibrate_plan(work, plan, calib, batch_size=batch_size)
    rewritten, _ = apply_plan(work, plan, target=target, seed=seed, extra_passes=_softmax_passes(plan))
    return ir.to_proto(rewritten), plan


def _example_arrays(module: Any, example_inputs: Any, exported: ExportedModule) -> dict[str, np.ndarray]:
    import torch

    from lpcompile.frontend.torch_export import flatten_inputs

    _, _, leaves, pos, _ = flatten_inputs(module, example_inputs)
    tensors = [leaves[i] for i in pos]
    return {
        name: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        for name, t in zip(exported.input_names, tensors, strict=True)
    }


def _calibration(
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


# --------------------------------------------------------------------------------------------
# module-level Hutchinson analysis


def analyze_module(
    module: torch.nn.Module,
    exported: ExportedModule,
    calib: CalibrationSet,
    config: AnalysisConfig,
    example_inputs: Any,
    progress: Callable[[int, int], None] | None = None,
) -> SensitivityTable:
    """Hutchinson analysis by autograd on ``module`` (see the module docstring).

    Raises:
        ModuleAnalysisUnsupported: a weight or activation of the export cannot be traced back to the
            module (callers analyse the ONNX export instead).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils import _pytree as pytree

    from lpcompile.analysis.config import candidate_formats
    from lpcompile.analysis.losses import output_loss_kinds
    from lpcompile.analysis.sensitivity import (
        _activation_elements,
        _batch_len,
        _ggn_diagonals,
        _hvp_diagonals,
        _limit,
        _spread,
        assemble_table,
        predict_losses,
    )
    from lpcompile.formats import activation_scale, qdq_activation
    from lpcompile.frontend.calib import batches, trim_padding
    from lpcompile.frontend.torch_export import flatten_inputs, rebuild_inputs
    from lpcompile.graph import find_weight_nodes

    t0 = time.perf_counter()
    model = exported.model
    nodes = find_weight_nodes(model)
    fmts = candidate_formats(config)
    weights = sorted({n.weight for n in nodes})
    refs_by_weight = _weight_refs(weights, exported.params)
    act_elements = _activation_elements(fmts) if config.activations else set()
    act_tensors = sorted({n.activation for n in nodes}) if act_elements else []

    _, _, example_leaves, tensor_pos, spec = flatten_inputs(module, example_inputs)
    example_dtypes = [example_leaves[i].dtype for i in tensor_pos]
    data = _limit(calib, config.max_samples)
    batch_list = [trim_padding(b) for b in batches(data, config.batch_size)]  # as the ONNX path does
    hooks = _ActivationHooks(module, model, nodes, exported.module_paths, act_tensors) if act_tensors else None
    was_training = module.training
    module.eval()
    try:
        base = {w: _param(module, r).detach() for w, r in refs_by_weight.items()}
        _check_values(model, base, refs_by_weight)

        def forward(batch: Mapping[str, np.ndarray], leaves: Mapping[str, Any]) -> dict[str, Any]:
            tensors = [
                torch.from_numpy(np.ascontiguousarray(batch[name])).to(dt)
                for name, dt in zip(exported.input_names, example_dtypes, strict=True)
            ]
            args, kwargs = rebuild_inputs(example_leaves, tensor_pos, spec, tensors)
            swap = {
                refs_by_weight[w].fqn: leaf.T if refs_by_weight[w].transposed else leaf for w, leaf in leaves.items()
            }
            with sdpa_kernel(SDPBackend.MATH):
                out = torch.func.functional_call(module, swap, args, kwargs, tie_weights=False, strict=False)
            flat = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if len(flat) != len(exported.output_names):
                raise ModuleAnalysisUnsupported(
                    f"the module returned {len(flat)} tensor(s), the export has {len(exported.output_names)} outputs"
                )
            return dict(zip(exported.output_names, flat, strict=True))

        t_build = time.perf_counter()
        # Pass 1: fp32 reference outputs and activation ranges (after one pass that observes where
        # each activation can be perturbed).
        refs: list[dict[str, Any]] = []
        amax: dict[str, float] = dict.fromkeys(act_tensors, 0.0)
        with torch.no_grad():
            if hooks is not None and batch_list:
                hooks.reset(observing=True)
                forward(batch_list[0], {})
                hooks.decide()
            for b in batch_list:
                if hooks is not None:
                    hooks.reset()
                out = forward(b, {})
                if hooks is not None:
                    hooks.check()
                refs.append({k: v.detach() for k, v in out.items()})
                for t in act_tensors:
                    a = hooks.captured[t].abs()
                    a = a[torch.isfinite(a)]
                    if a.numel():
                        amax[t] = max(amax[t], float(a.max()))
        out_names = list(exported.output_names)
        kinds = output_loss_kinds(out_names, [tuple(refs[0][k].shape) for k in out_names], config.loss)
        t_ref = time.perf_counter()

        # Pass 2: Hutchinson diagonals, by the ONNX path's own estimator functions. Weight leaves are
        # held in the ONNX orientation (the module sees their transpose where the export folded one),
        # so the probes drawn from the seeded generator are the ONNX path's probes.
        sizes = np.array([_batch_len(b) for b in batch_list], dtype=np.float64)
        bweights = sizes / sizes.sum()
        per_batch = _spread(config.probes, len(batch_list))
        gen = torch.Generator().manual_seed(config.seed)
        diag: dict[str, Any] = {}
        act_term: dict[tuple[str, str], float] = {(t, e): 0.0 for t in act_tensors for e in act_elements}
        done, total = 0, sum(per_batch)
        estimate = _hvp_diagonals if config.estimator == "hvp" else _ggn_diagonals
        for b, ref, k, bw in zip(batch_list, refs, per_batch, bweights, strict=True):
            if k == 0:
                continue
            if hooks is not None:
                hooks.reset(perturb=True)
            wleaves = {
                w: (base[w].T if refs_by_weight[w].transposed else base[w]).clone().requires_grad_(True)
                for w in weights
            }
            out = forward(b, wleaves)
            act_leaves = []
            if hooks is not None:
                hooks.check()
                act_leaves = [hooks.leaves[t] for t in act_tensors]
            leaves = [wleaves[w] for w in weights] + act_leaves

            def step() -> None:
                nonlocal done
                done += 1
                if progress:
                    progress(done, total)

            est = estimate([out[name] for name in kinds], ref, kinds, leaves, k, gen, step)
            for w in weights:
                if id(wleaves[w]) in est:
                    diag[w] = diag.get(w, 0.0) + float(bw) * est[id(wleaves[w])]
            for t, leaf in zip(act_tensors, act_leaves, strict=True):
                if id(leaf) not in est or hooks is None:
                    continue
                d = est[id(leaf)].double().numpy()
                x = hooks.captured[t].float().numpy()
                for e in act_elements:
                    delta = qdq_activation(x, e, activation_scale(amax[t], e)).astype(np.float64) - x
                    act_term[(t, e)] += float(bw) * 0.5 * float(np.sum(d * delta * delta))
            del out, est
        t_hvp = time.perf_counter()
    finally:
        if hooks is not None:
            hooks.remove()
        module.train(was_training)

    table_nodes = predict_losses(
        model,
        nodes,
        fmts,
        config,
        {w: _as_numpy(diag.get(w), _onnx_shape(base[w], refs_by_weight[w])) for w in weights},
        act_term,
        act_elements,
        exported.module_paths,
    )
    t_end = time.perf_counter()
    stamps = (t0, t_build, t_ref, t_hvp, t_end)
    return assemble_table(table_nodes, fmts, config, kinds, data, int(sizes.sum()), amax, stamps)


def _check_values(model: ir.Model, base: Mapping[str, Any], refs: Mapping[str, ParamRef]) -> None:
    """The module's parameters must still hold the exported weights (same module, not retrained)."""
    from lpcompile.graph import weight_array

    for w, ref in refs.items():
        value = base[w].T if ref.transposed else base[w]
        if not np.array_equal(value.float().cpu().numpy(), weight_array(model, w)):
            raise ModuleAnalysisUnsupported(f"parameter {ref.fqn} does not match the exported weight {w!r}")


def _onnx_shape(param: Any, ref: ParamRef) -> tuple[int, ...]:
    return tuple(param.T.shape if ref.transposed else param.shape)


def _as_numpy(d: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An accumulated diagonal as float64 (zeros for a weight no batch reached)."""
    if d is None or isinstance(d, float):
        return np.zeros(shape, dtype=np.float64)
    return d.double().numpy()


def _weight_refs(weights: Sequence[str], params: Mapping[str, ParamRef]) -> dict[str, ParamRef]:
    missing = [w for w in weights if w not in params]
    if missing:
        raise ModuleAnalysisUnsupported(
            f"{len(missing)} weight(s) of the export match no parameter of the module (e.g. {missing[0]!r})"
        )
    refs = {w: params[w] for w in weights}
    by_fqn: dict[str, str] = {}
    for w, r in refs.items():
        if r.fqn in by_fqn:
            raise ModuleAnalysisUnsupported(f"weights {by_fqn[r.fqn]!r} and {w!r} of the export are one parameter")
        by_fqn[r.fqn] = w
    return refs


def _param(module: Any, ref: ParamRef) -> Any:
    owner = module.get_submodule(ref.module_path) if ref.module_path else module
    return getattr(owner, ref.attr)


class _ActivationHooks:
    """Zero perturbation leaves (and captures) for the activation inputs of the weighted nodes.

    The ONNX path perturbs an activation tensor for *all* its consumers. Here a tensor whose ONNX
    consumers are all weighted nodes gets one shared leaf added at the inputs of their modules
    (forward pre-hooks; "consumer" mode). A tensor that also feeds other ops is perturbed at the
    output of the module that produces it ("producer" mode: a forward hook), when an observing pass
    shows that module runs once and its output object is exactly what the consumers receive;
    otherwise it falls back to consumer mode (the rewrite rounds only the weighted consumers'
    input, which that mode measures) and is logged.
    """

    def __init__(
        self,
        module: Any,
        model: ir.Model,
        nodes: Sequence[Any],
        module_paths: Mapping[str, str],
        act_tensors: Sequence[str],
    ) -> None:
        from lpcompile.frontend.torch_export import node_module_path

        self.act_tensors = list(act_tensors)
        self.consumer_calls: dict[str, list[str]] = {}
        for n in nodes:
            path = module_paths.get(n.name)
            sub = _submodule(module, path)
            if path is None or sub is None:
                raise ModuleAnalysisUnsupported(f"node {n.name!r} has no module for its activation hook")
            if type(sub).__name__ not in _ACT_MODULES:
                raise ModuleAnalysisUnsupported(
                    f"node {n.name!r} sits in a {type(sub).__name__} ({path}); activation hooks need Linear/Conv"
                )
            self.consumer_calls.setdefault(path, []).append(n.activation)
        weighted = {n.name for n in nodes}
        values = {v.name: v for node in model.graph for v in node.outputs if v.name}
        self.producer_of: dict[str, str] = {}
        for t in self.act_tensors:
            value = values.get(t)
            if value is None or all(use.node.name in weighted for use in value.uses()):
                continue
            path = node_module_path(value.producer()) if value.producer() is not None else None
            if path and _submodule(module, path) is not None and path not in self.producer_of.values():
                self.producer_of[t] = path
        self.mode = dict.fromkeys(self.act_tensors, "consumer")
        self.perturb = False
        self.observing = False
        self.calls: dict[str, int] = {}
        self.produced_calls: dict[str, int] = {}
        self.produced: dict[str, Any] = {}
        self.identity: dict[str, bool] = {}
        self.captured: dict[str, Any] = {}
        self.leaves: dict[str, Any] = {}
        self.handles: list[Any] = []
        for path, names in self.consumer_calls.items():
            self.handles.append(module.get_submodule(path).register_forward_pre_hook(self._consumer_hook(path, names)))
        for t, path in self.producer_of.items():
            self.handles.append(module.get_submodule(path).register_forward_hook(self._producer_hook(t)))

    def reset(self, *, perturb: bool = False, observing: bool = False) -> None:
        self.perturb, self.observing = perturb, observing
        self.calls, self.produced_calls, self.produced, self.captured, self.leaves = {}, {}, {}, {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def decide(self) -> None:
        """After an observing pass: producer mode where it reproduces the ONNX perturbation."""
        for t, path in self.producer_of.items():
            if self.produced_calls.get(t) == 1 and self.identity.get(t, False):
                self.mode[t] = "producer"
            else:
                logger.info(
                    "activation %s: perturbed at its weighted consumers only (the ONNX path also perturbs "
                    "its other uses; %s is not a single-output producer)",
                    t,
                    path,
                )
        self.observing = False

    def check(self) -> None:
        for path, names in self.consumer_calls.items():
            if self.calls.get(path, 0) != len(names):
                raise ModuleAnalysisUnsupported(
                    f"module {path!r} ran {self.calls.get(path, 0)} time(s), the export shows {len(names)}"
                )
        for t in self.act_tensors:
            if self.mode[t] == "producer" and self.produced_calls.get(t) != 1:
                raise ModuleAnalysisUnsupported(f"the producer of activation {t!r} ran more than once")
            if t not in self.captured:
                raise ModuleAnalysisUnsupported(f"activation {t!r} was not reached by a hook")
            if self.perturb and t not in self.leaves:
                raise ModuleAnalysisUnsupported(f"activation {t!r} was not perturbed")

    def _leaf(self, t: str, x: Any) -> Any:
        import torch

        leaf = self.leaves.get(t)
        if leaf is None:
            leaf = torch.zeros_like(x, requires_grad=True)
            self.leaves[t] = leaf
        elif leaf.shape != x.shape:
            raise ModuleAnalysisUnsupported(f"activation {t!r} reaches modules with different shapes")
        return leaf

    def _consumer_hook(self, path: str, names: Sequence[str]) -> Callable[..., Any]:
        import torch

        def hook(_mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            i = self.calls.get(path, 0)
            self.calls[path] = i + 1
            if i >= len(names) or not args or not isinstance(args[0], torch.Tensor):
                return None  # reported by check()
            t, x = names[i], args[0]
            if t in self.producer_of and (self.observing or self.mode[t] == "producer"):
                same = x is self.produced.get(t)
                self.identity[t] = self.identity.get(t, True) and same
                if self.mode[t] == "producer" and not same:
                    raise ModuleAnalysisUnsupported(f"activation {t!r} reached {path} through another tensor")
                if self.mode[t] == "producer":
                    return None
            self.captured.setdefault(t, x.detach())
            if not self.perturb:
                return None
            return (x + self._leaf(t, x), *args[1:])

        return hook

    def _producer_hook(self, t: str) -> Callable[..., Any]:
        import torch

        def hook(_mod: Any, _args: tuple[Any, ...], out: Any) -> Any:
            if not (self.observing or self.mode[t] == "producer"):
                return None
            self.produced_calls[t] = self.produced_calls.get(t, 0) + 1
            if not isinstance(out, torch.Tensor):
                self.identity[t] = False
                return None
            if self.mode[t] == "producer":
                self.captured.setdefault(t, out.detach())
            if self.perturb and self.mode[t] == "producer":
                out = out + self._leaf(t, out)
            self.produced[t] = out
            return out

        return hook


def _submodule(module: Any, path: str | None) -> Any | None:
    if path is None:
        return None
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None

"""analyze → plan → apply: the library behind ``lpcompile MODEL --budget B``.

``analyze_file`` writes nothing; ``plan_from_table`` is pure (a table and a budget in, a plan out);
``compile_file`` runs both and writes the model and its plan through :func:`workflow.apply_to_file`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from lpcompile.analysis.config import AnalysisConfig, candidate_formats
from lpcompile.analysis.table import SensitivityTable
from lpcompile.budget import parse_budget
from lpcompile.checks import check_model
from lpcompile.errors import LpError, UnsupportedOpsError
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.graph import find_weight_nodes
from lpcompile.plan import Candidate, PrecisionPlan
from lpcompile.planning import items_from_table, plan_from_solution, plan_from_table, rules_with_module_paths
from lpcompile.solver import KeepRule, Solution
from lpcompile.workflow import (
    ApplyResult,
    apply_to_file,
    check_output_path,
    default_output,
    load_calib_for,
    normalized_model,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CompileResult", "analyze_file", "analyze_model", "compile_file", "finite_table", "items_from_table",
    "plan_from_solution", "plan_from_table", "rules_with_module_paths",
]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CompileResult:
    """Everything ``lpcompile MODEL --budget B`` produced."""

    table: SensitivityTable
    plan: PrecisionPlan
    solution: Solution
    applied: ApplyResult
    timings: Mapping[str, float]


def analyze_model(
    model: ir.Model,
    calib: CalibrationSet,
    config: AnalysisConfig | None = None,
    *,
    validate: bool = False,
    progress: Progress | None = None,
    module_paths: Mapping[str, str] | None = None,
) -> SensitivityTable:
    """Hutchinson analysis, or measurement when the interpreter lacks ops; optionally validated."""
    config = config or AnalysisConfig()
    from lpcompile.analysis import measure
    from lpcompile.analysis.sensitivity import analyze_hessian

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    if not find_weight_nodes(model):  # nothing to differentiate: an empty table, an empty plan, the model as is
        logger.warning("no weighted nodes (MatMul/Gemm/Conv with fp32 initializer weights): nothing to analyse")
        return SensitivityTable(nodes=(), formats=candidate_formats(config), method=f"hutchinson-{config.method}",
                                loss=config.loss, probes=config.probes, seed=config.seed, calib=calib.source,
                                num_samples=calib.num_samples, synthetic_calib=calib.synthetic)
    try:
        table = analyze_hessian(model, calib, config, progress=stage("hessian"), module_paths=module_paths)
    except UnsupportedOpsError as exc:
        logger.warning("%s; falling back to forward-only perturbation measurement (slower)", exc)
        table = measure.analyze_by_measurement(
            model, calib, config.formats, batch_size=config.batch_size, loss=config.loss, progress=stage("measure")
        )
    if validate:
        t0 = time.perf_counter()
        table = measure.validate(
            table, model, calib, batch_size=config.batch_size, loss=config.loss, progress=stage("validate")
        )
        table = replace(table, timings={**table.timings, "validate_s": time.perf_counter() - t0})
    return table


def analyze_file(
    model_path: str | os.PathLike[str],
    calib_path: str | os.PathLike[str] | None,
    config: AnalysisConfig | None = None,
    *,
    validate: bool = False,
    progress: Progress | None = None,
) -> SensitivityTable:
    """Load, normalise, analyse. The table records the model's file name."""
    config = config or AnalysisConfig()
    model = normalized_model(model_path)
    checks = check_model(model)
    checks.log()
    calib = load_calib_for(model, calib_path, seed=config.seed, num_samples=max(16, config.batch_size))
    from lpcompile.frontend.torch_export import module_paths_from_metadata

    table = analyze_model(
        model, calib, config, validate=validate, progress=progress, module_paths=module_paths_from_metadata(model)
    )
    table = finite_table(table, checks.keep_fp32)
    return replace(table, model=Path(model_path).name)


def finite_table(table: SensitivityTable, keep_fp32: frozenset[str] = frozenset()) -> SensitivityTable:
    """Restrict ``keep_fp32`` nodes to fp32; refuse non-finite sensitivities anywhere else.

    A node with NaN/Inf weights (:mod:`lpcompile.checks`) keeps only its fp32 candidate. A
    non-finite trace or predicted loss on any other node means the model's fp32 outputs are not
    finite on the calibration data: no budget can be solved from that, so it is an error.

    Raises:
        LpError: naming the nodes with non-finite sensitivities.
    """
    nodes, bad = [], []
    for n in table.nodes:
        if n.name in keep_fp32:
            cands = {f: c for f, c in n.candidates.items() if f == "fp32"} or {"fp32": Candidate(bits=32.0)}
            cands = {f: replace(c, predicted_loss=0.0, measured_loss=None) for f, c in cands.items()}
            nodes.append(replace(n, candidates=cands, trace=None))
            continue
        values = [n.trace, *(x for c in n.candidates.values() for x in (c.predicted_loss, c.measured_loss))]
        if any(v is not None and not math.isfinite(v) for v in values):
            bad.append(n.name)
        nodes.append(n)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise LpError(
            f"analysis gave non-finite sensitivities for {len(bad)} node(s) ({shown}): the model's fp32 outputs "
            "are not finite on the calibration data (NaN/Inf weights or inputs?)"
        )
    return replace(table, nodes=tuple(nodes))


def compile_file(
    model_path: str | os.PathLike[str],
    budget: str,
    *,
    out: str | os.PathLike[str] | None = None,
    calib_path: str | os.PathLike[str] | None = None,
    config: AnalysisConfig | None = None,
    keep: Sequence[KeepRule] = (),
    target: str = "qdq",
    softmax: str = "auto",
    validate: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """``lpcompile MODEL --budget B``: analyse, solve, rewrite; writes OUT and OUT.plan.json."""
    config = config or AnalysisConfig()
    t0 = time.perf_counter()
    parse_budget(budget)  # fail fast on a malformed budget or output path, before minutes of analysis
    check_output_path(model_path, out or default_output(model_path), force, [calib_path])
    table = analyze_file(model_path, calib_path, config, validate=validate, progress=progress)
    t1 = time.perf_counter()
    plan, solution = plan_from_table(table, budget, formats=config.formats, keep=keep, softmax=softmax)
    t2 = time.perf_counter()
    applied = apply_to_file(
        model_path,
        out,
        plan=plan,
        calib_path=calib_path,
        target=target,
        seed=config.seed,
        force=force,
        log_checks=False,
    )
    t3 = time.perf_counter()
    return CompileResult(
        table=table,
        plan=applied.plan,
        solution=solution,
        applied=applied,
        timings={"analyze_s": t1 - t0, "plan_s": t2 - t1, "apply_s": t3 - t2, "total_s": t3 - t0},
    )

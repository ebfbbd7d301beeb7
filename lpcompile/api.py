"""The one pipeline, in memory: ``analyze`` → ``decide`` → ``apply``.

Every caller — the CLI, the PyTorch frontend, the report and the benchmarks — goes through these
functions; :mod:`lpcompile.files` wraps them with loading and atomic writing::

    model = files.load_model("m.onnx")                       # normalised onnx-ir model
    table = analyze(model, calib, AnalysisConfig())          # evidence: SensitivityTable
    plan = decide(table, "4.5bits", DecideConfig()).plan     # decisions only (pure)
    out = apply(model, plan, ApplyConfig(), calib)           # the rewritten model + the plan it wrote

``decide`` is pure: keep rules, the fp32 pins of nodes with NaN/Inf weights (already restricted in
the table by ``analyze``), bits accounting and the softmax choice happen there, once. ``apply``
never changes a decision: it checks the plan against the model, fills what the plan needs but may
lack (FP8 activation scales, from calibration data), writes exactly the plan's formats and returns
the plan with the achieved figures of the written model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from lpcompile.analysis.config import AnalysisConfig, candidate_formats
from lpcompile.analysis.measure import MeasureBackend
from lpcompile.analysis.table import Candidate, SensitivityTable
from lpcompile.budget import Budget, parse_budget
from lpcompile.checks import check_model
from lpcompile.config import ApplyConfig, DecideConfig, SoftmaxMode, Target
from lpcompile.errors import LpError, PlanError, UnsupportedOpsError, UsageError
from lpcompile.feasibility import stored_bits
from lpcompile.formats import canonical_name, get_format, grid_activation, needs_input_hessians, scaled_activation
from lpcompile.frontend.calib import CalibrationSet, batches
from lpcompile.graph import WeightNode, find_weight_nodes, tied_groups
from lpcompile.plan import NodeAssignment, PrecisionPlan, validate_against
from lpcompile.solver import Solution, pareto_front, solve, sweep
from lpcompile.solver.items import solver_items

logger = logging.getLogger(__name__)

__all__ = [
    "Applied",
    "Decision",
    "analyze",
    "apply",
    "decide",
    "decide_sweep",
    "decide_uniform",
    "finite_table",
]

Progress = Callable[[str, int, int], None]

#: targets on which the two-pass softmax runs faster than the runtime's own Softmax.
SOFTMAX_PAYS: frozenset[Target] = frozenset({Target.TVM})


# ---------------------------------------------------------------------------------------------
# analyze


def analyze(
    model: ir.Model,
    calib: CalibrationSet,
    config: AnalysisConfig | None = None,
    *,
    validate: bool = False,
    progress: Progress | None = None,
    module_paths: Mapping[str, str] | None = None,
    hessians: MutableMapping[str, np.ndarray] | None = None,
) -> SensitivityTable:
    """Sensitivity of every (node, candidate format) of a normalised model.

    ``hessians`` (e.g. an :class:`~lpcompile.analysis.input_hessians.HessianStore`) receives the layer
    inputs' ``XᵀX`` that ``mse``/``gptq`` rounding needs, so :func:`apply` reuses them. Large models
    (or ``config.stream="on"``) are analysed segment by segment (:mod:`lpcompile.analysis.streamed`).

    Hutchinson estimates through the torch interpretation of the graph; the forward-only
    measurement when the interpreter lacks ops; optionally validated by measurement. Nodes whose
    weights hold NaN/Inf keep only their fp32 candidate.

    Raises:
        LpError: non-finite sensitivities on other nodes (the model's fp32 outputs are not finite).
    """
    from lpcompile.analysis import measure
    from lpcompile.analysis.sensitivity import analyze_onnx

    config = config or AnalysisConfig()

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    checks = check_model(model)
    if not find_weight_nodes(model):  # nothing to differentiate: an empty table, an empty plan
        from lpcompile.graph import weight_coverage

        logger.warning("%s", weight_coverage(model).outcome())  # "nothing to do: ..." with what is kept and why
        return SensitivityTable(nodes=(), formats=candidate_formats(config), method=f"hutchinson-{config.method}",
                                loss=config.loss, probes=config.probes, seed=config.seed, calib=calib.source,
                                num_samples=calib.num_samples, synthetic_calib=calib.synthetic)
    try:
        if use_streamed(model, config):
            from lpcompile.analysis.streamed import analyze_streamed

            seg = int(config.segment_mb * 2**20) if config.segment_mb else None
            table = analyze_streamed(model, calib, config, module_paths, segment_bytes=seg, hessians=hessians).table
        else:
            table = analyze_onnx(
                model, calib, config, progress=stage("hessian"), module_paths=module_paths, hessians=hessians
            )
    except UnsupportedOpsError as exc:
        logger.warning("%s; falling back to forward-only perturbation measurement (slower)", exc)
        if model.meta.get("lpcompile.spilled_weights") is not None:  # ORT gets the model as one protobuf
            from lpcompile.frontend.onnx_io import materialize

            materialize(model)
        table = measure.analyze_by_measurement(
            model, calib, config.formats, measure_backend(), batch_size=config.batch_size, loss=config.loss,
            progress=stage("measure"), outputs=config.outputs,
        )
    if validate:
        t0 = time.perf_counter()
        table = measure.validate(
            table, model, calib, measure_backend(), batch_size=config.batch_size, loss=config.loss,
            progress=stage("validate"), outputs=config.outputs,
        )
        table = replace(table, timings={**table.timings, "validate_s": time.perf_counter() - t0})
    return finite_table(table, checks.keep_fp32)


def use_streamed(model: ir.Model, config: AnalysisConfig) -> bool:
    """Whether :func:`analyze` streams (``config.stream``; ``auto``: weights above ``STREAM_AUTO_BYTES``, or
    bf16 probe passes, which only the streamed analysis runs).

    Raises:
        UsageError: ``stream="on"`` or bf16 probes with settings that need the whole graph.
    """
    from lpcompile.analysis.config import STREAM_AUTO_BYTES
    from lpcompile.analysis.streamed import streamable

    if config.stream == "off":
        return False
    why = streamable(model, config)
    if config.stream == "on" or config.probe_dtype != "float32":
        if why:
            flag = "--stream on" if config.stream == "on" else f"--probe-dtype {config.probe_dtype} (streamed only)"
            raise UsageError(f"{flag}: {why}")
        return True
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes <= STREAM_AUTO_BYTES:
        return False
    if why:
        logger.warning("%.1f GB of weights analysed whole (memory ≈ 4× that): %s", weight_bytes / 1e9, why)
        return False
    logger.info("%.1f GB of weights: streamed analysis", weight_bytes / 1e9)
    return True


def measure_backend() -> MeasureBackend:
    """The ONNX Runtime backend the forward-only measurement runs on (rewrite + session + amax)."""
    from lpcompile.passes.pipeline import apply_plan
    from lpcompile.runtime.calibrate import collect_amax
    from lpcompile.runtime.ort import make_session, run

    def rewrite(model: ir.Model, plan: PrecisionPlan) -> ir.Model:
        return apply_plan(model, plan, target="qdq")[0]

    def session(model: ir.Model) -> Callable[[Mapping[str, object]], dict[str, object]]:
        sess = make_session(ir.to_proto(model), numerics="exact")
        return lambda batch: run(sess, batch)  # type: ignore[arg-type]

    return MeasureBackend(rewrite=rewrite, session=session, amax=collect_amax)


def finite_table(table: SensitivityTable, keep_fp32: frozenset[str] | set[str] = frozenset()) -> SensitivityTable:
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


# ---------------------------------------------------------------------------------------------
# decide (pure)


@dataclass(frozen=True)
class Decision:
    """A plan and the solver's answer it came from."""

    plan: PrecisionPlan
    solution: Solution


def resolved_softmax(mode: SoftmaxMode, target: Target) -> str:
    """The softmax mode a plan records: ``auto`` becomes ``two-pass`` where the target's two-pass kernel
    runs faster than its own Softmax (fewer passes over memory, whatever the neighbours' precision) and
    ``keep`` everywhere else."""
    from lpcompile.passes.targets import softmax_pays

    if mode == SoftmaxMode.AUTO:
        return (SoftmaxMode.TWO_PASS if softmax_pays(Target(target).value) else SoftmaxMode.KEEP).value
    return mode.value


def decide(table: SensitivityTable, budget: str | Budget | None, config: DecideConfig | None = None) -> Decision:
    """The plan with the least predicted loss within ``budget`` (exact ILP). Pure: no model, no I/O.

    With ``budget=None`` and ``config.max_loss``, the dual: the fewest bits whose predicted loss stays
    within ``max_loss`` (exact ILP, ties broken by the lower loss).

    Raises:
        BudgetError: the budget is infeasible (the message names the smallest feasible budget).
        UsageError / FormatError: bad keep rules or formats.
    """
    config = config or DecideConfig()
    items = solver_items(table, config.formats, config.keep)
    if budget is None:
        if config.max_loss is None:
            raise UsageError("give a budget (--budget) or a loss bound (--max-loss)")
        from lpcompile.solver.max_loss import solve_max_loss

        solution = solve_max_loss(items, config.max_loss)
        return Decision(plan=plan_from_solution(table, solution, None, config), solution=solution)
    b = parse_budget(budget) if isinstance(budget, str) else budget
    from lpcompile.solver.latency import predict_latency, resolve_objective, solve_with_objective

    target = Target(config.target).value
    objective = resolve_objective(config.objective, target)
    if objective == "size":
        solution = solve(items, b)
        return Decision(plan=plan_from_solution(table, solution, str(budget), config), solution=solution)
    residuals = config.int8_residuals
    solution = solve_with_objective(items, b, table, target, objective, int8_residuals=residuals)
    plan = plan_from_solution(table, solution, str(budget), config)
    est = predict_latency(table, solution.assignments, target, int8_residuals=residuals)
    latency = {"objective": objective, "target": target, "predicted_x_fp32": round(est.ratio, 4)}
    if residuals:
        latency["int8_residuals"] = True
    plan = replace(plan, metadata={**plan.metadata, "latency": latency})
    return Decision(plan=plan, solution=solution)


def decide_sweep(
    table: SensitivityTable, budgets: Sequence[Budget], config: DecideConfig | None = None
) -> tuple[list[Solution], set[int]]:
    """Solve every budget of a sweep from one table; return the solutions and the ids of the Pareto front."""
    config = config or DecideConfig()
    items = solver_items(table, config.formats, config.keep)
    sols = sweep(items, budgets)
    return sols, {id(s) for s in pareto_front(sols)}


def plan_from_solution(
    table: SensitivityTable, solution: Solution, budget_text: str | None, config: DecideConfig
) -> PrecisionPlan:
    """The plan of a solved budget: node → format, its bits and predicted loss, the activation scales."""
    nodes = []
    stored: set[str] = set()
    for n in table.nodes:  # a shared weight's loss is carried by the first node of its group
        if n.name not in solution.assignments:
            continue
        fmt = solution.assignments[n.name]
        c = n.candidates[fmt]
        loss = 0.0 if n.group and n.weight in stored and c.predicted_loss is not None else c.predicted_loss
        stored.add(n.weight)
        c = replace(c, predicted_loss=loss)
        nodes.append(
            NodeAssignment(
                name=n.name, op_type=n.op_type, weight=n.weight, params=n.params, format=fmt, bits=c.bits,
                predicted_loss=c.predicted_loss, module_path=n.module_path, group=n.group,
            )
        )
    order = {n.name: i for i, n in enumerate(table.nodes)}
    nodes.sort(key=lambda a: order[a.name])
    budget_bits = None
    if solution.budget is not None and solution.budget.kind == "bits":
        budget_bits = float(solution.budget.value)
    elif solution.budget is not None and solution.total_params:
        budget_bits = solution.budget.max_total_bits(solution.total_params) / solution.total_params
    fp8_acts = fp8_activations(nodes, {n.name: n.activation for n in table.nodes})
    return PrecisionPlan(
        nodes=tuple(nodes),
        budget=budget_text,
        budget_bits=budget_bits,
        model=table.model,
        softmax=resolved_softmax(config.softmax, config.target),
        activation_scales={t: v for t, v in table.activation_amax.items() if t in fp8_acts},
        metadata={"solver": {"status": solution.status, "optimal": solution.optimal}},
    )


def fp8_activations(nodes: Sequence[NodeAssignment], activation_of: Mapping[str, str | None]) -> set[str]:
    """Activation tensors whose node's chosen format rounds them to FP8 or int8 (they need a calibrated scale)."""
    out = set()
    for a in nodes:
        act = get_format(a.format).activation
        tensor = activation_of.get(a.name)
        if scaled_activation(act) and tensor:
            out.add(tensor)
    return out


def decide_uniform(
    model: ir.Model, fmt: str, *, softmax: SoftmaxMode | str = SoftmaxMode.AUTO, target: Target | str = Target.QDQ
) -> PrecisionPlan:
    """One format for every weighted node of a normalised model (baselines); NaN/Inf-weight nodes stay fp32."""
    config = DecideConfig(softmax=softmax, target=target)  # type: ignore[arg-type]
    name = canonical_name(fmt)
    f = get_format(name)
    pinned = check_model(model).keep_fp32
    groups = tied_groups(find_weight_nodes(model))
    nodes = []
    gathered = {w.weight for w in find_weight_nodes(model) if w.op_type == "Gather"}
    for w in find_weight_nodes(model):
        chosen = get_format("fp32") if w.name in pinned else f
        if w.weight in gathered and grid_activation(f.activation):
            logger.info("kept in fp32 (an embedding table has no activation for %s): %s", f.name, w.name)
            chosen = get_format("fp32")
        if w.name in pinned and not f.is_identity:
            logger.info("kept in fp32 (NaN/Inf weights): %s", w.name)
        nodes.append(
            NodeAssignment(
                name=w.name, op_type=w.op_type, weight=w.weight, params=w.params, format=chosen.name,
                bits=stored_bits(chosen, w, str(config.target)), group=groups.get(w.name),
            )
        )
    return PrecisionPlan(nodes=tuple(nodes), softmax=resolved_softmax(config.softmax, config.target))


# ---------------------------------------------------------------------------------------------
# apply


@dataclass(frozen=True)
class Applied:
    """The rewritten model, the plan it was written by (with achieved figures) and what changed."""

    model: ir.Model
    plan: PrecisionPlan
    modified_by: tuple[str, ...]
    softmax_substituted: tuple[str, ...]


def check_plan(model: ir.Model, plan: PrecisionPlan) -> list[WeightNode]:
    """The plan must name the model's weighted nodes and keep NaN/Inf-weight nodes in fp32.

    Raises:
        PlanError: unknown nodes, or a low-precision format on a node with non-finite weights.
    """
    nodes = find_weight_nodes(model)
    validate_against(plan, [n.name for n in nodes])
    keep = check_model(model).keep_fp32  # once: it reads every weight (SmolLM2: 0.5 GB from file)
    bad = sorted(n.name for n in plan.nodes if n.name in keep and n.format != "fp32")
    if bad:
        raise PlanError(
            f"plan gives a low-precision format to node(s) with NaN/Inf weights: {', '.join(bad[:5])}; "
            "set them to fp32"
        )
    return nodes


def with_model_facts(plan: PrecisionPlan, nodes: Sequence[WeightNode], target: str = "qdq") -> PrecisionPlan:
    """Each node's op type, weight, parameter count and bits as the model and format give them.

    A hand-written plan may give only ``name`` and ``format``; the written plan and the node
    metadata carry the real figures (bits = the format's cost on that tensor, scales included).
    """
    by_name = {n.name: n for n in nodes}
    filled = []
    for a in plan.nodes:
        n = by_name[a.name]
        bits = stored_bits(a.format, n, target)  # as the target writes it (MatMulNBits: fp32 scales)
        filled.append(replace(a, op_type=n.op_type, weight=n.weight, params=n.params, bits=bits))
    return plan.with_nodes(filled)


def missing_scales(model: ir.Model, plan: PrecisionPlan) -> list[str]:
    """FP8-rounded activation tensors of ``plan`` that have no calibrated scale yet."""
    activation_of = {n.name: n.activation for n in find_weight_nodes(model)}
    return sorted(t for t in fp8_activations(plan.nodes, activation_of) if t not in plan.activation_scales)


def complete_scales(
    model: ir.Model, plan: PrecisionPlan, calib: CalibrationSet | None, batch_size: int = 16
) -> PrecisionPlan:
    """Fill ``plan.activation_scales`` (calibrated amax) for every FP8 activation still missing one."""
    needed = missing_scales(model, plan)
    if not needed:
        return plan
    if calib is None:
        raise PlanError(f"the plan needs FP8 activation scales for {', '.join(needed[:5])}: give calibration data")
    from lpcompile.runtime.calibrate import collect_amax

    amax = collect_amax(ir.to_proto(model), batches(calib, batch_size), needed)
    logger.info("calibrated %d activation tensor(s) on %s", len(amax), calib.source)
    return replace(plan, activation_scales={**plan.activation_scales, **amax})


def apply(
    model: ir.Model,
    plan: PrecisionPlan,
    config: ApplyConfig | None = None,
    calib: CalibrationSet | None = None,
    hessians: Mapping[str, np.ndarray] | None = None,
) -> Applied:
    """Rewrite ``model`` (normalised; changed in place) by ``plan``.

    Args:
        model: the normalised model; rewritten in place (pass a clone to keep the original).
        plan: the decisions; never changed, only completed (scales) and measured (bits).
        config: target, rounding, seed.
        calib: calibration data for FP8 activation scales the plan lacks.
        hessians: the layer inputs' ``XᵀX`` the analysis gathered (:func:`analyze`'s ``hessians``);
            gathered from ``calib`` when the rounding needs them and this is empty.

    Raises:
        PlanError: the plan does not fit the model.
    """
    from lpcompile.passes.pipeline import apply_plan
    from lpcompile.passes.softmax_two_pass import TwoPassSoftmaxPass

    config = config or ApplyConfig()
    nodes = check_plan(model, plan)
    plan = with_model_facts(plan, nodes, "ort" if config.target == Target.ORT else "qdq")
    plan = complete_scales(model, plan, calib, config.batch_size)
    written_by: dict[str, object] = {
        "target": config.target.value,
        "rounding": config.rounding.value,
        "seed": config.seed,
    }
    if config.int8_residuals:
        written_by["int8_residuals"] = True
    plan = replace(plan, metadata={**plan.metadata, "written": written_by})  # how, not what: no decision changes
    low = frozenset(n.name for n in plan.nodes if n.format != "fp32")
    softmax = TwoPassSoftmaxPass(plan.softmax, low)
    written = config.target.value  # how each (op, format) is written: lpcompile.passes.targets
    if not hessians:
        hessians = None
    if hessians is None and calib is not None and needs_input_hessians(
        config.rounding.value, [n.format for n in plan.nodes]
    ):
        from lpcompile.analysis.input_hessians import collect_input_hessians
        from lpcompile.analysis.rounded import HESSIAN_BATCH

        hessians = collect_input_hessians(model, calib, batch_size=HESSIAN_BATCH)  # XᵀX for mse/gptq
    try:
        rewritten, modified = apply_plan(
            model,
            plan,
            target=written,
            rounding=config.rounding.value,
            seed=config.seed,
            extra_passes=[softmax],
            hessians=hessians,
            int8_residuals=config.int8_residuals,
        )
    except ir.passes.PassError as exc:
        raise LpError(f"internal error while rewriting the model: {_root_cause(exc)}") from exc
    return Applied(
        model=rewritten,
        plan=plan,
        modified_by=tuple(modified),
        softmax_substituted=tuple(getattr(softmax, "substituted", ())),
    )


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__

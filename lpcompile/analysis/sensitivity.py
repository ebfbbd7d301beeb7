"""Hessian sensitivity: Hutchinson estimates of the Gauss–Newton diagonal, per weight and activation.

For the distortion loss L (see :mod:`lpcompile.analysis.losses`) at the fp32 point, the diagonal
of the Hessian of every weight tensor (and of every activation tensor an activation format would
round) is estimated with Hutchinson's method: D ≈ mean over Rademacher probes v of v ⊙ Hv, with
Hv by double backward through the torch interpretation of the ONNX graph. One probe covers all
tensors at once (cross terms vanish in expectation). Probes are spread over the calibration
batches, so memory holds one batch's graph at a time.

The predicted loss of format f on node l is ½·Σ_i D_i·δ_i² with δ = Q_f(W) − W the format's actual
rounding error (``method="diag"``), or HAWQ-v2's ½·Tr(H)/n·‖δ‖² (``method="trace"``), plus, for
formats that round the node's activation input, ½·Σ_i D^a_i·(δa_i)² on each calibration batch.

Every probe also yields a trace sample per weight (Σ_i of its diagonal sample), so the table records
each node's relative standard error of the trace (``trace_rse``; stratified over the batches). With
``probe_tol`` the probes are drawn in rounds, the same number on every batch, until every node's
error is within the tolerance or ``max_probes`` is reached. One batch's probe pass is
:func:`batch_estimate`; it runs in this process, or in worker processes / Ray tasks
(:mod:`lpcompile.analysis.shard`) with per-probe seeding, which gives the same table.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir
import torch

from lpcompile.analysis.config import DEFAULT_FORMATS, AnalysisConfig, candidate_formats
from lpcompile.analysis.losses import choose_outputs, ggn_output_probe, torch_distortion
from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.formats import (
    Format,
    WeightLayout,
    activation_scale,
    get_format,
    is_classic,
    qdq_activation,
    qdq_weight,
    weight_rounding_key,
)
from lpcompile.frontend.calib import CalibrationSet, batches, dynamic_sequence_inputs, trim_padding
from lpcompile.graph import WeightNode, candidate_nodes, find_weight_nodes, tied_groups, weight_array

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _rademacher(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)


def activation_elements(fmts: Sequence[str]) -> set[str]:
    """The activation element types the candidate formats round to (fp8, bf16 ...)."""
    return {e for f in fmts if (e := get_format(f).activation)}


@dataclass(frozen=True)
class ProbeForward:
    """One differentiable forward of an adapter on a batch.

    Attributes:
        outputs: graph outputs by name (functions of the leaves).
        weight_leaves: weight name → the leaf tensor the outputs depend on (ONNX orientation).
        activation_leaves: activation tensor → a zero additive leaf (d/d(leaf) = d/d(activation)).
        captured: activation tensor → its value on this batch.
    """

    outputs: Mapping[str, torch.Tensor]
    weight_leaves: Mapping[str, torch.Tensor]
    activation_leaves: Mapping[str, torch.Tensor]
    captured: Mapping[str, torch.Tensor]


class ForwardAdapter(Protocol):
    """What the Hutchinson driver needs from a model: the ONNX graph interpreted in torch
    (:class:`OnnxAdapter`) or an ``nn.Module`` (:class:`lpcompile.frontend.torch_module.ModuleAdapter`)."""

    def reference(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """fp32 outputs and the captured activation tensors, without gradients."""
        ...

    def probe(self, batch: Mapping[str, np.ndarray]) -> ProbeForward:
        """A differentiable forward with weight and activation leaves."""
        ...


class OnnxAdapter:
    """The normalised ONNX model interpreted in torch (:class:`lpcompile.analysis.interpreter.TorchGraph`)."""

    def __init__(
        self,
        model: ir.Model,
        weights: Sequence[str],
        activations: Sequence[str],
        device: str = "cpu",
        share_tables: bool = False,
    ) -> None:
        """``share_tables``: an activation that is itself a (float32) weight, a Gather's table, gets the
        weight's leaf as its activation leaf instead of a zero perturbation leaf of its own: the
        gradient w.r.t. ``table + δ`` is the table's gradient, so output-space (GGN) estimates are the
        same, without a table-sized zero leaf, a table-sized ``table + δ`` copy, its gradient and its
        accumulator per probe pass. (The HVP estimator draws a Rademacher vector per leaf: it keeps
        the separate leaf.)"""
        from lpcompile.analysis.interpreter import TorchGraph

        self.graph = TorchGraph(ir.to_proto(model), trainable=list(weights), device=device)
        self.weights = list(weights)
        self.activations = list(activations)
        self.out_names = [v.name for v in model.graph.outputs]
        self.shared: frozenset[str] = (
            frozenset(t for t in self.activations if self.graph.is_float32_param(t)) if share_tables else frozenset()
        )

    def release(self) -> None:
        """Drop the interpreted graph (its weight leaves: a float32 copy of the weights) once the probe
        passes are done; the adapter cannot run afterwards."""
        self.graph = None  # type: ignore[assignment]

    def reference(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad():
            res = self.graph.forward(batch, capture=self.activations)
        return {k: res[k].detach() for k in self.out_names}, {t: res[t].detach() for t in self.activations}

    def probe(self, batch: Mapping[str, np.ndarray]) -> ProbeForward:
        perturb = {t: None for t in self.activations if t not in self.shared}
        out = self.graph.forward(batch, perturb=perturb, capture=self.activations)
        return ProbeForward(
            outputs={k: out[k] for k in self.out_names},
            weight_leaves={w: self.graph.params[w] for w in self.weights},
            activation_leaves={
                t: self.graph.params[t] if t in self.shared else self.graph.perturbations[t] for t in self.activations
            },
            captured={t: out[t].detach() for t in self.activations},
        )


def analyze_onnx(
    model: ir.Model,
    calib: CalibrationSet,
    config: AnalysisConfig | None = None,
    progress: Progress | None = None,
    module_paths: Mapping[str, str] | None = None,
    hessians: MutableMapping[str, np.ndarray] | None = None,
) -> SensitivityTable:
    """Run the Hutchinson analysis of a normalised model on calibration data.

    ``hessians`` receives the layer inputs' ``XᵀX`` when the rounding needs them (for ``apply``).

    Raises:
        UnsupportedOpsError: when the interpreter lacks some ops (callers fall back to measuring).
    """
    config = config or AnalysisConfig()
    t0 = time.perf_counter()
    nodes = find_weight_nodes(model)
    fmts = candidate_formats(config)
    weights = sorted({n.weight for n in nodes})
    act_elements = activation_elements(fmts) if config.activations else set()
    act_tensors = sorted({n.activation for n in nodes}) if act_elements else []
    device = resolve_device(config.device)
    adapter = OnnxAdapter(model, weights, act_tensors, device=device, share_tables=config.estimator == "ggn")
    if not config.sharded:
        return run_analysis(adapter, model, nodes, calib, config, progress, module_paths or {}, t0, hessians=hessians)
    from lpcompile.analysis.shard import ShardPool

    with ShardPool(model, weights, act_tensors, config, device) as pool:
        return run_analysis(
            adapter, model, nodes, calib, config, progress, module_paths or {}, t0, shards=pool.run, hessians=hessians
        )


def resolve_device(device: str) -> str:
    """``cpu``/``cuda``/``auto`` → the torch device the analysis runs on (auto: cuda when present).

    Raises:
        UsageError: ``cuda`` asked for where torch sees no CUDA device.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from lpcompile.errors import UsageError

        raise UsageError("--device cuda: torch sees no CUDA device (use --device auto or cpu)")
    return device


@dataclass(frozen=True)
class ProbeJob:
    """What every batch's probe pass needs besides the batch (picklable: workers receive it).

    Attributes:
        weights: weight names (trace samples are kept for these).
        act_tensors: activation tensors perturbed.
        act_elements: activation element types the candidates round to.
        kinds: output → distortion kind (``kl``/``mse``).
        amax: activation tensor → absolute maximum over the calibration data.
        estimator: ``ggn`` or ``hvp``.
        seed: the analysis seed.
        seeding: ``sequential`` or ``per-probe``.
        mean: return the mean over the batch's probes (fixed probe count) instead of the sum.
    """

    weights: tuple[str, ...]
    act_tensors: tuple[str, ...]
    act_elements: tuple[str, ...]
    kinds: Mapping[str, str]
    amax: Mapping[str, float]
    estimator: str
    seed: int
    seeding: str
    mean: bool


@dataclass(frozen=True)
class BatchTask:
    """Probes ``first`` … ``first + k − 1`` on calibration batch ``index``."""

    index: int
    batch: Mapping[str, np.ndarray]
    masks: Mapping[str, np.ndarray | None]
    first: int
    k: int


@dataclass(frozen=True)
class BatchEstimate:
    """One batch's probe pass (CPU tensors).

    Attributes:
        index: the batch.
        k: probes drawn.
        diag: weight or activation tensor → mean (``ProbeJob.mean``) or sum over the probes of the
            diagonal samples.
        act: (activation tensor, element) → Σ_i diag_i·δa_i² with ``diag`` as above.
        trace_samples: weight → one trace sample per probe.
    """

    index: int
    k: int
    diag: Mapping[str, torch.Tensor]
    act: Mapping[tuple[str, str], float]
    trace_samples: Mapping[str, tuple[float, ...]]


#: runs batch tasks and yields their estimates in task order (in this process or sharded)
BatchRunner = Callable[[ProbeJob, Sequence[BatchTask], Callable[[int], None] | None], Iterator[BatchEstimate]]


def probe_generator(seed: int, batch: int, probe: int) -> torch.Generator:
    """The generator of probe ``probe`` on batch ``batch`` in per-probe seeding (any process draws it alike)."""
    state = np.random.SeedSequence([seed, batch, probe]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31 | int(state[1])) & (2**63 - 1))


def batch_estimate(
    adapter: ForwardAdapter,
    task: BatchTask,
    ref: Mapping[str, torch.Tensor],
    job: ProbeJob,
    gen: torch.Generator | None = None,
    step: Callable[[], None] | None = None,
) -> BatchEstimate:
    """The probe pass of one batch: ``task.k`` probes, one differentiable forward.

    Args:
        gen: the shared generator of sequential seeding; None: per-probe generators.
    """
    fw = adapter.probe(task.batch)
    wl = [fw.weight_leaves[w] for w in job.weights]
    al = [fw.activation_leaves[t] for t in job.act_tensors]
    if gen is not None:
        gens = [gen] * task.k
    else:
        gens = [probe_generator(job.seed, task.index, task.first + j) for j in range(task.k)]
    estimate = _hvp_diagonals if job.estimator == "hvp" else _ggn_diagonals
    samples: list[list[torch.Tensor]] = [[] for _ in wl]
    leaves = list({id(leaf): leaf for leaf in [*wl, *al]}.values())  # a shared table leaf once (weights first)
    sums = estimate([fw.outputs[name] for name in job.kinds], ref, job.kinds, leaves, task.k, gens,
                    step, task.masks, samples)
    captured = fw.captured
    del fw  # the outputs (and the autograd graph behind them) go before the activation terms are computed
    est = {i: a.div_(task.k) for i, a in sums.items()} if job.mean else sums  # in place: the sums are ours
    diag = {w: est[id(leaf)].detach().cpu() for w, leaf in zip(job.weights, wl, strict=True) if id(leaf) in est}
    act: dict[tuple[str, str], float] = {}
    for t, leaf in zip(job.act_tensors, al, strict=True):
        if id(leaf) not in est:
            continue
        d = est[id(leaf)].detach().cpu().numpy()  # float32: activation_error widens it exactly
        a = captured[t].float().cpu().numpy()
        for e in job.act_elements:
            act[(t, e)] = activation_error(d, a, e, job.amax[t])
    traces = {
        w: tuple(float(x) for x in torch.stack(ss).cpu().tolist()) if ss else ()
        for w, ss in zip(job.weights, samples, strict=True)
    }
    return BatchEstimate(index=task.index, k=task.k, diag=diag, act=act, trace_samples=traces)


#: activation terms of bigger tensors round and square this many elements at a time
ACTIVATION_CHUNK = 1 << 20


def activation_error(d: np.ndarray, a: np.ndarray, element: str, amax: float) -> float:
    """Σ d·δa² for δa the rounding of activation ``a`` to ``element`` at the scale ``amax`` calibrates.

    The products d·δa·δa (float64, whatever ``d``'s float type: float32 is widened exactly) are
    formed ``ACTIVATION_CHUNK`` elements at a time into one float64 array of ``a``'s shape, then
    summed as a whole: the same array and the same sum as ``np.sum(d * δ * δ)``, with one float64
    copy of ``a`` instead of five (an embedding table read as an activation is 11.7M elements on
    MiniLM, 28M on SmolLM2).
    """
    a = np.asarray(a, dtype=np.float32)
    scale = activation_scale(amax, element)
    prod = np.empty(a.shape, dtype=np.float64)
    flat_a, flat_d, flat_p = a.reshape(-1), np.asarray(d).reshape(-1), prod.reshape(-1)
    for start in range(0, flat_a.size, ACTIVATION_CHUNK):
        sl = slice(start, start + ACTIVATION_CHUNK)
        ac = flat_a[sl]
        delta = qdq_activation(ac, element, scale).astype(np.float64)
        delta -= ac
        out = flat_p[sl]
        np.multiply(flat_d[sl], delta, out=out, dtype=np.float64)
        out *= delta
    return float(np.sum(prod))


def finite_amax(t: torch.Tensor, chunk: int = 1 << 20) -> float | None:
    """max |t| over the finite elements of ``t`` (None when there are none), ``chunk`` elements at a time
    (no full-size ``abs``, mask and index copies of a large tensor such as an embedding table)."""
    flat = t.detach().reshape(-1)
    best: float | None = None
    for start in range(0, flat.numel(), chunk):
        a = flat[start : start + chunk].abs()
        a = a[torch.isfinite(a)]
        if a.numel():
            m = float(a.max())
            best = m if best is None else max(best, m)
    return best


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). glibc keeps
    freed blocks below its adaptive (≤ 32 MB) mmap threshold in its arenas: without this, one batch's
    many mid-sized autograd tensors stay resident and the next batch's land beside them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def trace_rse(parts: Iterable[tuple[float, Sequence[float]]]) -> float | None:
    """Relative standard error of a stratified trace estimate T = Σ_b w_b·mean(samples_b).

    ``parts`` holds (batch weight, per-probe trace samples) for each batch that drew probes.
    Var(T) = Σ_b w_b²·s_b²/k_b with s_b² the batch's sample variance; a batch with one probe takes
    the pooled squared coefficient of variation of the others. None when no batch has two probes
    or T is zero.
    """
    rows = [(w, np.asarray(s, dtype=np.float64)) for w, s in parts if len(s)]
    total = sum(w * float(s.mean()) for w, s in rows)
    multi = [(w, s) for w, s in rows if len(s) >= 2]
    if not multi or total == 0.0 or not math.isfinite(total):
        return None
    cvs = [float(s.var(ddof=1)) / float(s.mean()) ** 2 for _, s in multi if s.mean() != 0.0]
    cv2 = float(np.mean(cvs)) if cvs else 0.0
    var = 0.0
    for w, s in rows:
        s2 = float(s.var(ddof=1)) if len(s) >= 2 else cv2 * float(s.mean()) ** 2
        var += w * w * s2 / len(s)
    return math.sqrt(var) / abs(total)


def run_analysis(
    adapter: ForwardAdapter,
    model: ir.Model,
    nodes: Sequence[WeightNode],
    calib: CalibrationSet,
    config: AnalysisConfig,
    progress: Progress | None,
    module_paths: Mapping[str, str],
    t0: float,
    prepare: Callable[[Mapping[str, np.ndarray]], None] | None = None,
    shards: BatchRunner | None = None,
    hessians: MutableMapping[str, np.ndarray] | None = None,
) -> SensitivityTable:
    """The one Hutchinson driver: reference pass, probes spread over batches, predicted losses, table.

    Args:
        adapter: the forward of the model (ONNX interpretation or ``nn.Module``).
        model: the normalised ONNX model (weights, node names, input signature).
        nodes: its weighted nodes.
        calib: calibration data.
        config: analyzer settings (probes, seed, estimator, batch size ...).
        progress: ``progress(done, total)`` per probe.
        module_paths: node name → PyTorch module path, recorded in the table.
        t0: ``perf_counter`` at the start of the analysis (for timings).
        prepare: called once with the first batch before the reference pass (module hooks observe).
        shards: runs the probe passes elsewhere (:class:`lpcompile.analysis.shard.ShardPool`); None:
            in this process with ``adapter``.

    Raises:
        UsageError: ``config.probe_dtype`` other than float32 (the streamed analysis runs those).
    """
    if config.probe_dtype != "float32":
        from lpcompile.errors import UsageError

        raise UsageError(f"--probe-dtype {config.probe_dtype} runs in the streamed analysis of an ONNX model only")
    fmts = candidate_formats(config)
    weights = sorted({n.weight for n in nodes})
    act_elements = activation_elements(fmts) if config.activations else set()
    act_tensors = sorted({n.activation for n in nodes}) if act_elements else []
    data = limit_samples(calib, config.max_samples)
    dynamic = dynamic_sequence_inputs(model)
    batch_list = [trim_padding(b, dynamic) for b in batches(data, config.batch_size)]
    if prepare is not None and batch_list:
        prepare(batch_list[0])
    t_build = time.perf_counter()

    # Pass 1: fp32 reference outputs and activation ranges.
    refs: list[dict[str, torch.Tensor]] = []
    amax: dict[str, float] = dict.fromkeys(act_tensors, 0.0)
    for b in batch_list:
        outs, captured = _reference(adapter, b, data)
        refs.append(outs)
        for t in act_tensors:
            m = finite_amax(captured[t])
            if m is not None:
                amax[t] = max(amax[t], m)
        del outs, captured
    spec = choose_outputs(
        model, config.outputs, config.loss, shapes={k: tuple(v.shape) for k, v in (refs[0] if refs else {}).items()}
    )
    kinds = spec.kinds()
    logger.info("distortion loss: %s", spec.describe())
    t_ref = time.perf_counter()

    # Pass 2: Hutchinson diagonals (weights) and activation-term sums (per tensor × element).
    sizes = np.array([batch_len(b) for b in batch_list], dtype=np.float64)
    bweights = sizes / sizes.sum()
    seeding = config.effective_seeding
    job = ProbeJob(
        weights=tuple(weights), act_tensors=tuple(act_tensors), act_elements=tuple(sorted(act_elements)),
        kinds=dict(kinds), amax=dict(amax), estimator=config.estimator, seed=config.seed, seeding=seeding,
        mean=config.probe_tol is None,
    )
    masks = [
        spec.masks(b, {name: tuple(ref[name].shape) for name in kinds}) for b, ref in zip(batch_list, refs, strict=True)
    ]
    if shards is not None:
        runner: BatchRunner = shards
    else:
        if config.sharded:
            logger.warning("--workers/--ray shard the ONNX interpretation only: this analysis runs in one process")
        gen = torch.Generator().manual_seed(config.seed) if seeding == "sequential" else None

        def runner(
            job: ProbeJob, tasks: Sequence[BatchTask], step: Callable[[int], None] | None
        ) -> Iterator[BatchEstimate]:
            for task in tasks:
                est = batch_estimate(adapter, task, refs[task.index], job, gen, (lambda: step(1)) if step else None)
                trim_heap()  # the batch's autograd graph is gone: hand its freed heap back before the next
                yield est

    if config.probe_tol is None:
        diag, act_term, rse, drawn = _fixed_probes(runner, job, batch_list, masks, bweights, config, progress)
    else:
        diag, act_term, rse, drawn = _converge(runner, job, batch_list, masks, bweights, config, progress)
    t_hvp = time.perf_counter()
    release = getattr(adapter, "release", None)
    if callable(release):  # the ONNX adapter's weight leaves are not needed to score the candidates
        release()
    trim_heap()

    diag_np = Float64Diagonals(diag, {n.weight: n.shape for n in nodes})
    from lpcompile.analysis.rounded import predict_for_config

    table_nodes = predict_for_config(
        model, nodes, fmts, config, diag_np, act_term, act_elements, module_paths, data, hessians
    ) or predict_losses(model, nodes, fmts, config, diag_np, act_term, act_elements, module_paths)
    table_nodes = [replace(n, trace_rse=rse.get(n.weight)) for n in table_nodes]
    t_end = time.perf_counter()
    table = assemble_table(
        table_nodes, fmts, config, kinds, data, int(sizes.sum()), amax, (t0, t_build, t_ref, t_hvp, t_end)
    )
    table = replace(table, probes=drawn, probe_tol=config.probe_tol, seeding=seeding)
    return replace(table, loss_outputs=spec.to_dict())


class Float64Diagonals(Mapping[str, np.ndarray]):
    """The float64 numpy diagonals the candidates are scored with, made when a weight is scored (the
    same values as converting them all first, without a float64 copy of every diagonal at once);
    weights without an estimate get zeros.

    ``widen=False``: float32 diagonals are handed out as float32 views, no copy. For
    :func:`predict_losses` the numbers are the same (its products widen them to float64 exactly and its
    trace sums a float64 copy); the streamed analysis scores a 28M-weight table that way.
    """

    def __init__(
        self, diag: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], widen: bool = True
    ) -> None:
        self._diag = diag
        self._shapes = shapes
        self._widen = widen

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._diag:
            t = self._diag[name].detach()
            return t.numpy() if not self._widen and t.dtype == torch.float32 else t.double().numpy()
        return np.zeros(self._shapes[name], dtype=np.float64)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def _reference(
    adapter: ForwardAdapter, batch: Mapping[str, np.ndarray], data: CalibrationSet
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's reference pass; an op failing on synthetic inputs names the input shapes and the flags."""
    from lpcompile.analysis.ops import OpEvalError
    from lpcompile.frontend.input_spec import explain_failure

    try:
        return adapter.reference(batch)
    except OpEvalError as exc:
        if data.synthetic and data.shapes is not None:
            raise explain_failure(exc, data.shapes) from exc
        raise


def _add_estimate(
    est: BatchEstimate,
    bw: float,
    weights: Sequence[str],
    diag: dict[str, torch.Tensor],
    act_term: dict[tuple[str, str], float],
) -> None:
    """Add one batch's estimates, weighted by the batch's share ``bw`` of the samples.

    In place (the same float32 operations as ``diag + bw * est``): the estimate's tensors are scaled and
    become, or are added to, the accumulators; no weight-sized temporaries.
    """
    for w in weights:
        if w in est.diag:
            scaled = est.diag[w].mul_(bw)
            if w in diag:
                diag[w].add_(scaled)
            else:
                diag[w] = scaled
    for key, value in est.act.items():
        act_term[key] += bw * 0.5 * value


def _fixed_probes(
    runner: BatchRunner,
    job: ProbeJob,
    batch_list: Sequence[Mapping[str, np.ndarray]],
    masks: Sequence[Mapping[str, np.ndarray | None]],
    bweights: np.ndarray,
    config: AnalysisConfig,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], float], dict[str, float | None], int]:
    """``config.probes`` probes spread over the batches (the historical arithmetic, term for term)."""
    per_batch = spread_probes(config.probes, len(batch_list))
    rows = enumerate(zip(batch_list, masks, per_batch, strict=True))
    tasks = [BatchTask(i, b, m, 0, k) for i, (b, m, k) in rows if k > 0]
    diag: dict[str, torch.Tensor] = {}
    act_term: dict[tuple[str, str], float] = {(t, e): 0.0 for t in job.act_tensors for e in job.act_elements}
    parts: dict[str, list[tuple[float, Sequence[float]]]] = {w: [] for w in job.weights}
    step = _counter(progress, sum(per_batch))
    for est in runner(job, tasks, step):
        bw = float(bweights[est.index])
        _add_estimate(est, bw, job.weights, diag, act_term)
        for w in job.weights:
            parts[w].append((bw, est.trace_samples.get(w, ())))
    return diag, act_term, {w: trace_rse(p) for w, p in parts.items()}, config.probes


def _converge(
    runner: BatchRunner,
    job: ProbeJob,
    batch_list: Sequence[Mapping[str, np.ndarray]],
    masks: Sequence[Mapping[str, np.ndarray | None]],
    bweights: np.ndarray,
    config: AnalysisConfig,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], float], dict[str, float | None], int]:
    """Rounds of probes, the same number on every batch, until every trace's relative error ≤ ``probe_tol``.

    The first round draws max(2, ⌈probes/batches⌉) per batch; each next one what the worst node's
    error says is missing (error ∝ 1/√k), at most 3× the probes so far, until ``max_probes`` (in
    all) is reached. Sums are accumulated and divided by the per-batch count at the end.
    """
    tol = float(config.probe_tol or 0.0)
    nb = len(batch_list)
    k_max = max(1, config.max_probes // max(nb, 1))
    k_round = min(k_max, max(2, math.ceil(config.probes / max(nb, 1))))
    k_done = 0
    acc: dict[str, torch.Tensor] = {}
    act_num: dict[tuple[str, str], float] = {(t, e): 0.0 for t in job.act_tensors for e in job.act_elements}
    samples: dict[str, list[list[float]]] = {w: [[] for _ in range(nb)] for w in job.weights}
    rse: dict[str, float | None] = dict.fromkeys(job.weights)
    step = _counter(progress, None)
    while nb and k_round > 0:
        tasks = [BatchTask(i, b, m, k_done, k_round) for i, (b, m) in enumerate(zip(batch_list, masks, strict=True))]
        for est in runner(job, tasks, step):
            _add_estimate(est, float(bweights[est.index]), job.weights, acc, act_num)
            for w in job.weights:
                samples[w][est.index].extend(est.trace_samples.get(w, ()))
        k_done += k_round
        rse = {w: trace_rse(zip(bweights.tolist(), samples[w], strict=True)) for w in job.weights}
        known = [r for r in rse.values() if r is not None]
        worst = max(known, default=0.0)
        logger.info("probes: %d per batch, worst trace error %.3g (tol %.3g)", k_done, worst, tol)
        if k_done >= k_max or (k_done >= 2 and worst <= tol):  # one probe per batch gives no error
            break
        need = math.ceil(k_done * (worst / tol) ** 2)
        k_round = min(k_max - k_done, 3 * k_done, max(1, need - k_done))
    if known_bad := [w for w, r in rse.items() if r is not None and r > tol]:
        logger.warning(
            "%d weight(s) did not converge to a relative trace error of %.3g within %d probes (worst %s: %.3g)",
            len(known_bad), tol, k_done * nb, max(known_bad, key=lambda w: rse[w] or 0.0),
            max(rse[w] or 0.0 for w in known_bad),
        )
    if nb and k_done < 2:
        logger.warning("--max-probes %d allows one probe per batch (%d batches): trace errors unknown",
                       config.max_probes, nb)
    k_done = max(k_done, 1)  # no batches: nothing was drawn, nothing to divide
    diag = {w: a / k_done for w, a in acc.items()}
    act_term = {key: v / k_done for key, v in act_num.items()}
    return diag, act_term, rse, k_done * nb


def _counter(progress: Progress | None, total: int | None) -> Callable[[int], None] | None:
    """A callback advancing ``progress`` by n probes (total unknown in convergence mode: reported as done)."""
    if progress is None:
        return None
    state = [0]

    def step(n: int) -> None:
        state[0] += n
        progress(state[0], total if total is not None else state[0])

    return step


def predict_losses(
    model: ir.Model,
    nodes: Sequence[WeightNode],
    fmts: Sequence[str],
    config: AnalysisConfig,
    diag: Mapping[str, np.ndarray],
    act_term: Mapping[tuple[str, str], float],
    act_elements: set[str],
    module_paths: Mapping[str, str],
) -> list[NodeSensitivity]:
    """Per (node, format) predicted loss from Hessian diagonals (shared by the ONNX and module paths).

    ``diag`` maps weight names to their estimated Hessian diagonal; ``act_term`` maps (activation
    tensor, element) to the already-summed ½·Σ D^a·δa² term of formats that round activations.
    """
    groups = tied_groups(nodes)
    offered = candidate_nodes(nodes, fmts)
    out = []
    for n in nodes:
        w = weight_array(model, n.weight)
        d = diag[n.weight]  # float64, or float32 (widened exactly in the products below; the trace sums float64)
        trace = float(np.asarray(d, dtype=np.float64).sum())
        cands: dict[str, Candidate] = {}
        errors: dict[object, tuple[float, float]] = {}  # formats that write the same weights are rounded once
        for f in offered[n.name]:
            fmt = get_format(f)
            bits = fmt.bits_for(n.shape, n.layout)
            if fmt.is_identity:
                cands[f] = Candidate(bits=bits, predicted_loss=0.0)
                continue
            key = weight_rounding_key(fmt)
            if key not in errors:
                errors[key] = rounding_error(fmt, w, n.layout, d)
            weighted, plain = errors[key]
            pred = 0.5 * trace / max(n.params, 1) * plain if config.method == "trace" else 0.5 * weighted
            if fmt.activation and fmt.activation in act_elements:
                pred += act_term[(n.activation, fmt.activation)]
            cands[f] = Candidate(bits=bits, predicted_loss=max(pred, 0.0))
        out.append(
            NodeSensitivity.of(
                n, cands, trace=trace, group=groups.get(n.name), module_path=module_paths.get(n.name)
            )
        )
    return out


#: weights of more elements are scored a slice of output channels at a time (bounded temporaries)
PREDICT_SLICE = 1 << 23


def rounding_error(fmt: Format, w: np.ndarray, layout: WeightLayout, d: np.ndarray) -> tuple[float, float]:
    """(Σ d·δ², Σ δ²) for δ = Q_fmt(w) − w, round to nearest.

    A big weight in a format whose scales are per channel or per block of the reduction axis (every
    channel quantized on its own) is done ``PREDICT_SLICE`` elements of channels at a time: the same
    δ element for element, with memory for a slice instead of several float64 copies of the tensor.
    """
    c = layout.channel_axis % w.ndim if w.ndim else 0
    sliceable = (
        w.size > PREDICT_SLICE and w.ndim >= 2 and is_classic(fmt) and not layout.flatten
        and fmt.scale in ("none", "per_channel", "per_block") and c != layout.reduction_axis % w.ndim
    )
    if not sliceable:
        return _squared_errors(qdq_weight(fmt, w, layout), w, d)
    step = max(1, PREDICT_SLICE * w.shape[c] // w.size)
    weighted = plain = 0.0
    for start in range(0, w.shape[c], step):
        idx = tuple(slice(start, start + step) if i == c else slice(None) for i in range(w.ndim))
        ws = np.ascontiguousarray(w[idx])
        sw, sp = _squared_errors(qdq_weight(fmt, ws, layout), ws, d[idx])
        weighted += sw
        plain += sp
    return weighted, plain


def _squared_errors(q: np.ndarray, w: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """(Σ (d·δ)·δ, Σ δ·δ) in float64 for δ = q − w: the products of ``d * delta * delta`` in their order,
    with two float64 temporaries instead of five."""
    delta = q.astype(np.float64)
    delta -= w
    t = np.multiply(d, delta)
    t *= delta
    weighted = float(np.sum(t))
    del t
    delta *= delta
    return weighted, float(np.sum(delta))


def assemble_table(
    table_nodes: Sequence[NodeSensitivity],
    fmts: tuple[str, ...],
    config: AnalysisConfig,
    kinds: Mapping[str, str],
    data: CalibrationSet,
    num_samples: int,
    amax: Mapping[str, float],
    stamps: tuple[float, float, float, float, float],
) -> SensitivityTable:
    """The table of a Hutchinson run; ``stamps`` = perf_counter at start, built, references, Hessian, end."""
    t0, t_build, t_ref, t_hvp, t_end = stamps
    return SensitivityTable(
        nodes=tuple(table_nodes),
        formats=fmts,
        method=f"hutchinson-{config.estimator}-{config.method}",
        loss="+".join(sorted(set(kinds.values()))),
        probes=config.probes,
        seed=config.seed,
        calib=data.source,
        num_samples=num_samples,
        synthetic_calib=data.synthetic,
        activation_amax={t: v for t, v in amax.items() if v > 0},
        timings={
            "build_s": t_build - t0,
            "reference_s": t_ref - t_build,
            "hessian_s": t_hvp - t_ref,
            "predict_s": t_end - t_hvp,
            "total_s": t_end - t0,
        },
    )


def _progress_step(progress: Progress | None, start: int, total: int) -> Callable[[], None] | None:
    """A callback advancing ``progress`` by one probe each call, from ``start``."""
    if progress is None:
        return None
    state = [start]

    def step() -> None:
        state[0] += 1
        progress(state[0], total)

    return step


def _hvp_diagonals(
    outputs: list[torch.Tensor],
    ref: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    leaves: list[torch.Tensor],
    k: int,
    gens: Sequence[torch.Generator],
    step: Callable[[], None] | None,
    masks: Mapping[str, np.ndarray | None] | None = None,
    samples: list[list[torch.Tensor]] | None = None,
) -> dict[int, torch.Tensor]:
    """Hutchinson: Σ over Rademacher v (probe j drawn from ``gens[j]``) of v ⊙ Hv, Hv by double backward.

    Returns the sums (divide by k for the diagonal); ``samples[i]`` gets Σ(v ⊙ Hv) of leaf i per probe.
    """
    if outputs:
        ref = {name: r.to(outputs[0].device) for name, r in ref.items()}
    loss = torch_distortion(dict(zip(kinds, outputs, strict=True)), ref, kinds, masks)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    pairs = [(leaf, g) for leaf, g in zip(leaves, grads, strict=True) if g is not None and g.requires_grad]
    acc = [torch.zeros_like(leaf) for leaf, _ in pairs]
    slot = {id(leaf): i for i, leaf in enumerate(leaves)}
    for j in range(k):
        vs = [_rademacher(leaf.shape, gens[j]).to(leaf.device) for leaf, _ in pairs]
        hv = torch.autograd.grad(
            [g for _, g in pairs], [leaf for leaf, _ in pairs], grad_outputs=vs, retain_graph=True, allow_unused=True
        )
        for (leaf, _), a, v, h in zip(pairs, acc, vs, hv, strict=True):
            if h is not None:
                vh = v * h.detach()
                a.add_(vh)
                if samples is not None and slot[id(leaf)] < len(samples):
                    samples[slot[id(leaf)]].append(vh.sum())
        if step:
            step()
    return {id(leaf): a for (leaf, _), a in zip(pairs, acc, strict=True)}


def _ggn_diagonals(
    outputs: list[torch.Tensor],
    ref: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    leaves: list[torch.Tensor],
    k: int,
    gens: Sequence[torch.Generator],
    step: Callable[[], None] | None,
    masks: Mapping[str, np.ndarray | None] | None = None,
    samples: list[list[torch.Tensor]] | None = None,
) -> dict[int, torch.Tensor]:
    """Output-space Hutchinson on H = JᵀMJ: Σ over z (Cov z = M; probe j from ``gens[j]``) of (Jᵀz)².

    One backward each; divide the sums by k for diag(H). ``samples[i]`` gets Σ(Jᵀz)² of leaf i per probe.

    Unbiased like the HVP form, but every sample is non-negative and free of the off-diagonal
    terms that dominate v ⊙ Hv for small diagonal entries.
    """
    # The first probe's squares become the accumulators (0 + x is x for the non-negative x = g², so the
    # sums are those of zero-initialised ones), and each gradient is dropped once squared: one probe
    # holds the gradients and the accumulators, not gradients, squares and zeroed accumulators.
    acc: list[torch.Tensor | None] = [None] * len(leaves)
    for j in range(k):
        zs = [
            ggn_output_probe(ref[name].cpu(), kind, gens[j], (masks or {}).get(name)).to(out.device)
            for (name, kind), out in zip(kinds.items(), outputs, strict=True)
        ]
        gs = list(torch.autograd.grad(outputs, leaves, grad_outputs=zs, retain_graph=True, allow_unused=True))
        del zs
        for i in range(len(gs)):
            g, gs[i] = gs[i], None
            if g is None:
                continue
            sq = g.detach() * g.detach()
            del g
            a = acc[i]
            if a is None:
                acc[i] = sq
            else:
                a.add_(sq)
            if samples is not None and i < len(samples):
                samples[i].append(sq.sum())
            del sq
        if step:
            step()
    return {
        id(leaf): torch.zeros_like(leaf) if a is None else a for leaf, a in zip(leaves, acc, strict=True)
    }


def limit_samples(calib: CalibrationSet, max_samples: int | None) -> CalibrationSet:
    if max_samples is None:
        return calib
    from lpcompile.frontend.calib import split

    n = min(max_samples, calib.num_samples)
    return split(calib, n)[0]


def batch_len(b: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: axis 0 of its first input of rank ≥ 1 (scalars are shared by all samples)."""
    return next((int(v.shape[0]) for v in b.values() if np.ndim(v) >= 1), 1 if b else 0)


def spread_probes(probes: int, nbatches: int) -> list[int]:
    """Distribute ``probes`` over batches, at least one per batch when probes ≥ batches."""
    if nbatches == 0:
        return []
    base, extra = divmod(max(probes, 1), nbatches)
    return [base + (1 if i < extra else 0) for i in range(nbatches)]


__all__ = [
    "DEFAULT_FORMATS",
    "AnalysisConfig",
    "BatchEstimate",
    "BatchTask",
    "ForwardAdapter",
    "OnnxAdapter",
    "ProbeForward",
    "ProbeJob",
    "activation_error",
    "analyze_onnx",
    "batch_estimate",
    "candidate_formats",
    "probe_generator",
    "resolve_device",
    "run_analysis",
    "trace_rse",
]

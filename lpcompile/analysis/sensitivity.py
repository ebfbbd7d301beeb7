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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir
import torch

from lpcompile.analysis.config import DEFAULT_FORMATS, AnalysisConfig, candidate_formats
from lpcompile.analysis.losses import choose_outputs, ggn_output_probe, torch_distortion
from lpcompile.analysis.table import Candidate, NodeSensitivity, SensitivityTable
from lpcompile.formats import activation_scale, get_format, qdq_activation, qdq_weight
from lpcompile.frontend.calib import CalibrationSet, batches, dynamic_sequence_inputs, trim_padding
from lpcompile.graph import WeightNode, find_weight_nodes, tied_groups, weight_array

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

    def __init__(self, model: ir.Model, weights: Sequence[str], activations: Sequence[str]) -> None:
        from lpcompile.analysis.interpreter import TorchGraph

        self.graph = TorchGraph(ir.to_proto(model), trainable=list(weights))
        self.weights = list(weights)
        self.activations = list(activations)
        self.out_names = [v.name for v in model.graph.outputs]

    def reference(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad():
            res = self.graph.forward(batch, capture=self.activations)
        return {k: res[k].detach() for k in self.out_names}, {t: res[t].detach() for t in self.activations}

    def probe(self, batch: Mapping[str, np.ndarray]) -> ProbeForward:
        perturb = {t: None for t in self.activations}
        out = self.graph.forward(batch, perturb=perturb, capture=self.activations)
        return ProbeForward(
            outputs={k: out[k] for k in self.out_names},
            weight_leaves={w: self.graph.params[w] for w in self.weights},
            activation_leaves={t: self.graph.perturbations[t] for t in self.activations},
            captured={t: out[t].detach() for t in self.activations},
        )


def analyze_onnx(
    model: ir.Model,
    calib: CalibrationSet,
    config: AnalysisConfig | None = None,
    progress: Progress | None = None,
    module_paths: Mapping[str, str] | None = None,
) -> SensitivityTable:
    """Run the Hutchinson analysis of a normalised model on calibration data.

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
    adapter = OnnxAdapter(model, weights, act_tensors)
    return run_analysis(adapter, model, nodes, calib, config, progress, module_paths or {}, t0)


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
    """
    fmts = candidate_formats(config)
    weights = sorted({n.weight for n in nodes})
    act_elements = activation_elements(fmts) if config.activations else set()
    act_tensors = sorted({n.activation for n in nodes}) if act_elements else []
    data = _limit(calib, config.max_samples)
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
            a = captured[t].abs()
            a = a[torch.isfinite(a)]
            if a.numel():
                amax[t] = max(amax[t], float(a.max()))
    spec = choose_outputs(
        model, config.outputs, config.loss, shapes={k: tuple(v.shape) for k, v in (refs[0] if refs else {}).items()}
    )
    kinds = spec.kinds()
    logger.info("distortion loss: %s", spec.describe())
    t_ref = time.perf_counter()

    # Pass 2: Hutchinson diagonals (weights) and activation-term sums (per tensor × element).
    sizes = np.array([_batch_len(b) for b in batch_list], dtype=np.float64)
    bweights = sizes / sizes.sum()
    per_batch = _spread(config.probes, len(batch_list))
    gen = torch.Generator().manual_seed(config.seed)
    diag: dict[str, torch.Tensor] = {}
    act_term: dict[tuple[str, str], float] = {(t, e): 0.0 for t in act_tensors for e in act_elements}
    done, total = 0, sum(per_batch)
    estimate = _hvp_diagonals if config.estimator == "hvp" else _ggn_diagonals
    for b, ref, k, bw in zip(batch_list, refs, per_batch, bweights, strict=True):
        if k == 0:
            continue
        fw = adapter.probe(b)
        wl = [fw.weight_leaves[w] for w in weights]
        al = [fw.activation_leaves[t] for t in act_tensors]
        masks = spec.masks(b, {name: tuple(ref[name].shape) for name in kinds})
        est = estimate([fw.outputs[name] for name in kinds], ref, kinds, [*wl, *al], k, gen,
                       _progress_step(progress, done, total), masks)
        done += k
        for w, leaf in zip(weights, wl, strict=True):
            if id(leaf) in est:
                diag[w] = diag[w] + float(bw) * est[id(leaf)] if w in diag else float(bw) * est[id(leaf)]
        for t, leaf in zip(act_tensors, al, strict=True):
            if id(leaf) not in est:
                continue
            d = est[id(leaf)].double().numpy()
            a = fw.captured[t].float().numpy()
            for e in act_elements:
                delta = qdq_activation(a, e, activation_scale(amax[t], e)).astype(np.float64) - a
                act_term[(t, e)] += float(bw) * 0.5 * float(np.sum(d * delta * delta))
        del fw, est
    t_hvp = time.perf_counter()

    shapes = {n.weight: n.shape for n in nodes}
    diag_np = {
        w: diag[w].detach().double().numpy() if w in diag else np.zeros(shapes[w], dtype=np.float64) for w in weights
    }
    table_nodes = predict_losses(model, nodes, fmts, config, diag_np, act_term, act_elements, module_paths)
    t_end = time.perf_counter()
    table = assemble_table(
        table_nodes, fmts, config, kinds, data, int(sizes.sum()), amax, (t0, t_build, t_ref, t_hvp, t_end)
    )
    return replace(table, loss_outputs=spec.to_dict())


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
    gathered = {n.weight for n in nodes if n.op_type == "Gather"}  # embedding tables (and their tied heads)
    out = []
    for n in nodes:
        w = weight_array(model, n.weight)
        d = diag[n.weight]
        trace = float(d.sum())
        cands: dict[str, Candidate] = {}
        for f in fmts:
            fmt = get_format(f)
            if n.weight in gathered and (fmt.activation or "").startswith("float8"):
                continue  # a Gather has no float activation input for an FP8 scale: not a candidate
            bits = fmt.bits_for(n.shape, n.layout)
            if fmt.is_identity:
                cands[f] = Candidate(bits=bits, predicted_loss=0.0)
                continue
            delta = qdq_weight(fmt, w, n.layout).astype(np.float64) - w
            if config.method == "trace":
                pred = 0.5 * trace / max(n.params, 1) * float(np.sum(delta * delta))
            else:
                pred = 0.5 * float(np.sum(d * delta * delta))
            if fmt.activation and fmt.activation in act_elements:
                pred += act_term[(n.activation, fmt.activation)]
            cands[f] = Candidate(bits=bits, predicted_loss=max(pred, 0.0))
        out.append(
            NodeSensitivity(
                name=n.name,
                op_type=n.op_type,
                weight=n.weight,
                params=n.params,
                shape=n.shape,
                candidates=cands,
                trace=trace,
                group=groups.get(n.name),
                module_path=module_paths.get(n.name),
                activation=n.activation,
            )
        )
    return out


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
    gen: torch.Generator,
    step: Callable[[], None] | None,
    masks: Mapping[str, np.ndarray | None] | None = None,
) -> dict[int, torch.Tensor]:
    """Hutchinson: diag(H) ≈ mean over Rademacher v of v ⊙ Hv, Hv by double backward of the loss."""
    loss = torch_distortion(dict(zip(kinds, outputs, strict=True)), ref, kinds, masks)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    pairs = [(leaf, g) for leaf, g in zip(leaves, grads, strict=True) if g is not None and g.requires_grad]
    acc = [torch.zeros_like(leaf) for leaf, _ in pairs]
    for _ in range(k):
        vs = [_rademacher(leaf.shape, gen) for leaf, _ in pairs]
        hv = torch.autograd.grad(
            [g for _, g in pairs], [leaf for leaf, _ in pairs], grad_outputs=vs, retain_graph=True, allow_unused=True
        )
        for a, v, h in zip(acc, vs, hv, strict=True):
            if h is not None:
                a.add_(v * h.detach())
        if step:
            step()
    return {id(leaf): a / k for (leaf, _), a in zip(pairs, acc, strict=True)}


def _ggn_diagonals(
    outputs: list[torch.Tensor],
    ref: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    leaves: list[torch.Tensor],
    k: int,
    gen: torch.Generator,
    step: Callable[[], None] | None,
    masks: Mapping[str, np.ndarray | None] | None = None,
) -> dict[int, torch.Tensor]:
    """Output-space Hutchinson on H = JᵀMJ: diag(H) ≈ mean over z (Cov z = M) of (Jᵀz)², one backward each.

    Unbiased like the HVP form, but every sample is non-negative and free of the off-diagonal
    terms that dominate v ⊙ Hv for small diagonal entries.
    """
    acc = [torch.zeros_like(leaf) for leaf in leaves]
    for _ in range(k):
        zs = [ggn_output_probe(ref[name], kind, gen, (masks or {}).get(name)) for name, kind in kinds.items()]
        gs = torch.autograd.grad(outputs, leaves, grad_outputs=zs, retain_graph=True, allow_unused=True)
        for a, g in zip(acc, gs, strict=True):
            if g is not None:
                a.add_(g.detach() * g.detach())
        if step:
            step()
    return {id(leaf): a / k for leaf, a in zip(leaves, acc, strict=True)}


def _limit(calib: CalibrationSet, max_samples: int | None) -> CalibrationSet:
    if max_samples is None:
        return calib
    from lpcompile.frontend.calib import split

    n = min(max_samples, calib.num_samples)
    return split(calib, n)[0]


def _batch_len(b: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: axis 0 of its first input of rank ≥ 1 (scalars are shared by all samples)."""
    return next((int(v.shape[0]) for v in b.values() if np.ndim(v) >= 1), 1 if b else 0)


def _spread(probes: int, nbatches: int) -> list[int]:
    """Distribute ``probes`` over batches, at least one per batch when probes ≥ batches."""
    if nbatches == 0:
        return []
    base, extra = divmod(max(probes, 1), nbatches)
    return [base + (1 if i < extra else 0) for i in range(nbatches)]


__all__ = [
    "DEFAULT_FORMATS",
    "AnalysisConfig",
    "ForwardAdapter",
    "OnnxAdapter",
    "ProbeForward",
    "analyze_onnx",
    "candidate_formats",
    "run_analysis",
]

"""Per-(node, candidate) predicted losses where a candidate is a (format, rounding) pair.

The drop-in for :func:`lpcompile.analysis.sensitivity.predict_losses` once the analysis has the
layer-input Hessians (:mod:`lpcompile.analysis.input_hessians`, accumulated in its reference pass):
each candidate's loss is computed from the very weights that candidate writes
(:func:`lpcompile.rounding.candidate`), with the Kronecker-factored prediction
½·Σ_n g_n·δ_nᵀĤδ_n (:func:`lpcompile.rounding.kron_loss`) wherever the node has a Hessian, so
GPTQ's use of input correlations is visible to the solver. The rounding uses the shrunk ``XᵀX``, the
prediction the raw one (:func:`lpcompile.rounding.unshrunk`). The rounded weights are returned too,
keyed by (weight, candidate), so ``apply`` can write exactly what was scored
(``QuantizeWeightsPass(weights=...)``).

Candidate names: a format, optionally with a rounding suffix (``int4_b128:gptq``, see
:func:`lpcompile.formats.split_candidate`); without one, ``default_rounding`` applies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence

import numpy as np
import onnx_ir as ir

from lpcompile.analysis.input_hessians import node_hessian
from lpcompile.analysis.table import Candidate, NodeSensitivity
from lpcompile.formats import QuantizedWeight, dequantize, get_format, split_candidate
from lpcompile.graph import WeightNode, candidate_nodes, tied_groups, weight_array
from lpcompile.rounding import DEFAULT_CONFIG, RoundingConfig, default_method, kron_loss, round_weight, unshrunk

logger = logging.getLogger(__name__)

RoundedWeights = dict[tuple[str, str], QuantizedWeight]


def predict_rounded_losses(
    model: ir.Model,
    nodes: Sequence[WeightNode],
    candidates: Sequence[str],
    diag: Mapping[str, np.ndarray],
    act_term: Mapping[tuple[str, str], float],
    act_elements: set[str],
    module_paths: Mapping[str, str],
    *,
    hessians: Mapping[str, np.ndarray] | None,
    default_rounding: str = "nearest",
    kron: bool = True,
    config: RoundingConfig = DEFAULT_CONFIG,
    keep_weights: bool = True,
) -> tuple[list[NodeSensitivity], RoundedWeights]:
    """Table rows and the rounded weights (empty when ``keep_weights`` is False).

    Args:
        model: the normalised model.
        nodes: its weighted nodes.
        candidates: candidate names (formats with optional ``:rounding``), fp32 included.
        diag: estimated Hessian diagonal per weight name.
        act_term: ½·Σ D^a·δa² per (activation tensor, element), as the analyzer sums it.
        act_elements: the activation elements analysed.
        module_paths: node name → module path (PyTorch entry), may be empty.
        hessians: ``XᵀX`` per activation tensor (None: diagonal predictions, Hessian-free rounding).
        default_rounding: the rounding of candidates without a suffix.
        kron: use the Kronecker prediction where a Hessian exists (else ½·ΣD·δ² everywhere).
        config: rounding knobs.
        keep_weights: return the rounded weights (memory: one copy per candidate per weight).
    """
    groups = tied_groups(nodes)
    offered = candidate_nodes(nodes, candidates)
    rows: list[NodeSensitivity] = []
    weights: RoundedWeights = {}
    cache: dict[tuple[str, str, str], tuple[QuantizedWeight, float]] = {}
    for n in nodes:
        w = weight_array(model, n.weight)
        d = diag[n.weight]
        h = node_hessian(n, hessians)
        h_pred = unshrunk(h) if kron else None  # predict with the raw XᵀX, round with the shrunk one
        cands: dict[str, Candidate] = {}
        for name in offered[n.name]:
            fmt_name, method = split_candidate(name)
            fmt = get_format(fmt_name)
            method = method or default_method(fmt, default_rounding, has_hessian=h is not None)
            bits = fmt.bits_for(n.shape, n.layout)
            if fmt.is_identity:
                cands[name] = Candidate(bits=bits, predicted_loss=0.0)
                continue
            key = (n.weight, fmt.name, method)
            if key not in cache:
                q = round_weight(fmt, w, n.layout, method, hessian=h, config=config)
                delta = dequantize(q).reshape(w.shape).astype(np.float64) - w
                cache[key] = (q, kron_loss(delta, n.layout, d, h_pred))
            q, pred = cache[key]
            if fmt.activation and fmt.activation in act_elements:
                pred += act_term[(n.activation, fmt.activation)]
            cands[name] = Candidate(bits=bits, predicted_loss=max(pred, 0.0))
            if keep_weights:
                weights[(n.weight, name)] = q
        rows.append(
            NodeSensitivity.of(
                n, cands, trace=float(np.sum(d)), group=groups.get(n.name), module_path=module_paths.get(n.name)
            )
        )
    return rows, weights


def weights_for_plan(plan: object, weights: RoundedWeights) -> dict[str, QuantizedWeight]:
    """The scored weights of the plan's choices, by initializer name (``QuantizeWeightsPass(weights=...)``)."""
    out: dict[str, QuantizedWeight] = {}
    for a in plan.nodes:  # type: ignore[attr-defined]
        q = weights.get((a.weight, a.format))
        if q is not None:
            out[a.weight] = q
    return out


__all__ = ["RoundedWeights", "predict_rounded_losses", "weights_for_plan"]


#: roundings whose weights depend on the layer-input Hessian
HESSIAN_ROUNDINGS = frozenset({"mse", "gptq"})
#: the batch size every XᵀX collection uses, so analysis and apply sum the same fp32 batches
HESSIAN_BATCH = 16


def needs_hessians(default_rounding: str, candidates: Sequence[str]) -> bool:
    """Whether any candidate (its ``:rounding`` suffix, else ``default_rounding``) needs ``XᵀX``."""
    return any((split_candidate(c)[1] or default_rounding) in HESSIAN_ROUNDINGS for c in candidates)


def predict_for_config(
    model: ir.Model,
    nodes: Sequence[WeightNode],
    candidates: Sequence[str],
    config: object,
    diag: Mapping[str, np.ndarray],
    act_term: Mapping[tuple[str, str], float],
    act_elements: set[str],
    module_paths: Mapping[str, str],
    calib: object,
    hessians_out: MutableMapping[str, np.ndarray] | None = None,
) -> list[NodeSensitivity] | None:
    """The analyzer's hook: rows scored with ``config.rounding`` (None when every candidate rounds to
    nearest, so the caller keeps its own prediction). ``XᵀX`` comes from one extra forward over the
    same calibration samples (:func:`~lpcompile.analysis.input_hessians.collect_input_hessians`);
    the loss is the Kronecker prediction where a node has ``XᵀX`` (the diagonal one ranks GPTQ weights
    wrongly against nearest ones: GPTQ raises the plain weight error while it lowers the output error)."""
    from lpcompile.analysis.input_hessians import collect_input_hessians

    rounding = str(getattr(config, "rounding", "nearest"))
    if rounding in ("nearest", "stochastic") and not any(split_candidate(c)[1] for c in candidates):
        return None
    hessians: Mapping[str, np.ndarray] | None = None
    if needs_hessians(rounding, candidates):
        if hessians_out:  # already gathered (the caller's store): reuse
            hessians = hessians_out
        else:
            hessians = collect_input_hessians(model, calib, nodes, batch_size=HESSIAN_BATCH)
            if hessians_out is not None:  # handed on to apply, so the rounding reuses them
                hessians_out.update(hessians)
    rows, _ = predict_rounded_losses(
        model,
        nodes,
        candidates,
        diag,
        act_term,
        act_elements,
        module_paths,
        hessians=hessians,
        default_rounding=rounding if rounding != "stochastic" else "nearest",
        kron=True,
        keep_weights=False,
    )
    return rows

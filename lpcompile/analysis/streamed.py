"""Segment-streamed Hutchinson analysis: the whole-model Gauss–Newton diagonal, one segment in memory.

The full-model analysis (:func:`lpcompile.analysis.sensitivity.analyze_onnx`) holds every weight as a
torch leaf, the autograd graph of a whole batch and a diagonal accumulator per weight: about four
times the model. Here the topologically sorted graph is cut into contiguous **segments** of about
``segment_bytes`` of weights, at positions where few tensors are live (a transformer is cut between
blocks: the residual stream, the mask and the rotary tables cross the cut). Then:

1. **Forward**, segment by segment with only that segment's weights loaded: the tensors that cross
   cuts are kept for every calibration batch (for a 1.1B Llama with 16 × 128 tokens, about 16 MB
   per cut), as are the reference outputs and the activation ranges.
2. **Backward**, segments in reverse order. For each batch the segment is re-run from its stored
   inputs with gradients, and each probe's output-space vector z (drawn exactly as the full-model
   GGN estimator draws it, with per-probe seeding) or the gradient arriving from the segments after
   it is back-propagated: the squared weight gradients accumulate into the segment's Hessian
   diagonal, the input gradients are handed to the segment before, and the layer inputs' ``XᵀX``
   are gathered from the same forward. A weight read in several segments (a tied embedding and
   head) has its per-probe gradient summed over the segments before squaring, so the estimate is the
   full-model one: when its first segment reads it only through ``Gather`` s (an embedding), the later
   reader squares its gradient where it is made except on the rows those Gathers read in the batch,
   and only those rows wait (SmolLM2: ≤ 1,024 of 49,152 rows, instead of 113 MB a probe written to
   disk); other shared weights wait whole, spilled to disk when large.
3. Each segment's nodes are scored (diagonal or Kronecker prediction of every candidate, rounding
   included) as soon as their weight's diagonal and their activation term are final, and the
   segment's weights, gradients and diagonals are released.

The result is the table the full-model GGN estimator gives with ``seeding="per-probe"``: the same
probes, the same sums (up to floating-point summation order). Peak memory: one segment's weights
×≈4, the tensors crossing cuts for all batches, and one batch's autograd graph of one segment.
Only the ``ggn`` estimator with a fixed probe count runs streamed (double backward and convergence
rounds would need the whole graph again).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
import torch

from lpcompile.analysis.config import AnalysisConfig, candidate_formats
from lpcompile.analysis.interpreter import TorchGraph
from lpcompile.analysis.losses import choose_outputs, ggn_output_probe
from lpcompile.analysis.sensitivity import Float64Diagonals, activation_error, finite_amax, trim_heap
from lpcompile.analysis.table import NodeSensitivity, SensitivityTable
from lpcompile.frontend.calib import CalibrationSet, batches, dynamic_sequence_inputs, trim_padding
from lpcompile.graph import WeightNode, find_weight_nodes, release_data, tied_groups

logger = logging.getLogger(__name__)

__all__ = ["Segment", "StreamedResult", "analyze_streamed", "plan_segments", "streamable"]

#: default weight bytes per segment: the model's weights / 16, within these bounds
MIN_SEGMENT_BYTES = 16 << 20
MAX_SEGMENT_BYTES = 512 << 20
#: per-probe partial gradients of weights read in several segments are kept in memory up to this
SPILL_BYTES = 64 << 20


@dataclass(frozen=True)
class Segment:
    """A contiguous run of the sorted graph's nodes.

    Attributes:
        index: position in the graph (0 = first).
        nodes: the node indices ``[start, stop)`` in the sorted node list.
        inputs: non-initializer tensors read here and produced before (or graph inputs).
        outputs: tensors produced here that later segments read, and graph outputs produced here.
        initializers: initializers read here.
        weight_bytes: bytes of the initializers read here.
    """

    index: int
    nodes: tuple[int, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: tuple[str, ...]
    weight_bytes: int


@dataclass(frozen=True)
class StreamedResult:
    """The table and the layer-input second moments gathered on the way (for ``apply``'s rounding)."""

    table: SensitivityTable
    hessians: MutableMapping[str, np.ndarray]


def streamable(model: ir.Model, config: AnalysisConfig) -> str | None:
    """Why ``model``/``config`` cannot run streamed (None when it can)."""
    if config.estimator != "ggn":
        return "the hvp estimator needs double backward through the whole graph"
    if config.probe_tol is not None:
        return "convergence mode (--probe-tol) draws probes in rounds over the whole graph"
    if config.sharded:
        return "sharded runs (--workers/--ray) interpret the whole graph in each worker"
    if model.functions:
        return "the model has local functions (inline them first)"
    return None


def _nbytes(value: ir.Value) -> int:
    cv = value.const_value
    return int(cv.nbytes) if cv is not None else 0


def plan_segments(model: ir.Model, segment_bytes: int | None = None) -> list[Segment]:
    """Cut the sorted graph into segments of about ``segment_bytes`` of weights where few tensors are live.

    Args:
        model: the normalised model (nodes in topological order).
        segment_bytes: weight bytes per segment (None: the weights / 16, within 16–512 MB; a segment
            that reads a bigger tensor is cut at the next place few tensors are live. A given value is
            raised to the largest initializer).
    """
    nodes = list(model.graph)
    inits = model.graph.initializers
    graph_inputs = [v.name for v in model.graph.inputs if v.name not in inits]
    graph_outputs = {v.name for v in model.graph.outputs}
    first_read: dict[str, int] = {}
    last_read: dict[str, int] = {}
    produced: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is None or not v.name:
                continue
            first_read.setdefault(v.name, i)
            last_read[v.name] = i
        for v in node.outputs:
            if v.name:
                produced[v.name] = i
    for name in graph_outputs:
        last_read[name] = len(nodes)
    sizes = {name: _nbytes(v) for name, v in inits.items()}
    total = sum(sizes[n] for n in first_read if n in sizes)
    if segment_bytes is None:
        # not raised to the largest tensor (SmolLM2's 113 MB embedding table would make segments of 8–14
        # of its 30 layers: a batch's autograd graph through them, not the weights, is the memory then)
        segment_bytes = min(max(total // 16, MIN_SEGMENT_BYTES), MAX_SEGMENT_BYTES)
    else:
        segment_bytes = max(segment_bytes, max(sizes.values(), default=0))
    new_bytes = [0] * len(nodes)
    for name, i in first_read.items():
        if name in sizes:
            new_bytes[i] += sizes[name]
    # live (non-initializer) tensors after each node
    delta = [0] * (len(nodes) + 1)
    for name in graph_inputs:
        if name in last_read:
            delta[0] += 1
            delta[last_read[name]] -= 1
    for name, i in produced.items():
        end = last_read.get(name, i)
        if end > i:
            delta[i] += 1
            delta[end] -= 1
    live, running = [], 0
    for i in range(len(nodes)):
        running += delta[i]
        live.append(running)
    floor = min(live[:-1], default=0)
    cuts: list[int] = []
    acc, best = 0, None
    for i in range(len(nodes) - 1):
        acc += new_bytes[i]
        if acc < segment_bytes:
            continue
        if best is None or live[i] < live[best]:
            best = i
        if live[i] <= floor or acc >= 2 * segment_bytes:
            cuts.append(best + 1)
            acc = sum(new_bytes[best + 1 : i + 1])
            best = None
    bounds = [0, *cuts, len(nodes)]
    segments: list[Segment] = []
    for a, b in itertools.pairwise(bounds):
        if a >= b:
            continue
        reads: dict[str, None] = {}
        made: set[str] = set()
        for node in nodes[a:b]:
            for v in node.inputs:
                if v is not None and v.name:
                    reads.setdefault(v.name)
            made.update(v.name for v in node.outputs if v.name)
        seg_inits = tuple(n for n in reads if n in inits)
        seg_inputs = tuple(n for n in reads if n not in inits and n not in made)
        seg_outputs = tuple(
            n for n in sorted(made, key=lambda x: produced[x]) if last_read.get(n, -1) >= b or n in graph_outputs
        )
        segments.append(
            Segment(len(segments), (a, b), seg_inputs, seg_outputs, seg_inits, sum(sizes[n] for n in seg_inits))
        )
    logger.info(
        "streamed analysis: %d segment(s) of ≤ %.0f MB weights (largest %.0f MB)",
        len(segments), segment_bytes / 2**20, max((s.weight_bytes for s in segments), default=0) / 2**20,
    )
    return segments


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    dtype = value.dtype
    elem = int(dtype.value) if dtype is not None else 0
    return onnx.helper.make_tensor_value_info(value.name, elem, None)


def _segment_graph(model: ir.Model, seg: Segment, device: str) -> TorchGraph:
    """One segment as a :class:`~lpcompile.analysis.interpreter.TorchGraph` whose initializers are inputs."""
    nodes = list(model.graph)[seg.nodes[0] : seg.nodes[1]]
    values = {v.name: v for n in nodes for v in (*[i for i in n.inputs if i is not None], *n.outputs)}
    g = onnx.GraphProto()
    g.name = f"segment_{seg.index}"
    g.node.extend(ir.serde.serialize_node(n) for n in nodes)
    g.input.extend(_value_info(values[n]) for n in (*seg.inputs, *seg.initializers))
    g.output.extend(_value_info(values[n]) for n in seg.outputs)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    return TorchGraph(onnx.helper.make_model(g, opset_imports=opsets), device=device)


def _load(model: ir.Model, names: Iterable[str], trainable: set[str], device: str) -> dict[str, torch.Tensor]:
    """Torch copies of initializers (trainable ones as fp32 leaves), external data released after."""
    from lpcompile.analysis import ops as _ops

    out: dict[str, torch.Tensor] = {}
    for name in names:
        value = model.graph.initializers[name]
        tensor = value.const_value
        arr = tensor.numpy()
        if name in trainable:
            t = torch.tensor(np.asarray(arr, dtype=np.float32), device=device).requires_grad_(True)
        else:
            t = _ops.numpy_to_torch(np.array(arr))
            t = t.to(device) if device != "cpu" else t
        out[name] = t
        del arr
        release_data(tensor)
    return out


class _Partials:
    """Per-probe gradients of weights read in several segments, summed over segments before squaring
    (kept in a :class:`~lpcompile.analysis.input_hessians.HessianStore`: in memory up to ``limit``, then on disk)."""

    def __init__(self, limit: int) -> None:
        from lpcompile.analysis.input_hessians import HessianStore

        self.store = HessianStore(limit)

    @staticmethod
    def _key(key: tuple[str, int, int]) -> str:
        return f"{key[1]}/{key[2]}/{key[0]}"

    def add(self, key: tuple[str, int, int], g: torch.Tensor) -> None:
        g = g.detach().cpu()
        prev = self.pop(key)
        self.store[self._key(key)] = (g if prev is None else prev + g).numpy()

    def pop(self, key: tuple[str, int, int]) -> torch.Tensor | None:
        value = self.store.pop(self._key(key), None)
        return None if value is None else torch.from_numpy(value)

    def close(self) -> None:
        self.store.close()


def analyze_streamed(
    model: ir.Model,
    calib: CalibrationSet,
    config: AnalysisConfig,
    module_paths: Mapping[str, str] | None = None,
    segment_bytes: int | None = None,
    hessians: MutableMapping[str, np.ndarray] | None = None,
) -> StreamedResult:
    """The Hutchinson GGN analysis, streamed segment by segment (see the module docstring).

    Args:
        model: the normalised model.
        calib: calibration data.
        config: analyzer settings (``ggn``, fixed probe count, not sharded).
        module_paths: node name → PyTorch module path, recorded in the table.
        segment_bytes: weight bytes per segment (None: see :func:`plan_segments`).
        hessians: where the layer inputs' ``XᵀX`` go when the rounding needs them (a
            :class:`~lpcompile.analysis.input_hessians.HessianStore` spills big ones to disk); None: a new store.

    Raises:
        UsageError: when the configuration needs the whole graph (:func:`streamable`).
    """
    from lpcompile.analysis.input_hessians import HessianAccumulator, HessianStore, attention_mask, hessian_specs
    from lpcompile.analysis.rounded import needs_hessians
    from lpcompile.analysis.sensitivity import (
        activation_elements,
        assemble_table,
        batch_len,
        limit_samples,
        resolve_device,
        spread_probes,
        trace_rse,
    )
    from lpcompile.errors import UsageError

    why = streamable(model, config)
    if why:
        raise UsageError(f"the streamed analysis cannot run: {why}")
    t0 = time.perf_counter()
    module_paths = module_paths or {}
    device = resolve_device(config.device)
    nodes = find_weight_nodes(model)
    groups = tied_groups(nodes)
    fmts = candidate_formats(config)
    weights = sorted({n.weight for n in nodes})
    wset = set(weights)
    act_elements = activation_elements(fmts) if config.activations else set()
    inits = model.graph.initializers
    act_all = sorted({n.activation for n in nodes}) if act_elements else []
    act_inits = [t for t in act_all if t in inits]  # a Gather's "activation" is its table
    act_tensors = [t for t in act_all if t not in inits]
    rounding = config.rounding if config.rounding != "stochastic" else "nearest"
    low = config.probe_dtype == "bfloat16"
    want_h = needs_hessians(rounding, fmts)
    data = limit_samples(calib, config.max_samples)
    dynamic = dynamic_sequence_inputs(model)
    batch_list = [trim_padding(b, dynamic) for b in batches(data, config.batch_size)]
    segments = plan_segments(model, segment_bytes)
    seg_of_node = _segment_of_nodes(model, segments)
    readers: dict[str, list[int]] = {}
    for seg in segments:
        for name in seg.initializers:
            if name in wset:
                readers.setdefault(name, []).append(seg.index)
    producer_seg = {name: seg.index for seg in segments for name in _produced(model, seg)}
    graph_input_names = {v.name for v in model.graph.inputs}
    # a tied table read by Gathers in its first segment and densely in one later one (an LLM's embedding and
    # head): the later reader's per-probe gradient is kept only on the rows the Gathers read in that batch
    gather_ids = _row_gathers(model, segments, readers)
    gathered: dict[str, list[torch.Tensor]] = {w: [] for w in gather_ids}  # per batch: the rows read
    t_build = time.perf_counter()

    # ---- pass 1: forward, segment by segment; keep what crosses cuts, the outputs and activation ranges
    out_names = [v.name for v in model.graph.outputs]
    # the reference outputs the probes are drawn from: when every graph output comes out of one segment,
    # that segment's backward recomputes them (the same forward on the same inputs) and no batch's
    # outputs are kept (SmolLM2: 16 × 128 × 49,152 logits = 400 MB); else they are kept from here
    out_segs = {producer_seg[n] for n in out_names if n in producer_seg}
    refs_from_backward = len(out_segs) == 1 and all(n in producer_seg for n in out_names)
    keep_names = {n for seg in segments for n in seg.inputs}
    if not refs_from_backward:
        keep_names |= set(out_names)
    out_shapes: list[dict[str, tuple[int, ...]]] = [{} for _ in batch_list]
    stored: list[dict[str, torch.Tensor]] = [
        {k: torch.as_tensor(np.asarray(v)) for k, v in b.items() if k in keep_names} for b in batch_list
    ]
    amax: dict[str, float] = dict.fromkeys(act_tensors, 0.0)
    graphs: dict[int, TorchGraph] = {}
    for seg in segments:
        sg = _segment_graph(model, seg, device)
        graphs[seg.index] = sg
        params = _load(model, seg.initializers, set(), device)
        capture = [t for t in act_tensors if producer_seg.get(t) == seg.index or
                   (t in graph_input_names and t in seg.inputs)]
        seg_ids = {w: ids for w, ids in gather_ids.items() if readers[w][0] == seg.index}
        id_capture = sorted({i for ids in seg_ids.values() for i in ids if i not in graph_input_names})
        with torch.no_grad():
            for b, batch in enumerate(batch_list):
                feeds = {n: stored[b][n] if n in stored[b] else torch.as_tensor(batch[n]) for n in seg.inputs}
                res = sg.forward({**feeds, **params}, capture=[*capture, *id_capture])
                for w, ids in seg_ids.items():
                    read = [torch.as_tensor(np.asarray(batch[i]) if i in graph_input_names else res[i]) for i in ids]
                    gathered[w].append(_read_rows(read, int(model.graph.initializers[w].shape[0])))
                for name in seg.outputs:
                    if name in keep_names:
                        stored[b][name] = res[name].detach()
                    if name in out_names:
                        out_shapes[b][name] = tuple(res[name].shape)
                for t in capture:
                    m = finite_amax(res[t])
                    if m is not None:
                        amax[t] = max(amax[t], m)
        del params
        trim_heap()
        logger.debug("forward: segment %d/%d done", seg.index + 1, len(segments))
    for b, batch in enumerate(batch_list):  # outputs that are graph inputs or initializers (no producer here)
        for name in out_names:
            if name not in out_shapes[b] and name in stored[b]:
                out_shapes[b][name] = tuple(stored[b][name].shape)
            elif name not in out_shapes[b] and name in batch:
                out_shapes[b][name] = tuple(np.shape(batch[name]))
    refs: list[dict[str, torch.Tensor]] = (
        [] if refs_from_backward else [{n: stored[b][n] for n in out_names} for b in range(len(batch_list))]
    )
    spec = choose_outputs(model, config.outputs, config.loss, shapes=out_shapes[0] if out_shapes else {})
    kinds = spec.kinds()
    masks = [spec.masks(b, {n: sh[n] for n in kinds}) for b, sh in zip(batch_list, out_shapes, strict=True)]
    t_ref = time.perf_counter()
    logger.debug(
        "forward pass done (%d batch(es)); reference outputs %s", len(batch_list),
        "recomputed by their segment's backward" if refs_from_backward else "kept",
    )

    # ---- pass 2: backward, segments in reverse order
    sizes = np.array([batch_len(b) for b in batch_list], dtype=np.float64)
    bweights = sizes / max(sizes.sum(), 1.0)
    per_batch = spread_probes(config.probes, len(batch_list))
    dep = _weight_dependent(model, wset | set(act_tensors))
    incoming: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    zcache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    partials = _Partials(SPILL_BYTES)
    tied_acc: dict[str, torch.Tensor] = {}  # row-gathered tables: accumulated from their dense reader on
    row_partials: dict[tuple[str, int, int], tuple[torch.Tensor, float]] = {}  # (gradient on the rows, Σ rest²)
    diag: dict[str, torch.Tensor] = {}
    samples: dict[str, list[list[float]]] = {w: [[] for _ in batch_list] for w in weights}
    act_term: dict[tuple[str, str], float] = {(t, e): 0.0 for t in act_all for e in act_elements}
    act_done: set[str] = set()
    hess = hessians if hessians is not None else HessianStore()
    rows: dict[str, NodeSensitivity] = {}
    pending = list(nodes)
    t_predict = 0.0
    try:
        for seg in reversed(segments):
            sg = graphs[seg.index]
            seg_weights = [n for n in seg.initializers if n in wset]
            params = _load(model, seg.initializers, set(seg_weights), device)
            # (a weight read in several segments accumulates where it is read first: its other readers only
            # hand on their per-probe partial gradients)
            acc = {
                w: tied_acc.pop(w) if w in tied_acc else torch.zeros_like(params[w])
                for w in seg_weights if seg.index == readers[w][0]
            }
            for w in seg_weights:
                if w in gathered and seg.index == readers[w][1]:
                    tied_acc[w] = torch.zeros_like(params[w])
            seg_nodes = [n for n in nodes if seg_of_node.get(n.name) == seg.index]
            hacc = HessianAccumulator(hessian_specs(model, seg_nodes)) if want_h else None
            logger.debug("backward: segment %d loaded (%d weights)", seg.index, len(seg_weights))
            perturb_names = [t for t in act_tensors if producer_seg.get(t) == seg.index or
                             (t in graph_input_names and t in seg.inputs)]
            # an activation's gradient is taken at the tensor itself (no zero perturbation leaf and no
            # ``a + 0`` copy of every activation: the same gradient); one that no gradient reaches otherwise
            # (computed from inputs alone) gets the additive leaf
            leafed: set[str] = set()
            for b, batch in enumerate(batch_list):
                k = per_batch[b]
                if k == 0 and hacc is None:
                    continue
                feeds: dict[str, torch.Tensor] = {}
                for n in seg.inputs:
                    v = stored[b][n] if n in stored[b] else torch.as_tensor(batch[n])
                    if dep.get(n) and v.is_floating_point():
                        v = v.detach().clone().requires_grad_(True)
                    feeds[n] = v
                capture = list(dict.fromkeys([*(hacc.tensors if hacc else ()), *perturb_names]))
                # bf16 probes: the values (activations, XᵀX, the outputs the probes are drawn from) come from an
                # fp32 forward; the differentiable forward runs under autocast, so the probes' products are bf16
                exact = _exact_values(sg, feeds, params, capture) if low else None
                with _autocast(device, low):
                    res = sg.forward({**feeds, **params}, capture=capture, perturb=dict.fromkeys(leafed) or None)
                    unreached = [t for t in perturb_names if t not in leafed and t in res and not res[t].requires_grad]
                    if unreached:
                        leafed.update(unreached)
                        del res
                        res = sg.forward({**feeds, **params}, capture=capture, perturb=dict.fromkeys(leafed))
                vals = exact if exact is not None else res
                if hacc is not None:
                    hacc.update({t: vals[t] for t in hacc.tensors if t in vals}, attention_mask(batch))
                leaves = [params[w] for w in seg_weights]
                in_leaves = [(n, feeds[n]) for n in seg.inputs if feeds[n].requires_grad]
                act_leaves = [
                    (t, sg.perturbations[t] if t in leafed else res[t])
                    for t in perturb_names
                    if (t in leafed and t in sg.perturbations) or (t not in leafed and t in res)
                ]
                sq = {t: torch.zeros_like(leaf, dtype=torch.float32) for t, leaf in act_leaves}
                for j in range(k):
                    outs, gouts = [], []
                    zz: torch.Tensor | None = None
                    ref = refs[b] if refs else _detached(vals, kinds)
                    z = (
                        _probe(zcache, (b, j), ref, kinds, masks[b], config.seed)
                        if any(name in kinds for name in seg.outputs)
                        else {}
                    )
                    inc = incoming.get((b, j), {})
                    for name in seg.outputs:
                        g = inc.pop(name, None)
                        if name in kinds:
                            zz = z.pop(name).to(res[name].device)
                            g = zz if g is None else g + zz
                        if g is None or not res[name].requires_grad:
                            continue
                        outs.append(res[name])
                        gouts.append(g.to(res[name].device, res[name].dtype))  # (bf16 where autocast made one)
                    if not zcache.get((b, j), True):
                        zcache.pop((b, j), None)
                    if not outs:
                        continue
                    targets = [*leaves, *(v for _, v in in_leaves), *(v for _, v in act_leaves)]
                    grads = torch.autograd.grad(outs, targets, grad_outputs=gouts, retain_graph=True, allow_unused=True)
                    del outs, gouts, g, z  # this probe's output vectors (the outputs' size) go now
                    zz = None
                    gw = grads[: len(leaves)]
                    gi = grads[len(leaves) : len(leaves) + len(in_leaves)]
                    ga = grads[len(leaves) + len(in_leaves) :]
                    for w, g in zip(seg_weights, gw, strict=True):
                        if g is None:
                            continue
                        alpha = float(bweights[b]) / k
                        if w in gathered:  # Σ(g_dense + g_rows)²: the rows the Gathers read wait for their part
                            r = gathered[w][b].to(g.device)
                            if seg.index != readers[w][0]:
                                on_rows = g.detach()[r]  # (a copy: advanced indexing)
                                s2 = _square_(g.detach())
                                s2[r] = 0.0
                                tied_acc[w].add_(s2, alpha=alpha)
                                row_partials[(w, b, j)] = (on_rows, float(s2.sum()))
                                del s2, on_rows
                                continue
                            dense, rest = row_partials.pop((w, b, j), (None, 0.0))
                            part = g.detach()[r]
                            part = part if dense is None else part.add_(dense)
                            s2 = _square_(part)
                            acc[w].index_add_(0, r, s2, alpha=alpha)
                            samples[w][b].append(rest + float(s2.sum()))
                            del s2, part
                            continue
                        if len(readers[w]) > 1:
                            if seg.index != readers[w][0]:
                                partials.add((w, b, j), g)
                                continue
                            prev = partials.pop((w, b, j))
                            g = g if prev is None else prev.to(g.device).add_(g.detach())  # (= g + prev)
                        s2 = _square_(g.detach())  # a fresh gradient, or the partial sum: squared where it is
                        acc[w].add_(s2, alpha=alpha)
                        samples[w][b].append(float(s2.sum()))
                        del s2
                    nxt = incoming.setdefault((b, j), {})
                    for (n, _), g in zip(in_leaves, gi, strict=True):
                        if g is not None:
                            nxt[n] = nxt[n] + g.detach() if n in nxt else g.detach()
                    for (t, _), g in zip(act_leaves, ga, strict=True):
                        if g is not None:
                            g = g.detach().float()
                            sq[t].add_(g * g)
                    if not nxt:
                        incoming.pop((b, j), None)
                    del grads, gw, gi, ga  # before the next probe's gradients are made
                    logger.debug("backward: segment %d batch %d probe %d", seg.index, b, j)
                for t, leaf in act_leaves:
                    if k == 0:
                        continue
                    d = (sq[t] / k).cpu().numpy()  # float32: activation_error widens it exactly
                    a = vals[t].detach().float().cpu().numpy()
                    for e in act_elements:
                        act_term[(t, e)] += float(bweights[b]) * 0.5 * activation_error(d, a, e, amax[t])
                    del leaf
                del res, vals, exact
                logger.debug("backward: segment %d batch %d: %d probe(s) done", seg.index, b, k)
            act_done.update(perturb_names)
            for w in seg_weights:
                if seg.index == readers[w][0]:
                    diag[w] = acc[w].detach().cpu()
                    if w in act_inits:  # perturbing a table is perturbing the weight: its diagonal
                        _table_term(w, params[w], diag[w], act_elements, amax, act_term)
                        act_done.add(w)
            del acc, params
            if hacc is not None:
                for name, h in hacc.result().items():
                    hess[name] = h
                del hacc
            tp = time.perf_counter()
            logger.debug("backward: segment %d scoring", seg.index)
            pending = _score_ready(
                model, pending, diag, act_done, act_tensors, rows, fmts, config, act_term, act_elements,
                module_paths, hess, want_h, rounding, groups,
            )
            t_predict += time.perf_counter() - tp
            trim_heap()
            logger.info("segment %d/%d done", len(segments) - seg.index, len(segments))
    finally:
        partials.close()
    if pending:  # weights read by no segment (unused): zero diagonal
        for n in pending:
            diag.setdefault(n.weight, torch.zeros(n.shape))
        _score_ready(model, pending, diag, set(act_tensors), act_tensors, rows, fmts, config, act_term,
                     act_elements, module_paths, hess, want_h, rounding, groups)
    t_hvp = time.perf_counter()
    rse = {w: trace_rse(zip(bweights.tolist(), samples[w], strict=True)) for w in weights}
    table_nodes = [replace(rows[n.name], trace_rse=rse.get(n.weight)) for n in nodes]
    table = assemble_table(
        table_nodes, fmts, config, kinds, data, int(sizes.sum()), amax, (t0, t_build, t_ref, t_hvp - t_predict, t_hvp)
    )
    table = replace(
        table, probes=config.probes, seeding="per-probe", loss_outputs=spec.to_dict(), probe_dtype=config.probe_dtype
    )
    table = replace(table, timings={**table.timings, "segments": float(len(segments))})
    return StreamedResult(table=table, hessians=hess)


def _table_term(
    name: str,
    value: torch.Tensor,
    diag: torch.Tensor,
    elements: Iterable[str],
    amax: dict[str, float],
    act_term: dict[tuple[str, str], float],
) -> None:
    """The activation term of an initializer read as an activation: ½·Σ D·δa² with D its weight diagonal."""
    a = value.detach().float().cpu().numpy()
    m = finite_amax(value)  # chunked: no mask, index and abs copies of the table
    amax[name] = m if m is not None else 0.0
    d = diag.numpy()  # float32: activation_error widens it exactly (no float64 copy of the table)
    for e in elements:
        act_term[(name, e)] = 0.5 * activation_error(d, a, e, amax[name])


def _probe(
    cache: dict[tuple[int, int], dict[str, torch.Tensor]],
    key: tuple[int, int],
    ref: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    masks: Mapping[str, np.ndarray | None],
    seed: int,
) -> dict[str, torch.Tensor]:
    """The output-space vectors of probe ``key`` = (batch, probe), drawn as the full-model GGN draws them."""
    from lpcompile.analysis.sensitivity import probe_generator

    if key not in cache:
        gen = probe_generator(seed, key[0], key[1])
        cache[key] = {
            name: ggn_output_probe(ref[name].cpu(), kind, gen, masks.get(name)) for name, kind in kinds.items()
        }
    return cache[key]


def _autocast(device: str, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` (matrix products in bf16 with fp32 accumulation) when ``enabled``."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def _exact_values(
    sg: TorchGraph, feeds: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], capture: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The fp32 forward of a segment, without gradients: what bf16 probe passes read values from."""
    with torch.no_grad():
        return sg.forward({**{n: v.detach() for n, v in feeds.items()}, **params}, capture=list(capture))


def _row_gathers(
    model: ir.Model, segments: Sequence[Segment], readers: Mapping[str, list[int]]
) -> dict[str, list[str]]:
    """Weights read in exactly two segments, in the first only as the table of axis-0 ``Gather`` s (an embedding
    tied to a head) whose indices are graph inputs or made in that segment (its forward sees them): weight →
    the index tensors of those Gathers."""
    nodes = list(model.graph)
    inputs = {v.name for v in model.graph.inputs}
    out: dict[str, list[str]] = {}
    for w, segs in readers.items():
        if len(segs) != 2:
            continue
        first = nodes[segments[segs[0]].nodes[0] : segments[segs[0]].nodes[1]]
        if any(n.op_type in ("If", "Loop", "Scan") for n in first):  # (a body might read it unseen)
            continue
        made = {v.name for n in first for v in n.outputs}
        uses = [n for n in first if any(v is not None and v.name == w for v in n.inputs)]
        ok = uses and all(
            n.op_type == "Gather" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2 and n.inputs[0] is not None
            and n.inputs[0].name == w and n.inputs[1] is not None and n.inputs[1].name != w
            and (n.inputs[1].name in inputs or n.inputs[1].name in made)
            and (n.attributes["axis"].as_int() if "axis" in n.attributes else 0) == 0
            for n in uses
        )
        if ok:
            out[w] = sorted({n.inputs[1].name for n in uses})  # type: ignore[union-attr]
    return out


def _read_rows(indices: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """The distinct rows of an ``n``-row table that these Gather indices read (negative ones count from the end)."""
    flat = torch.cat([i.reshape(-1).to(torch.int64) for i in indices]) if indices else torch.zeros(0, dtype=torch.int64)
    return torch.unique(torch.where(flat < 0, flat + n, flat))


def _square_(g: torch.Tensor) -> torch.Tensor:
    """``g * g``, in ``g``'s memory unless its elements overlap (an expanded tensor)."""
    try:
        return g.mul_(g)
    except RuntimeError:
        return g * g


def _detached(res: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: res[n].detach() for n in names if n in res}


def _produced(model: ir.Model, seg: Segment) -> list[str]:
    nodes = list(model.graph)[seg.nodes[0] : seg.nodes[1]]
    return [v.name for n in nodes for v in n.outputs if v.name]


def _segment_of_nodes(model: ir.Model, segments: Sequence[Segment]) -> dict[str, int]:
    out: dict[str, int] = {}
    nodes = list(model.graph)
    for seg in segments:
        for n in nodes[seg.nodes[0] : seg.nodes[1]]:
            out[n.name] = seg.index
    return out


def _weight_dependent(model: ir.Model, sources: set[str]) -> dict[str, bool]:
    """Tensor name → whether it depends on any of ``sources`` (gradients only flow along these)."""
    dep = dict.fromkeys(sources, True)
    for node in model.graph:
        d = any(dep.get(v.name, False) for v in node.inputs if v is not None)
        for v in node.outputs:
            dep[v.name] = d or dep.get(v.name, False)
    return dep


def _score_ready(
    model: ir.Model,
    pending: list[WeightNode],
    diag: dict[str, torch.Tensor],
    act_done: set[str],
    act_tensors: Sequence[str],
    rows: dict[str, NodeSensitivity],
    fmts: Sequence[str],
    config: AnalysisConfig,
    act_term: Mapping[tuple[str, str], float],
    act_elements: set[str],
    module_paths: Mapping[str, str],
    hess: Mapping[str, np.ndarray],
    want_h: bool,
    rounding: str,
    groups: Mapping[str, str],
) -> list[WeightNode]:
    """Score the pending nodes whose weight diagonal and activation term are final; return the rest.

    A tied group is scored together (its rows are only complete as a group). Diagonals no pending
    node needs any more are dropped.
    """
    from lpcompile.analysis.rounded import predict_rounded_losses
    from lpcompile.analysis.sensitivity import predict_losses
    from lpcompile.formats import split_candidate

    acts = set(act_tensors) | {t for t, _ in act_term}
    ready = [n for n in pending if n.weight in diag and (n.activation not in acts or n.activation in act_done)]
    if not ready:
        return pending
    rounded = rounding not in ("nearest",) or any(split_candidate(c)[1] for c in fmts)
    # round to nearest reads float32 diagonals (no float64 copy of a 28M-weight table)
    d64 = Float64Diagonals(
        {n.weight: diag[n.weight] for n in ready}, {n.weight: n.shape for n in ready}, widen=rounded
    )
    if rounded:
        scored, _ = predict_rounded_losses(
            model, ready, fmts, d64, act_term, act_elements, module_paths,
            hessians=hess if want_h else None, default_rounding=rounding, kron=True, keep_weights=False,
        )
    else:
        scored = predict_losses(model, ready, fmts, config, d64, act_term, act_elements, module_paths)
    for row in scored:
        rows[row.name] = replace(row, group=groups.get(row.name, row.group))
    for n in ready:
        release_data(model.graph.initializers[n.weight].const_value)
    rest = [n for n in pending if n.name not in rows]
    still = {n.weight for n in rest}
    for w in [w for w in diag if w not in still]:
        del diag[w]
    return rest

"""Observing intermediate tensors in ONNX Runtime: activation ranges (amax) for activation formats.

The named tensors are exposed as extra graph outputs. When the model already declares a type for
a tensor (graph input/output or ``value_info``) that declaration is reused; otherwise the output is
declared *without* a type and ONNX Runtime infers it (checked on ORT 1.31: this is more robust than
guessing FLOAT, which breaks on integer or bf16 tensors, and needs no shape inference pass, which
cannot run on models beyond the 2 GB protobuf limit). Runs use ``"exact"`` numerics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.errors import CalibrationError

from .ort import make_session, prepare_inputs, run

logger = logging.getLogger(__name__)


def _as_proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model) if isinstance(model, ir.Model) else model


def _graph_tensor_names(graph: onnx.GraphProto) -> tuple[set[str], set[str], set[str]]:
    inputs = {i.name for i in graph.input}
    inits = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer if t.values.name}
    produced = {o for n in graph.node for o in n.output if o}
    return inputs, inits, produced


def with_outputs(model: onnx.ModelProto | ir.Model, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the named node-produced tensors."""
    proto = onnx.ModelProto()
    proto.CopyFrom(_as_proto(model))
    graph = proto.graph
    existing = {o.name for o in graph.output}
    declared = {vi.name: vi for vi in graph.value_info}
    for name in tensors:
        if name in existing:
            continue
        if name in declared and declared[name].type.HasField("tensor_type"):
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(declared[name])
            graph.output.append(vi)
        else:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        existing.add(name)
    return proto


def _classify(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split names into (graph inputs, initializers, node outputs); unknown names raise."""
    inputs, inits, produced = _graph_tensor_names(model.graph)
    unknown = [t for t in tensors if t not in inputs and t not in inits and t not in produced]
    if unknown:
        raise CalibrationError(f"tensor(s) not in the main graph: {', '.join(unknown)}")
    from_inputs = [t for t in tensors if t in inputs]
    from_inits = [t for t in tensors if t in inits and t not in inputs]
    from_nodes = [t for t in tensors if t in produced and t not in inputs]
    return from_inputs, from_inits, from_nodes


def _initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    raise CalibrationError(f"initializer {name!r} not found")


def _finite_amax(a: np.ndarray) -> float:
    x = np.abs(np.asarray(a).astype(np.float64, copy=False)).ravel()
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else 0.0


def collect_tensors(
    model: onnx.ModelProto | ir.Model,
    batch: Mapping[str, np.ndarray],
    tensors: Sequence[str],
) -> dict[str, np.ndarray]:
    """The values of the named tensors (graph inputs, initializers or node outputs) on one batch."""
    proto = _as_proto(model)
    from_inputs, _, from_nodes = _classify(proto, tensors)
    out: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    if from_nodes:
        session = make_session(with_outputs(proto, from_nodes), numerics="exact")
        values = run(session, batch, outputs=from_nodes)
    elif from_inputs:
        prepare_inputs(make_session(proto, numerics="exact"), batch)  # validates the batch
    for name in tensors:
        if name in values:
            out[name] = values[name]
        elif name in from_inputs:
            out[name] = np.asarray(batch[name])
        else:
            out[name] = _initializer_array(proto, name)
    return out


def collect_amax(
    model: onnx.ModelProto | ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    tensors: Sequence[str],
) -> dict[str, float]:
    """Max |x| over the finite values of each named tensor across all batches.

    Streams: only running maxima are kept, never the tensors themselves. A tensor with no finite
    value (or no batches at all) gets 0.0 and a warning.

    Args:
        model: the model (fp32 reference usually).
        batches: input batches, e.g. ``lpcompile.frontend.calib.batches(calib, 8)``.
        tensors: names of graph inputs, initializers or node outputs of the main graph.

    Returns:
        ``{name: amax}`` in the order of ``tensors``.
    """
    proto = _as_proto(model)
    from_inputs, from_inits, from_nodes = _classify(proto, tensors)
    amax = {t: 0.0 for t in tensors}
    for name in from_inits:
        amax[name] = _finite_amax(_initializer_array(proto, name))
    session = make_session(with_outputs(proto, from_nodes) if from_nodes else proto, numerics="exact")
    seen_batches = 0
    for batch in batches:
        seen_batches += 1
        if from_nodes:
            values = run(session, batch, outputs=from_nodes)
        else:
            values = {}
            prepare_inputs(session, batch)  # validates the batch
        for name in from_inputs:
            amax[name] = max(amax[name], _finite_amax(batch[name]))
        for name in from_nodes:
            amax[name] = max(amax[name], _finite_amax(values[name]))
    if seen_batches == 0 and (from_inputs or from_nodes):
        logger.warning("collect_amax: no batches; activation ranges are 0")
    zero = [t for t in tensors if amax[t] == 0.0 and t not in from_inits]
    if zero and seen_batches:
        logger.warning("collect_amax: no finite non-zero value seen for %s", ", ".join(zero))
    return amax

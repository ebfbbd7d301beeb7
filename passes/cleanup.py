"""Tidy a rewritten graph without touching the rounding it was rewritten for.

Rules, applied to a fixed point in the main graph:

1. **No-op casts**: ``Cast(to=T)`` of a value already of type ``T`` is dropped.
2. **Exact round trips**: ``Cast(to=T0)(Cast(to=T1)(z))`` with ``z`` of type ``T0`` is ``z``
   when ``T1`` represents every ``T0`` value exactly (bf16/fp16/fp8 → fp32 → back, fp32 → fp64
   → fp32, ...). This is also what makes a second bf16 round trip on an already rounded tensor
   vanish. ``fp32 → bf16 → fp32`` is *not* exact and is never touched.
3. **Repeated Q/DQ**: ``QuantizeLinear(DequantizeLinear(q, s, zp), s, zp)`` with the same scale
   and zero point (same values, same ``axis``/``block_size``, saturating) and an fp32 scale
   within [2⁻¹⁰⁰, 2¹⁰⁰] gives back ``q`` exactly, so the second quantization is dropped.
4. **Duplicates**: Cast / QuantizeLinear / DequantizeLinear nodes with identical inputs and
   attributes are merged (one round trip per tensor and type); small constant inputs (scales,
   zero points) count as identical when their contents are.
5. **Dead code**: unused nodes and initializers are removed (onnx_ir's RemoveUnusedNodesPass).
6. **Stale value info**: the recorded type/shape of an intermediate value that ONNX shape inference
   contradicts (another element type or rank, or another fixed dim) is replaced by the inferred
   one, so the written model passes ``onnx.checker.check_model(full_check=True)``. Values that
   inference cannot reach (custom-domain ops) keep what they have.

Graph outputs are never renamed or removed: a rule that would replace a graph output is skipped.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lpcompile.passes._common import cast_to, is_onnx_op

logger = logging.getLogger(__name__)

_FLOATS_8 = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2)
# T0 -> types that hold every T0 value exactly.
_EXACT_WIDENING: dict[ir.DataType, tuple[ir.DataType, ...]] = {
    ir.DataType.FLOAT8E4M3FN: (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.FLOAT8E5M2: (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.FLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.BFLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
    ir.DataType.FLOAT: (ir.DataType.DOUBLE,),
}
_CSE_OPS = ("Cast", "QuantizeLinear", "DequantizeLinear")
_MAX_ROUNDS = 20
_CONST_KEY_LIMIT = 4096  # constants up to this many elements are compared by content


class CleanupPass(ir.passes.InPlacePass):
    """Fold no-op casts, exact round trips and repeated Q/DQ; merge duplicates; drop dead code."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for _ in range(_MAX_ROUNDS):
            changed = _fold_casts(graph)
            changed |= _fold_requantize(graph)
            changed |= _merge_duplicates(graph)
            changed |= RemoveUnusedNodesPass()(model).modified
            modified |= changed
            if not changed:
                break
        modified |= refresh_value_info(model)
        return ir.passes.PassResult(model, modified)


_INFER_INLINE_LIMIT = 4096  # initializers with more elements reach shape inference as typed inputs


def _type_key(value_type: onnx.TypeProto) -> tuple[int, tuple[int | str | None, ...] | None] | None:
    if not value_type.HasField("tensor_type"):
        return None
    t = value_type.tensor_type
    if not t.HasField("shape"):
        return (t.elem_type, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return (t.elem_type, dims)


def _conflicts(have: ir.Value, inferred: tuple[int, tuple[int | str | None, ...] | None]) -> bool:
    elem, dims = inferred
    if have.dtype is not None and elem and int(have.dtype) != elem:
        return True
    if have.shape is None or dims is None:
        return False
    if len(have.shape) != len(dims):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(have.shape, dims, strict=True))


def refresh_value_info(model: ir.Model) -> bool:
    """Replace the type/shape of intermediate values that shape inference contradicts (rule 6).

    Returns:
        True when a value's type or shape changed.
    """
    proto = ir.to_proto(model)
    graph = proto.graph
    del graph.value_info[:]
    _cut_constant_subgraphs(model, proto)
    large = [t for t in graph.initializer if np.prod(t.dims, dtype=np.int64) > _INFER_INLINE_LIMIT]
    if large:
        names = {t.name for t in large}
        declared = {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name not in names]
        for t in large:
            if t.name not in declared:
                graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del graph.initializer[:]
        graph.initializer.extend(kept)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: leave the model as it is
        logger.debug("shape inference failed, value info left as is: %s", exc)
        return False
    found = {vi.name: key for vi in inferred.graph.value_info if (key := _type_key(vi.type)) is not None}
    changed = False
    for node in model.graph:
        for value in node.outputs:
            key = found.get(value.name)
            if key is None or value.is_graph_output() or (value.dtype is None and value.shape is None):
                continue
            if _conflicts(value, key):
                logger.debug("stale value info on %r replaced by the inferred type/shape", value.name)
                value.dtype = ir.DataType(key[0]) if key[0] else value.dtype
                value.shape = ir.Shape(list(key[1])) if key[1] is not None else None
                changed = True
    return changed


def _cut_constant_subgraphs(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Hand shape inference the outputs of constant subgraphs (weight decodes) as typed graph inputs.

    ONNX shape inference with ``data_prop`` evaluates constant subgraphs on the weights: a table decode
    of one 576×1536 weight cost ~110 MB and ~1 s (SmolLM2 with a grammar format ran out of memory at
    15.9 GB). The rewrite typed those outputs itself, so they are not what this refresh checks: nodes
    whose inputs are all initializers or outputs of such nodes are dropped from ``proto`` (a copy), and
    each of their outputs read by the rest of the graph becomes an input with the value's own type and
    shape. Nothing is cut when one of those outputs has no known type and shape.
    """
    const: set[str] = set()
    cut: list[int] = []
    for i, node in enumerate(model.graph):
        ins = [v for v in node.inputs if v is not None]
        if ins and all(v.const_value is not None or (v.name in const) for v in ins) and not node.attributes.get(
            "body"
        ):
            cut.append(i)
            const.update(o.name for o in node.outputs if o.name)
    if not cut:
        return
    cut_set = set(cut)
    boundary: dict[str, ir.Value] = {}
    for i, node in enumerate(model.graph):
        if i in cut_set:
            continue
        for v in node.inputs:
            if v is not None and v.name in const:
                boundary[v.name] = v
    for v in model.graph.outputs:
        if v.name in const:
            boundary[v.name] = v
    if any(v.dtype is None or v.shape is None for v in boundary.values()):
        return
    kept = [n for i, n in enumerate(proto.graph.node) if i not in cut_set]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    declared = {i.name for i in proto.graph.input}
    for name, v in boundary.items():
        if name not in declared:
            dims = [d if isinstance(d, int) else str(d) for d in v.shape]  # type: ignore[union-attr]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, int(v.dtype), dims))  # type: ignore[arg-type]
    used = {x for n in proto.graph.node for x in n.input} | {o.name for o in proto.graph.output}
    live = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(live)


def _replace(value: ir.Value, replacement: ir.Value) -> bool:
    """Point every user of ``value`` at ``replacement`` (not for graph outputs)."""
    if value is replacement or value.is_graph_output() or not value.uses():
        return False
    value.replace_all_uses_with(replacement)
    return True


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    """The value's element type, from its type info or (when missing) from its producer."""
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    producer = value.producer()
    if producer is None:
        return None
    to = cast_to(producer)
    if to is not None:
        return to
    if is_onnx_op(producer, "DequantizeLinear") and len(producer.inputs) > 1:
        return _dtype(producer.inputs[1])
    if is_onnx_op(producer, "QuantizeLinear") and len(producer.inputs) > 2:
        return _dtype(producer.inputs[2])
    return None


def _fold_casts(graph: ir.Graph) -> bool:
    changed = False
    for node in list(graph):
        to = cast_to(node)
        if to is None or node.inputs[0] is None:
            continue
        src = node.inputs[0]
        if _dtype(src) == to:
            changed |= _replace(node.outputs[0], src)
            continue
        inner = src.producer()
        inner_to = cast_to(inner) if inner is not None else None
        if inner is None or inner_to is None or inner.inputs[0] is None:
            continue
        z = inner.inputs[0]
        if _dtype(z) == to and inner_to in _EXACT_WIDENING.get(to, ()):
            changed |= _replace(node.outputs[0], z)
    return changed


def _same_constant(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is b:
        return True
    if a is None or b is None or a.const_value is None or b.const_value is None:
        return False
    if a.dtype != b.dtype:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.shape == y.shape and x.tobytes() == y.tobytes()


def _attrs(node: ir.Node, names: tuple[str, ...]) -> tuple:
    out = []
    for name in names:
        attr = node.attributes.get(name)
        out.append(None if attr is None else repr(attr.value))
    return tuple(out)


def _fold_requantize(graph: ir.Graph) -> bool:
    changed = False
    for node in list(graph):
        if not is_onnx_op(node, "QuantizeLinear") or len(node.inputs) < 3 or node.inputs[0] is None:
            continue
        dq = node.inputs[0].producer()
        if dq is None or not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
            continue
        q_scale, q_zp = node.inputs[1], node.inputs[2]
        if not (_same_constant(q_scale, dq.inputs[1]) and _same_constant(q_zp, dq.inputs[2])):
            continue
        if _attrs(node, ("axis", "block_size")) != _attrs(dq, ("axis", "block_size")):
            continue
        sat = node.attributes.get("saturate")
        if sat is not None and sat.as_int() == 0 and q_zp is not None and q_zp.dtype in _FLOATS_8:
            continue
        if q_scale is None or q_scale.dtype != ir.DataType.FLOAT or q_scale.const_value is None:
            continue
        s = np.abs(np.asarray(q_scale.const_value.numpy(), dtype=np.float64))
        if s.size == 0 or s.min() < 2.0**-100 or s.max() > 2.0**100:
            continue
        out_dtype = node.attributes.get("output_dtype")
        codes = dq.inputs[0]
        if out_dtype is not None and out_dtype.as_int() not in (0, int(_dtype(codes) or 0)):
            continue
        changed |= _replace(node.outputs[0], codes)
    return changed


def _input_key(value: ir.Value | None) -> tuple:
    """Identity of an input for merging: small constant initializers by content, others by object."""
    if (
        value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and value.const_value is not None
        and value.const_value.size <= _CONST_KEY_LIMIT
    ):
        arr = value.const_value.numpy()
        return ("const", int(value.const_value.dtype), tuple(arr.shape), arr.tobytes())
    return ("value", id(value))


def _merge_duplicates(graph: ir.Graph) -> bool:
    changed = False
    seen: dict[tuple, ir.Node] = {}
    for node in list(graph):
        if not is_onnx_op(node, _CSE_OPS) or len(node.outputs) != 1:
            continue
        key = (
            node.op_type,
            tuple(_input_key(v) for v in node.inputs),
            tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items())),
        )
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if _replace(node.outputs[0], first.outputs[0]):
            changed = True
    return changed

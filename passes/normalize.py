"""Bring every weight into one form: ``MatMul(x, W[K, N])`` (+ ``Add``) instead of ``Gemm``.

Rewrites, in the main graph:

* ``Constant`` nodes (with a ``value`` tensor) that feed the weight input of a MatMul / Gemm /
  Conv (or a Gemm's ``C``) become initializers named after their output, so they are weights
  the plan can assign formats to.
* ``Gemm(A, B, C?, alpha, beta, transA=0, transB)`` with ``B`` a float32 initializer becomes
  ``MatMul(A, B')`` named like the Gemm (the plan refers to it) with ``B' = alpha·Bᵀ`` (``Bᵀ``
  only when ``transB``; ``alpha·`` only when ``alpha != 1``), followed by
  ``Add(·, beta·C)`` named ``<gemm>/bias`` when ``C`` is present and ``beta != 0``. The last node
  keeps the Gemm's output value (name and graph-output status unchanged). ``B'`` replaces ``B``
  in place (same name) when every user of ``B`` is rewritten the same way, otherwise it is a new
  initializer ``<B>_mm`` shared by all Gemms that need the same transform. A constant ``C``
  scaled by ``beta != 1`` becomes a new initializer ``<C>_beta``; a dynamic ``C`` is scaled by a
  ``Mul`` node ``<gemm>/beta``.
* ``Gemm`` with ``transA=1`` is left alone (logged as a warning).
* A ``Gemm(transB=1, alpha=1)`` whose ``B`` is also a ``Gather`` table (a tied embedding /
  head) becomes ``MatMul(A, Transpose(B))`` (node ``<gemm>/weight_t``): ``B`` stays one
  initializer, so the tie survives (:mod:`lpcompile.graph` reads the MatMul through the
  Transpose).
* Weights reached through constant subgraphs are folded into initializers: the weight input of
  a MatMul / Gemm / Conv / ConvTranspose (input 1) or Gather (input 0) computed from
  ``Constant``, ``ConstantOfShape``, ``Cast``, ``Transpose``, ``Reshape``, ``Identity``,
  ``Squeeze``, ``Unsqueeze`` or ``Flatten`` of initializers and constants becomes an initializer
  named after the folded value (numpy, exact: casts of fp16/bf16 to fp32 widen exactly). Not
  folded: nodes the rewrite passes inserted (``lpcompile.serves``), a ``Transpose(perm=[1,0])``
  of an initializer read by a MatMul when the initializer has other users (a tied head), and
  anything that reads a graph input or a quantized tensor.
* A MatMul weight ``[D, V]`` that is exactly the transpose of a Gather table ``[V, D]`` (what
  ``torch.onnx.export`` writes for an output head tied to its embedding: it folds the
  transpose into a second initializer) is replaced by ``Transpose(table)`` (node
  ``<matmul>/weight_t``): the tie is restored, one copy is stored, and the head and the table
  get one decision.

Numerics: ``(alpha·B)`` is rounded once in fp32 instead of scaling the product; otherwise the
result only differs from the Gemm by fp32 summation order.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lpcompile.passes._common import (
    SERVES_KEY,
    Namer,
    add_initializer,
    float_initializer,
    is_onnx_op,
    make_node,
    remove_if_unused,
)

logger = logging.getLogger(__name__)

_WEIGHT_INPUTS = {"MatMul": (1,), "Conv": (1,), "Gemm": (1, 2)}


class NormalizeWeightsPass(ir.passes.InPlacePass):
    """Gemm → MatMul(+Add) and weight ``Constant`` → initializer (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        lifted = _lift_weight_constants(graph)
        converted = _convert_gemms(graph, namer)
        folded = fold_weight_subgraphs(graph, namer)
        retied = retie_transposed_tables(graph, namer)
        modified = bool(lifted or converted or folded or retied)
        if modified:
            logger.info(
                "normalised weights: %d constant(s) lifted, %d Gemm(s) rewritten, %d weight subgraph(s) folded, "
                "%d head(s) re-tied to their embedding table",
                lifted,
                converted,
                folded,
                retied,
            )
        return ir.passes.PassResult(model, modified)


def _lift_weight_constants(graph: ir.Graph) -> int:
    count = 0
    for node in list(graph):
        for idx in _weight_constant_inputs(node):
            value = node.inputs[idx]
            producer = value.producer()
            if producer is None:  # lifted already (shared by an earlier node)
                continue
            tensor = producer.attributes["value"].as_tensor()
            name = value.name or ""
            # Detach the value from the Constant node: create the initializer under the same name.
            init = ir.Value(name=None, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
            value.replace_all_uses_with(init)
            graph.remove(producer, safe=True)
            value.name = None
            init.name = name
            init.const_value = ir.tensor(np.asarray(tensor.numpy()), name=name)
            graph.register_initializer(init)
            count += 1
    return count


def needs_normalization(model: ir.Model) -> bool:
    """Whether :class:`NormalizeWeightsPass` would change ``model``."""
    return any(
        _gemm_candidate(node, warn=False) or _weight_constant_inputs(node) or _foldable_weight_inputs(node)
        for node in model.graph
    ) or bool(_retie_pairs(model.graph))


def _weight_constant_inputs(node: ir.Node) -> list[int]:
    if not is_onnx_op(node, tuple(_WEIGHT_INPUTS)):
        return []
    out = []
    for idx in _WEIGHT_INPUTS[node.op_type]:
        value = node.inputs[idx] if idx < len(node.inputs) else None
        producer = value.producer() if value is not None else None
        if producer is None or not is_onnx_op(producer, "Constant") or value.is_graph_output():
            continue
        if producer.attributes.get("value") is None or len(producer.attributes) != 1:
            continue
        out.append(idx)
    return out


def _gemm_candidate(node: ir.Node, warn: bool = True) -> bool:
    if not is_onnx_op(node, "Gemm") or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    if not float_initializer(node.inputs[1]) or len(node.inputs[1].shape or ()) != 2:
        return False
    if _int_attr(node, "transA", 0):
        if warn:
            logger.warning("Gemm %r has transA=1: left as Gemm (its weight is not normalised)", node.name)
        return False
    return True


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def _weight_key(node: ir.Node) -> tuple[int, float, int]:
    return (id(node.inputs[1]), _float_attr(node, "alpha", 1.0), _int_attr(node, "transB", 0))


def _convert_gemms(graph: ir.Graph, namer: Namer) -> int:
    gemms = [n for n in graph if _gemm_candidate(n)]
    if not gemms:
        return 0
    # One transformed weight per (B, alpha, transB), shared by every Gemm that needs it.
    transformed: dict[tuple[int, float, int], ir.Value] = {}
    users_by_key: dict[tuple[int, float, int], list[ir.Node]] = {}
    for node in gemms:
        users_by_key.setdefault(_weight_key(node), []).append(node)
    for key, nodes in users_by_key.items():
        b = nodes[0].inputs[1]
        _, alpha, trans_b = key
        if alpha == 1.0 and not trans_b:
            transformed[key] = b
            continue
        users = {id(u.node) for u in b.uses()}
        if users == {id(n) for n in nodes} and _streamed(b):  # a big model: transform on access, never held
            b.const_value = _lazy_gemm_weight(b.const_value, alpha, bool(trans_b), b.name or "")
            b.shape = ir.Shape(b.const_value.shape)
            transformed[key] = b
            continue
        new = _gemm_weight(np.asarray(b.const_value.numpy()), alpha, bool(trans_b))
        if users == {id(n) for n in nodes}:
            b.const_value = ir.tensor(new, name=b.name)
            b.shape = ir.Shape(new.shape)
            transformed[key] = b
        elif trans_b and alpha == 1.0 and _gathered(b):  # keep the tie: one table, read through a Transpose
            transformed[key] = _transpose_node(graph, namer, b, nodes[0])
        else:
            transformed[key] = add_initializer(graph, namer, f"{b.name}_mm", new)
    for node in gemms:
        _rewrite_gemm(graph, namer, node, transformed[_weight_key(node)])
    return len(gemms)


def _gemm_weight(arr: np.ndarray, alpha: float, trans_b: bool) -> np.ndarray:
    """The MatMul weight of a Gemm: ``alpha · B`` (transposed with ``transB``), float32, C-contiguous."""
    new = np.asarray(arr, dtype=np.float32)
    new = new.T if trans_b else new
    if alpha != 1.0:
        new = (np.float32(alpha) * new).astype(np.float32)
    return np.ascontiguousarray(new)


def _streamed(value: ir.Value) -> bool:
    from lpcompile.frontend.onnx_io import StreamedTensor

    return isinstance(value.const_value, StreamedTensor)


def _lazy_gemm_weight(src: ir.TensorProtocol, alpha: float, trans_b: bool, name: str) -> ir.LazyTensor:
    """:func:`_gemm_weight` of a weight streamed from its file, computed each time it is read (not cached),
    so a big model's Gemm weights are never all in memory at once."""
    dims = [int(d) for d in src.shape]
    shape = ir.Shape(dims[::-1] if trans_b else dims)
    return ir.LazyTensor(
        lambda: ir.tensor(_gemm_weight(src.numpy(), alpha, trans_b), name=name),
        dtype=ir.DataType.FLOAT,
        shape=shape,
        name=name,
    )


def _rewrite_gemm(graph: ir.Graph, namer: Namer, node: ir.Node, weight: ir.Value) -> None:
    a = node.inputs[0]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    beta = _float_attr(node, "beta", 1.0)
    out = node.outputs[0]
    name = node.name or ""
    n = int(weight.shape[1])
    m_dim = a.shape[0] if a.shape is not None and len(a.shape) == 2 else None
    out_shape = ir.Shape([m_dim, n])
    dtype = out.dtype or ir.DataType.FLOAT
    new_nodes: list[ir.Node] = []
    old_b = node.inputs[1]
    use_bias = c is not None and beta != 0.0
    mm_out_name = namer.value(f"{out.name}_matmul") if use_bias else namer.value(f"{out.name}_tmp")
    mm = make_node("MatMul", [a, weight], None, name=name, out_name=mm_out_name, out_dtype=dtype, out_shape=out_shape)
    new_nodes.append(mm)
    last = mm.outputs[0]
    if use_bias:
        assert c is not None
        bias = c
        if beta != 1.0:
            if c.const_value is not None and c.is_initializer():
                scaled = (np.float32(beta) * np.asarray(c.const_value.numpy(), dtype=np.float32)).astype(np.float32)
                bias = add_initializer(graph, namer, f"{c.name}_beta", scaled)
            else:
                beta_v = add_initializer(graph, namer, f"{name}_beta", np.array(beta, dtype=np.float32))
                mul = make_node(
                    "Mul",
                    [c, beta_v],
                    None,
                    name=namer.node(f"{name}/beta"),
                    out_name=namer.value(f"{c.name}_beta"),
                    out_dtype=dtype,
                    out_shape=c.shape,
                )
                new_nodes.append(mul)
                bias = mul.outputs[0]
        add = make_node(
            "Add",
            [last, bias],
            None,
            name=namer.node(f"{name}/bias"),
            out_name=namer.value(f"{out.name}_bias"),
            out_dtype=dtype,
            out_shape=out_shape,
        )
        new_nodes.append(add)
        last = add.outputs[0]
    # Keep the Gemm's output name (downstream names and graph outputs stay as they were).
    out_name = out.name
    out_type, out_shp = out.type, out.shape
    graph.insert_before(node, new_nodes)
    out.replace_all_uses_with(last, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = None
    last.name = out_name
    if out_type is not None:
        last.type = out_type
    if out_shp is not None:
        last.shape = out_shp
    mm.metadata_props.update(dict(node.metadata_props))
    if node.doc_string:
        mm.doc_string = node.doc_string
    if old_b is not weight:
        remove_if_unused(graph, old_b)
    if c is not None:
        remove_if_unused(graph, c)


def _gathered(b: ir.Value) -> bool:
    """Whether ``b`` is also an embedding table (input 0 of a Gather)."""
    return any(is_onnx_op(u.node, "Gather") and u.idx == 0 for u in b.uses())


def _transpose_node(graph: ir.Graph, namer: Namer, b: ir.Value, first: ir.Node) -> ir.Value:
    shape = [int(d) for d in b.shape] if b.shape is not None else None
    t = make_node(
        "Transpose",
        [b],
        {"perm": [1, 0]},
        name=namer.node(f"{first.name}/weight_t"),
        out_name=namer.value(f"{b.name}_t"),
        out_dtype=b.dtype or ir.DataType.FLOAT,
        out_shape=shape[::-1] if shape else None,
    )
    graph.insert_before(first, [t])
    return t.outputs[0]


# ---------------------------------------------------------------------------------------------
# Constant weight subgraphs
# ---------------------------------------------------------------------------------------------

_FOLD_WEIGHT_INPUTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
_FOLDABLE = (
    "Constant",
    "ConstantOfShape",
    "Cast",
    "Transpose",
    "Reshape",
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
)
_MAX_DEPTH = 8


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    attrs = node.attributes
    if len(attrs) != 1:
        return None
    (name, attr), *_ = attrs.items()
    if name == "value":
        return np.asarray(attr.as_tensor().numpy())
    if name == "value_float":
        return np.asarray(attr.as_float(), dtype=np.float32)
    if name == "value_floats":
        return np.asarray(list(attr.as_floats()), dtype=np.float32)
    if name == "value_int":
        return np.asarray(attr.as_int(), dtype=np.int64)
    if name == "value_ints":
        return np.asarray(list(attr.as_ints()), dtype=np.int64)
    return None


def _ints_input(node: ir.Node, idx: int, depth: int) -> list[int] | None:
    if len(node.inputs) <= idx or node.inputs[idx] is None:
        return None
    arr = _fold_value(node.inputs[idx], depth + 1)
    return None if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]


def _fold_value(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The numpy value of ``value`` when it is computed from constants only (None otherwise)."""
    if value is None or depth > _MAX_DEPTH or value.is_graph_input():
        return None
    if value.is_initializer():
        return None if value.const_value is None else np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None or not is_onnx_op(node, _FOLDABLE) or SERVES_KEY in node.metadata_props:
        return None
    op = node.op_type
    if op == "Constant":
        return _constant_attr(node)
    if op == "ConstantOfShape":
        shape = _ints_input(node, 0, depth)
        if shape is None:
            return None
        attr = node.attributes.get("value")
        fill = np.asarray(attr.as_tensor().numpy()).reshape(-1) if attr is not None else np.zeros(1, np.float32)
        return np.full(shape, fill[0], dtype=fill.dtype)
    x = _fold_value(node.inputs[0] if node.inputs else None, depth + 1)
    if x is None:
        return None
    if op == "Identity":
        return x
    if op == "Cast":
        to = ir.DataType(node.attributes.get_int("to", 0))
        if to not in _CAST_NUMPY:
            return None
        return x.astype(_CAST_NUMPY[to])
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return np.transpose(x, list(perm) if perm else None)
    if op == "Reshape":
        shape = _ints_input(node, 1, depth)
        if shape is None:
            return None
        if not node.attributes.get_int("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints_input(node, 1, depth) if len(node.inputs) > 1 else node.attributes.get_ints("axes", None)
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
        if axes is None:
            return None
        out_rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(a % out_rank for a in axes))
    if op == "Flatten":
        axis = node.attributes.get_int("axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    return None


def _cast_numpy() -> dict[ir.DataType, type]:
    import ml_dtypes

    return {
        ir.DataType.FLOAT: np.float32,
        ir.DataType.FLOAT16: np.float16,
        ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
        ir.DataType.DOUBLE: np.float64,
        ir.DataType.INT64: np.int64,
        ir.DataType.INT32: np.int32,
    }


_CAST_NUMPY = _cast_numpy()


def _is_tied_head(node: ir.Node, value: ir.Value) -> bool:
    """A MatMul reading ``Transpose(perm=[1,0])`` of an initializer that other nodes read too."""
    producer = value.producer()
    if not is_onnx_op(node, "MatMul") or producer is None or not is_onnx_op(producer, "Transpose"):
        return False
    src = producer.inputs[0] if producer.inputs else None
    if src is None or not src.is_initializer() or len(src.shape or ()) != 2:
        return False
    return len({id(u.node) for u in src.uses()}) > 1


def _is_float_array(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"


def _foldable_weight_inputs(node: ir.Node) -> list[int]:
    if not is_onnx_op(node, tuple(_FOLD_WEIGHT_INPUTS)):
        return []
    idx = _FOLD_WEIGHT_INPUTS[node.op_type]
    value = node.inputs[idx] if idx < len(node.inputs) else None
    if value is None or value.is_initializer() or value.is_graph_input() or value.is_graph_output():
        return []
    producer = value.producer()
    if producer is None or not is_onnx_op(producer, _FOLDABLE) or SERVES_KEY in producer.metadata_props:
        return []
    if is_onnx_op(producer, "Constant"):
        return []  # lifted by _lift_weight_constants (MatMul/Gemm/Conv) or folded below (others)
    if _is_tied_head(node, value):
        return []
    arr = _fold_value(value)
    if arr is None or not _is_float_array(arr):
        return []
    return [idx]


def fold_weight_subgraphs(graph: ir.Graph, namer: Namer) -> int:
    """Fold constant subgraphs feeding weight inputs into initializers (see the module docstring)."""
    count = 0
    folded: dict[int, ir.Value] = {}
    for node in list(graph):
        idxs = _foldable_weight_inputs(node)
        if not idxs and is_onnx_op(node, ("Gather", "ConvTranspose")):
            # Constant tables / ConvTranspose weights (not lifted by _lift_weight_constants)
            idx = _FOLD_WEIGHT_INPUTS[node.op_type]
            v = node.inputs[idx] if idx < len(node.inputs) else None
            p = v.producer() if v is not None else None
            if p is not None and is_onnx_op(p, "Constant") and SERVES_KEY not in p.metadata_props:
                arr = _fold_value(v)
                if arr is not None and _is_float_array(arr):
                    idxs = [idx]
        for idx in idxs:
            value = node.inputs[idx]
            if id(value) not in folded:
                arr = np.ascontiguousarray(_fold_value(value))
                folded[id(value)] = add_initializer(graph, namer, f"{value.name or 'weight'}_folded", arr)
            node.replace_input_with(idx, folded[id(value)])
            count += 1
    if count:
        _remove_dead(graph)
    return count


def _remove_dead(graph: ir.Graph) -> None:
    """Drop foldable nodes whose outputs nobody reads any more (repeatedly), and orphaned initializers."""
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if not is_onnx_op(node, _FOLDABLE) or SERVES_KEY in node.metadata_props:
                continue
            if any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            inputs = [v for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            for v in inputs:
                remove_if_unused(graph, v)
            changed = True


# ---------------------------------------------------------------------------------------------
# Heads tied to an embedding table
# ---------------------------------------------------------------------------------------------


def _retie_pairs(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value]]:
    """(MatMul, table) pairs whose MatMul weight equals the transpose of a Gather table."""
    tables: dict[tuple[int, int], list[ir.Value]] = {}
    for node in graph:
        if not is_onnx_op(node, "Gather") or not node.inputs or not float_initializer(node.inputs[0]):
            continue
        axis = node.attributes.get_int("axis", 0)
        t = node.inputs[0]
        if axis in (0, -2) and len(t.shape or ()) == 2:
            key = (int(t.shape[0]), int(t.shape[1]))
            if all(x is not t for x in tables.setdefault(key, [])):
                tables[key].append(t)
    if not tables:
        return []
    out = []
    for node in graph:
        if not is_onnx_op(node, "MatMul") or len(node.inputs) < 2 or not float_initializer(node.inputs[1]):
            continue
        w = node.inputs[1]
        if len(w.shape or ()) != 2:
            continue
        for t in tables.get((int(w.shape[1]), int(w.shape[0])), []):
            if t is w or t.dtype != w.dtype:
                continue
            tw, ww = t.const_value.numpy(), w.const_value.numpy()
            if tw[0, :4].tolist() == ww[:4, 0].tolist() and np.array_equal(tw.T, ww):
                out.append((node, t))
                break
    return out


def retie_transposed_tables(graph: ir.Graph, namer: Namer) -> int:
    """Read a head that is a transposed copy of an embedding table through ``Transpose(table)``."""
    pairs = _retie_pairs(graph)
    transposed: dict[int, ir.Value] = {}
    for node, table in pairs:
        old = node.inputs[1]
        if id(table) not in transposed:
            transposed[id(table)] = _transpose_node(graph, namer, table, node)
        node.replace_input_with(1, transposed[id(table)])
        remove_if_unused(graph, old)
    if pairs:
        logger.info("re-tied %d head(s) to their embedding table (a transposed copy was stored)", len(pairs))
    return len(pairs)

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

Numerics: ``(alpha·B)`` is rounded once in fp32 instead of scaling the product; otherwise the
result only differs from the Gemm by fp32 summation order.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lpcompile.passes._common import (
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
        modified = bool(lifted or converted)
        if modified:
            logger.info("normalised weights: %d constant(s) lifted, %d Gemm(s) rewritten", lifted, converted)
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
    return any(_gemm_candidate(node, warn=False) or _weight_constant_inputs(node) for node in model.graph)


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
        arr = np.asarray(b.const_value.numpy(), dtype=np.float32)
        new = arr.T if trans_b else arr
        if alpha != 1.0:
            new = (np.float32(alpha) * new).astype(np.float32)
        new = np.ascontiguousarray(new)
        users = {id(u.node) for u in b.uses()}
        if users == {id(n) for n in nodes}:
            b.const_value = ir.tensor(new, name=b.name)
            b.shape = ir.Shape(new.shape)
            transformed[key] = b
        else:
            transformed[key] = add_initializer(graph, namer, f"{b.name}_mm", new)
    for node in gemms:
        _rewrite_gemm(graph, namer, node, transformed[_weight_key(node)])
    return len(gemms)


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

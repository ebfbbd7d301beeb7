"""W8A8 int8 Convs as ``QLinearConv`` chains on ONNX Runtime (target ``ort``).

A ``w8a8`` Conv (int8 per-channel weights, per-tensor int8 activations) is written by the weight and
activation passes with a per-channel DequantizeLinear weight and its input rounded per run::

    x ─ Q(s_x, int8 0) ─ DQ ─ Conv(W = DQ(Wq, ws, axis 0), b) ─ [Clip | Relu | MaxPool | Reshape | Flatten]* ─ z
    z ─ Q(s_z, int8 0) ─ DQ ─ (the next w8a8 node)

ONNX Runtime CPU has no int8 Conv faster than fp32 unless the Conv's *output* is quantized too
(``QLinearConv``; measured in :mod:`lpcompile.passes.targets`). Where the Conv's output reaches, through
ops that commute with rounding (Clip, Relu, MaxPool, Reshape, Flatten: monotone, and shape-only),
nothing but the activation rounding of later w8a8 nodes with one scale ``s_z``, rounding the Conv's
output with ``s_z`` is what the plan already does one step later: ``Q(clip(y)) = clip(Q(y))`` and
``Q(max(y)) = max(Q(y))`` for a monotone ``Q``. This pass writes that chain in the integer domain::

    x_u8 ─ QLinearConv(s_x, 128, Wq, ws, 0, s_z, 128, bias_i32) ─ Clip(u8) ─ MaxPool(u8) ─ … ─ z_u8 ─ DQ(s_z, 128)

so the next w8a8 Conv reads ``z_u8`` directly and ORT runs the chain as int8 kernels (NHWC, with
the layout transposes between consecutive ones cancelled). Activations are uint8 with zero point
128, the same rounding as int8 with zero point 0 shifted by 128 (ORT's u8s8 kernels are the fast
ones on x86). The only change to the numbers is the bias, stored as ``int32 round(b / (s_x·ws))``
as ``QLinearConv`` requires (an error of at most ``s_x·ws/2`` before the output rounding), and the
requantization's fp32 arithmetic. Convs whose output goes anywhere else (a residual ``Add``, a
pooling average, a graph output) keep the decoded-once form; with ``int8_residuals``,
:mod:`lpcompile.passes.qlinear_add` rounds the residual ``Add`` s' inputs first, so the Convs that
feed them join the chain and the sums become ``QLinearAdd``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lpcompile.passes._common import Namer, add_initializer, const_array, is_onnx_op
from lpcompile.passes.w8a8 import UINT8_ZERO_POINT, Uint8Quantizer

logger = logging.getLogger(__name__)

ZERO_POINT_U8 = UINT8_ZERO_POINT
_TRANSPARENT = ("Clip", "Relu", "MaxPool", "Reshape", "Flatten")


def zero_point_kind(value: ir.Value | None) -> int | None:
    """0 for a scalar int8 zero point 0 (the activation pass's), 128 for a scalar uint8 128 (the fused
    MatMul's and this pass's), else None."""
    z = const_array(value)
    if z is None or z.size != 1:
        return None
    zi = int(z.reshape(()))
    if z.dtype == np.int8 and zi == 0:
        return 0
    if z.dtype == np.uint8 and zi == ZERO_POINT_U8:
        return ZERO_POINT_U8
    return None


def scalar_scale(value: ir.Value | None) -> float | None:
    s = const_array(value)
    if s is None or s.size != 1 or not np.isfinite(s).all() or not float(s.reshape(())) > 0:
        return None
    return float(s.reshape(()))


@dataclass(frozen=True)
class _Act:
    """A per-tensor activation rounding feeding a node: ``DQ(q, scale, zp)``, zp int8 0 or uint8 128."""

    q: ir.Value
    scale: ir.Value
    step: float
    unsigned: bool


def activation_of(value: ir.Value | None) -> _Act | None:
    """``value = DQ(q, s, zp)`` with a positive scalar scale and zp int8 0 or uint8 128 (this pass's own)."""
    dq = value.producer() if value is not None else None
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    q, s, zp = dq.inputs[:3]
    kind, step = zero_point_kind(zp), scalar_scale(s)
    if q is None or s is None or step is None or kind is None:
        return None
    return _Act(q, s, step, unsigned=kind == ZERO_POINT_U8)


def rounded_from(act: _Act) -> ir.Value | None:
    """The float tensor an int8 activation rounding quantizes: ``x`` of ``Q(x, s, 0)`` with the same ``s``."""
    q = act.q.producer()
    if q is None or not is_onnx_op(q, "QuantizeLinear") or len(q.inputs) < 3:
        return None
    if scalar_scale(q.inputs[1]) != act.step or zero_point_kind(q.inputs[2]) != 0:
        return None
    return q.inputs[0]


def int8_conv_weight(value: ir.Value | None) -> tuple[ir.Value, ir.Value, np.ndarray] | None:
    """``(codes, scale, per-channel scales)`` of a per-channel int8 Conv weight ``DQ(codes, scale, axis=0)``
    (how :mod:`lpcompile.passes.targets` writes every ``w8a8`` weight on ``ort``); ``QLinearConv`` reads the
    same two initializers."""
    node = value.producer() if value is not None else None
    if node is None or not is_onnx_op(node, "DequantizeLinear") or node.attributes.get_int("block_size", 0):
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zp = const_array(node.inputs[2])
        if zp is None or np.any(zp != 0):
            return None
    codes_v, scale_v = node.inputs[0], node.inputs[1]
    codes, s = const_array(codes_v), const_array(scale_v)
    if codes is None or s is None or codes.dtype != np.int8 or codes.ndim < 3 or s.dtype != np.float32:
        return None
    cout = codes.shape[0]
    if s.size == 1:
        s = np.full(cout, float(s.reshape(())), np.float32)
    elif not (s.ndim == 1 and s.size == cout and node.attributes.get_int("axis", 1) == 0):
        return None
    if not (np.isfinite(s).all() and (s > 0).all()):
        return None
    return codes_v, scale_v, s  # type: ignore[return-value]


def is_transparent(node: ir.Node, data: ir.Value) -> bool:
    """An op that commutes with a monotone per-tensor rounding, with ``data`` as its rounded input."""
    if not is_onnx_op(node, _TRANSPARENT) or not node.inputs or node.inputs[0] is not data:
        return False
    if is_onnx_op(node, "Clip"):
        return all(v is None or (const_array(v) is not None and const_array(v).size == 1) for v in node.inputs[1:3])
    if is_onnx_op(node, "MaxPool"):
        return len(node.outputs) == 1 or not any(True for _ in node.outputs[1].uses())
    if is_onnx_op(node, "Reshape"):
        return len(node.inputs) > 1 and const_array(node.inputs[1]) is not None
    return True


@dataclass(frozen=True)
class Chain:
    """The transparent ops after a Conv, and the roundings (of one scale) that read their end."""

    ops: tuple[ir.Node, ...]
    scale: ir.Value
    step: float
    quantizers: tuple[ir.Node, ...]


def output_chain(conv: ir.Node) -> Chain | None:
    """The transparent ops after ``conv`` up to a tensor read only by int8 roundings of one scale.

    A rounding is ``QuantizeLinear`` with int8 zero point 0 read by ``DequantizeLinear`` s (the activation
    pass's form) or uint8 zero point 128 (the input of a fused ``MatMulIntegerToFloat``).
    """
    v = conv.outputs[0]
    ops: list[ir.Node] = []
    while True:
        if v.is_graph_output():
            return None
        uses = [u.node for u in v.uses()]
        if not uses:
            return None
        if all(is_onnx_op(u, "QuantizeLinear") and u.inputs[0] is v and len(u.inputs) > 2 for u in uses):
            steps = {scalar_scale(u.inputs[1]) for u in uses}
            step = steps.pop() if len(steps) == 1 else None
            if step is None:
                return None
            for u in uses:
                kind = zero_point_kind(u.inputs[2])
                if u.outputs[0].is_graph_output() or kind is None:
                    return None
                if kind == 0:  # int8: every reader must be a DequantizeLinear (rewired to the uint8 end)
                    for w in u.outputs[0].uses():
                        dq = w.node
                        if not is_onnx_op(dq, "DequantizeLinear") or w.idx != 0 or activation_of(dq.outputs[0]) is None:
                            return None
            return Chain(tuple(ops), uses[0].inputs[1], step, tuple(uses))  # type: ignore[arg-type]
        if len(uses) != 1 or not is_transparent(uses[0], v):
            return None
        ops.append(uses[0])
        v = uses[0].outputs[0]


def _q_u8(x: float, scale: float) -> int:
    """``QuantizeLinear(x, scale, uint8 128)``: round half to even, saturate."""
    return int(np.clip(np.rint(np.float32(x) / np.float32(scale)) + ZERO_POINT_U8, 0, 255))


class QLinearConvChainPass(ir.passes.InPlacePass):
    """Rewrite w8a8 Convs whose outputs are rounded anyway as uint8 ``QLinearConv`` chains (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        u8 = Uint8Quantizer(graph, namer, "qlinear")
        zp_w: ir.Value | None = None
        count = 0
        for conv in list(graph):
            if not is_onnx_op(conv, "Conv") or len(conv.inputs) < 2 or conv.graph is not graph:
                continue
            act = activation_of(conv.inputs[0])
            wt = int8_conv_weight(conv.inputs[1])
            if act is None or wt is None:
                continue
            bias = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
            if len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None:
                continue
            chain = output_chain(conv)
            if chain is None:
                continue
            x_float = None if act.unsigned else rounded_from(act)
            if not act.unsigned and x_float is None:
                continue
            w_codes, w_scale, ws = wt
            s_x, s_z = act.step, chain.step
            if zp_w is None:
                zp_w = add_initializer(graph, namer, "qlinear_weight_zp", np.array(0, np.int8))
            new_nodes: list[ir.Node] = []
            base = conv.name or "conv"
            x_u8 = act.q if act.unsigned else u8.quantize(x_float, act.scale, base, new_nodes)  # type: ignore[arg-type]
            zp_u8 = u8.zero_point
            inputs: list[ir.Value | None] = [x_u8, act.scale, zp_u8, w_codes, w_scale, zp_w, chain.scale, zp_u8]
            if bias is not None:
                bq = np.rint(bias.astype(np.float64) / (np.float64(s_x) * ws.astype(np.float64)))
                inputs.append(
                    add_initializer(graph, namer, f"{base}_bias_i32", np.clip(bq, -(2**31), 2**31 - 1).astype(np.int32))
                )
            y = ir.Value(name=namer.value(f"{conv.outputs[0].name or base}_u8"), type=ir.TensorType(ir.DataType.UINT8))
            y.shape = conv.outputs[0].shape.copy() if conv.outputs[0].shape is not None else None
            new_nodes.append(
                ir.node(
                    "QLinearConv",
                    inputs,
                    {a.name: a for a in conv.attributes.values()},
                    name=conv.name,
                    outputs=[y],
                    doc_string=conv.doc_string,
                    metadata_props=dict(conv.metadata_props),
                )
            )
            cur = y
            for op in chain.ops:
                cur = int8_op(graph, namer, op, cur, s_z, new_nodes)
            graph.insert_before(conv, new_nodes)
            rewire_roundings(chain, cur, zp_u8)
            count += 1
        if not count:
            return ir.passes.PassResult(model, False)
        RemoveUnusedNodesPass()(model)
        logger.info("wrote %d w8a8 Conv(s) as QLinearConv chains (uint8 activations)", count)
        return ir.passes.PassResult(model, True)


def int8_op(graph: ir.Graph, namer: Namer, op: ir.Node, data: ir.Value, s_z: float, out: list[ir.Node]) -> ir.Value:
    """``op`` applied to the uint8 tensor ``data`` (the output rounded with ``s_z``, zero point 128)."""
    result = ir.Value(name=namer.value(f"{op.outputs[0].name or op.op_type}_u8"), type=ir.TensorType(ir.DataType.UINT8))
    result.shape = op.outputs[0].shape.copy() if op.outputs[0].shape is not None else None
    name = namer.node(f"{op.name or op.op_type}/u8")
    if is_onnx_op(op, ("Clip", "Relu")):
        lo = 0.0 if is_onnx_op(op, "Relu") else None
        hi = None
        if is_onnx_op(op, "Clip"):
            if len(op.inputs) > 1 and op.inputs[1] is not None:
                lo = float(const_array(op.inputs[1]).reshape(()))  # type: ignore[union-attr]
            if len(op.inputs) > 2 and op.inputs[2] is not None:
                hi = float(const_array(op.inputs[2]).reshape(()))  # type: ignore[union-attr]
        bounds: list[ir.Value | None] = [
            None if lo is None else add_initializer(graph, namer, f"{name}_min", np.array(_q_u8(lo, s_z), np.uint8)),
            None if hi is None else add_initializer(graph, namer, f"{name}_max", np.array(_q_u8(hi, s_z), np.uint8)),
        ]
        while bounds and bounds[-1] is None:
            bounds.pop()
        out.append(ir.node("Clip", [data, *bounds], None, name=name, outputs=[result]))
    else:
        attrs = {a.name: a for a in op.attributes.values()}
        out.append(ir.node(op.op_type, [data, *op.inputs[1:]], attrs, domain=op.domain, name=name, outputs=[result]))
    return result


def rewire_roundings(chain: Chain, cur: ir.Value, zp_u8: ir.Value) -> None:
    """Point the roundings at the end of ``chain`` at the uint8 tensor ``cur`` (the same rounding, done)."""
    for qn in chain.quantizers:
        if zero_point_kind(qn.inputs[2]) == ZERO_POINT_U8:  # a uint8 rounding (MatMulIntegerToFloat's input)
            qn.outputs[0].replace_all_uses_with(cur)
            continue
        for use in list(qn.outputs[0].uses()):
            dq = use.node
            dq.replace_input_with(0, cur)
            dq.replace_input_with(2, zp_u8)


__all__ = [
    "ZERO_POINT_U8",
    "Chain",
    "QLinearConvChainPass",
    "activation_of",
    "int8_conv_weight",
    "int8_op",
    "is_transparent",
    "output_chain",
    "rewire_roundings",
    "rounded_from",
    "scalar_scale",
    "zero_point_kind",
]

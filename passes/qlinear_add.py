"""Residual ``Add`` s of w8a8 Conv blocks in uint8 on ONNX Runtime (target ``ort``, opt-in).

A ``w8a8`` plan rounds the *inputs* of its Convs. In an inverted-residual block (MobileNet,
EfficientNet) the residual sum feeds the next block's expand Conv, which rounds it, and the next
residual ``Add``, which reads it unrounded; the block's project Conv output is not rounded at all.
So the int8 chains of :mod:`lpcompile.passes.qlinear_conv` stop at every residual ``Add``, and the
float Convs there, with the NCHW↔NHWC transposes around them, cost what the int8 kernels saved.

With ``int8_residuals`` the target rounds the two tensors a plan leaves in float there:

* :class:`RoundResidualsPass` (before the chain pass): for an ``Add`` whose sum is rounded with one
  scale ``s`` by every reader (the next w8a8 node, or another such ``Add``), possibly after ops that
  commute with the rounding (a ResNet block's ``Relu``, a ``Clip``), a w8a8 Conv output it
  adds is rounded with ``s`` too, and an input that is rounded for another reader anyway (the skip
  tensor, rounded for the expand Conv it also feeds) is read rounded. These are the roundings
  ORT's ``quantize_static`` makes everywhere; they add error the analyzer does not score (one
  rounding of the project Conv's output with the sum's step, and the skip tensor's rounding, per
  block), which the compile's measured guard reports. The project Conv's output saturates at the sum's
  range (±128 steps): where it alone is much larger than the sum, this clips it.
* :class:`QLinearAddPass` (after the chain pass): ``DQ(a) + DQ(b)`` rounded with ``s`` (after those
  ops) becomes ONNX Runtime's ``QLinearAdd`` (``com.microsoft``) on the uint8 tensors, the ops
  applied to its uint8 output as the chain pass applies them, so the chain goes on through the
  block in int8 and NHWC.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lpcompile.passes._common import MS_DOMAIN, Namer, is_onnx_op, make_node
from lpcompile.passes.qlinear_conv import (
    activation_of,
    int8_conv_weight,
    int8_op,
    is_transparent,
    output_chain,
    rewire_roundings,
    rounded_from,
    scalar_scale,
    zero_point_kind,
)
from lpcompile.passes.w8a8 import Uint8Quantizer

logger = logging.getLogger(__name__)


def _int8_roundings(value: ir.Value) -> list[ir.Node]:
    """The activation-pass roundings ``Q(value, s, int8 0)`` that read ``value`` (each read by DQs only)."""
    out = []
    for use in value.uses():
        q = use.node
        if (
            is_onnx_op(q, "QuantizeLinear")
            and use.idx == 0
            and len(q.inputs) > 2
            and zero_point_kind(q.inputs[2]) == 0
            and scalar_scale(q.inputs[1]) is not None
            and not q.outputs[0].is_graph_output()
            and all(is_onnx_op(u.node, "DequantizeLinear") and u.idx == 0 for u in q.outputs[0].uses())
        ):
            out.append(q)
    return out


def _sum_end(add: ir.Node) -> ir.Value | None:
    """The end of the single-reader ops after ``add`` that commute with a rounding (none: the sum itself);
    None when a tensor on the way is a graph output."""
    v = add.outputs[0]
    while not v.is_graph_output():
        uses = list(v.uses())
        if len(uses) != 1 or not is_transparent(uses[0].node, v):
            return v
        v = uses[0].node.outputs[0]
    return None


def _is_w8a8_conv_output(value: ir.Value, add: ir.Node) -> bool:
    """``value`` is a w8a8 Conv's output read only by ``add``."""
    conv = value.producer()
    if conv is None or not is_onnx_op(conv, "Conv") or len(conv.inputs) < 2 or value.is_graph_output():
        return False
    if activation_of(conv.inputs[0]) is None or int8_conv_weight(conv.inputs[1]) is None:
        return False
    return all(u.node is add for u in value.uses())


class RoundResidualsPass(ir.passes.InPlacePass):
    """Round the project Conv output and the skip tensor of residual ``Add`` s (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        # (QLinearAdd broadcasts as Add does; a constant input is neither a Conv output nor rounded)
        adds = [n for n in graph if is_onnx_op(n, "Add") and len(n.inputs) == 2 and None not in n.inputs]
        # An Add qualifies when its sum is rounded with one scale by every reader but other qualifying Adds,
        # and each input is a w8a8 Conv output of its own or a tensor rounded for another reader anyway.
        chosen: dict[int, tuple[ir.Node, ir.Node]] = {}  # id(add) -> (add, the Q rounding its sum)
        ends: dict[int, ir.Value] = {}
        for add in adds:
            end = _sum_end(add)
            qs = _int8_roundings(end) if end is not None else []
            steps = {scalar_scale(q.inputs[1]) for q in qs}
            if end is None or len(steps) != 1:
                continue
            ends[id(add)] = end
            if all(_is_w8a8_conv_output(x, add) or _int8_roundings(x) for x in add.inputs if x is not None):
                chosen[id(add)] = (add, qs[0])
        changed = True
        while changed:  # drop Adds whose sum has a reader that is neither a rounding nor a chosen Add
            changed = False
            for key in list(chosen):
                end = ends[key]
                readers = [u.node for u in end.uses()]
                rounded = {id(q) for q in _int8_roundings(end)}
                if any(id(r) not in rounded and id(r) not in chosen for r in readers):
                    del chosen[key]
                    changed = True
        count = 0
        for add, q_sum in chosen.values():
            for idx, x in enumerate(add.inputs):
                assert x is not None
                qs = _int8_roundings(x)
                if qs:  # read the rounding another reader makes anyway
                    q = qs[0]
                    dq_in = [q.outputs[0], q.inputs[1], q.inputs[2]]
                else:  # the project Conv's output, rounded with the sum's step
                    q = make_node(
                        "QuantizeLinear", [x, q_sum.inputs[1], q_sum.inputs[2]], None,
                        name=namer.node(f"{add.name or 'add'}/residual_q{idx}"),
                        out_name=namer.value(f"{x.name or 'residual'}_q"), out_dtype=ir.DataType.INT8,
                        out_shape=x.shape,
                    )  # fmt: skip
                    graph.insert_before(add, [q])
                    dq_in = [q.outputs[0], q_sum.inputs[1], q_sum.inputs[2]]
                dq = make_node(
                    "DequantizeLinear", dq_in, None, name=namer.node(f"{add.name or 'add'}/residual_dq{idx}"),
                    out_name=namer.value(f"{x.name or 'residual'}_rounded"), out_dtype=ir.DataType.FLOAT,
                    out_shape=x.shape,
                )  # fmt: skip
                graph.insert_before(add, [dq])
                add.replace_input_with(idx, dq.outputs[0])
            count += 1
        if count:
            graph.sort()  # a graph input's rounding sits before its first reader, which may follow the Add
            logger.info("rounded the inputs of %d residual Add(s) for uint8 QLinearAdd chains", count)
        else:
            logger.warning(
                "--int8-residuals: no residual Add between w8a8 Convs whose sum is rounded anyway; nothing changed"
            )
        return ir.passes.PassResult(model, count > 0)


class QLinearAddPass(ir.passes.InPlacePass):
    """``DQ(a) + DQ(b)`` whose sum is rounded with one scale, as a uint8 ``QLinearAdd`` (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        u8 = Uint8Quantizer(graph, namer, "qlinear_add")
        count = 0
        for add in list(graph):
            if not is_onnx_op(add, "Add") or len(add.inputs) != 2 or add.graph is not graph:
                continue
            acts = [activation_of(x) for x in add.inputs]
            chain = output_chain(add)  # the sum (through Relu/Clip/...) read only by roundings of one step
            if any(a is None for a in acts) or chain is None:
                continue
            floats = [None if a.unsigned else rounded_from(a) for a in acts]  # type: ignore[union-attr]
            if any(f is None and not a.unsigned for f, a in zip(floats, acts, strict=True)):  # type: ignore[union-attr]
                continue
            new_nodes: list[ir.Node] = []
            base = add.name or "add"
            ins: list[ir.Value | None] = []
            for a, f in zip(acts, floats, strict=True):
                assert a is not None
                q = a.q if f is None else u8.quantize(f, a.scale, base, new_nodes)
                ins += [q, a.scale, u8.zero_point]
            s = add.outputs[0]
            ins += [chain.scale, u8.zero_point]
            qadd = make_node(
                "QLinearAdd", ins, None, domain=MS_DOMAIN, name=add.name or "",
                out_name=namer.value(f"{s.name or base}_u8"), out_dtype=ir.DataType.UINT8, out_shape=s.shape,
            )  # fmt: skip
            qadd.doc_string = add.doc_string
            new_nodes.append(qadd)
            cur = qadd.outputs[0]
            for op in chain.ops:
                cur = int8_op(graph, namer, op, cur, chain.step, new_nodes)
            graph.insert_before(add, new_nodes)
            rewire_roundings(chain, cur, u8.zero_point)
            count += 1
        if not count:
            return ir.passes.PassResult(model, False)
        RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("wrote %d residual Add(s) as uint8 QLinearAdd", count)
        return ir.passes.PassResult(model, True)


__all__ = ["QLinearAddPass", "RoundResidualsPass"]

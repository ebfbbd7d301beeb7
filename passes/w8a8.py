"""W8A8 int8 MatMuls as ONNX Runtime's int8 GEMM (``com.microsoft.MatMulIntegerToFloat``), target ``ort``.

The ``w8a8`` format (int8 per-channel weights, per-tensor int8 activations with a calibrated scale) is
written by the weight and activation passes as standard ONNX::

    x ─ QuantizeLinear(s, zp=int8 0) ─ DequantizeLinear ─┐
                           Wq(int8) ─ DequantizeLinear(ws, axis=1) ─ MatMul ─ [Add(bias)]

ONNX Runtime 1.32 CPU fuses that into ``MatMulIntegerToFloat`` only while no bias ``Add`` follows:
its ``MatMulAddFusion`` first turns MatMul+Add into a ``Gemm`` with per-run ``DequantizeLinear``
inputs (3.1–3.3× an fp32 MatMul of 47×384×1536, measured), and with int8 activations its own
fusion runs the slow s8s8 path (20× fp32); uint8 activations (zero point 128) take the u8s8 path
(0.25–0.27× fp32). So for ``ort`` this pass writes the fused form itself::

    x ─ QuantizeLinear(s, zp=uint8 128) ─ MatMulIntegerToFloat(·, Wq, s, ws, 128, -, bias)

The ``w8a8_dyn`` format's activation is ``DynamicQuantizeLinear(x) → DequantizeLinear``: its uint8 codes,
scale and zero point feed the fused node directly (ORT's ``quantize_dynamic`` form, 0.44× fp32 on MiniLM).

``uint8 = int8 + 128`` with zero point 128 is the same rounding (round half to even of ``x / s``,
saturated to 256 levels), so the result equals the Q/DQ graph's up to fp32 summation order (0.0 on
the tests). The activation quantization is shared by every fused MatMul reading it (q/k/v). The
node keeps the MatMul's name and metadata; the bias ``Add`` is absorbed when it adds a 1-D ``[N]``
constant to the MatMul's only use.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lpcompile.passes._common import MS_DOMAIN, Namer, add_initializer, const_array, is_onnx_op

logger = logging.getLogger(__name__)

UINT8_ZERO_POINT = 128


def _int8_activation(value: ir.Value | None) -> tuple[ir.Value, ir.Value] | None:
    """``DQ(Q(x, s, int8 0), s, int8 0)``, the w8a8 activation rounding: ``(x, s)``."""
    dq = value.producer() if value is not None else None
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    q_val, s, zp = dq.inputs[:3]
    q = q_val.producer() if q_val is not None else None
    if q is None or not is_onnx_op(q, "QuantizeLinear") or len(q.inputs) < 3:
        return None
    if q.inputs[1] is not s or q.inputs[2] is not zp:
        return None
    z = const_array(zp)
    sc = const_array(s)
    if z is None or z.dtype != np.int8 or z.size != 1 or int(z.reshape(())) != 0 or sc is None or sc.size != 1:
        return None
    x = q.inputs[0]
    return (x, s) if x is not None else None


def _dynamic_activation(value: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """``DQ(DynamicQuantizeLinear(x))``, the w8a8_dyn activation rounding: its ``(q, s, z)`` outputs."""
    dq = value.producer() if value is not None else None
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    q_val, s, zp = dq.inputs[:3]
    dyn = q_val.producer() if q_val is not None else None
    if dyn is None or not is_onnx_op(dyn, "DynamicQuantizeLinear") or len(dyn.outputs) != 3:
        return None
    if q_val is not dyn.outputs[0] or s is not dyn.outputs[1] or zp is not dyn.outputs[2]:
        return None
    return q_val, s, zp


def _int8_weight(value: ir.Value | None) -> tuple[ir.Value, ir.Value] | None:
    """``DQ(Wq int8 [K, N], ws [N] | scalar, axis=1)`` without zero point or blocks: ``(Wq, ws)``."""
    dq = value.producer() if value is not None else None
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 2:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zp = const_array(dq.inputs[2])
        if zp is None or np.any(zp != 0):
            return None
    if dq.attributes.get_int("block_size", 0):
        return None
    w, ws = dq.inputs[:2]
    codes, scale = const_array(w), const_array(ws)
    if codes is None or scale is None or codes.dtype != np.int8 or codes.ndim != 2:
        return None
    per_channel = scale.ndim == 1 and scale.shape[0] == codes.shape[1] and dq.attributes.get_int("axis", 1) == 1
    if scale.size != 1 and not per_channel:
        return None
    return w, ws


def _bias_add(node: ir.Node, graph: ir.Graph, n: int) -> tuple[ir.Node, ir.Value] | None:
    """The ``Add`` of a 1-D ``[N]`` float constant that is the MatMul output's only use."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if not is_onnx_op(add, "Add") or add.graph is not graph or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    b = const_array(other)
    if b is None or b.dtype != np.float32 or b.shape != (n,):
        return None
    return add, other  # type: ignore[return-value]


class Uint8Quantizer:
    """``QuantizeLinear(x, s, uint8 128)`` made once per ``(x, s)`` in a graph, with one shared zero point.

    ``uint8 = int8 + 128`` with zero point 128 is the int8 zero-point-0 rounding, and the form ORT's fast
    u8s8 kernels (``MatMulIntegerToFloat``, ``QLinearConv``) take.
    """

    def __init__(self, graph: ir.Graph, namer: Namer, prefix: str) -> None:
        self._graph, self._namer, self._prefix = graph, namer, prefix
        self._zero_point: ir.Value | None = None
        self._done: dict[tuple[int, int], ir.Value] = {}

    @property
    def zero_point(self) -> ir.Value:
        if self._zero_point is None:
            zp = np.array(UINT8_ZERO_POINT, dtype=np.uint8)
            self._zero_point = add_initializer(self._graph, self._namer, f"{self._prefix}_act_zp_u8", zp)
        return self._zero_point

    def quantize(self, x: ir.Value, scale: ir.Value, node_name: str, new_nodes: list[ir.Node]) -> ir.Value:
        """The uint8 ``x`` (its ``QuantizeLinear`` appended to ``new_nodes`` the first time)."""
        key = (id(x), id(scale))
        if key not in self._done:
            out = ir.Value(
                name=self._namer.value(f"{x.name or 'x'}_act_u8"),
                type=ir.TensorType(ir.DataType.UINT8),
                shape=x.shape.copy() if x.shape is not None else None,
            )
            name = self._namer.node(f"{node_name}/act_q_u8")
            new_nodes.append(ir.node("QuantizeLinear", [x, scale, self.zero_point], None, name=name, outputs=[out]))
            self._done[key] = out
        return self._done[key]


def _integer_matmul(
    base: str, node: ir.Node, q: ir.Value, s: ir.Value, zp: ir.Value, wq: ir.Value, ws: ir.Value, namer: Namer
) -> tuple[list[ir.Node], ir.Value]:
    """Standard ONNX ``MatMulInteger(q, Wq, zp) → Cast(float) → Mul(s·ws)``: ORT's ``quantize_dynamic`` form.

    ORT fuses it (with the ``DynamicQuantizeLinear`` before it) into ``DynamicQuantizeMatMul`` from
    ``ORT_ENABLE_EXTENDED`` up; unfused it is exact integer arithmetic then one fp32 multiply. The
    ``MatMulInteger`` is named ``base`` and carries ``node``'s doc string and metadata (it is the planned node).
    """
    acc = ir.Value(name=namer.value(f"{base}_int32"), type=ir.TensorType(ir.DataType.INT32))
    mm = ir.node(
        "MatMulInteger", [q, wq, zp], None, name=base, outputs=[acc], doc_string=node.doc_string,
        metadata_props=dict(node.metadata_props),
    )
    f = ir.Value(name=namer.value(f"{base}_int32_f"), type=ir.TensorType(ir.DataType.FLOAT))
    cast = ir.node("Cast", [acc], {"to": ir.DataType.FLOAT}, name=namer.node(f"{base}/cast_f"), outputs=[f])
    sc = ir.Value(name=namer.value(f"{base}_scales"), type=ir.TensorType(ir.DataType.FLOAT))
    smul = ir.node("Mul", [s, ws], None, name=namer.node(f"{base}/scales_mul"), outputs=[sc])
    y = ir.Value(name=None, type=ir.TensorType(ir.DataType.FLOAT))
    mul = ir.node("Mul", [f, sc], None, name=namer.node(f"{base}/rescale"), outputs=[y])
    return [mm, cast, smul, mul], y


class FuseW8A8MatMulPass(ir.passes.InPlacePass):
    """Rewrite w8a8 Q/DQ MatMuls (and their bias ``Add``) as ``MatMulIntegerToFloat`` (module docstring).

    With ``standard=True`` (the ``qdq`` target: no contrib ops) only ``w8a8_dyn`` MatMuls are rewritten,
    as the standard ``MatMulInteger → Cast → Mul`` that ORT fuses into ``DynamicQuantizeMatMul``; the
    bias ``Add`` stays (ORT's fusion absorbs it).
    """

    def __init__(self, standard: bool = False) -> None:
        super().__init__()
        self.standard = standard

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        u8 = Uint8Quantizer(graph, namer, "w8a8")
        count = 0
        for node in list(graph):
            if not is_onnx_op(node, "MatMul") or len(node.inputs) != 2:
                continue
            wt = _int8_weight(node.inputs[1])
            if wt is None:
                continue
            act = None if self.standard else _int8_activation(node.inputs[0])
            dyn = _dynamic_activation(node.inputs[0]) if act is None else None
            if act is None and dyn is None:
                continue
            if self.standard:
                q, s, zp = dyn  # type: ignore[misc]
                base = node.name or "matmul"
                node.name = namer.node(f"{base}/float")  # frees the planned name for the MatMulInteger
                new_nodes, y = _integer_matmul(base, node, q, s, zp, *wt, namer)
                out = node.outputs[0]
                y.shape = out.shape.copy() if out.shape is not None else None
                graph.insert_before(node, new_nodes)
                out_name = out.name
                out.replace_all_uses_with(y, replace_graph_outputs=True)
                graph.remove(node, safe=True)
                out.name = None
                y.name = out_name
                count += 1
                continue
            wq, ws = wt
            n = int(wq.const_value.shape[1])  # type: ignore[union-attr]
            new_nodes: list[ir.Node] = []
            if act is not None:
                x, s = act
                x_u8, zp = u8.quantize(x, s, node.name or "matmul", new_nodes), u8.zero_point
            else:
                x_u8, s, zp = dyn  # type: ignore[misc]
            bias = _bias_add(node, graph, n)
            last = bias[0] if bias is not None else node
            out = last.outputs[0]
            new_out = ir.Value(name=None, type=out.type, shape=out.shape.copy() if out.shape is not None else None)
            inputs = [x_u8, wq, s, ws, zp, None]
            if bias is not None:
                inputs.append(bias[1])
            fused = ir.node(
                "MatMulIntegerToFloat",
                inputs,
                None,
                domain=MS_DOMAIN,
                name=node.name,
                outputs=[new_out],
                doc_string=node.doc_string,
                metadata_props=dict(node.metadata_props),
            )
            new_nodes.append(fused)
            graph.insert_before(node, new_nodes)
            out_name = out.name
            out.replace_all_uses_with(new_out, replace_graph_outputs=True)
            if bias is not None:
                graph.remove(bias[0], safe=True)
            graph.remove(node, safe=True)
            out.name = None
            new_out.name = out_name
            count += 1
        if not count:
            return ir.passes.PassResult(model, False)
        if not self.standard:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        RemoveUnusedNodesPass()(model)
        form = "MatMulInteger (standard ONNX)" if self.standard else "MatMulIntegerToFloat"
        logger.info("wrote %d w8a8 MatMul(s) as %s with uint8 activations", count, form)
        return ir.passes.PassResult(model, True)


__all__ = ["UINT8_ZERO_POINT", "FuseW8A8MatMulPass", "Uint8Quantizer"]

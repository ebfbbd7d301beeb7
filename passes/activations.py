"""Round the activation inputs of planned nodes to their format's activation type.

For every plan node whose format has ``activation`` set, the node's activation input (input 0:
``x`` of MatMul / Gemm / Conv / MatMulNBits) is rounded before the node reads it:

* FP8 (``float8_e4m3fn`` / ``float8_e5m2``): ``QuantizeLinear(x, <x>_act_scale, <x>_act_zp;
  saturate=1)`` → ``DequantizeLinear(·, <x>_act_scale, <x>_act_zp)`` with a per-tensor fp32
  scalar scale ``formats.activation_scale(plan.activation_scales[x], element)`` and a scalar
  zero point 0 of the fp8 type (it fixes QuantizeLinear's output type). Nodes
  ``<base>/act_q`` and ``<base>/act_dq``; values ``<x>_act_q`` (fp8) and ``<x>_act_dq`` (fp32).
  A tensor without a calibrated amax in the plan is a :class:`PlanError`.
  With ``style="cast"`` (the ONNX Runtime target) the same rounding is written as
  ``Div(x, scale)`` → ``Cast(to=FLOAT8*, saturate=1)`` (``/act_q``) → ``Cast(to=FLOAT)``
  (``/act_dq``) → ``Mul(·, scale)``: bit-identical to the Q/DQ pair, and kept intact by every
  ORT optimisation level (ORT 1.31's QDQ transforms at ``ORT_ENABLE_ALL`` drop FP8 zero points
  and change the results of the Q/DQ form).
* int8 (the ``w8a8`` format): ``QuantizeLinear(x, <x>_act_scale, <x>_act_zp)`` →
  ``DequantizeLinear`` with an int8 zero point 0 and scale ``amax / 127`` — always the Q/DQ pair,
  whatever the style: ONNX Runtime fuses it with the weight's ``DequantizeLinear`` and a MatMul
  into ``MatMulIntegerToFloat`` (int8 GEMM; ``passes/targets.py``), and it is exact at every level.
* uint8 dynamic (the ``w8a8_dyn`` format): ``DynamicQuantizeLinear(x)`` (``<base>/act_dynq``: codes, scale
  and zero point from the tensor's own range on every run) → ``DequantizeLinear`` (``/act_dq``); no
  calibration. ``passes/w8a8.py`` then feeds the codes to an integer GEMM.
* bf16 / fp16: a Cast round trip ``Cast(x; to=BFLOAT16|FLOAT16)`` → ``Cast(·; to=FLOAT)``,
  nodes ``<base>/to_bf16`` (``/to_fp16``) and ``<base>/to_fp32``; values ``<x>_bf16`` and
  ``<x>_bf16_fp32``.

``<base>`` is the consumer's name when one planned node consumes the rounded tensor, else the
tensor's name. Every inserted node carries ``lpcompile.serves`` (the planned consumers).

Placement rule (as few round trips as the plan allows):

1. One rounding per (tensor, activation type): every planned consumer of ``x`` that wants the
   same type reads the same Q/DQ pair or Cast round trip; the tensor is never rounded twice to
   the same type (a tensor read by a bf16 node and an fp16 node gets one round trip of each).
   Consumers that do not want rounding keep reading the original fp32 ``x``.
2. 16-bit *regions* are the connected components of the graph whose vertices are the nodes
   planned with the same 16-bit format and whose edges are tensors produced by one region node
   and read as activation by another (networkx). A tensor internal to a region gets its round
   trip right after its producer; a tensor entering a region (graph input, initializer, or
   produced outside the region) gets it right before its first planned consumer. FP8 pairs
   are placed right before the first planned consumer.

The pass is idempotent: a node whose activation input is already the output of a matching
round trip (or Q/DQ pair) is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import numpy as np
import onnx_ir as ir

from lpcompile.errors import PlanError
from lpcompile.formats import DYNAMIC_UINT8, FLOAT_SPECS, activation_scale, get_format, scaled_activation
from lpcompile.passes._common import (
    ACT_DQ,
    ACT_DYNQ,
    ACT_Q,
    ELEMENT_DTYPES,
    SERVES_KEY,
    SHORT_NAMES,
    TO_FP32,
    Namer,
    add_initializer,
    cast_to,
    is_onnx_op,
    make_node,
    node_positions,
    nodes_by_name,
)
from lpcompile.passes.opset import ensure_opset
from lpcompile.plan import PrecisionPlan, validate_against

logger = logging.getLogger(__name__)

ACTIVATION_OPSET = 21


def is_fp8(element: str) -> bool:
    return element.startswith("float8")


def existing_activation_rounding(node: ir.Node) -> str | None:
    """The element a node's activation input is already rounded to by this pass, else None."""
    if not node.inputs or node.inputs[0] is None:
        return None
    producer = node.inputs[0].producer()
    if producer is None:
        return None
    if is_onnx_op(producer, "DequantizeLinear") and len(producer.inputs) >= 3:
        q_val = producer.inputs[0]
        q = q_val.producer() if q_val is not None else None
        zp = producer.inputs[2]
        if q is not None and is_onnx_op(q, "DynamicQuantizeLinear") and zp is q.outputs[2]:
            return DYNAMIC_UINT8
        if q is not None and is_onnx_op(q, "QuantizeLinear") and zp is not None:
            for element, dtype in ELEMENT_DTYPES.items():
                if (is_fp8(element) or element == "int8") and zp.dtype == dtype:
                    return element
        return None
    if is_onnx_op(producer, "Mul") and producer.inputs[0] is not None:
        back = producer.inputs[0].producer()
        if back is not None and cast_to(back) == ir.DataType.FLOAT and back.inputs[0] is not None:
            inner = back.inputs[0].producer()
            to = cast_to(inner) if inner is not None else None
            for element, dtype in ELEMENT_DTYPES.items():
                if is_fp8(element) and to == dtype:
                    return element
        return None
    if cast_to(producer) == ir.DataType.FLOAT and producer.inputs[0] is not None:
        inner = producer.inputs[0].producer()
        to = cast_to(inner) if inner is not None else None
        for element in ("bfloat16", "float16"):
            if to == ELEMENT_DTYPES[element]:
                return element
    return None


@dataclass
class _Rounding:
    """One rounding of one tensor to one element type, shared by its planned consumers."""

    tensor: ir.Value
    element: str
    consumers: list[ir.Node] = field(default_factory=list)


class ActivationPrecisionPass(ir.passes.InPlacePass):
    """Insert FP8 Q/DQ pairs and bf16/fp16 Cast round trips on planned activations."""

    def __init__(self, plan: PrecisionPlan, style: Literal["qdq", "cast"] = "qdq") -> None:
        super().__init__()
        if style not in ("qdq", "cast"):
            raise ValueError(f"style must be 'qdq' or 'cast', not {style!r}")
        self.plan = plan
        self.style = style

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        wanted = self._wanted(model)
        if not wanted:
            return ir.passes.PassResult(model, False)
        ensure_opset(model, ACTIVATION_OPSET)  # may swap model.graph: look nodes up afterwards
        graph = model.graph
        by_name = nodes_by_name(graph)
        positions = node_positions(graph)
        roundings: dict[tuple[int, str], _Rounding] = {}
        for name, element in wanted:
            node = by_name[name]
            x = node.inputs[0]
            key = (id(x), element)
            if key not in roundings:
                roundings[key] = _Rounding(x, element)
            roundings[key].consumers.append(node)
        internal = _region_internal_tensors(graph, self.plan, by_name)
        namer = Namer(graph)
        for r in sorted(roundings.values(), key=lambda r: min(positions[id(c)] for c in r.consumers)):
            r.consumers.sort(key=lambda c: positions[id(c)])
            if scaled_activation(r.element):
                self._insert_fp8(graph, namer, r)
            elif r.element == DYNAMIC_UINT8:
                _insert_dynamic(graph, namer, r)
            else:
                _insert_round_trip(graph, namer, r, after_producer=id(r.tensor) in internal)
        logger.info("rounded %d activation tensor(s)", len(roundings))
        return ir.passes.PassResult(model, True)

    def _wanted(self, model: ir.Model) -> list[tuple[str, str]]:
        """``(node name, element)`` pairs still to round; validates the plan's node names."""
        by_name = nodes_by_name(model.graph)
        validate_against(self.plan, list(by_name))
        out = []
        for a in self.plan.nodes:
            element = get_format(a.format).activation
            if element is None:
                continue
            node = by_name[a.name]
            if not node.inputs or node.inputs[0] is None:
                continue
            x = node.inputs[0]
            if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
                logger.warning("node %r: activation %r is %s, not FLOAT; left as is", a.name, x.name, x.dtype)
                continue
            if existing_activation_rounding(node) == element:
                continue
            if scaled_activation(element) and x.name not in self.plan.activation_scales:
                raise PlanError(
                    f"node {a.name!r} ({a.format}) needs a calibrated amax for its activation {x.name!r}, "
                    "but the plan has none: calibrate first (the pipeline fills plan.activation_scales)"
                )
            out.append((a.name, element))
        return out

    def _insert_fp8(self, graph: ir.Graph, namer: Namer, r: _Rounding) -> None:
        x = r.tensor
        x_name = x.name or "x"
        amax = float(self.plan.activation_scales[x_name])
        scale = np.array(activation_scale(amax, r.element), dtype=np.float32)
        int8 = r.element == "int8"
        zp = np.zeros((), dtype=np.int8 if int8 else FLOAT_SPECS[r.element].np_dtype)
        scale_v = add_initializer(graph, namer, f"{x_name}_act_scale", scale)
        fp8 = ELEMENT_DTYPES[r.element]
        # int8 is always a Q/DQ pair: exact at every ORT level, and what ORT fuses with a
        # DequantizeLinear weight into its int8 kernels (MatMulIntegerToFloat, QLinearConv)
        if self.style == "cast" and not int8:
            steps = [
                _Step("Div", (scale_v,), None, "/act_div", "_act_div", ir.DataType.FLOAT),
                _Step("Cast", (), {"to": int(fp8), "saturate": 1}, ACT_Q, "_act_q", fp8),
                _Step("Cast", (), {"to": int(ir.DataType.FLOAT)}, ACT_DQ, "_act_f32", ir.DataType.FLOAT),
                _Step("Mul", (scale_v,), None, "/act_mul", "_act_dq", ir.DataType.FLOAT),
            ]
        else:
            zp_v = add_initializer(graph, namer, f"{x_name}_act_zp", zp)
            steps = [
                _Step("QuantizeLinear", (scale_v, zp_v), None if int8 else {"saturate": 1}, ACT_Q, "_act_q", fp8),
                _Step("DequantizeLinear", (scale_v, zp_v), None, ACT_DQ, "_act_dq", ir.DataType.FLOAT),
            ]
        _insert_chain(graph, namer, r, _base_name(r), steps)


@dataclass(frozen=True)
class _Step:
    """One node of a rounding chain: it reads the previous value, then ``extra`` inputs."""

    op: str
    extra: tuple[ir.Value, ...]
    attrs: dict[str, object] | None
    node_suffix: str
    value_suffix: str
    dtype: ir.DataType


def _insert_chain(
    graph: ir.Graph, namer: Namer, r: _Rounding, base: str, steps: list[_Step], after_producer: bool = False
) -> None:
    """Insert ``steps`` on ``r.tensor`` (after its producer, or before the first consumer) and rewire consumers."""
    x = r.tensor
    x_name = x.name or "x"
    serves = [c.name or "" for c in r.consumers]
    nodes: list[ir.Node] = []
    prev = x
    for st in steps:
        node = make_node(
            st.op,
            [prev, *st.extra],
            st.attrs,
            name=namer.node(base + st.node_suffix),
            out_name=namer.value(x_name + st.value_suffix),
            out_dtype=st.dtype,
            out_shape=x.shape,
            serves=serves,
        )
        nodes.append(node)
        prev = node.outputs[0]
    producer = x.producer()
    if after_producer and producer is not None and producer.graph is graph:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(r.consumers[0], nodes)
    for c in r.consumers:
        c.replace_input_with(0, prev)


def _insert_dynamic(graph: ir.Graph, namer: Namer, r: _Rounding) -> None:
    """``DynamicQuantizeLinear(x)`` → ``DequantizeLinear(q, s, z)`` before the first consumer (``w8a8_dyn``)."""
    x = r.tensor
    x_name = x.name or "x"
    base = _base_name(r)
    serves = sorted({c.name or "" for c in r.consumers} - {""})
    meta = {SERVES_KEY: ",".join(serves)} if serves else None
    q = ir.Value(name=namer.value(x_name + "_act_q"), type=ir.TensorType(ir.DataType.UINT8),
                 shape=x.shape.copy() if x.shape is not None else None)
    s = ir.Value(name=namer.value(x_name + "_act_scale"), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    z = ir.Value(name=namer.value(x_name + "_act_zp"), type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape([]))
    dyn = ir.node("DynamicQuantizeLinear", [x], None, name=namer.node(base + ACT_DYNQ), outputs=[q, s, z],
                  metadata_props=meta)
    dq = make_node("DequantizeLinear", [q, s, z], None, name=namer.node(base + ACT_DQ),
                   out_name=namer.value(x_name + "_act_dq"), out_dtype=ir.DataType.FLOAT, out_shape=x.shape,
                   serves=serves)
    graph.insert_before(r.consumers[0], [dyn, dq])
    for c in r.consumers:
        c.replace_input_with(0, dq.outputs[0])


def _base_name(r: _Rounding) -> str:
    if len(r.consumers) == 1 and r.consumers[0].name:
        return r.consumers[0].name
    return r.tensor.name or (r.consumers[0].name or "x")


def _insert_round_trip(graph: ir.Graph, namer: Namer, r: _Rounding, after_producer: bool) -> None:
    short = SHORT_NAMES[r.element]
    steps = [
        _Step("Cast", (), {"to": ELEMENT_DTYPES[r.element]}, f"/to_{short}", f"_{short}", ELEMENT_DTYPES[r.element]),
        _Step("Cast", (), {"to": ir.DataType.FLOAT}, TO_FP32, f"_{short}_fp32", ir.DataType.FLOAT),
    ]
    _insert_chain(graph, namer, r, _base_name(r), steps, after_producer=after_producer)


def region_graph(graph: ir.Graph, plan: PrecisionPlan) -> nx.Graph:
    """Planned 16-bit nodes as vertices (``format`` attribute), edges where one feeds the other.

    An edge joins two nodes with the same 16-bit format when a tensor produced by one is the
    activation input of the other. Connected components are the regions.
    """
    by_name = nodes_by_name(graph)
    formats = {}
    for a in plan.nodes:
        element = get_format(a.format).activation
        if element in ("bfloat16", "float16") and a.name in by_name:
            formats[a.name] = a.format
    g = nx.Graph()
    for name, fmt in formats.items():
        g.add_node(name, format=fmt)
    for name in formats:
        node = by_name[name]
        x = node.inputs[0] if node.inputs else None
        x = _unwrap_round_trip(x)
        producer = x.producer() if x is not None else None
        if producer is not None and producer.name in formats and formats[producer.name] == formats[name]:
            g.add_edge(producer.name, name)
    return g


def _unwrap_round_trip(x: ir.Value | None) -> ir.Value | None:
    """The tensor a Cast round trip rounds (``x`` itself when it is not a round trip output)."""
    if x is None:
        return None
    p = x.producer()
    if p is not None and cast_to(p) == ir.DataType.FLOAT and p.inputs[0] is not None:
        inner = p.inputs[0].producer()
        if inner is not None and cast_to(inner) in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
            return inner.inputs[0]
    return x


def _region_internal_tensors(graph: ir.Graph, plan: PrecisionPlan, by_name: dict[str, ir.Node]) -> set[int]:
    """``id`` of the tensors produced by a region node and read by a node of the same region."""
    g = region_graph(graph, plan)
    out: set[int] = set()
    for i, comp in enumerate(nx.connected_components(g)):
        logger.debug("16-bit region %d: %s", i, sorted(comp))
        for name in comp:
            node = by_name[name]
            x = _unwrap_round_trip(node.inputs[0])
            producer = x.producer() if x is not None else None
            if producer is not None and producer.name in comp:
                out.add(id(x))
    return out

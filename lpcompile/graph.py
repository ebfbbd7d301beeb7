"""Finding the weighted nodes of a graph: what the plan assigns formats to."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lpcompile.formats import CONV_LAYOUT, MATMUL_LAYOUT, WeightLayout

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class WeightNode:
    """A node whose weight input is a float initializer that a format can be applied to.

    Attributes:
        name: the node name (unique; :func:`lpcompile.frontend.onnx_io.ensure_node_names`).
        op_type: ``MatMul``, ``Gemm`` or ``Conv``.
        weight: the initializer name.
        shape: the weight's shape.
        layout: its channel and reduction axes.
        input_index: which node input holds the weight.
        activation: the name of the activation input (the one an activation format rounds).
    """

    name: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    layout: WeightLayout
    input_index: int
    activation: str

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def _float_initializer(value: ir.Value | None) -> bool:
    if value is None or value.const_value is None or not value.is_initializer():
        return False
    return value.dtype == ir.DataType.FLOAT


def _layout_for(node: ir.Node, shape: tuple[int, ...]) -> WeightLayout | None:
    if node.op_type == "MatMul":
        return MATMUL_LAYOUT if len(shape) == 2 else None
    if node.op_type == "Gemm":
        if len(shape) != 2:
            return None
        trans_b = node.attributes.get_int("transB", 0)
        return WeightLayout(channel_axis=0, reduction_axis=1) if trans_b else MATMUL_LAYOUT
    if node.op_type == "Conv":
        return CONV_LAYOUT if len(shape) >= 3 else None
    return None


def find_weight_nodes(model: ir.Model) -> list[WeightNode]:
    """Weighted nodes of the main graph, in graph order.

    A node qualifies when it is a MatMul (weight = input 1, rank 2), Gemm (input 1, rank 2) or
    Conv (input 1, rank >= 3) in the default domain whose weight is a float32 initializer that
    is not also a graph input (a graph input can be overridden at run time).
    """
    out: list[WeightNode] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHTED_OPS:
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        w = node.inputs[1]
        if not _float_initializer(w) or w.is_graph_input():
            continue
        shape = tuple(int(d) for d in w.const_value.shape)
        layout = _layout_for(node, shape)
        if layout is None or 0 in shape:
            continue
        out.append(
            WeightNode(
                name=node.name or "",
                op_type=node.op_type,
                weight=w.name or "",
                shape=shape,
                layout=layout,
                input_index=1,
                activation=node.inputs[0].name or "",
            )
        )
    return out


def weight_array(model: ir.Model, name: str) -> np.ndarray:
    """The float32 numpy value of an initializer."""
    value = model.graph.initializers[name]
    return np.asarray(value.const_value.numpy(), dtype=np.float32)


def tied_groups(nodes: Sequence[WeightNode]) -> dict[str, str]:
    """Map node name → group key for nodes that share a weight initializer (others omitted)."""
    by_weight: dict[str, list[str]] = {}
    for n in nodes:
        by_weight.setdefault(n.weight, []).append(n.name)
    return {name: f"weight:{w}" for w, names in by_weight.items() if len(names) > 1 for name in names}

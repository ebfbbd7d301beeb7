"""Small helpers shared by the rewrite passes (naming, initializers, node look-up, patterns)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"
SERVES_KEY = "lpcompile.serves"

# Suffixes of the node names the passes insert (after the name of the node they serve).
WEIGHT_DQ = "/weight_dq"
WEIGHT_CAST = "/weight_cast"
ACT_Q = "/act_q"
ACT_DQ = "/act_dq"
ACT_DYNQ = "/act_dynq"
TO_FP32 = "/to_fp32"

# Float element key (formats.FLOAT_SPECS / Format.element) -> IR data type.
ELEMENT_DTYPES: dict[str, ir.DataType] = {
    "float32": ir.DataType.FLOAT,
    "bfloat16": ir.DataType.BFLOAT16,
    "float16": ir.DataType.FLOAT16,
    "float8_e4m3fn": ir.DataType.FLOAT8E4M3FN,
    "float8_e5m2": ir.DataType.FLOAT8E5M2,
    "int8": ir.DataType.INT8,
    "int4": ir.DataType.INT4,
}
SHORT_NAMES: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def is_onnx_op(node: ir.Node, op_type: str | Sequence[str]) -> bool:
    """Whether ``node`` is the default-domain op ``op_type`` (or one of several)."""
    ops = (op_type,) if isinstance(op_type, str) else tuple(op_type)
    return node.domain in ONNX_DOMAINS and node.op_type in ops


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    """Main-graph nodes keyed by name (the first node wins for duplicated names)."""
    out: dict[str, ir.Node] = {}
    for node in graph:
        if node.name and node.name not in out:
            out[node.name] = node
    return out


def node_positions(graph: ir.Graph) -> dict[int, int]:
    """``id(node) -> position`` in graph order (for choosing insertion points)."""
    return {id(node): i for i, node in enumerate(graph)}


class Namer:
    """Hands out value and node names that are unique in a graph (and its subgraphs)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._values: set[str] = set()
        self._nodes: set[str] = set()
        for v in list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values()):
            if v.name:
                self._values.add(v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self._nodes.add(node.name)
            for v in node.outputs:
                if v.name:
                    self._values.add(v.name)

    @staticmethod
    def _unique(base: str, taken: set[str]) -> str:
        name = base
        k = 1
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        return name

    def value(self, base: str) -> str:
        return self._unique(base, self._values)

    def node(self, base: str) -> str:
        return self._unique(base, self._nodes)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer (``None`` for anything computed at run time)."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def add_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``base`` (made unique)."""
    name = namer.value(base)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def make_node(
    op_type: str,
    inputs: Sequence[ir.Value | None],
    attributes: dict[str, object] | None,
    *,
    name: str,
    out_name: str,
    out_dtype: ir.DataType,
    out_shape: ir.Shape | Sequence[int] | None,
    domain: str = "",
    serves: Iterable[str] = (),
) -> ir.Node:
    """Create a one-output node with a typed output value (not yet inserted in a graph)."""
    shape = None
    if out_shape is not None:
        shape = out_shape.copy() if isinstance(out_shape, ir.Shape) else ir.Shape(list(out_shape))
    out = ir.Value(name=out_name, type=ir.TensorType(out_dtype), shape=shape)
    served = sorted(set(serves))
    node = ir.node(
        op_type,
        inputs,
        attributes,  # type: ignore[arg-type]
        domain=domain,
        name=name,
        outputs=[out],
        metadata_props={SERVES_KEY: ",".join(served)} if served else None,
    )
    return node


def add_serves(node: ir.Node, names: Iterable[str]) -> None:
    """Add consumers to a node's ``lpcompile.serves`` list (sorted, comma-separated)."""
    current = {s for s in node.metadata_props.get(SERVES_KEY, "").split(",") if s}
    new = current | set(names)
    if new != current:
        node.metadata_props[SERVES_KEY] = ",".join(sorted(new))


def float_initializer(value: ir.Value | None) -> bool:
    """A float32 initializer that is not also a graph input or output."""
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and value.dtype == ir.DataType.FLOAT
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> bool:
    """Drop an initializer that has no uses left (and is neither graph input nor output)."""
    if (
        value.is_initializer()
        and not value.uses()
        and not value.is_graph_input()
        and not value.is_graph_output()
        and value.name in graph.initializers
    ):
        del graph.initializers[value.name]
        return True
    return False


def get_int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def cast_to(node: ir.Node) -> ir.DataType | None:
    """The ``to`` type of a default-domain Cast node (None for anything else)."""
    if not is_onnx_op(node, "Cast"):
        return None
    attr = node.attributes.get("to")
    return None if attr is None else ir.DataType(attr.as_int())


def dq_chain(
    namer: Namer,
    codes: ir.Value,
    scale: ir.Value | None,
    axis: int,
    block_size: int,
    shape: Sequence[int],
    half: bool,
    base: str,
    w_name: str,
    serves: Sequence[str],
) -> list[ir.Node]:
    """A weight's ``DequantizeLinear`` (output fp16 when ``half``, then ``Cast`` to fp32), or a plain
    ``Cast`` of the codes when there is no scale; nodes named ``<base>/weight_dq`` / ``weight_cast``."""
    shape = list(shape)

    def cast(x: ir.Value) -> ir.Node:
        return make_node(
            "Cast",
            [x],
            {"to": ir.DataType.FLOAT},
            name=namer.node(base + WEIGHT_CAST),
            out_name=namer.value(f"{w_name}_fp32"),
            out_dtype=ir.DataType.FLOAT,
            out_shape=shape,
            serves=serves,
        )

    if scale is None:
        return [cast(codes)]
    attrs: dict[str, object] = {"axis": int(axis)}
    if block_size:
        attrs["block_size"] = int(block_size)
    dq = make_node(
        "DequantizeLinear",
        [codes, scale],
        attrs,
        name=namer.node(base + WEIGHT_DQ),
        out_name=namer.value(f"{w_name}_dq"),
        out_dtype=ir.DataType.FLOAT16 if half else ir.DataType.FLOAT,
        out_shape=shape,
        serves=serves,
    )
    return [dq, cast(dq.outputs[0])] if half else [dq]

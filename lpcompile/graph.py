"""Finding the weighted nodes of a graph: what the plan assigns formats to, and what it cannot.

Weighted nodes (:func:`find_weight_nodes`), with the layout their weight is quantized on:

==================  =========================  ==================================================
node                weight                     layout (channel axis, reduction axis)
==================  =========================  ==================================================
MatMul              input 1, ``[K, N]``        channel 1, reduction 0
MatMul on a         ``Transpose(perm=[1,0])``  channel 0, reduction 1 of the initializer
transposed table    of an initializer         (``via`` = the Transpose node; tied heads)
Gemm                input 1                    follows ``transB``
Conv                ``[O, I/g, kh, kw]``       channel 0, reduction ``I/g·kh·kw`` flattened
                                               (im2col order) when kh·kw > 1: depthwise and
                                               grouped convolutions get one block per output
                                               channel instead of one scale per weight
ConvTranspose       ``[Cin, Cout/g, kh, kw]``  channel 1, blocks over ``Cout/g·kh·kw`` of each
                                               input channel (flattened)
Gather (axis 0)     input 0, ``[V, D]`` table  channel 0 (rows), reduction 1 (the embedding
                                               dim): rows are decoded where they are gathered
==================  =========================  ==================================================

Weights are float32, float16 or bfloat16 initializers (``WeightNode.dtype``); fp16/bf16 ones are
analysed in fp32 and quantized from their own (exactly widened) values.

Everything else that holds weight-like data is reported by :func:`weight_coverage` with the
reason it is kept: recurrent weights (LSTM/GRU/RNN: kept fp32, not yet supported), weights that
are already quantized (QDQ int8/int4, MatMulNBits, GatherBlockQuantized: kept, counted at their
stored bits), and the small float tensors no format applies to (biases, norms).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.formats import MATMUL_LAYOUT, WeightLayout

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
FLOAT_WEIGHT_DTYPES = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
}
ONNX_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class WeightNode:
    """A node whose weight input is a float initializer that a format can be applied to.

    Attributes:
        name: the node name (unique; :func:`lpcompile.frontend.onnx_io.ensure_node_names`).
        op_type: ``MatMul``, ``Gemm``, ``Conv``, ``ConvTranspose`` or ``Gather``.
        weight: the initializer name.
        shape: the weight's shape (as stored in the initializer).
        layout: its channel and reduction axes (on the initializer).
        input_index: which node input holds the weight (or the ``via`` node's output).
        activation: the name of the activation input (the one an activation format rounds); for a
            Gather, the table itself (its input 0).
        via: name of a ``Transpose(perm=[1, 0])`` node between the initializer and the node
            (a head tied to an embedding table), else ``""``.
        dtype: element type of the initializer: ``float32``, ``float16`` or ``bfloat16``.
    """

    name: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    layout: WeightLayout
    input_index: int
    activation: str
    via: str = ""
    dtype: str = "float32"

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def _float_initializer(value: ir.Value | None) -> bool:
    if value is None or value.const_value is None or not value.is_initializer():
        return False
    return value.dtype in FLOAT_WEIGHT_DTYPES


def conv_layout(shape: tuple[int, ...]) -> WeightLayout:
    """Layout of a Conv weight ``[O, I/g, *kernel]``: blocks over the flattened ``I/g·kernel``."""
    return WeightLayout(0, 1, flatten=math.prod(shape[2:]) > 1)


def conv_transpose_layout(shape: tuple[int, ...]) -> WeightLayout:
    """Layout of a ConvTranspose weight ``[Cin, Cout/g, *kernel]``: channel 1, blocks over ``Cout/g·kernel``."""
    return WeightLayout(1, 1, flatten=math.prod(shape[2:]) > 1)


GATHER_LAYOUT = WeightLayout(channel_axis=0, reduction_axis=1)


def _layout_for(node: ir.Node, shape: tuple[int, ...]) -> WeightLayout | None:
    if node.op_type == "MatMul":
        return MATMUL_LAYOUT if len(shape) == 2 else None
    if node.op_type == "Gemm":
        if len(shape) != 2:
            return None
        trans_b = node.attributes.get_int("transB", 0)
        return WeightLayout(channel_axis=0, reduction_axis=1) if trans_b else MATMUL_LAYOUT
    if node.op_type == "Conv":
        return conv_layout(shape) if len(shape) >= 3 else None
    if node.op_type == "ConvTranspose":
        return conv_transpose_layout(shape) if len(shape) >= 3 else None
    if node.op_type == "Gather":
        return GATHER_LAYOUT if len(shape) == 2 and node.attributes.get_int("axis", 0) in (0, -2) else None
    return None


def _weight_input(node: ir.Node) -> tuple[int, ir.Value | None, ir.Node | None]:
    """(input index, initializer value, via-Transpose node) of a weighted op's weight."""
    idx = 0 if node.op_type == "Gather" else 1
    if len(node.inputs) <= idx or node.inputs[idx] is None:
        return idx, None, None
    value = node.inputs[idx]
    if node.op_type == "MatMul" and not value.is_initializer():
        producer = value.producer()
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and producer.domain in ONNX_DOMAINS
            and list(producer.attributes.get_ints("perm", [1, 0]) or [1, 0]) == [1, 0]
            and producer.inputs
            and producer.inputs[0] is not None
            and len(producer.inputs[0].shape or ()) == 2
        ):
            return idx, producer.inputs[0], producer
    return idx, value, None


def find_weight_nodes(model: ir.Model) -> list[WeightNode]:
    """Weighted nodes of the main graph, in graph order (see the module docstring for the ops).

    The weight must be a float32/float16/bfloat16 initializer that is not also a graph input
    (a graph input can be overridden at run time), without zero-sized dimensions. A Gather
    qualifies with ``axis=0`` on a rank-2 table; a MatMul also through a ``Transpose(perm=[1,0])``
    of a rank-2 initializer.
    """
    out: list[WeightNode] = []
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS or node.op_type not in WEIGHTED_OPS:
            continue
        if len(node.inputs) < 2 or any(v is None for v in node.inputs[:2]):
            continue
        idx, w, via = _weight_input(node)
        if not _float_initializer(w) or w.is_graph_input():
            continue
        shape = tuple(int(d) for d in w.const_value.shape)
        layout = GATHER_LAYOUT if via is not None else _layout_for(node, shape)
        if layout is None or 0 in shape:
            continue
        act = node.inputs[0] if node.op_type != "Gather" else w
        out.append(
            WeightNode(
                name=node.name or "",
                op_type=node.op_type,
                weight=w.name or "",
                shape=shape,
                layout=layout,
                input_index=idx,
                activation=act.name or "",
                via=(via.name or "") if via is not None else "",
                dtype=FLOAT_WEIGHT_DTYPES[w.dtype],
            )
        )
    return out


def weight_array(model: ir.Model, name: str) -> np.ndarray:
    """The float32 numpy value of an initializer (fp16/bf16 widened exactly)."""
    value = model.graph.initializers[name]
    return np.asarray(value.const_value.numpy(), dtype=np.float32)


def release_data(tensor: object) -> None:
    """Unmap an external (memory-mapped) initializer after reading it, so its pages leave this
    process's resident set; it maps again when next read. A no-op for in-memory tensors or while
    an array still views the mapping."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # an array still views the mapping: it goes when that array does
            logger.debug("external tensor %s still viewed; left mapped", tensor.name)


def candidate_nodes(nodes: Sequence[WeightNode], fmts: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Node name → the candidate formats it can take, in ``fmts`` order.

    An embedding table (a Gather's weight, and the heads tied to it) has no float activation input to
    round, so formats that round activations to FP8 / int8 (calibrated or dynamic) are not its candidates.
    """
    from lpcompile.formats import get_format, grid_activation

    gathered = {n.weight for n in nodes if n.op_type == "Gather"}
    fp8 = {f for f in fmts if grid_activation(get_format(f).activation)}
    return {n.name: tuple(f for f in fmts if n.weight not in gathered or f not in fp8) for n in nodes}


def tied_groups(nodes: Sequence[WeightNode]) -> dict[str, str]:
    """Map node name → group key for nodes that share a weight initializer (others omitted).

    A table read by a Gather and by a MatMul through a Transpose (a tied embedding / head) is one
    group: one decision, one stored copy.
    """
    by_weight: dict[str, list[str]] = {}
    for n in nodes:
        by_weight.setdefault(n.weight, []).append(n.name)
    return {name: f"weight:{w}" for w, names in by_weight.items() if len(names) > 1 for name in names}


# ---------------------------------------------------------------------------------------------
# Coverage: what the plan cannot assign, and why
# ---------------------------------------------------------------------------------------------

_STORED_BITS = {
    ir.DataType.INT4: 4,
    ir.DataType.UINT4: 4,
    ir.DataType.INT8: 8,
    ir.DataType.UINT8: 8,
    ir.DataType.FLOAT8E4M3FN: 8,
    ir.DataType.FLOAT8E5M2: 8,
    ir.DataType.FLOAT16: 16,
    ir.DataType.BFLOAT16: 16,
    ir.DataType.FLOAT: 32,
}


@dataclass(frozen=True)
class KeptWeight:
    """A weight-like tensor the plan does not assign a format to.

    Attributes:
        node: the node that reads it.
        op_type: that node's op type.
        tensor: the initializer name (the codes, for an already-quantized weight).
        params: number of weight values.
        bits: bits per weight as stored (scales and zero points included where known).
        reason: ``"recurrent"``, ``"already-quantized"`` or ``"graph-input"``.
        detail: one line for logs and reports.
        stored: every initializer counted in ``bits`` (codes, scales, zero points).
    """

    node: str
    op_type: str
    tensor: str
    params: int
    bits: float
    reason: str
    detail: str
    stored: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightCoverage:
    """Which weights a plan can cover (``planned``) and which are kept, with reasons.

    ``other_params`` counts float initializer values outside any weighted node (biases, norm
    scales, position tables read by non-weighted ops) that stay as they are.
    """

    planned: tuple[WeightNode, ...]
    kept: tuple[KeptWeight, ...] = field(default=())
    other_params: int = 0
    other_bits: float = 0.0

    @property
    def fixed_bits(self) -> float:
        """Bits of every weight-like tensor the plan does not decide (kept weights + other floats).

        A size budget for the whole file minus this is what the planned weights may use.
        """
        return sum(k.bits * k.params for k in self.kept) + self.other_bits

    @property
    def planned_params(self) -> int:
        return sum(n.params for n in {n.weight: n for n in self.planned}.values())

    @property
    def kept_params(self) -> int:
        return sum(k.params for k in self.kept)

    @property
    def nothing_to_do(self) -> bool:
        """True when no weight is left for a plan to assign (the run would be a no-op)."""
        return not self.planned

    def outcome(self) -> str:
        """One plain sentence: what a compile of this model can do (for logs and ``--strict``)."""
        parts = []
        by_reason: dict[str, list[KeptWeight]] = {}
        for k in self.kept:
            by_reason.setdefault(k.reason, []).append(k)
        for reason, items in sorted(by_reason.items()):
            n = sum(k.params for k in items)
            parts.append(f"{len(items)} {reason} weight(s) kept ({n} values: {items[0].detail})")
        kept = "; ".join(parts)
        if self.nothing_to_do:
            return "nothing to do: no weight a format can be assigned to" + (f"; {kept}" if kept else "")
        msg = f"{len(self.planned)} weighted node(s), {self.planned_params} weights to plan"
        return msg + (f"; {kept}" if kept else "")


def _int_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def _value_bits(value: ir.Value | None) -> int:
    if value is None or value.const_value is None:
        return 0
    return _STORED_BITS.get(value.dtype, 8 * max(1, value.dtype.itemsize if value.dtype else 4)) * math.prod(
        int(d) for d in value.const_value.shape
    )


def _names(values: Iterable[ir.Value | None]) -> tuple[str, ...]:
    return tuple(v.name for v in values if v is not None and v.name and _int_initializer(v))


def _already_quantized(node: ir.Node) -> KeptWeight | None:
    if node.domain == MS_DOMAIN and node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
        attrs = node.attributes
        data = node.inputs[1] if node.op_type == "MatMulNBits" else node.inputs[0]
        if not _int_initializer(data):
            return None
        if node.op_type == "MatMulNBits":
            params = attrs.get_int("K", 0) * attrs.get_int("N", 0)
        else:
            shape = [int(d) for d in data.const_value.shape]
            params = math.prod(shape) * (2 if data.dtype == ir.DataType.UINT8 and attrs.get_int("bits", 4) == 4 else 1)
        stored = sum(_value_bits(v) for v in node.inputs[1:] if v is not None and _int_initializer(v))
        if node.op_type == "GatherBlockQuantized":
            stored = sum(_value_bits(v) for i, v in enumerate(node.inputs) if i != 1 and _int_initializer(v))
        bits = stored / max(params, 1)
        return KeptWeight(
            node.name or "",
            node.op_type,
            data.name or "",
            params,
            bits,
            "already-quantized",
            f"{node.op_type} {attrs.get_int('bits', 4)}-bit block {attrs.get_int('block_size', 0)}",
            _names(v for i, v in enumerate(node.inputs) if not (node.op_type == "GatherBlockQuantized" and i == 1)),
        )
    if node.domain in ONNX_DOMAINS and node.op_type == "Cast" and node.inputs and _int_initializer(node.inputs[0]):
        codes = node.inputs[0]
        if codes.dtype not in _QUANTIZED_DTYPES:
            return None
        params = math.prod(int(d) for d in codes.const_value.shape)
        scale = _decode_once_scale(node)
        stored = _value_bits(codes) + _value_bits(scale)
        return KeptWeight(
            node.name or "",
            node.op_type,
            codes.name or "",
            params,
            stored / max(params, 1),
            "already-quantized",
            f"Cast of {codes.dtype.name} codes (decode of constants)",
            _names([codes, scale]),
        )
    if node.domain in ONNX_DOMAINS and node.op_type == "DequantizeLinear":
        codes = node.inputs[0] if node.inputs else None
        if not _int_initializer(codes) or codes.dtype not in _STORED_BITS or codes.dtype == ir.DataType.FLOAT:
            return None
        params = math.prod(int(d) for d in codes.const_value.shape)
        stored = sum(_value_bits(v) for v in node.inputs if v is not None and _int_initializer(v))
        return KeptWeight(
            node.name or "",
            node.op_type,
            codes.name or "",
            params,
            stored / max(params, 1),
            "already-quantized",
            f"DequantizeLinear of {codes.dtype.name} codes",
            _names(node.inputs),
        )
    return None


_QUANTIZED_DTYPES = (
    ir.DataType.INT4,
    ir.DataType.UINT4,
    ir.DataType.INT8,
    ir.DataType.FLOAT8E4M3FN,
    ir.DataType.FLOAT8E5M2,
)


def _decode_once_scale(cast: ir.Node) -> ir.Value | None:
    """The scale initializer a ``Cast(codes)`` decode multiplies by (following a short chain)."""
    value = cast.outputs[0]
    for _ in range(6):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.domain in ONNX_DOMAINS and node.op_type == "Mul" and len(node.inputs) == 2:
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            if other is not None and not other.is_initializer() and other.producer() is not None:
                p = other.producer()
                other = p.inputs[0] if p.op_type == "Cast" and p.inputs else other
            return other if other is not None and other.is_initializer() else None
        if node.domain not in ONNX_DOMAINS or node.op_type not in ("Reshape", "Pad", "Cast", "Slice"):
            return None
        value = node.outputs[0]
    return None


def _kept_float(node: ir.Node, v: ir.Value, reason: str, why: str) -> KeptWeight:
    """A float weight kept as stored (its own element type's bits)."""
    n = math.prod(int(d) for d in v.const_value.shape) if v.const_value is not None else 0
    return KeptWeight(node.name or "", node.op_type, v.name or "", n, 8.0 * v.dtype.itemsize, reason, why)


def weight_coverage(model: ir.Model) -> WeightCoverage:
    """Weighted nodes plus every weight kept as it is, with the reason (never silent).

    Recurrent weights (LSTM/GRU/RNN inputs W, R, B) are kept fp32 and logged ("recurrent weights
    not yet supported"); already-quantized weights are kept at their stored bits; weighted ops
    whose weight is a graph input are kept too.
    """
    planned = find_weight_nodes(model)
    planned_weights = {n.weight for n in planned}
    kept: list[KeptWeight] = []
    seen: set[str] = set(planned_weights)
    for node in model.graph:
        q = _already_quantized(node)
        if q is not None:
            if q.tensor not in seen:  # codes read by several decodes (a tied table) count once
                kept.append(q)
            seen.update(q.stored)
            seen.add(q.tensor)
            continue
        if node.domain in ONNX_DOMAINS and node.op_type in RECURRENT_OPS:
            for v in node.inputs[1:3]:
                if v is not None and _float_initializer(v):
                    kept.append(_kept_float(node, v, "recurrent", "kept fp32: recurrent weights not yet supported"))
                    seen.add(v.name or "")
            continue
        if node.domain in ONNX_DOMAINS and node.op_type in WEIGHTED_OPS and len(node.inputs) > 1:
            idx = 0 if node.op_type == "Gather" else 1
            v = node.inputs[idx]
            if v is not None and v.is_graph_input() and v.is_initializer() and v.dtype in FLOAT_WEIGHT_DTYPES:
                why = "kept: the weight is also a graph input (overridable at run time)"
                kept.append(_kept_float(node, v, "graph-input", why))
                seen.add(v.name or "")
    other = 0
    other_bits = 0.0
    for name, v in model.graph.initializers.items():
        if name in seen or v.const_value is None or v.dtype not in FLOAT_WEIGHT_DTYPES:
            continue
        n = math.prod(int(d) for d in v.const_value.shape)
        other += n
        other_bits += 8.0 * v.dtype.itemsize * n
    for k in kept:
        level = logging.WARNING if k.reason == "recurrent" else logging.INFO
        logger.log(level, "node %r (%s): weight %r %s", k.node, k.op_type, k.tensor, k.detail)
    return WeightCoverage(tuple(planned), tuple(kept), other, other_bits)

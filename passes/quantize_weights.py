"""Store every planned weight in its format and decode it in the graph.

For each plan node whose format is not fp32 the node's weight input (a float32 initializer)
is replaced by stored codes plus the standard ops that decode them, computed with the
reference :func:`lpcompile.formats.quantize_weight` (so ``qdq_weight`` predicts the result
bit for bit). ``<n>`` is the name of the (first, in graph order) node the decode serves, ``<w>``
the original weight name (names are made unique with ``_1``, ``_2``… on collision):

=================  ==============================================================================
format             emitted pattern (every inserted node has ``lpcompile.serves = <node names>``)
=================  ==============================================================================
fp8_e4m3/e5m2,     ``<w>_q`` FLOAT8E4M3FN / FLOAT8E5M2 / INT8 (weight shape), ``<w>_scale`` FLOAT
int8               ``[channels]`` → ``DequantizeLinear(<w>_q, <w>_scale; axis=channel axis)``
                   named ``<n>/weight_dq``, output ``<w>_dq`` FLOAT (no zero point: symmetric)
int4_bXX           ``<w>_q`` INT4 (weight shape), ``<w>_scale`` FLOAT16 (weight shape with the
                   reduction axis cut to ⌈K/bs⌉) → ``DequantizeLinear(axis=reduction axis,
                   block_size=bs)`` ``<n>/weight_dq`` → ``<w>_dq`` FLOAT16 → ``Cast(to=FLOAT)``
                   ``<n>/weight_cast`` → ``<w>_fp32`` FLOAT
int4_bXX, target   the MatMul node itself becomes ``com.microsoft.MatMulNBits`` (same name, same
"ort", MatMul      output): inputs ``(A, <w>_q4 UINT8 [N, n_blocks, bs/2], <w>_scale FLOAT
                   [N, n_blocks])``, no zero point (default 8), attributes ``K, N, bits=4,
                   block_size=bs, accuracy_level=0``. Codes are stored as ``q + 8`` packed two per
                   byte along K, low nibble first; a partial last block is padded with code 8
                   (zero). Used when bs is a power of two ≥ 16, else the QDQ pattern is emitted.
bf16 / fp16        ``<w>_q`` BFLOAT16 / FLOAT16 → ``Cast(to=FLOAT)`` ``<n>/weight_cast`` →
                   ``<w>_fp32`` FLOAT
=================  ==============================================================================

The decode nodes are inserted right before the first node they serve; nodes that share a
weight (same initializer, same layout) share one decode. Per-channel axes: MatMul ``[K, N]``
channel 1 / reduction 0; Conv ``[O, I, kh, kw]`` channel 0 / reduction 1; a Gemm left by
normalisation follows its ``transB``.

MatMulNBits numerics: ORT decodes ``code·scale`` in fp32 (the fp16 scale widened exactly), while
the reference (and the QDQ pattern) rounds ``code·scale`` to fp16 first; the two differ by at most
2⁻¹¹ relative per weight element.

Stochastic rounding draws for each weight from ``weight_seed(seed, weight_name)``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lpcompile.errors import PlanError, UsageError
from lpcompile.formats import Format, QuantizedWeight, get_format, quantize_weight
from lpcompile.graph import WeightNode, find_weight_nodes
from lpcompile.passes._common import (
    ELEMENT_DTYPES,
    MS_DOMAIN,
    WEIGHT_CAST,
    WEIGHT_DQ,
    Namer,
    add_initializer,
    cast_to,
    get_int_attr,
    is_onnx_op,
    make_node,
    node_positions,
    nodes_by_name,
    remove_if_unused,
)
from lpcompile.passes.opset import ensure_opset
from lpcompile.plan import NodeAssignment, PrecisionPlan, validate_against

logger = logging.getLogger(__name__)

Target = Literal["qdq", "ort"]
QDQ_OPSET = 21

_DTYPE_ELEMENTS = {v: k for k, v in ELEMENT_DTYPES.items()}


def weight_seed(seed: int | None, weight_name: str) -> int | None:
    """The seed stochastic rounding of one weight uses (None when ``seed`` is None)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed), zlib.crc32(weight_name.encode("utf-8"))]).generate_state(1)[0])


def existing_weight_encoding(node: ir.Node) -> tuple[str, int, int] | None:
    """``(element, block_size, K)`` of a weight this pass already decoded for ``node``, else None.

    Recognises the patterns in the module docstring (MatMulNBits included); ``block_size`` is 0
    for unblocked encodings, ``K`` is the length of the blocked axis (0 when unblocked).
    """
    if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
        return ("int4", get_int_attr(node, "block_size", 0), get_int_attr(node, "K", 0))
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    producer = node.inputs[1].producer()
    if producer is None:
        return None
    if cast_to(producer) == ir.DataType.FLOAT:
        src = producer.inputs[0]
        if src is None:
            return None
        if src.is_initializer() and src.dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
            return (_DTYPE_ELEMENTS[src.dtype], 0, 0)
        inner = src.producer()
        if inner is not None and is_onnx_op(inner, "DequantizeLinear"):
            return _dq_encoding(inner, want_int4=True)
        return None
    if is_onnx_op(producer, "DequantizeLinear"):
        return _dq_encoding(producer, want_int4=False)
    return None


def _dq_encoding(dq: ir.Node, want_int4: bool) -> tuple[str, int, int] | None:
    codes = dq.inputs[0]
    if codes is None or not codes.is_initializer() or codes.dtype not in _DTYPE_ELEMENTS:
        return None
    if (codes.dtype == ir.DataType.INT4) != want_int4:
        return None
    block = get_int_attr(dq, "block_size", 0)
    if not block:
        return (_DTYPE_ELEMENTS[codes.dtype], 0, 0)
    axis = get_int_attr(dq, "axis", 1)
    shape = codes.shape
    k = int(shape[axis]) if shape is not None and -len(shape) <= axis < len(shape) else 0
    return (_DTYPE_ELEMENTS[codes.dtype], block, k)


def _matches(fmt: Format, enc: tuple[str, int, int]) -> bool:
    element, block, k = enc
    if fmt.is_identity or fmt.element != element:
        return False
    if fmt.scale != "per_block":
        return block == 0
    bs = int(fmt.block_size or 0)
    return block == (min(bs, k) if k else bs)


@dataclass
class _Group:
    """Plan nodes that share one weight initializer."""

    weight: ir.Value
    fmt: Format
    members: list[tuple[NodeAssignment, ir.Node, WeightNode]]


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace planned weights by stored codes + decoding (see the module docstring).

    Args:
        plan: the precision plan (node names as after :class:`NormalizeWeightsPass`).
        target: ``"qdq"`` (standard ops only) or ``"ort"`` (int4 MatMul weights as
            ``com.microsoft.MatMulNBits``).
        rounding: ``"nearest"`` or ``"stochastic"``.
        seed: seed for stochastic rounding (see :func:`weight_seed`).
    """

    def __init__(
        self, plan: PrecisionPlan, target: Target = "qdq", rounding: str = "nearest", seed: int | None = None
    ) -> None:
        super().__init__()
        if target not in ("qdq", "ort"):
            raise UsageError(f"unknown target {target!r}: use 'qdq' or 'ort'")
        if rounding not in ("nearest", "stochastic"):
            raise UsageError(f"unknown rounding {rounding!r}: use 'nearest' or 'stochastic'")
        self.plan = plan
        self.target = target
        self.rounding = rounding
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        todo = self._check(model)
        if not todo:
            return ir.passes.PassResult(model, False)
        ensure_opset(model, QDQ_OPSET)  # may swap model.graph: look nodes up afterwards
        graph = model.graph
        groups = self._groups(model, {a.name for a in todo})
        namer = Namer(graph)
        positions = node_positions(graph)
        uses_nbits = False
        for group in groups:
            uses_nbits |= self._apply_group(graph, namer, positions, group)
        if uses_nbits:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("quantized %d weight(s) for %d node(s)", len(groups), len(todo))
        return ir.passes.PassResult(model, True)

    # -- checking ----------------------------------------------------------------------------
    def _check(self, model: ir.Model) -> list[NodeAssignment]:
        """Validate the plan against the model; return the assignments still to apply."""
        graph = model.graph
        weight_names = {w.name for w in find_weight_nodes(model)}
        by_name = nodes_by_name(graph)
        done: dict[str, tuple[str, int, int]] = {}
        for a in self.plan.nodes:
            node = by_name.get(a.name)
            if node is not None and a.name not in weight_names:
                enc = existing_weight_encoding(node)
                if enc is not None:
                    done[a.name] = enc
        validate_against(self.plan, sorted(weight_names | set(done)))
        todo = []
        for a in self.plan.nodes:
            fmt = get_format(a.format)
            if a.name in done:
                enc = done[a.name]
                if not _matches(fmt, enc):
                    raise PlanError(
                        f"node {a.name!r} already stores its weight as {enc[0]}"
                        f"{f' (block {enc[1]})' if enc[1] else ''}, but the plan asks for {fmt.name}"
                    )
            elif not fmt.is_identity:
                todo.append(a)
        return todo

    def _groups(self, model: ir.Model, todo_names: set[str]) -> list[_Group]:
        graph = model.graph
        by_name = nodes_by_name(graph)
        wnodes = {w.name: w for w in find_weight_nodes(model)}
        groups: dict[int, _Group] = {}
        order: list[int] = []
        for a in self.plan.nodes:
            if a.name not in wnodes:
                continue
            node = by_name[a.name]
            weight = node.inputs[1]
            fmt = get_format(a.format)
            key = id(weight)
            if key not in groups:
                groups[key] = _Group(weight, fmt, [])
                order.append(key)
            g = groups[key]
            if g.fmt.name != fmt.name:
                other = g.members[0][0].name
                raise PlanError(
                    f"nodes {other!r} and {a.name!r} share weight {weight.name!r} but the plan gives them "
                    f"different formats ({g.fmt.name}, {fmt.name}); tie them to one format"
                )
            g.members.append((a, node, wnodes[a.name]))
        out = [groups[k] for k in order if not groups[k].fmt.is_identity]
        return [g for g in out if any(a.name in todo_names for a, _, _ in g.members)]

    # -- rewriting ---------------------------------------------------------------------------
    def _apply_group(self, graph: ir.Graph, namer: Namer, positions: dict[int, int], group: _Group) -> bool:
        weight = group.weight
        w_name = weight.name or "weight"
        arr = np.asarray(weight.const_value.numpy(), dtype=np.float32)
        seed = weight_seed(self.seed, w_name)
        by_layout: dict[tuple[int, int], list[tuple[ir.Node, WeightNode]]] = {}
        for _, node, wn in group.members:
            key = (wn.layout.channel_axis, wn.layout.reduction_axis)
            by_layout.setdefault(key, []).append((node, wn))
        used_nbits = False
        for members in by_layout.values():
            members.sort(key=lambda m: positions.get(id(m[0]), 0))
            layout = members[0][1].layout
            q = quantize_weight(group.fmt, arr, layout, self.rounding, seed)  # type: ignore[arg-type]
            dq_members = []
            packed: tuple[ir.Value, ir.Value] | None = None
            for node, wn in members:
                if self._use_nbits(node, wn, q):
                    if packed is None:
                        packed = _nbits_initializers(graph, namer, w_name, q)
                    _replace_with_nbits(graph, node, packed, q)
                    used_nbits = True
                else:
                    dq_members.append(node)
            if dq_members:
                decoded = _emit_decode(graph, namer, w_name, q, group.fmt, dq_members)
                for node in dq_members:
                    node.replace_input_with(1, decoded)
        remove_if_unused(graph, weight)
        return used_nbits

    def _use_nbits(self, node: ir.Node, wn: WeightNode, q: QuantizedWeight) -> bool:
        if self.target != "ort" or not is_onnx_op(node, "MatMul") or q.block_size == 0:
            return False
        bs = q.block_size
        ok = len(wn.shape) == 2 and q.axis == 0 and bs >= 16 and (bs & (bs - 1)) == 0
        if not ok:
            logger.info("node %r: block %d does not fit MatMulNBits; emitting QDQ", node.name, bs)
        return ok


def _emit_decode(
    graph: ir.Graph, namer: Namer, w_name: str, q: QuantizedWeight, fmt: Format, consumers: Sequence[ir.Node]
) -> ir.Value:
    """Insert the decode of ``q`` before the first consumer; return the fp32 weight value."""
    first = consumers[0]
    base = first.name or w_name
    serves = [n.name or "" for n in consumers]
    shape = list(q.codes.shape)
    codes = add_initializer(graph, namer, f"{w_name}_q", _storage_array(q, fmt))
    new_nodes: list[ir.Node] = []
    if q.scale is None:
        cast = make_node(
            "Cast",
            [codes],
            {"to": ir.DataType.FLOAT},
            name=namer.node(base + WEIGHT_CAST),
            out_name=namer.value(f"{w_name}_fp32"),
            out_dtype=ir.DataType.FLOAT,
            out_shape=shape,
            serves=serves,
        )
        new_nodes.append(cast)
    else:
        scale = add_initializer(graph, namer, f"{w_name}_scale", np.ascontiguousarray(q.scale))
        attrs: dict[str, object] = {"axis": int(q.axis)}
        if q.block_size:
            attrs["block_size"] = int(q.block_size)
        out_dtype = ir.DataType.FLOAT16 if q.scale.dtype == np.float16 else ir.DataType.FLOAT
        dq = make_node(
            "DequantizeLinear",
            [codes, scale],
            attrs,
            name=namer.node(base + WEIGHT_DQ),
            out_name=namer.value(f"{w_name}_dq"),
            out_dtype=out_dtype,
            out_shape=shape,
            serves=serves,
        )
        new_nodes.append(dq)
        if out_dtype != ir.DataType.FLOAT:
            cast = make_node(
                "Cast",
                [dq.outputs[0]],
                {"to": ir.DataType.FLOAT},
                name=namer.node(base + WEIGHT_CAST),
                out_name=namer.value(f"{w_name}_fp32"),
                out_dtype=ir.DataType.FLOAT,
                out_shape=shape,
                serves=serves,
            )
            new_nodes.append(cast)
    graph.insert_before(first, new_nodes)
    return new_nodes[-1].outputs[0]


def _storage_array(q: QuantizedWeight, fmt: Format) -> np.ndarray:
    if fmt.element == "int4":
        return np.ascontiguousarray(q.codes.astype(np.int8).astype(ml_dtypes.int4))
    if fmt.element == "int8":
        return np.ascontiguousarray(q.codes.astype(np.int8))
    return np.ascontiguousarray(q.codes)


def pack_matmul_nbits(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits ``B`` (uint8 ``[N, n_blocks, bs/2]``) and ``scales`` (fp32 ``[N, n_blocks]``).

    ``q`` is an int4 weight ``[K, N]`` blocked along axis 0. Codes are stored as ``q + 8``
    (the op's default zero point is 8), two per byte along K, the first in the low nibble; a
    partial last block is padded with 8 (a zero weight).
    """
    k, n = q.codes.shape
    bs = q.block_size
    nblk = -(-k // bs)
    u = (q.codes.astype(np.int16) + 8).astype(np.uint8).T  # [N, K]
    if nblk * bs != k:
        u = np.concatenate([u, np.full((n, nblk * bs - k), 8, dtype=np.uint8)], axis=1)
    u = u.reshape(n, nblk, bs)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(q.scale.astype(np.float32).T)  # [N, n_blocks]
    return np.ascontiguousarray(packed), scales


def _nbits_initializers(graph: ir.Graph, namer: Namer, w_name: str, q: QuantizedWeight) -> tuple[ir.Value, ir.Value]:
    packed, scales = pack_matmul_nbits(q)
    return (
        add_initializer(graph, namer, f"{w_name}_q4", packed),
        add_initializer(graph, namer, f"{w_name}_scale", scales),
    )


def _replace_with_nbits(graph: ir.Graph, node: ir.Node, packed: tuple[ir.Value, ir.Value], q: QuantizedWeight) -> None:
    k, n = (int(d) for d in q.codes.shape)
    out = node.outputs[0]
    new_out = ir.Value(name=None, type=out.type, shape=out.shape.copy() if out.shape is not None else None)
    new = ir.node(
        "MatMulNBits",
        [node.inputs[0], packed[0], packed[1]],
        {"K": k, "N": n, "bits": 4, "block_size": int(q.block_size), "accuracy_level": 0},
        domain=MS_DOMAIN,
        name=node.name,
        outputs=[new_out],
        doc_string=node.doc_string,
        metadata_props=dict(node.metadata_props),
    )
    out_name = out.name
    graph.insert_before(node, new)
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    old_weight = node.inputs[1]
    graph.remove(node, safe=True)
    out.name = None
    new_out.name = out_name
    if old_weight is not None:
        remove_if_unused(graph, old_weight)

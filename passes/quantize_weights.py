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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lpcompile.errors import PlanError, UsageError
from lpcompile.formats import (
    Format,
    QuantizedWeight,
    WeightLayout,
    get_format,
    is_classic,
    quantize_weight,
    split_candidate,
)
from lpcompile.graph import WeightNode, find_weight_nodes
from lpcompile.passes._common import (
    ELEMENT_DTYPES,
    MS_DOMAIN,
    WEIGHT_CAST,
    Namer,
    add_initializer,
    cast_to,
    dq_chain,
    get_int_attr,
    is_onnx_op,
    make_node,
    node_positions,
    nodes_by_name,
    remove_if_unused,
)
from lpcompile.passes.opset import ensure_opset
from lpcompile.passes.table_decode import emit_table_decode, table_decode_encoding
from lpcompile.passes.targets import WeightForm, check_target, weight_form
from lpcompile.plan import NodeAssignment, PrecisionPlan, validate_against

logger = logging.getLogger(__name__)

Target = Literal["qdq", "ort", "tvm"]
QDQ_OPSET = 21
#: rounding methods (see :mod:`lpcompile.rounding`; listed here so importing the pass needs no torch)
ROUNDINGS = ("nearest", "stochastic", "rtn", "mse", "gptq")

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
    once = decode_once_encoding(node.inputs[1])
    if once is not None:
        return once
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
        rounding: the default rounding (:mod:`lpcompile.rounding`): ``"nearest"``, ``"stochastic"``,
            ``"rtn"``, ``"mse"`` or ``"gptq"``; a plan node's own ``rounding`` (when it has one) wins.
        seed: seed for stochastic rounding (see :func:`weight_seed`).
        weights: precomputed stored weights by initializer name (e.g. the very ones the analyzer
            scored); written as they are when their format is the planned one.
        hessians: ``XᵀX`` of the weighted nodes' activation inputs by activation tensor name
            (:mod:`lpcompile.analysis.input_hessians`), for ``mse`` / ``gptq``.
    """

    def __init__(
        self,
        plan: PrecisionPlan,
        target: Target = "qdq",
        rounding: str = "nearest",
        seed: int | None = None,
        weights: Mapping[str, QuantizedWeight] | None = None,
        hessians: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        check_target(target)
        if rounding not in ROUNDINGS:
            raise UsageError(f"unknown rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
        self.plan = plan
        self.target = target
        self.rounding = rounding
        self.seed = seed
        self.weights = dict(weights or {})
        self.hessians = hessians

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
                enc = (
                    existing_weight_encoding(node)
                    or existing_extended_encoding(node)
                    or table_decode_encoding(node, 0 if is_onnx_op(node, "Gather") else 1)
                )
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
            weight = graph.initializers[wnodes[a.name].weight]
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
            q = self._quantize(group, arr, layout, seed, members)
            if not is_classic(group.fmt):  # grammar families: portable table decode (passes/table_decode.py)
                _emit_table(graph, namer, w_name, q, group.fmt, members, arr.shape, positions)
                continue
            if needs_extended_emission(members, q, arr.shape):
                once = all(self._form(n, wn, q, group.fmt) == WeightForm.DECODE_ONCE for n, wn in members)
                used_nbits |= emit_extended(graph, namer, w_name, q, group.fmt, members, arr.shape, self.target, once)
                continue
            dq_members = []
            packed: tuple[ir.Value, ir.Value] | None = None
            once_members = []
            for node, wn in members:
                form = self._form(node, wn, q, group.fmt)
                if form == WeightForm.MATMUL_NBITS:
                    if packed is None:
                        packed = _nbits_initializers(graph, namer, w_name, q)
                    _replace_with_nbits(graph, node, packed, q)
                    used_nbits = True
                elif form == WeightForm.DECODE_ONCE:
                    once_members.append(node)
                else:
                    dq_members.append(node)
            for consumers, emit in ((dq_members, _emit_decode), (once_members, _emit_decode_once)):
                if consumers:
                    decoded = emit(graph, namer, w_name, q, group.fmt, consumers)
                    for node in consumers:
                        node.replace_input_with(1, decoded)
        remove_if_unused(graph, weight)
        return used_nbits

    def _quantize(
        self,
        group: _Group,
        arr: np.ndarray,
        layout: WeightLayout,
        seed: int | None,
        members: Sequence[tuple[ir.Node, WeightNode]],
    ) -> QuantizedWeight:
        """The stored weight: precomputed (``weights``), else by the node's (or the pass's) rounding."""
        name = group.weight.name or ""
        pre = self.weights.get(name)
        if pre is not None:
            if pre.format != group.fmt.name:
                raise PlanError(f"precomputed weight {name!r} is {pre.format}, but the plan asks for {group.fmt.name}")
            return pre
        method = next((r for a, _, _ in group.members if (r := getattr(a, "rounding", None))), None) or next(
            (r for a, _, _ in group.members if (r := split_candidate(a.format)[1])), None
        )
        if method is None and self.rounding in ("nearest", "stochastic"):
            method = self.rounding
        if method == "nearest":
            return quantize_in_slices(group.fmt, arr, layout)
        if method == "stochastic":
            return quantize_weight(group.fmt, arr, layout, method, seed)  # type: ignore[arg-type]
        from lpcompile.analysis.input_hessians import node_hessian
        from lpcompile.rounding import default_method, round_weight

        h = next((h for _, wn in members if (h := node_hessian(wn, self.hessians)) is not None), None)
        method = method or default_method(group.fmt, self.rounding, has_hessian=h is not None)
        return round_weight(group.fmt, arr, layout, method, hessian=h, seed=seed)

    def _form(self, node: ir.Node, wn: WeightNode, q: QuantizedWeight, fmt: Format) -> WeightForm:
        """The written form of ``node``'s weight, chosen by the target (:mod:`lpcompile.passes.targets`)."""
        op = node.op_type if is_onnx_op(node, node.op_type) else f"{node.domain}.{node.op_type}"
        size = int(np.prod(wn.shape))
        form = weight_form(
            self.target, op, fmt, block_size=q.block_size, rank=len(wn.shape), axis=q.axis, elements=size
        )
        if self.target == "ort" and fmt.element == "int4" and op == "MatMul" and form != WeightForm.MATMUL_NBITS:
            logger.info(
                "node %r: int4 block %d, %d weights: no MatMulNBits (passes/targets.py); decoding once",
                node.name,
                q.block_size,
                size,
            )
        return form


SLICE_BYTES = 8 * 2**20
"""Round-to-nearest quantizes weights bigger than this many float32 bytes a slice of channels at a time."""


def _slice_axis(fmt: Format, layout: WeightLayout, ndim: int) -> int | None:
    """The axis a weight can be cut along without changing its codes or scales, or None."""
    if not is_classic(fmt) or ndim == 0:
        return None
    if fmt.scale == "none":
        return 0  # element-wise casts
    c, r = layout.channel_axis % ndim, layout.reduction_axis % ndim
    if fmt.scale == "per_block" and (layout.flatten or c == r):
        return None
    return c  # per-channel scales and per-block scales (blocks run along the reduction axis) live per channel


def quantize_in_slices(
    fmt: Format, arr: np.ndarray, layout: WeightLayout, slice_bytes: int = SLICE_BYTES
) -> QuantizedWeight:
    """Round-to-nearest :func:`~lpcompile.formats.quantize_weight`, one slice of channels at a time.

    The reference works on the whole tensor in float64 (several copies of the weight at twice its
    size); scales are per channel, or per block of one channel, so slicing along the channel axis
    gives the same codes and scales bit for bit while the temporaries stay a few slices big.
    Small weights, and formats whose scales span channels, go to the reference directly.
    """
    axis = _slice_axis(fmt, layout, arr.ndim)
    if axis is None or arr.nbytes <= slice_bytes or arr.shape[axis] < 2:
        return quantize_weight(fmt, arr, layout, "nearest")
    per = max(1, int(slice_bytes // max(1, arr.nbytes // arr.shape[axis])))
    codes: np.ndarray | None = None
    scales: list[np.ndarray] = []
    first: QuantizedWeight | None = None
    for i in range(0, arr.shape[axis], per):
        cut = (slice(None),) * axis + (slice(i, i + per),)
        q = quantize_weight(fmt, arr[cut], layout, "nearest")
        if codes is None:  # filled in place: no second copy of the codes
            first, codes = q, np.empty(arr.shape, dtype=q.codes.dtype)
        codes[cut] = q.codes
        if q.scale is not None:
            scales.append(q.scale)
    assert first is not None and codes is not None
    scale = None
    if first.scale is not None:  # per-channel: 1-D over channels; per-block: the weight's rank
        scale = np.concatenate(scales, axis=0 if first.scale.ndim == 1 else axis)
    return QuantizedWeight(first.format, codes, scale, first.axis, first.block_size)


def _emit_table(
    graph: ir.Graph,
    namer: Namer,
    w_name: str,
    q: QuantizedWeight,
    fmt: Format,
    members: Sequence[tuple[ir.Node, WeightNode]],
    shape: tuple[int, ...],
    positions: dict[int, int],
) -> None:
    """One table decode (see :mod:`lpcompile.passes.table_decode`) shared by ``members``."""
    by_name = nodes_by_name(graph)
    anchors = [(by_name[wn.via] if wn.via else node, wn) for node, wn in members]
    first = min((a for a, _ in anchors), key=lambda a: positions.get(id(a), 0))
    out_dtype = ELEMENT_DTYPES[members[0][1].dtype]
    serves = [node.name or "" for node, _ in members]
    nodes = emit_table_decode(graph, namer, w_name, q, fmt, first.name or w_name, serves, shape, out_dtype)
    graph.insert_before(first, nodes)
    decoded = nodes[-1].outputs[0]
    for anchor, wn in anchors:
        anchor.replace_input_with(0 if wn.via else wn.input_index, decoded)


def _emit_decode(
    graph: ir.Graph, namer: Namer, w_name: str, q: QuantizedWeight, fmt: Format, consumers: Sequence[ir.Node]
) -> ir.Value:
    """Insert the decode of ``q`` before the first consumer; return the fp32 weight value."""
    first = consumers[0]
    serves = [n.name or "" for n in consumers]
    codes = add_initializer(graph, namer, f"{w_name}_q", _storage_array(q, fmt))
    scale = None if q.scale is None else add_initializer(graph, namer, f"{w_name}_scale", np.ascontiguousarray(q.scale))
    half = q.scale is not None and q.scale.dtype == np.float16
    new_nodes = dq_chain(
        namer, codes, scale, q.axis, q.block_size, list(q.codes.shape), half, first.name or w_name, w_name, serves
    )
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


# -- decode once (the form of targets "qdq" / "ort" where the runtime has no fast kernel) -------
# Standard ops on initializers that ONNX Runtime constant-folds at session creation (it never
# folds DequantizeLinear): see lpcompile.passes.targets. Same arithmetic as formats.dequantize.

_I64_PREFIX = "lpcompile_i64_"


@dataclass
class _Chain:
    """Nodes of one weight's decode chain, named ``<node><suffix>`` with outputs ``<w><suffix>``."""

    namer: Namer
    base: str
    w_name: str
    serves: Sequence[str]
    nodes: list[ir.Node] = field(default_factory=list)

    def add(
        self,
        op: str,
        inputs: list[ir.Value],
        attrs: dict[str, object] | None,
        suffix: str,
        dtype: ir.DataType,
        out_shape: Sequence[int],
    ) -> ir.Value:
        node = make_node(
            op,
            inputs,
            attrs,
            name=self.namer.node(self.base + suffix),
            out_name=self.namer.value(f"{self.w_name}{suffix.replace('/', '_')}"),
            out_dtype=dtype,
            out_shape=out_shape,
            serves=self.serves,
        )
        self.nodes.append(node)
        return node.outputs[0]


def _i64_const(graph: ir.Graph, namer: Namer, values: Sequence[int]) -> ir.Value:
    """A shared int64 vector initializer (one per distinct content in the graph)."""
    arr = np.asarray(list(values), dtype=np.int64)
    name = _I64_PREFIX + "_".join(str(v).replace("-", "m") for v in arr.tolist())
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is not None:
        old = existing.const_value.numpy()
        if old.dtype == np.int64 and old.shape == arr.shape and np.array_equal(old, arr):
            return existing
    return add_initializer(graph, namer, name, arr)


def _emit_decode_once(
    graph: ir.Graph, namer: Namer, w_name: str, q: QuantizedWeight, fmt: Format, consumers: Sequence[ir.Node]
) -> ir.Value:
    """Insert a constant-foldable decode of ``q`` before the first consumer; return the fp32 weight.

    ``Cast(codes → FLOAT)``, then for scaled formats ``Mul`` by the scale (stored in a broadcast
    shape with the same element count). Blocked 2-D weights ``[K, N]`` (blocks along axis 0) or
    ``[O, K]`` (axis 1) store their whole blocks as ``<w>_q`` ``[K//b, b, N]`` / ``[O, K//b, b]``
    with scales ``<w>_scale`` ``[K//b, 1, N]`` / ``[O, K//b, 1]``, multiplied, rounded to fp16 and
    back when the scales are fp16 (as ``DequantizeLinear`` with an fp16 scale does) and
    ``Flatten``-ed back; a partial last block is stored apart (``<w>_q_tail``, ``<w>_scale_tail``)
    and joined by ``Concat``. So the file holds exactly the codes and scales (no shape tensors).
    Other ranks view the codes as blocks with ``Reshape`` (+ ``Pad`` / ``Slice`` for a partial
    block), which needs a few shared int64 shape vectors.
    """
    first = consumers[0]
    base = first.name or w_name
    serves = [n.name or "" for n in consumers]
    shape = [int(d) for d in q.codes.shape]
    rank = len(shape)
    stored = _storage_array(q, fmt)
    chain = _Chain(namer, base, w_name, serves)
    nodes, add = chain.nodes, chain.add
    fp32 = ir.DataType.FLOAT

    def scaled(codes: np.ndarray, scale: np.ndarray, suffix: str) -> ir.Value:
        """Cast codes, multiply by the scale (same rank, broadcast), round through fp16 if blocked fp16."""
        c = add_initializer(graph, namer, f"{w_name}_q{suffix}", np.ascontiguousarray(codes))
        x = add("Cast", [c], {"to": fp32}, WEIGHT_CAST + suffix, fp32, list(codes.shape))
        s_val = add_initializer(graph, namer, f"{w_name}_scale{suffix}", np.ascontiguousarray(scale))
        if s_val.dtype != fp32:
            s_val = add("Cast", [s_val], {"to": fp32}, "/weight_scale_cast" + suffix, fp32, list(scale.shape))
        x = add("Mul", [x, s_val], None, "/weight_mul" + suffix, fp32, list(codes.shape))
        if q.block_size and fmt.scale_dtype == "float16":
            f16 = ir.DataType.FLOAT16
            x = add("Cast", [x], {"to": f16}, "/weight_fp16" + suffix, f16, list(codes.shape))
            x = add("Cast", [x], {"to": fp32}, "/weight_fp32" + suffix, fp32, list(codes.shape))
        return x

    if q.scale is None:
        codes = add_initializer(graph, namer, f"{w_name}_q", stored)
        add("Cast", [codes], {"to": fp32}, WEIGHT_CAST, fp32, shape)
    elif not q.block_size:
        # per-channel: [C] + [1] * (trailing dims) broadcasts along the channel axis
        scale_shape = [shape[q.axis]] + [1] * (rank - 1 - q.axis)
        scaled(stored, q.scale.reshape(scale_shape), "")
    elif rank == 2 and q.axis in (0, 1):
        r, b = int(q.axis), int(q.block_size)
        k = shape[r]
        full = k // b
        parts: list[ir.Value] = []
        if full:
            if r == 0:
                main = stored[: full * b].reshape(full, b, shape[1])
                main_scale = q.scale[:full].reshape(full, 1, shape[1])
            else:
                main = stored[:, : full * b].reshape(shape[0], full, b)
                main_scale = q.scale[:, :full].reshape(shape[0], full, 1)
            x = scaled(main, main_scale, "")
            flat = [full * b, shape[1]] if r == 0 else [shape[0], full * b]
            parts.append(add("Flatten", [x], {"axis": 2 - r}, "/weight_unblock", fp32, flat))
        if k > full * b:
            tail = stored[full * b :] if r == 0 else stored[:, full * b :]
            tail_scale = q.scale[full:] if r == 0 else q.scale[:, full:]
            parts.append(scaled(tail, tail_scale, "_tail"))
        if len(parts) > 1:
            add("Concat", parts, {"axis": r}, "/weight_join", fp32, shape)
    else:
        _decode_blocks_reshape(graph, namer, w_name, stored, q, fmt, shape, add)
    graph.insert_before(first, nodes)
    return nodes[-1].outputs[0]


def _decode_blocks_reshape(
    graph: ir.Graph,
    namer: Namer,
    w_name: str,
    stored: np.ndarray,
    q: QuantizedWeight,
    fmt: Format,
    shape: list[int],
    add: Callable[..., ir.Value],
) -> ir.Value:
    """The blocked decode for weights of rank other than 2: Pad / Reshape / Mul / Reshape / Slice."""
    fp32 = ir.DataType.FLOAT
    rank = len(shape)
    r, b = int(q.axis), int(q.block_size)
    k = shape[r]
    nb = -(-k // b)
    pad = nb * b - k
    codes = add_initializer(graph, namer, f"{w_name}_q", stored)
    x = add("Cast", [codes], {"to": fp32}, WEIGHT_CAST, fp32, shape)
    if pad:
        pads = [0] * (2 * rank)
        pads[rank + r] = pad
        padded = [*shape[:r], nb * b, *shape[r + 1 :]]
        x = add("Pad", [x, _i64_const(graph, namer, pads)], None, "/weight_pad", fp32, padded)
    blocked = [*shape[:r], nb, b, *shape[r + 1 :]]
    x = add("Reshape", [x, _i64_const(graph, namer, blocked)], None, "/weight_blocks", fp32, blocked)
    scale_shape = [*shape[:r], nb, 1, *shape[r + 1 :]]
    scale = add_initializer(graph, namer, f"{w_name}_scale", np.ascontiguousarray(q.scale).reshape(scale_shape))
    if scale.dtype != fp32:
        scale = add("Cast", [scale], {"to": fp32}, "/weight_scale_cast", fp32, scale_shape)
    x = add("Mul", [x, scale], None, "/weight_mul", fp32, blocked)
    if fmt.scale_dtype == "float16":
        x = add("Cast", [x], {"to": ir.DataType.FLOAT16}, "/weight_fp16", ir.DataType.FLOAT16, blocked)
        x = add("Cast", [x], {"to": fp32}, "/weight_fp32", fp32, blocked)
    flat = [*shape[:r], nb * b, *shape[r + 1 :]]
    x = add("Reshape", [x, _i64_const(graph, namer, flat)], None, "/weight_unblock", fp32, flat)
    if pad:
        ends = [_i64_const(graph, namer, [0]), _i64_const(graph, namer, [k]), _i64_const(graph, namer, [r])]
        x = add("Slice", [x, *ends], None, "/weight_slice", fp32, shape)
    return x


def decode_once_encoding(value: ir.Value) -> tuple[str, int, int] | None:
    """``(element, block_size, K)`` of a weight written by the decode-once form, else None.

    Walks back from ``value`` through ``Concat`` (first input: the whole blocks), ``Flatten``,
    ``Slice``/``Reshape``/``Cast``/``Mul``/``Pad`` to the ``Cast`` of the stored codes; only chains
    with a scale ``Mul`` count (a bare ``Cast`` of a 16-bit weight is recognised by
    :func:`existing_weight_encoding` itself).
    """
    node = value.producer()
    k_total: int | None = None
    if node is not None and is_onnx_op(node, "Concat") and node.inputs and node.inputs[0] is not None:
        axis = node.attributes.get_int("axis", 0)
        if value.shape is not None and value.shape.is_static() and -len(value.shape) <= axis < len(value.shape):
            k_total = int(value.shape[axis])
        node = node.inputs[0].producer()
    flatten_axis: int | None = None
    blocked: list[int] | None = None
    scale_shape: list[int] | None = None
    saw_mul = False
    while node is not None and is_onnx_op(node, ("Flatten", "Slice", "Reshape", "Cast", "Mul", "Pad")) and node.inputs:
        src = node.inputs[0]
        if src is None:
            return None
        if is_onnx_op(node, "Flatten"):
            flatten_axis = node.attributes.get_int("axis", 1)
        if is_onnx_op(node, "Reshape") and len(node.inputs) > 1 and node.inputs[1] is not None:
            const = node.inputs[1].const_value
            if const is not None:
                blocked = [int(v) for v in const.numpy().reshape(-1)]
        if is_onnx_op(node, "Mul") and len(node.inputs) > 1 and node.inputs[1] is not None:
            saw_mul = True
            s = node.inputs[1]
            sp = s.producer()
            if sp is not None and cast_to(sp) is not None and sp.inputs[0] is not None:
                s = sp.inputs[0]
            scale_shape = [int(d) for d in s.shape] if s.shape is not None and s.shape.is_static() else None
        if is_onnx_op(node, "Cast") and src.is_initializer():
            if not saw_mul or src.dtype not in _DTYPE_ELEMENTS or src.shape is None:
                return None
            element = _DTYPE_ELEMENTS[src.dtype]
            dims = [int(d) for d in src.shape]
            if flatten_axis is not None and len(dims) == 3 and flatten_axis in (1, 2):
                r = 2 - flatten_axis  # [K//b, b, N] (axis 0 blocks) or [O, K//b, b] (axis 1 blocks)
                b = dims[1] if r == 0 else dims[2]
                return (element, b, k_total if k_total is not None else dims[r] * b)
            if blocked is None:
                return (element, 0, 0)
            if scale_shape is None or len(scale_shape) != len(blocked):
                return None
            diffs = [i for i, (x, y) in enumerate(zip(scale_shape, blocked, strict=True)) if x != y]
            if not diffs:
                return (element, 1, 1)
            p = diffs[0]
            return (element, blocked[p], int(dims[p - 1]))
        node = src.producer()
    return None


# ---------------------------------------------------------------------------------------------
# Layouts beyond a plain [K, N] / [O, I, ...] weight: flattened Conv / ConvTranspose blocks,
# Gather tables, heads that read a table through a Transpose, fp16/bf16 weights.
#
# * flattened blocks (``WeightLayout.flatten``): codes ``<w>_q`` INT4 ``[O, I·kh·kw]`` (the
#   im2col view), scales ``<w>_scale`` FLOAT16 ``[O, ⌈I·kh·kw/bs⌉]`` → ``DequantizeLinear(axis=1,
#   block_size)`` → ``Cast(to=FLOAT)`` → ``Reshape(<w>_shape)`` (node ``<n>/weight_reshape``) to
#   the stored weight shape. A partial last block is legal blocked DequantizeLinear.
# * Gather tables (``[V, D]``, rows = channel 0, blocks along D): target ``qdq`` decodes the
#   table with the patterns above and gathers from the decoded table (standard ONNX has no
#   Gather on INT4); target ``ort`` with int4 blocks (power of two ≥ 16) replaces the Gather by
#   ``com.microsoft.GatherBlockQuantized(<w>_q, ids, <w>_scale; gather_axis=0, quantize_axis=1,
#   block_size, bits=4)`` (same name; output FLOAT16 = the scales' type) → ``Cast(to=FLOAT)``
#   ``<n>/weight_cast``: only the gathered rows are decoded. It reads the same codes and scales
#   as any tied head, so a tied table is stored once.
# * ``via`` Transpose (a head tied to the table): the decoded table replaces the Transpose's
#   input; the Transpose stays.
# * fp16 / bf16 weights: the decode ends with ``Cast(to=<weight type>)`` (``<n>/weight_cast_out``).
#   Exact for int4 with fp16 scales (the decoded values are fp16 values); otherwise the fp32
#   decode is rounded once more to the weight's type.
# ---------------------------------------------------------------------------------------------


def needs_extended_emission(
    members: Sequence[tuple[ir.Node, WeightNode]], q: QuantizedWeight, shape: tuple[int, ...]
) -> bool:
    """Whether a (weight, layout) group needs :func:`emit_extended` rather than the plain decode."""
    if tuple(q.codes.shape) != tuple(shape):
        return True
    return any(wn.op_type == "Gather" or wn.via or wn.dtype != "float32" for _, wn in members)


def _gbq_ok(wn: WeightNode, q: QuantizedWeight, fmt: Format) -> bool:
    bs = q.block_size
    return (
        wn.op_type == "Gather"
        and fmt.element == "int4"
        and len(wn.shape) == 2
        and q.axis == 1
        and bs >= 16
        and (bs & (bs - 1)) == 0
    )


def emit_extended(
    graph: ir.Graph,
    namer: Namer,
    w_name: str,
    q: QuantizedWeight,
    fmt: Format,
    members: Sequence[tuple[ir.Node, WeightNode]],
    shape: tuple[int, ...],
    target: str,
    decode_once: bool = False,
) -> bool:
    """Write one (weight, layout) group (see the section comment); return whether a contrib op was used.

    ``decode_once``: decode with :func:`_emit_decode_once` (constant-foldable ops) instead of
    ``DequantizeLinear``, then reshape / cast as below.
    """
    out_dtype = ELEMENT_DTYPES[members[0][1].dtype]
    gbq = [(n, wn) for n, wn in members if target == "ort" and q.scale is not None and _gbq_ok(wn, q, fmt)]
    rest = [(n, wn) for n, wn in members if all(n is not g for g, _ in gbq)]
    codes = scale = None
    if gbq or not decode_once:
        codes = add_initializer(graph, namer, f"{w_name}_q", _storage_array(q, fmt))
        if q.scale is not None:
            scale = add_initializer(graph, namer, f"{w_name}_scale", np.ascontiguousarray(q.scale))
    for node, _ in gbq:
        _replace_with_gbq(graph, namer, node, codes, scale, q, out_dtype)  # type: ignore[arg-type]
    if rest:
        by_name = nodes_by_name(graph)
        anchors = [(by_name[wn.via] if wn.via else node, wn) for node, wn in rest]
        positions = node_positions(graph)
        first = min((a for a, _ in anchors), key=lambda a: positions.get(id(a), 0))
        serves = [node.name or "" for node, _ in rest]
        base = first.name or w_name
        if decode_once and codes is None:
            head = _emit_decode_once(graph, namer, w_name, q, fmt, [first])
            nodes = _reshape_cast(graph, namer, head, list(q.codes.shape), shape, out_dtype, base, w_name, serves)
        elif decode_once and scale is not None and q.block_size and q.codes.ndim == 2 and q.axis == 1:
            # codes shared with GatherBlockQuantized: a constant-foldable decode of the same initializers
            nodes = _decode_once_shared(graph, namer, codes, scale, q, fmt, base, w_name, serves)  # type: ignore[arg-type]
            view = list(q.codes.shape)
            nodes += _reshape_cast(graph, namer, nodes[-1].outputs[0], view, shape, out_dtype, base, w_name, serves)
        else:
            nodes = _decode_chain(graph, namer, codes, scale, q, shape, out_dtype, base, w_name, serves)  # type: ignore[arg-type]
        graph.insert_before(first, nodes)
        decoded = nodes[-1].outputs[0] if nodes else head
        for anchor, wn in anchors:
            anchor.replace_input_with(0 if wn.via else wn.input_index, decoded)
    return bool(gbq)


def _decode_chain(
    graph: ir.Graph,
    namer: Namer,
    codes: ir.Value,
    scale: ir.Value | None,
    q: QuantizedWeight,
    shape: tuple[int, ...],
    out_dtype: ir.DataType,
    base: str,
    w_name: str,
    serves: Sequence[str],
) -> list[ir.Node]:
    view = list(q.codes.shape)
    half = q.scale is not None and q.scale.dtype == np.float16
    nodes = dq_chain(namer, codes, scale, q.axis, q.block_size, view, half, base, w_name, serves)
    return nodes + _reshape_cast(graph, namer, nodes[-1].outputs[0], view, shape, out_dtype, base, w_name, serves)


def _decode_once_shared(
    graph: ir.Graph,
    namer: Namer,
    codes: ir.Value,
    scale: ir.Value,
    q: QuantizedWeight,
    fmt: Format,
    base: str,
    w_name: str,
    serves: Sequence[str],
) -> list[ir.Node]:
    """Decode 2-D codes blocked along axis 1 with ops ORT folds (as :func:`_emit_decode_once`), reading
    the given codes and ``[R, n_blocks]`` scales (shared with a GatherBlockQuantized)."""
    rows, k = (int(d) for d in q.codes.shape)
    b = int(q.block_size)
    nb = -(-k // b)
    pad = nb * b - k
    fp32 = ir.DataType.FLOAT
    chain = _Chain(namer, base, w_name, serves)
    nodes, add = chain.nodes, chain.add

    x = add("Cast", [codes], {"to": fp32}, WEIGHT_CAST, fp32, [rows, k])
    if pad:
        x = add("Pad", [x, _i64_const(graph, namer, [0, 0, 0, pad])], None, "/weight_pad", fp32, [rows, nb * b])
    x = add("Reshape", [x, _i64_const(graph, namer, [rows, nb, b])], None, "/weight_blocks", fp32, [rows, nb, b])
    s3 = add("Reshape", [scale, _i64_const(graph, namer, [rows, nb, 1])], None, "/weight_scale_rs", scale.dtype or fp32,
             [rows, nb, 1])  # fmt: skip
    if scale.dtype != fp32:
        s3 = add("Cast", [s3], {"to": fp32}, "/weight_scale_cast", fp32, [rows, nb, 1])
    x = add("Mul", [x, s3], None, "/weight_mul", fp32, [rows, nb, b])
    if fmt.scale_dtype == "float16":
        x = add("Cast", [x], {"to": ir.DataType.FLOAT16}, "/weight_fp16", ir.DataType.FLOAT16, [rows, nb, b])
        x = add("Cast", [x], {"to": fp32}, "/weight_fp32", fp32, [rows, nb, b])
    x = add("Reshape", [x, _i64_const(graph, namer, [rows, nb * b])], None, "/weight_unblock", fp32, [rows, nb * b])
    if pad:
        starts, ends, axes = (_i64_const(graph, namer, [v]) for v in (0, k, 1))
        add("Slice", [x, starts, ends, axes], None, "/weight_slice", fp32, [rows, k])
    return nodes


def _reshape_cast(
    graph: ir.Graph,
    namer: Namer,
    value: ir.Value,
    view: Sequence[int],
    shape: tuple[int, ...],
    out_dtype: ir.DataType,
    base: str,
    w_name: str,
    serves: Sequence[str],
) -> list[ir.Node]:
    """Reshape a decoded fp32 view to the weight's shape and cast it to the weight's type (as needed)."""
    nodes: list[ir.Node] = []
    last = value
    if tuple(view) != tuple(shape):
        target_shape = _i64_const(graph, namer, shape)
        nodes.append(
            make_node(
                "Reshape",
                [last, target_shape],
                None,
                name=namer.node(base + "/weight_reshape"),
                out_name=namer.value(f"{w_name}_rs"),
                out_dtype=ir.DataType.FLOAT,
                out_shape=list(shape),
                serves=serves,
            )
        )
        last = nodes[-1].outputs[0]
    if out_dtype != ir.DataType.FLOAT:
        nodes.append(
            make_node(
                "Cast",
                [last],
                {"to": out_dtype},
                name=namer.node(base + WEIGHT_CAST + "_out"),
                out_name=namer.value(f"{w_name}_{out_dtype.name.lower()}"),
                out_dtype=out_dtype,
                out_shape=list(shape),
                serves=serves,
            )
        )
    return nodes


def _replace_with_gbq(
    graph: ir.Graph,
    namer: Namer,
    node: ir.Node,
    codes: ir.Value,
    scale: ir.Value,
    q: QuantizedWeight,
    out_dtype: ir.DataType,
) -> None:
    """Replace a Gather on a table by GatherBlockQuantized on its codes (+ a Cast to the table type)."""
    out = node.outputs[0]
    name = node.name or "gather"
    scale_dtype = ir.DataType.FLOAT16 if q.scale is not None and q.scale.dtype == np.float16 else ir.DataType.FLOAT
    shape = out.shape.copy() if out.shape is not None else None
    gbq_out = ir.Value(name=namer.value(f"{out.name}_gbq"), type=ir.TensorType(scale_dtype), shape=shape)
    gbq = ir.node(
        "GatherBlockQuantized",
        [codes, node.inputs[1], scale],
        {"gather_axis": 0, "quantize_axis": 1, "block_size": int(q.block_size), "bits": 4},
        domain=MS_DOMAIN,
        name=name,
        outputs=[gbq_out],
        doc_string=node.doc_string,
        metadata_props=dict(node.metadata_props),
    )
    new_nodes = [gbq]
    last = gbq_out
    if scale_dtype != out_dtype:
        cast = make_node(
            "Cast",
            [gbq_out],
            {"to": out_dtype},
            name=namer.node(name + WEIGHT_CAST),
            out_name=namer.value(f"{out.name}_cast"),
            out_dtype=out_dtype,
            out_shape=shape,
            serves=[name],
        )
        new_nodes.append(cast)
        last = cast.outputs[0]
    out_name = out.name
    graph.insert_before(node, new_nodes)
    out.replace_all_uses_with(last, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = None
    last.name = out_name


def existing_extended_encoding(node: ir.Node) -> tuple[str, int, int] | None:
    """Like :func:`existing_weight_encoding` for the patterns of :func:`emit_extended`."""
    if node.domain == MS_DOMAIN and node.op_type == "GatherBlockQuantized":
        data = node.inputs[0]
        k = int(data.shape[1]) if data is not None and data.shape is not None and len(data.shape) == 2 else 0
        return ("int4", get_int_attr(node, "block_size", 0), k)
    idx = 0 if is_onnx_op(node, "Gather") else 1
    if len(node.inputs) <= idx or node.inputs[idx] is None:
        return None
    value = node.inputs[idx]
    producer = value.producer()
    if producer is not None and is_onnx_op(producer, "Transpose") and idx == 1:
        value = producer.inputs[0]
    for _ in range(4):  # Cast(out) / Reshape / Cast(fp32) / DequantizeLinear
        once = decode_once_encoding(value) if value is not None else None
        if once is not None:
            return once
        producer = value.producer() if value is not None else None
        if producer is None:
            return None
        if is_onnx_op(producer, "DequantizeLinear"):
            codes = producer.inputs[0]
            return _dq_encoding(producer, want_int4=codes is not None and codes.dtype == ir.DataType.INT4)
        if cast_to(producer) is not None:
            src = producer.inputs[0]
            if src is not None and src.is_initializer() and src.dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
                return (_DTYPE_ELEMENTS[src.dtype], 0, 0)
        elif not is_onnx_op(producer, "Reshape"):
            return None
        value = producer.inputs[0]
    return None

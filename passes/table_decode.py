"""Portable decode of weights in formats no runtime decodes natively (the grammar families).

FP4/FP6 minifloats, NF4, integers of 2–7 bits, asymmetric integers, E8M0 / E4M3 / bf16 block
scales and NVFP4's per-tensor scale are written with standard ONNX ops only, so ONNX Runtime (and
any runtime) runs them, and the decode reproduces :func:`lpcompile.formats.dequantize` bit for bit:

==========================  =====================================================================
stored                      decode (every inserted node carries ``lpcompile.serves`` and the last
                            one ``lpcompile.table_decode = <format>``)
==========================  =====================================================================
``<w>_codes`` UINT8         codes of 1/2/4 bits packed ``8/bits`` per byte (first code in the low
                            bits): ``BitShift``/``BitwiseAnd`` per lane → ``Concat``; 3/5/6/7
                            bits: 8 codes in ``bits`` bytes (little-endian bit stream), code j read
                            from the two bytes it spans: ``Cast(INT32)`` → ``Gather`` low / high
                            byte → ``lo + 256·hi`` → ``Div(2^(bits·j mod 8))`` → ``Mod(2^bits)`` →
                            ``Cast(UINT8)`` (values < 2^16: exact; ORT's int64 ReduceSum is not
                            exact beyond 2^53, so no 56-bit word is formed); 8 bits one per byte;
                            then ``Reshape`` → ``Slice`` → ``Reshape(codes shape)``. Every code
                            stores exactly ``bits`` bits (plus zero codes padding the last group)
``<w>_table`` FLOAT [2^b]   ``Cast(INT32)`` → ``Gather(<w>_table, codes)``: the value of every code
``<w>_zp`` UINT8            asymmetric ints: zero points packed like the codes, unpacked the same
                            way (``<w>_zp_…`` nodes), then ``Sub(values, Cast(zp))`` per group
``<w>_offset`` FLOAT16 /    asymmetric ints with a float offset (``z<T>``): after the scale
BFLOAT16 / FLOAT            ``Mul``, ``Add(·, Cast_f32(<w>_offset))`` per group (``q·s + m``, fp32;
                            no rounding to the scale type afterwards)
``<w>_scale``               fp32 as is; fp16 / bf16 / FLOAT8E4M3FN → ``Cast(FLOAT)``; E8M0 as UINT8
                            → ``Gather(<w>_scale_table [256])``; NVFP4: ``Mul(·, <w>_tscale)``
==========================  =====================================================================

Per-block scales multiply the values reshaped to ``[…, n_blocks, block, …]`` (zero-padded when the
block does not divide the axis, sliced back after), per-channel scales broadcast along the channel
axis. With fp16 / bf16 scales the product is rounded to that type (``Cast`` round trip), as
DequantizeLinear's output would be.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lpcompile import format_grammar as fg
from lpcompile.formats import Format, QuantizedWeight
from lpcompile.passes._common import Namer, add_initializer, make_node

logger = logging.getLogger(__name__)

DECODE_KEY = "lpcompile.table_decode"
_FLOAT = ir.DataType.FLOAT


def pack_codes(codes: np.ndarray, bits: int) -> tuple[np.ndarray, int, int]:
    """Unsigned ``bits``-bit codes (flattened) packed into bytes: ``(bytes, codes per group, bytes per group)``.

    1/2/4-bit codes: ``8 // bits`` per byte, the first code in the low bits. 3/5/6/7-bit codes: 8
    codes in ``bits`` bytes, a little-endian bit stream (code ``j`` of a group occupies bits
    ``[bits·j, bits·j + bits)`` of the group's ``8·bits``-bit word). 8-bit codes: one per byte. The
    last group is padded with zero codes.
    """
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if bits >= 8:
        return flat.copy(), 1, 1
    per, nbytes = (8 // bits, 1) if bits in (1, 2, 4) else (8, bits)
    pad = (-flat.size) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    lanes = flat.reshape(-1, per).astype(np.uint64)
    word = np.zeros(lanes.shape[0], np.uint64)
    for j in range(per):
        word |= lanes[:, j] << np.uint64(bits * j)
    out = np.stack([(word >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(nbytes)], axis=1)
    return out.astype(np.uint8).reshape(-1), per, nbytes


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` (for tests and readers)."""
    if bits >= 8:
        return np.asarray(packed, np.uint8)[:n]
    per, nbytes = (8 // bits, 1) if bits in (1, 2, 4) else (8, bits)
    groups = np.asarray(packed, np.uint8).reshape(-1, nbytes).astype(np.uint64)
    word = np.zeros(groups.shape[0], np.uint64)
    for k in range(nbytes):
        word |= groups[:, k] << np.uint64(8 * k)
    mask = np.uint64((1 << bits) - 1)
    lanes = [(word >> np.uint64(bits * j)) & mask for j in range(per)]
    return np.stack(lanes, axis=1).reshape(-1)[:n].astype(np.uint8)


def _e8m0_table() -> np.ndarray:
    raw = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    return np.where(np.isnan(raw), 0.0, raw).astype(np.float32)


class _Builder:
    def __init__(self, graph: ir.Graph, namer: Namer, base: str, w_name: str, serves: Sequence[str]) -> None:
        self.graph, self.namer, self.base, self.w_name, self.serves = graph, namer, base, w_name, list(serves)
        self.nodes: list[ir.Node] = []

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self.namer, f"{self.w_name}_{suffix}", np.ascontiguousarray(array))

    def i64(self, suffix: str, values: Sequence[int]) -> ir.Value:
        return self.const(suffix, np.asarray(list(values), dtype=np.int64))

    def add(
        self,
        op: str,
        inputs: Sequence[ir.Value],
        attrs: dict[str, object] | None,
        suffix: str,
        dtype: ir.DataType,
        shape: Sequence[int] | None,
    ) -> ir.Value:
        node = make_node(
            op,
            list(inputs),
            attrs,
            name=self.namer.node(f"{self.base}/weight_{suffix}"),
            out_name=self.namer.value(f"{self.w_name}_{suffix}"),
            out_dtype=dtype,
            out_shape=list(shape) if shape is not None else None,
            serves=self.serves,
        )
        self.nodes.append(node)
        return node.outputs[0]


def _scale_value(b: _Builder, q: QuantizedWeight, fmt: Format, shape: Sequence[int]) -> ir.Value:
    """The fp32 scale (per group, in the broadcast ``shape``), tensor scale included."""
    s = np.asarray(q.scale)
    dtype = fmt.scale_dtype
    if dtype == "float8_e8m0fnu":
        bits = s.view(np.uint8).reshape(shape)
        table = b.const("scale_table", _e8m0_table())
        idx = b.add(
            "Cast", [b.const("scale_q", bits)], {"to": ir.DataType.INT32}, "scale_idx", ir.DataType.INT32, shape
        )
        val = b.add("Gather", [table, idx], {"axis": 0}, "scale_f32", _FLOAT, shape)
    elif dtype == "float32":
        val = b.const("scale", s.astype(np.float32).reshape(shape))
    else:
        stored = b.const("scale", s.reshape(shape))
        val = b.add("Cast", [stored], {"to": _FLOAT}, "scale_f32", _FLOAT, shape)
    if q.tensor_scale is not None:
        ts = b.const("tscale", np.asarray(np.float32(q.tensor_scale)))
        val = b.add("Mul", [val, ts], None, "scale_full", _FLOAT, shape)
    return val


def _unpacked(b: _Builder, what: str, array: np.ndarray, bits: int, shape: list[int]) -> ir.Value:
    """Store ``array`` (unsigned ``bits``-bit codes) packed (:func:`pack_codes`); the UINT8 decode in ``shape``.

    ``what`` is ``"codes"`` (the weight's codes: the names the 1/2/4-bit decode always had) or
    ``"zp"`` (asymmetric zero points, packed the same way so they store ``bits`` bits each).
    """
    n = int(np.prod(shape))
    packed, per, nbytes = pack_codes(array, bits)

    def nm(suffix: str) -> str:
        return suffix if what == "codes" else f"{what}_{suffix}"

    stored = b.const("codes" if what == "codes" else what, packed)
    u8 = ir.DataType.UINT8
    if per == 1:
        return b.add("Reshape", [stored, b.i64(nm("codes_shape"), shape)], None, nm("codes_nd"), u8, shape)
    groups = packed.size // nbytes
    if nbytes == 1:  # 1/2/4 bits: lane j = (byte >> bits·j) & mask
        mask = b.const(nm("code_mask"), np.asarray([(1 << bits) - 1], np.uint8))
        lanes = []
        for j in range(per):
            src = stored
            if j:
                sh = b.const(nm(f"code_shift{j}"), np.asarray([bits * j], np.uint8))
                src = b.add("BitShift", [stored, sh], {"direction": "RIGHT"}, nm(f"lane{j}_shift"), u8, [groups])
            lane = b.add("BitwiseAnd", [src, mask], None, nm(f"lane{j}"), u8, [groups])
            axis = b.i64(nm(f"lane{j}_axis"), [1])
            lanes.append(b.add("Unsqueeze", [lane, axis], None, nm(f"lane{j}_col"), u8, [groups, 1]))
        inter = b.add("Concat", lanes, {"axis": 1}, nm("lanes"), u8, [groups, per])
    else:  # 3/5/6/7 bits: code j spans bytes lo_j, lo_j + 1 of its group: ((lo + 256·hi) / 2^(bits·j mod 8)) mod 2^bits
        i32 = ir.DataType.INT32
        lo = [bits * j // 8 for j in range(per)]
        hi = [min(i + 1, nbytes - 1) for i in lo]
        hi_weight = [256 if i + 1 < nbytes else 0 for i in lo]  # the last code of a group lies in one byte
        gs = [groups, nbytes]
        rows = b.add("Reshape", [stored, b.i64(nm("group_shape"), gs)], None, nm("groups"), u8, gs)
        wide = b.add("Cast", [rows], {"to": i32}, nm("groups_i32"), i32, gs)
        lanes_shape = [groups, per]
        low = b.add("Gather", [wide, b.i64(nm("lo_byte"), lo)], {"axis": 1}, nm("lo"), i32, lanes_shape)
        high = b.add("Gather", [wide, b.i64(nm("hi_byte"), hi)], {"axis": 1}, nm("hi"), i32, lanes_shape)
        hw = b.const(nm("hi_weight"), np.asarray(hi_weight, np.int32))
        high = b.add("Mul", [high, hw], None, nm("hi_placed"), i32, lanes_shape)
        pair = b.add("Add", [low, high], None, nm("pair"), i32, lanes_shape)
        div = b.const(nm("lane_div"), np.asarray([1 << (bits * j % 8) for j in range(per)], np.int32))
        shifted = b.add("Div", [pair, div], None, nm("shifted"), i32, lanes_shape)
        mod = b.const(nm("lane_mod"), np.asarray([1 << bits], np.int32))
        lanes_i = b.add("Mod", [shifted, mod], {"fmod": 0}, nm("lanes_i32"), i32, lanes_shape)
        inter = b.add("Cast", [lanes_i], {"to": u8}, nm("lanes"), u8, lanes_shape)
    flat = b.add("Reshape", [inter, b.i64(nm("flat_shape"), [groups * per])], None, nm("flat"), u8, [groups * per])
    if groups * per != n:
        cut = [b.i64(nm("cut_start"), [0]), b.i64(nm("cut_end"), [n]), b.i64(nm("cut_axis"), [0])]
        flat = b.add("Slice", [flat, *cut], None, nm("cut"), u8, [n])
    return b.add("Reshape", [flat, b.i64(nm("codes_shape"), shape)], None, nm("codes_nd"), u8, shape)


def emit_table_decode(
    graph: ir.Graph,
    namer: Namer,
    w_name: str,
    q: QuantizedWeight,
    fmt: Format,
    base: str,
    serves: Sequence[str],
    weight_shape: Sequence[int],
    out_dtype: ir.DataType = _FLOAT,
) -> list[ir.Node]:
    """Nodes decoding ``q`` (see the module docstring); the last one's output is the weight."""
    b = _Builder(graph, namer, base, w_name, serves)
    shape = [int(d) for d in q.codes.shape]
    rank = len(shape)
    bits = fg.element_bits(fmt.element)
    codes = _unpacked(b, "codes", fg.to_codes(q.codes, fmt.element), bits, shape)
    idx = b.add("Cast", [codes], {"to": ir.DataType.INT32}, "idx", ir.DataType.INT32, shape)
    values = b.add("Gather", [b.const("table", fg.code_table(fmt.element)), idx], {"axis": 0}, "values", _FLOAT, shape)

    if q.block_size:
        r, bs = int(q.axis), int(q.block_size)
        k = shape[r]
        nb = -(-k // bs)
        pad = nb * bs - k
        if pad:
            pads = [0] * (2 * rank)
            pads[rank + r] = pad
            values = b.add(
                "Pad", [values, b.i64("pads", pads)], None, "pad", _FLOAT, [*shape[:r], nb * bs, *shape[r + 1 :]]
            )
        blocked = [*shape[:r], nb, bs, *shape[r + 1 :]]
        values = b.add("Reshape", [values, b.i64("blocked", blocked)], None, "blocks", _FLOAT, blocked)
        group_shape = [*shape[:r], nb, 1, *shape[r + 1 :]]
    else:
        group_shape = [1] * rank
        group_shape[q.axis] = shape[q.axis]
        blocked = shape
    offset = getattr(fmt, "offset_dtype", None)
    if q.zero_point is not None and offset is None:
        zp = _unpacked(b, "zp", np.asarray(q.zero_point, np.uint8), bits, group_shape)
        zpf = b.add("Cast", [zp], {"to": _FLOAT}, "zp_f32", _FLOAT, group_shape)
        values = b.add("Sub", [values, zpf], None, "centered", _FLOAT, blocked)
    scale = _scale_value(b, q, fmt, group_shape)
    values = b.add("Mul", [values, scale], None, "scaled", _FLOAT, blocked)
    if offset is not None and q.zero_point is not None:  # q·s + m
        m = b.const("offset", np.asarray(q.zero_point).reshape(group_shape))
        if offset != "float32":
            m = b.add("Cast", [m], {"to": _FLOAT}, "offset_f32", _FLOAT, group_shape)
        values = b.add("Add", [values, m], None, "shifted", _FLOAT, blocked)
    elif q.tensor_scale is None and fmt.scale_dtype in ("float16", "bfloat16"):
        low = ir.DataType.FLOAT16 if fmt.scale_dtype == "float16" else ir.DataType.BFLOAT16
        values = b.add("Cast", [values], {"to": low}, "round", low, blocked)
        values = b.add("Cast", [values], {"to": _FLOAT}, "round_f32", _FLOAT, blocked)
    if q.block_size:
        r = int(q.axis)
        flat_shape = [*shape[:r], blocked[r] * blocked[r + 1], *shape[r + 1 :]]
        values = b.add("Reshape", [values, b.i64("unblocked", flat_shape)], None, "unblock", _FLOAT, flat_shape)
        if flat_shape[r] != shape[r]:
            values = b.add(
                "Slice",
                [values, b.i64("k_start", [0]), b.i64("k_end", [shape[r]]), b.i64("k_axis", [r])],
                None,
                "slice",
                _FLOAT,
                shape,
            )
    if list(weight_shape) != shape:
        values = b.add(
            "Reshape", [values, b.i64("weight_shape", list(weight_shape))], None, "reshape", _FLOAT, list(weight_shape)
        )
    if out_dtype != _FLOAT:
        values = b.add("Cast", [values], {"to": out_dtype}, "cast_out", out_dtype, list(weight_shape))
    b.nodes[-1].metadata_props[DECODE_KEY] = fmt.name
    logger.debug("%s: %s decoded by table (%d nodes, %d-bit codes packed)", w_name, fmt.name, len(b.nodes), bits)
    return b.nodes


def table_decode_encoding(node: ir.Node, index: int) -> tuple[str, int, int] | None:
    """``(element, block_size, K)`` when ``node``'s input ``index`` is the output of a table decode."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer()
    if producer is None or DECODE_KEY not in producer.metadata_props:
        return None
    from lpcompile.formats import get_format

    fmt = get_format(producer.metadata_props[DECODE_KEY])
    return (fmt.element, int(fmt.block_size or 0), 0)


__all__ = ["DECODE_KEY", "emit_table_decode", "pack_codes", "table_decode_encoding", "unpack_codes"]

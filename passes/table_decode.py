"""Portable decode of weights in formats no runtime decodes natively (the grammar families).

FP4/FP6 minifloats, NF4, integers of 2–7 bits, asymmetric integers, E8M0 / E4M3 / bf16 block
scales and NVFP4's per-tensor scale are written with standard ONNX ops only, so ONNX Runtime (and
any runtime) runs them, and the decode reproduces :func:`lpcompile.formats.dequantize` bit for bit:

==========================  =====================================================================
stored                      decode (every inserted node carries ``lpcompile.serves`` and the last
                            one ``lpcompile.table_decode = <format>``)
==========================  =====================================================================
``<w>_codes`` UINT8         codes of 1/2/4 bits packed ``8/bits`` per byte (first code in the low
                            bits), wider codes one per byte: ``BitShift``/``BitwiseAnd`` per lane
                            → ``Concat`` → ``Reshape`` → ``Slice`` → ``Reshape(codes shape)``
``<w>_table`` FLOAT [2^b]   ``Cast(INT32)`` → ``Gather(<w>_table, codes)``: the value of every code
``<w>_zp`` UINT8            asymmetric ints: ``Sub(values, Cast(zp))`` per group
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


def pack_codes(codes: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Unsigned codes (flattened) packed ``8 // bits`` per byte when ``bits`` divides 8; (bytes, per byte)."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if bits not in (1, 2, 4):
        return flat.copy(), 1
    per = 8 // bits
    pad = (-flat.size) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    lanes = flat.reshape(-1, per).astype(np.uint16)
    packed = np.zeros(lanes.shape[0], np.uint16)
    for j in range(per):
        packed |= lanes[:, j] << (bits * j)
    return packed.astype(np.uint8), per


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` (for tests and readers)."""
    if bits not in (1, 2, 4):
        return np.asarray(packed, np.uint8)[:n]
    per = 8 // bits
    mask = (1 << bits) - 1
    lanes = [(packed >> (bits * j)) & mask for j in range(per)]
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
    n = int(np.prod(shape))
    bits = fg.element_bits(fmt.element)
    codes_u8 = fg.to_codes(q.codes, fmt.element)
    packed, per = pack_codes(codes_u8, bits)
    stored = b.const("codes", packed)
    if per > 1:
        mask = b.const("code_mask", np.asarray([(1 << bits) - 1], np.uint8))
        lanes = []
        for j in range(per):
            src = stored
            if j:
                sh = b.const(f"code_shift{j}", np.asarray([bits * j], np.uint8))
                src = b.add(
                    "BitShift", [stored, sh], {"direction": "RIGHT"}, f"lane{j}_shift", ir.DataType.UINT8, [packed.size]
                )
            lane = b.add("BitwiseAnd", [src, mask], None, f"lane{j}", ir.DataType.UINT8, [packed.size])
            lanes.append(
                b.add(
                    "Unsqueeze",
                    [lane, b.i64(f"lane{j}_axis", [1])],
                    None,
                    f"lane{j}_col",
                    ir.DataType.UINT8,
                    [packed.size, 1],
                )
            )
        inter = b.add("Concat", lanes, {"axis": 1}, "lanes", ir.DataType.UINT8, [packed.size, per])
        flat = b.add(
            "Reshape",
            [inter, b.i64("flat_shape", [packed.size * per])],
            None,
            "flat",
            ir.DataType.UINT8,
            [packed.size * per],
        )
        if packed.size * per != n:
            flat = b.add(
                "Slice",
                [flat, b.i64("cut_start", [0]), b.i64("cut_end", [n]), b.i64("cut_axis", [0])],
                None,
                "cut",
                ir.DataType.UINT8,
                [n],
            )
        codes = b.add("Reshape", [flat, b.i64("codes_shape", shape)], None, "codes_nd", ir.DataType.UINT8, shape)
    else:
        codes = b.add("Reshape", [stored, b.i64("codes_shape", shape)], None, "codes_nd", ir.DataType.UINT8, shape)
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
    if q.zero_point is not None:
        zp = b.const("zp", np.asarray(q.zero_point, np.uint8).reshape(group_shape))
        zpf = b.add("Cast", [zp], {"to": _FLOAT}, "zp_f32", _FLOAT, group_shape)
        values = b.add("Sub", [values, zpf], None, "centered", _FLOAT, blocked)
    scale = _scale_value(b, q, fmt, group_shape)
    values = b.add("Mul", [values, scale], None, "scaled", _FLOAT, blocked)
    if q.tensor_scale is None and fmt.scale_dtype in ("float16", "bfloat16"):
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
    logger.debug("%s: %s decoded by table (%d nodes, %d code(s) per byte)", w_name, fmt.name, len(b.nodes), per)
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

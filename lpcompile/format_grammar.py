"""Formats as a language: one grammar, parsed and validated here, with a bit-exact reference per family.

A format name is an element followed by ``_``-separated parts::

    name     := element ( "_" part )*
    element  := "int"N            symmetric integers, N = 2..8 (codes -2^(N-1) .. 2^(N-1)-1)
              | "int"N "_asym"    asymmetric: unsigned codes 0 .. 2^N-1 and a zero point per scale group
              | "e"X"m"Y          minifloat, saturating, with subnormals, no inf/NaN codes beyond the
                                  type's own: e2m1 (FP4), e2m3 / e3m2 (FP6), e4m3 / e5m2 (FP8)
              | "nf4"             the 16-value NormalFloat codebook (QLoRA), absmax-scaled
    part     := "b"B              one scale per block of B along the reduction axis
              | "pc"              one scale per output channel
              | "s"T              scale type T: fp32 | fp16 | bf16 | e8m0 (power of two) | e4m3
                                  (``sf16`` / ``sf32`` are accepted for ``sfp16`` / ``sfp32``)
              | "t32"             a second, per-tensor fp32 scale (NVFP4): block scales are stored
                                  relative to it
              | "a"A              activations entering the op rounded to A: e4m3 | e5m2 | bf16 | fp16
              | "z"T              asymmetric ints only: a FLOAT offset per scale group instead of the
                                  integer zero point, of type T: f16 | bf16 | f32 (GGUF Q4_1 / Q5_1,
                                  HQQ-style), decode ``q·s + m``

Defaults: ints and 8-bit floats are per channel with fp32 scales; FP4/FP6 and ``nf4`` need
blocks; block scales are fp16 unless given. Short names: ``mxfp4`` = ``e2m1_b32_se8m0``,
``mxfp6_e2m3``, ``mxfp6_e3m2``, ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxint8`` = ``int8_b32_se8m0``,
``nvfp4`` = ``e2m1_b16_se4m3_t32``, ``nf4`` = ``nf4_b64``, ``int8_asym`` = ``int8_asym_pc``,
``w4a8`` = ``int4_b128_ae4m3`` (ZeroQuant-FP style W4A8), ``q4_1`` = ``int4_asym_b32_zf16`` and
``q5_1`` = ``int5_asym_b32_zf16`` (llama.cpp's Q4_1 / Q5_1: blocks of 32, fp16 scale and fp16 min;
5.0 / 6.0 bits). The names already in the registry
(``int4_b128``, ``int8``, ``fp8_e4m3``…) keep their exact definitions and numerics.

Bits per weight count everything stored: the element, each scale (32/16/8 bits), each zero point
(N bits; a float offset: its type's 16 or 32 bits) and the per-tensor scale.

References (numpy + ml_dtypes, round-to-nearest-even everywhere):

* symmetric ints: ``s = amax/qmax`` stored in the scale type, codes ``clip(rint(w/s))``, decode ``q·s``;
* asymmetric ints: ``s = (max−min)/(2^N−1)``, ``z = clip(rint(−min/s), 0, 2^N−1)``, codes
  ``clip(rint(w/s)+z, 0, 2^N−1)``, decode ``(q−z)·s``;
* asymmetric ints with a float offset (``z<T>``): ``s = (max−min)/(2^N−1)`` in the scale type and
  ``m = min`` in the offset type (max / min of the group itself: 0 need not be in range; a partial
  last block ignores its padding), codes ``clip(rint((w−m)/s), 0, 2^N−1)`` computed (float64) with
  the STORED ``s`` and ``m``, decode ``q·s + m`` in fp32: ``fp32(fp32(q·s) + m)`` (one ONNX ``Mul``
  then one ``Add``; with fp16 / bf16 / E4M3 / E8M0 scales ``q·s`` is exact in fp32, so the one
  rounding is the ``Add``'s and a fused multiply-add gives the same value). Unlike the other
  families the product is *not* rounded to an fp16 / bf16 scale type (no ``DequantizeLinear`` is
  modelled: llama.cpp dequantizes Q4_1 as ``q·d + m`` in fp32 too). A group with max = min stores
  ``s = 1``, codes 0 and ``m = min``; weights beyond ±float32 max / 4 (±inf) saturate there, so the
  decode stays finite;
* minifloats: ``s`` maps ``amax`` to the element's largest value (E8M0 scales: the OCP MX rule
  ``2^(floor(log2 amax) − emax)``), codes = the ml_dtypes cast of ``w/s`` (saturating), decode ``q·s``;
* NVFP4: ``S = amax_tensor/(448·6)`` (fp32), block scales ``e4m3(amax_b/6/S)``, decode ``q·s_b·S``;
* NF4: ``s = amax`` per block, code = nearest codebook entry of ``w/s``, decode ``table[q]·s``.

Decoding multiplies in fp32; a product is rounded to the scale type only where ONNX
``DequantizeLinear`` would (fp16 / bf16 scales: the output has the scale's type).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from lpcompile.errors import FormatError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiniFloat:
    """A small float element: its ml_dtypes type (the reference cast) and its largest value."""

    key: str
    np_dtype: type
    max_value: float
    emax: int  # exponent of the largest normal (OCP MX "emax_elem")


MINIFLOATS: Mapping[str, MiniFloat] = {
    "e2m1": MiniFloat("float4_e2m1fn", ml_dtypes.float4_e2m1fn, 6.0, 2),
    "e2m3": MiniFloat("float6_e2m3fn", ml_dtypes.float6_e2m3fn, 7.5, 2),
    "e3m2": MiniFloat("float6_e3m2fn", ml_dtypes.float6_e3m2fn, 28.0, 4),
    "e4m3": MiniFloat("float8_e4m3fn", ml_dtypes.float8_e4m3fn, 448.0, 8),
    "e5m2": MiniFloat("float8_e5m2", ml_dtypes.float8_e5m2, 57344.0, 15),
}
BY_ELEMENT: Mapping[str, MiniFloat] = {m.key: m for m in MINIFLOATS.values()}
SCALE_TYPES: Mapping[str, str] = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "e8m0": "float8_e8m0fnu",
    "e4m3": "float8_e4m3fn",
}
SCALE_BITS: Mapping[str, int] = {"float32": 32, "float16": 16, "bfloat16": 16, "float8_e8m0fnu": 8, "float8_e4m3fn": 8}
ACTIVATIONS: Mapping[str, str] = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2", "bf16": "bfloat16", "fp16": "float16"}
#: NormalFloat-4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0
NF4_TABLE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933998108,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

SHORT_NAMES: Mapping[str, str] = {
    "mxfp4": "e2m1_b32_se8m0",
    "mxfp6_e2m3": "e2m3_b32_se8m0",
    "mxfp6_e3m2": "e3m2_b32_se8m0",
    "mxfp8_e4m3": "e4m3_b32_se8m0",
    "mxfp8_e5m2": "e5m2_b32_se8m0",
    "mxint8": "int8_b32_se8m0",
    "nvfp4": "e2m1_b16_se4m3_t32",
    "nf4": "nf4_b64",
    "int8_asym": "int8_asym_pc",
    "int4_asym": "int4_asym_b128",
    "w4a8": "int4_b128_ae4m3",
    "fp4": "e2m1_b32_sfp16",
    "q4_1": "int4_asym_b32_zf16",
    "q5_1": "int5_asym_b32_zf16",
}
#: float offset types of the ``z<T>`` part (``zfp16`` / ``zfp32`` are accepted too)
OFFSET_TYPES: Mapping[str, str] = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
OFFSET_BITS: Mapping[str, int] = {"float16": 16, "bfloat16": 16, "float32": 32}
#: float-offset formats saturate weights beyond this magnitude (float32 max / 4: the decode never overflows)
OFFSET_LIMIT = float(np.finfo(np.float32).max) / 4


@dataclass(frozen=True)
class Spec:
    """A parsed format name (the fields the registry's :class:`~lpcompile.formats.Format` needs)."""

    name: str
    element: str  # "int<N>", "uint<N>" (asymmetric), a MiniFloat key, or "nf4"
    storage_bits: int
    scale: str  # "per_channel" or "per_block"
    scale_dtype: str
    block_size: int | None
    zero_point: bool
    tensor_scale: bool
    activation: str | None
    description: str
    offset_dtype: str | None = None  # float offset per group (``z<T>``): decode q·s + m; None: integer zp


_PART = re.compile(r"^(b\d+|pc|s[a-z0-9]+|t32|a[a-z0-9]+|z[a-z0-9]+|asym|sym)$")


@functools.lru_cache(maxsize=256)
def parse(text: str) -> Spec:
    """Parse a grammar name (see the module docstring) into a validated :class:`Spec`.

    Raises:
        FormatError: with a one-line message naming the offending part.
    """
    key = text.strip().lower()
    key = SHORT_NAMES.get(key, key)
    parts = key.split("_")
    head, rest = parts[0], parts[1:]
    asym = "asym" in rest
    rest = [p for p in rest if p not in ("asym", "sym")]
    m_int = re.fullmatch(r"u?int(\d)", head)
    m_flt = re.fullmatch(r"e(\d)m(\d)", head)
    if m_int:
        bits = int(m_int.group(1))
        if not 2 <= bits <= 8:
            raise FormatError(f"format {text!r}: integers of 2 to 8 bits, not {bits}")
        asym = asym or head.startswith("uint")
        element = f"uint{bits}" if asym else f"int{bits}"
    elif m_flt:
        if head not in MINIFLOATS:
            raise FormatError(f"format {text!r}: minifloat {head} is not one of {', '.join(MINIFLOATS)}")
        if asym:
            raise FormatError(f"format {text!r}: minifloats are symmetric (no zero point)")
        element = MINIFLOATS[head].key
        bits = 1 + int(m_flt.group(1)) + int(m_flt.group(2))
    elif head == "nf4":
        if asym:
            raise FormatError(f"format {text!r}: nf4 is symmetric (no zero point)")
        element, bits = "nf4", 4
    else:
        raise FormatError(f"format {text!r}: an element must come first (intN, intN_asym, eXmY, nf4)")
    block: int | None = None
    per_channel = False
    scale_dtype: str | None = None
    tensor_scale = False
    activation: str | None = None
    offset_dtype: str | None = None
    for p in rest:
        if not _PART.match(p):
            raise FormatError(f"format {text!r}: unknown part {p!r} (bN, pc, s<type>, t32, a<type>, z<type>, asym)")
        if p[0] == "b" and p[1:].isdigit():
            block = int(p[1:])
            if block < 1:
                raise FormatError(f"format {text!r}: block size must be >= 1")
        elif p == "pc":
            per_channel = True
        elif p == "t32":
            tensor_scale = True
        elif p[0] == "s":
            st = {"f16": "fp16", "f32": "fp32"}.get(p[1:], p[1:])  # sf16 / sf32 spell the offsets' way
            if st not in SCALE_TYPES:
                raise FormatError(f"format {text!r}: scale type {p[1:]!r} is not one of {', '.join(SCALE_TYPES)}")
            scale_dtype = SCALE_TYPES[st]
        elif p[0] == "z":
            zt = p[1:].replace("fp", "f", 1) if p[1:] in ("fp16", "fp32") else p[1:]
            if zt not in OFFSET_TYPES:
                raise FormatError(f"format {text!r}: offset type {p[1:]!r} is not one of {', '.join(OFFSET_TYPES)}")
            offset_dtype = OFFSET_TYPES[zt]
        elif p[0] == "a":
            if p[1:] not in ACTIVATIONS:
                raise FormatError(f"format {text!r}: activation {p[1:]!r} is not one of {', '.join(ACTIVATIONS)}")
            activation = ACTIVATIONS[p[1:]]
    if offset_dtype is not None and not asym:
        raise FormatError(f"format {text!r}: a float offset (z<type>) needs an asymmetric int (intN_asym)")
    if offset_dtype is not None and tensor_scale:
        raise FormatError(f"format {text!r}: a float offset does not combine with a per-tensor scale (t32)")
    if block is not None and per_channel:
        raise FormatError(f"format {text!r}: give either a block size or pc, not both")
    if block is None and (element.startswith(("float4", "float6")) or element == "nf4"):
        raise FormatError(f"format {text!r}: {head} needs a block size (e.g. {head}_b32)")
    if block is None:
        per_channel = True  # ints and 8-bit floats default to one scale per output channel
    scale = "per_block" if block is not None else "per_channel"
    if scale_dtype is None:
        scale_dtype = "float16" if block is not None else "float32"
    if tensor_scale and scale_dtype == "float32":
        raise FormatError(f"format {text!r}: a per-tensor scale (t32) needs low-precision block scales")
    canon = [head if not asym else f"int{bits}_asym"]
    canon.append(f"b{block}" if block is not None else "pc")
    default_scale = "float16" if block is not None else "float32"
    if scale_dtype != default_scale:
        canon.append("s" + {v: k for k, v in SCALE_TYPES.items()}[scale_dtype])
    if tensor_scale:
        canon.append("t32")
    if offset_dtype is not None:
        canon.append("z" + {v: k for k, v in OFFSET_TYPES.items()}[offset_dtype])
    if activation:
        canon.append("a" + {v: k for k, v in ACTIVATIONS.items()}[activation])
    name = "_".join(canon)
    gran = f"blocks of {block} along the reduction axis" if block else "per output channel"
    kind = "asymmetric" if asym else "symmetric"
    desc = f"{head} {kind if m_int else ''} weights, {gran}, {scale_dtype} scales".replace("  ", " ")
    if tensor_scale:
        desc += " + fp32 per-tensor scale"
    if offset_dtype is not None:
        desc = desc.replace("asymmetric", "asymmetric (float offset)") + f", {offset_dtype} offsets (q·s + m)"
    if activation:
        desc += f", activations {activation}"
    return Spec(name, element, bits, scale, scale_dtype, block, asym, tensor_scale, activation, desc, offset_dtype)


# ---------------------------------------------------------------------------------------------
# element helpers
# ---------------------------------------------------------------------------------------------


def int_range(element: str) -> tuple[int, int]:
    """Code range of ``int<N>`` / ``uint<N>``."""
    n = int(element[-1])
    return (0, 2**n - 1) if element.startswith("uint") else (-(2 ** (n - 1)), 2 ** (n - 1) - 1)


def code_table(element: str) -> np.ndarray:
    """Every code's value, float32, indexed by the stored (unsigned) code: what a Gather decodes from.

    ints: code ``c`` of an N-bit two's-complement field decodes to its signed value (``uint``: itself);
    minifloats: the ml_dtypes value of each bit pattern (NaN patterns, where the type has them, are 0);
    nf4: the codebook.
    """
    if element == "nf4":
        return np.asarray(NF4_TABLE, dtype=np.float32)
    if element.startswith(("int", "uint")):
        lo, _hi = int_range(element)
        n = int(element[-1])
        codes = np.arange(2**n)
        if lo < 0:
            codes = np.where(codes >= 2 ** (n - 1), codes - 2**n, codes)
        return codes.astype(np.float32)
    mf = BY_ELEMENT[element]
    bits = 8 if element.startswith("float8") else int(element[5])
    raw = np.arange(2**bits, dtype=np.uint8)
    vals = raw.view(mf.np_dtype).astype(np.float32)
    return np.where(np.isnan(vals), 0.0, vals).astype(np.float32)


def element_bits(element: str) -> int:
    if element == "nf4":
        return 4
    if element.startswith(("int", "uint")):
        return int(element[-1])
    return 8 if element.startswith("float8") else int(element[5])


def to_codes(values: np.ndarray, element: str) -> np.ndarray:
    """Stored unsigned codes (uint8) of element values (ints: two's complement in N bits)."""
    if element.startswith(("int", "uint")):
        n = element_bits(element)
        return (np.asarray(values).astype(np.int16) & (2**n - 1)).astype(np.uint8)
    if element == "nf4":
        return np.asarray(values).astype(np.uint8)  # already indices
    mf = BY_ELEMENT[element]
    return np.asarray(values).astype(mf.np_dtype).view(np.uint8)


# ---------------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------------


def store_scale(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Round float64 scales to the scale type (positive, finite), returned in that type."""
    s = np.asarray(s, dtype=np.float64)
    if scale_dtype == "float32":
        out = s.astype(np.float32)
        return np.where(out > 0, out, np.float32(np.finfo(np.float32).tiny)).astype(np.float32)
    if scale_dtype == "float16":
        out = np.minimum(s, 65504.0).astype(np.float16)
        tiny = np.float16(np.finfo(np.float16).smallest_subnormal)
        return np.where(out > 0, out, tiny).astype(np.float16)
    if scale_dtype == "bfloat16":
        big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
        out = np.minimum(s, big).astype(np.float32).astype(ml_dtypes.bfloat16)
        tiny = ml_dtypes.bfloat16(float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal))
        return np.where(out.astype(np.float32) > 0, out, tiny).astype(ml_dtypes.bfloat16)
    if scale_dtype == "float8_e4m3fn":
        out = np.clip(s, 0.0, 448.0).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        tiny = ml_dtypes.float8_e4m3fn(2.0**-9)
        return np.where(out.astype(np.float32) > 0, out, tiny).astype(ml_dtypes.float8_e4m3fn)
    if scale_dtype == "float8_e8m0fnu":
        # already powers of two (see _mx_scale); clamp to the type's range
        e = np.clip(np.round(np.log2(np.maximum(s, 2.0**-127))), -127, 127)
        return np.exp2(e).astype(np.float32).astype(ml_dtypes.float8_e8m0fnu)
    raise FormatError(f"unknown scale type {scale_dtype}")


def store_offset(m: np.ndarray, offset_dtype: str) -> np.ndarray:
    """Round float64 offsets to their type (round-to-nearest-even, saturating at the type's largest
    finite value), returned in that type."""
    m = np.asarray(m, dtype=np.float64)
    if offset_dtype not in OFFSET_BITS:
        raise FormatError(f"unknown offset type {offset_dtype}")
    np_type = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[offset_dtype]
    big = float(ml_dtypes.finfo(np_type).max)
    return np.clip(m, -big, big).astype(np_type)


def _mx_scale(amax: np.ndarray, emax: int) -> np.ndarray:
    """OCP MX shared scale: 2^(floor(log2 amax) − emax_elem) (1 for all-zero groups)."""
    a = np.asarray(amax, dtype=np.float64)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0))) - emax
    return np.where(a > 0, np.exp2(np.clip(e, -127, 127)), 1.0)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize (grouped view: [G, B, rest] with one scale per (G, rest))
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Stored pieces of one weight in a grammar format (shapes as the registry's QuantizedWeight)."""

    codes: np.ndarray  # element values: int8/int16 ints, ml_dtypes floats, uint8 NF4 indices
    scale: np.ndarray  # in the scale type
    zero_point: np.ndarray | None  # uint8, same shape as scale; float offsets (z<T>): in the offset type
    tensor_scale: float | None
    axis: int
    block_size: int


def _groups(w: np.ndarray, scale: str, axis: int, block: int) -> tuple[np.ndarray, int]:
    """``[G, B, *rest]`` view (zero-padded) of ``w`` with the grouped axis first; returns it and the pad."""
    moved = np.moveaxis(w, axis, 0)
    if scale == "per_channel":
        rest = moved.reshape(moved.shape[0], -1)  # [C, rest]
        return rest[:, :, None], 0  # groups = channels: [C, rest, 1]
    k = moved.shape[0]
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        moved = np.concatenate([moved, np.zeros((pad, *moved.shape[1:]), moved.dtype)], axis=0)
    return moved.reshape(nb, block, *moved.shape[1:]), pad


def quantize(spec: Spec, w: np.ndarray, channel_axis: int, reduction_axis: int) -> Encoded:
    """Reference quantization of a float32 weight (NaN → 0, ±inf saturate like the registry formats)."""
    w = np.asarray(w, dtype=np.float32)
    w = np.nan_to_num(w, nan=0.0, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)
    if spec.scale == "per_channel":
        axis = channel_axis % w.ndim
        block = 0
    else:
        axis = reduction_axis % w.ndim
        block = max(1, min(int(spec.block_size or 1), w.shape[axis]))
    g, pad = _groups(w, spec.scale, axis, block)
    red = 1  # per channel [C, rest, 1]: over rest; per block [G, B, *rest]: over B
    gd = g.astype(np.float64)
    amax = np.max(np.abs(gd), axis=red, keepdims=True)
    tensor_scale: float | None = None
    zp = None
    if spec.offset_dtype is not None:
        hi = int_range(spec.element)[1]
        gd = np.clip(gd, -OFFSET_LIMIT, OFFSET_LIMIT)  # so hi·s + m stays finite in fp32
        valid = _valid_mask(g.shape, pad)
        gmin = np.min(np.where(valid, gd, np.inf), axis=red, keepdims=True)
        gmax = np.max(np.where(valid, gd, -np.inf), axis=red, keepdims=True)
        s_st = store_scale(np.where(gmax > gmin, (gmax - gmin) / hi, 1.0), spec.scale_dtype)
        zp = store_offset(gmin, spec.offset_dtype)
        codes = np.clip(np.rint((gd - zp.astype(np.float64)) / s_st.astype(np.float64)), 0, hi)
    elif spec.element.startswith("uint"):
        lo, hi = int_range(spec.element)
        gmin = np.minimum(np.min(gd, axis=red, keepdims=True), 0.0)
        gmax = np.maximum(np.max(gd, axis=red, keepdims=True), 0.0)
        s_st = store_scale(np.where(gmax > gmin, (gmax - gmin) / hi, 1.0), spec.scale_dtype)
        s = s_st.astype(np.float64)
        zpf = np.clip(np.rint(-gmin / s), lo, hi)
        codes = np.clip(np.rint(gd / s) + zpf, lo, hi)
        zp = zpf.astype(np.uint8)
    else:
        if spec.element == "nf4":
            top = 1.0
        elif spec.element.startswith("int"):
            top = float(int_range(spec.element)[1])
        else:
            top = BY_ELEMENT[spec.element].max_value
        if spec.tensor_scale:
            t_amax = float(np.max(amax)) if amax.size else 0.0
            elem_max = top
            tensor_scale = float(np.float32(t_amax / (SCALE_MAX[spec.scale_dtype] * elem_max))) if t_amax > 0 else 1.0
            tensor_scale = tensor_scale if tensor_scale > 0 else 1.0
            raw = np.where(amax > 0, amax / top / tensor_scale, 1.0)
        elif spec.scale_dtype == "float8_e8m0fnu":
            emax = BY_ELEMENT[spec.element].emax if spec.element in BY_ELEMENT else math.floor(math.log2(top))
            raw = _mx_scale(amax, emax)
        else:
            raw = np.where(amax > 0, amax / top, 1.0)
        s_st = store_scale(raw, spec.scale_dtype)
        s = s_st.astype(np.float64) * (tensor_scale if tensor_scale is not None else 1.0)
        x = (gd / s).astype(np.float32)
        if spec.element == "nf4":
            table = np.asarray(NF4_TABLE, dtype=np.float32)
            codes = np.argmin(np.abs(x[..., None] - table), axis=-1)
        elif spec.element.startswith("int"):
            lo, hi = int_range(spec.element)
            codes = np.clip(np.rint(x), lo, hi)
        else:
            mf = BY_ELEMENT[spec.element]
            codes = np.clip(x, -mf.max_value, mf.max_value).astype(mf.np_dtype)
    codes = _ungroup(np.asarray(codes), spec.scale, axis, pad, w.shape)
    scale_arr = _ungroup_scale(s_st, spec.scale, axis, w.shape)
    zp_arr = None if zp is None else _ungroup_scale(zp, spec.scale, axis, w.shape)
    if spec.element.startswith(("int", "uint")):
        codes = codes.astype(np.int16 if spec.element.startswith("uint") else np.int8)
    elif spec.element == "nf4":
        codes = codes.astype(np.uint8)
    return Encoded(codes, scale_arr, zp_arr, tensor_scale, axis, block)


SCALE_MAX: Mapping[str, float] = {
    "float16": 65504.0,
    "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
    "float8_e4m3fn": 448.0,
    "float8_e8m0fnu": 2.0**127,
    "float32": float(np.finfo(np.float32).max),
}


def _valid_mask(shape: tuple[int, ...], pad: int) -> np.ndarray:
    """Broadcastable mask of the grouped view ``[G, B, *rest]``: False on the zero padding of the last block."""
    valid = np.ones(shape[:2] + (1,) * (len(shape) - 2), dtype=bool)
    if pad:
        valid[-1, shape[1] - pad :] = False
    return valid


def _ungroup(g: np.ndarray, scale: str, axis: int, pad: int, shape: tuple[int, ...]) -> np.ndarray:
    moved_shape = (shape[axis], *[d for i, d in enumerate(shape) if i != axis])
    flat = g.reshape(moved_shape) if scale == "per_channel" else g.reshape(-1, *g.shape[2:])[: shape[axis]]
    return np.moveaxis(flat.reshape(moved_shape), 0, axis)


def _ungroup_scale(s: np.ndarray, scale: str, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    if scale == "per_channel":
        return np.ascontiguousarray(s.reshape(-1))  # [C]
    out = np.moveaxis(s[:, 0], 0, axis)  # [nb, *rest] → weight rank with the axis cut to nb
    return np.ascontiguousarray(out)


def dequantize(spec: Spec, enc: Encoded) -> np.ndarray:
    """Decode to float32: ``(code − z)·s(·S)`` with the DequantizeLinear rounding of the product;
    float offsets: ``fp32(fp32(code·s) + m)``, no rounding to the scale type."""
    if spec.element == "nf4":
        values = np.asarray(NF4_TABLE, dtype=np.float32)[enc.codes.astype(np.int64)]
    else:
        values = enc.codes.astype(np.float32)
    shape = values.shape
    scale = enc.scale.astype(np.float32)
    if spec.scale == "per_channel":
        bshape = [1] * len(shape)
        bshape[enc.axis] = -1
        full_s = scale.reshape(bshape)
        full_z = None if enc.zero_point is None else enc.zero_point.astype(np.float32).reshape(bshape)
    else:
        full_s = np.repeat(scale, enc.block_size, axis=enc.axis).take(np.arange(shape[enc.axis]), axis=enc.axis)
        full_z = (
            None
            if enc.zero_point is None
            else np.repeat(enc.zero_point.astype(np.float32), enc.block_size, axis=enc.axis).take(
                np.arange(shape[enc.axis]), axis=enc.axis
            )
        )
    if spec.offset_dtype is not None:  # q·s + m, both in fp32
        return ((values * full_s).astype(np.float32) + full_z).astype(np.float32)
    if full_z is not None:
        values = values - full_z
    if enc.tensor_scale is not None:
        full_s = (full_s * np.float32(enc.tensor_scale)).astype(np.float32)
    out = (values * full_s).astype(np.float32)
    if spec.scale_dtype == "float16" and enc.tensor_scale is None:
        out = out.astype(np.float16).astype(np.float32)
    elif spec.scale_dtype == "bfloat16" and enc.tensor_scale is None:
        out = out.astype(ml_dtypes.bfloat16).astype(np.float32)
    return out


def bits_per_weight(spec: Spec, n: int, num_groups: int) -> float:
    """Stored bits per weight of a tensor of ``n`` weights in ``num_groups`` scale groups."""
    if n == 0:
        return float(spec.storage_bits)
    zp_bits = OFFSET_BITS[spec.offset_dtype] if spec.offset_dtype else (spec.storage_bits if spec.zero_point else 0)
    extra = num_groups * (SCALE_BITS[spec.scale_dtype] + zp_bits)
    extra += 32 if spec.tensor_scale else 0
    return (spec.storage_bits * n + extra) / n

"""The format registry: every precision lpcompile can assign, with bit-exact references.

A :class:`Format` is a *recipe*: how a weight is stored (element type, scale granularity and
scale type), what the activations entering the op are rounded to, and how many bits a weight
costs including the scale overhead. ``quantize_weight`` / ``dequantize`` are the reference
implementations every pass, runtime and analysis step agrees with; the FP8 and bf16 codes come
from ml_dtypes, the integer grids are symmetric with round-half-to-even.

Weight layout: a weight tensor has an *output-channel axis* (per-channel scales live along it)
and a *reduction axis* (int4 blocks run along it). For ``MatMul(x, W[K, N])`` that is channel 1,
reduction 0; for ``Conv`` weights ``[O, I, kh, kw]`` channel 0, reduction 1.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import ml_dtypes
import numpy as np
import onnx

from lpcompile.errors import FormatError

logger = logging.getLogger(__name__)

Rounding = Literal["nearest", "stochastic"]
ScaleKind = Literal["none", "per_channel", "per_block"]


@dataclass(frozen=True)
class FloatSpec:
    """An IEEE-like floating-point element type.

    Attributes:
        mantissa_bits: explicit fraction bits.
        min_exponent: exponent of the smallest normal number (subnormals share its ULP).
        max_value: largest finite magnitude (saturation bound).
        np_dtype: the numpy / ml_dtypes type whose casts are the reference (round-to-nearest-even).
    """

    mantissa_bits: int
    min_exponent: int
    max_value: float
    np_dtype: type


FLOAT_SPECS: Mapping[str, FloatSpec] = {
    "float32": FloatSpec(23, -126, float(np.finfo(np.float32).max), np.float32),
    "bfloat16": FloatSpec(7, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), ml_dtypes.bfloat16),
    "float16": FloatSpec(10, -14, 65504.0, np.float16),
    "float8_e4m3fn": FloatSpec(3, -6, 448.0, ml_dtypes.float8_e4m3fn),
    "float8_e5m2": FloatSpec(2, -14, 57344.0, ml_dtypes.float8_e5m2),
}


@dataclass(frozen=True)
class WeightLayout:
    """Which axes of a weight tensor carry output channels and the reduction.

    ``flatten``: per-block formats may treat the axes from ``reduction_axis`` to the last as one
    reduction, flattened row-major (``[O, I, kh, kw]`` → ``[O, I·kh·kw]``, as im2col sees a Conv
    weight) — they do when that needs fewer blocks (depthwise / grouped Conv, I not a multiple
    of the block); blocks, scales and codes then live on that view (:func:`blocked_view`).
    Other formats ignore it.
    """

    channel_axis: int
    reduction_axis: int
    flatten: bool = False


def blocked_view(
    shape: tuple[int, ...], layout: WeightLayout, block_size: int | None = None
) -> tuple[tuple[int, ...], WeightLayout]:
    """The shape and layout a per-block format quantizes ``shape`` on.

    With ``layout.flatten`` the trailing axes from the reduction axis are flattened when that
    needs fewer blocks of ``block_size`` (always, when ``block_size`` is None); otherwise the
    shape is kept. The returned layout never flattens.
    """
    plain = WeightLayout(layout.channel_axis, layout.reduction_axis)
    if not layout.flatten or not shape:
        return tuple(shape), plain
    r = layout.reduction_axis % len(shape)
    flat = math.prod(shape[r:])
    if block_size:
        trailing = math.prod(shape[r + 1 :])
        k = int(shape[r])
        if -(-flat // min(block_size, flat)) >= trailing * -(-k // min(block_size, k)):
            return tuple(shape), plain
    view = (*shape[:r], flat)
    return tuple(int(d) for d in view), WeightLayout(layout.channel_axis, r)


MATMUL_LAYOUT = WeightLayout(channel_axis=1, reduction_axis=0)
CONV_LAYOUT = WeightLayout(channel_axis=0, reduction_axis=1)


@dataclass(frozen=True)
class Format:
    """A precision recipe for one weighted op.

    Attributes:
        name: registry key, e.g. ``"int4_b128"``.
        element: storage element type: a key of :data:`FLOAT_SPECS`, or ``"int8"`` / ``"int4"``.
        storage_bits: bits per stored weight element.
        scale: scale granularity of the stored weight.
        scale_dtype: ``"float32"`` or ``"float16"`` (``None`` without scales).
        block_size: elements per scale block along the reduction axis (``per_block`` only).
        activation: what the op's activation inputs are rounded to (a float element key such as
            ``"float8_e4m3fn"`` or ``"bfloat16"``); ``None`` keeps them fp32.
        description: one line for tables and reports.
    """

    name: str
    element: str
    storage_bits: int
    scale: ScaleKind = "none"
    scale_dtype: str | None = None
    block_size: int | None = None
    activation: str | None = None
    description: str = ""
    zero_point: bool = False
    tensor_scale: bool = False
    offset_dtype: str | None = None  # asymmetric ints with a float offset per group (q·s + m), its type

    @property
    def is_float(self) -> bool:
        return self.element in FLOAT_SPECS

    @property
    def is_identity(self) -> bool:
        """True for fp32: nothing to rewrite."""
        return self.element == "float32" and self.activation is None

    @property
    def nominal_bits(self) -> float:
        """Bits per weight for a large tensor (per-block overhead counted, per-channel ignored)."""
        if self.scale == "per_block" and self.block_size:
            return self.storage_bits + self._group_bits / self.block_size
        return float(self.storage_bits)

    @property
    def _group_bits(self) -> int:
        """Bits stored per scale group: the scale and, for asymmetric formats, the zero point (or float offset)."""
        if self.offset_dtype is not None:
            return _scale_bits(self.scale_dtype) + _scale_bits(self.offset_dtype)
        return _scale_bits(self.scale_dtype) + (self.storage_bits if self.zero_point else 0)

    def bits_for(self, shape: tuple[int, ...], layout: WeightLayout) -> float:
        """Effective bits per weight of a tensor of ``shape``, scale overhead included."""
        n = math.prod(shape)
        if n == 0:
            return float(self.storage_bits)
        extra = self._group_bits * self.num_scales(shape, layout) + (32 if self.tensor_scale else 0)
        return (self.storage_bits * n + extra) / n

    def num_scales(self, shape: tuple[int, ...], layout: WeightLayout) -> int:
        """How many scale values the stored tensor needs."""
        if self.scale == "none":
            return 0
        if self.scale == "per_channel":
            return int(shape[layout.channel_axis])
        shape, layout = blocked_view(shape, layout, self.block_size)
        return math.prod(_block_scale_shape(shape, layout.reduction_axis, self._block(shape, layout)))

    def _block(self, shape: tuple[int, ...], layout: WeightLayout) -> int:
        bs = int(self.block_size or 0)
        return max(1, min(bs, int(shape[layout.reduction_axis]))) if bs else 1

    def onnx_storage_type(self) -> int:
        """The ONNX ``TensorProto`` data type of the stored weight."""
        return _ONNX_TYPES[self.element]


def _scale_bits(scale_dtype: str | None) -> int:
    return {None: 0, "float32": 32, "float16": 16, "bfloat16": 16, "float8_e8m0fnu": 8, "float8_e4m3fn": 8}[scale_dtype]


_ONNX_TYPES: Mapping[str, int] = {
    "float32": onnx.TensorProto.FLOAT,
    "bfloat16": onnx.TensorProto.BFLOAT16,
    "float16": onnx.TensorProto.FLOAT16,
    "float8_e4m3fn": onnx.TensorProto.FLOAT8E4M3FN,
    "float8_e5m2": onnx.TensorProto.FLOAT8E5M2,
    "int8": onnx.TensorProto.INT8,
    "int4": onnx.TensorProto.INT4,
}

INT_RANGES: Mapping[str, tuple[int, int]] = {"int8": (-128, 127), "int4": (-8, 7)}
# Symmetric grids map amax to +qmax (127 / 7); the extra negative code is only reached by rounding.
INT_QMAX: Mapping[str, int] = {"int8": 127, "int4": 7}
DYNAMIC_UINT8 = "uint8_dynamic"
"""Activation element of ``w8a8_dyn``: uint8 codes with a scale and zero point from each run's own range."""


def _build_registry() -> dict[str, Format]:
    formats = [
        Format("fp32", "float32", 32, description="fp32 weights and activations (unchanged)"),
        Format("bf16", "bfloat16", 16, activation="bfloat16", description="W16A16 bf16, fp32 accumulation"),
        Format("fp16", "float16", 16, activation="float16", description="W16A16 fp16, fp32 accumulation"),
        Format("bf16w", "bfloat16", 16, description="bf16 weights, fp32 activations (weight-only W16A32)"),
        Format("fp16w", "float16", 16, description="fp16 weights, fp32 activations (weight-only W16A32)"),
        Format(
            "fp8_e4m3",
            "float8_e4m3fn",
            8,
            scale="per_channel",
            scale_dtype="float32",
            activation="float8_e4m3fn",
            description="W8A8 FP8 E4M3FN (per-channel weight scales, per-tensor activation scale)",
        ),
        Format(
            "fp8_e5m2",
            "float8_e5m2",
            8,
            scale="per_channel",
            scale_dtype="float32",
            activation="float8_e5m2",
            description="W8A8 FP8 E5M2 (per-channel weight scales, per-tensor activation scale)",
        ),
        Format(
            "int8",
            "int8",
            8,
            scale="per_channel",
            scale_dtype="float32",
            description="int8 symmetric weights per output channel, fp32 activations",
        ),
        Format(
            "w8a8",
            "int8",
            8,
            scale="per_channel",
            scale_dtype="float32",
            activation="int8",
            description="W8A8 int8: symmetric per-channel weights, per-tensor int8 activations (calibrated scale)",
        ),
        Format(
            "w8a8_dyn",
            "int8",
            8,
            scale="per_channel",
            scale_dtype="float32",
            activation=DYNAMIC_UINT8,
            description=(
                "W8A8 dynamic: symmetric per-channel int8 weights, activations rounded to uint8 per run "
                "with their own range (ONNX DynamicQuantizeLinear)"
            ),
        ),
    ]
    for bs in (32, 64, 128):
        formats.append(
            Format(
                f"int4_b{bs}",
                "int4",
                4,
                scale="per_block",
                scale_dtype="float16",
                block_size=bs,
                description=f"int4 symmetric weights, blocks of {bs} along the reduction axis, fp16 scales",
            )
        )
    return {f.name: f for f in formats}


_REGISTRY: Mapping[str, Format] = _build_registry()
ALIASES: Mapping[str, str] = {"int4": "int4_b128", "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}


def format_names() -> tuple[str, ...]:
    """All canonical format names, cheapest-last order of the registry."""
    return tuple(_REGISTRY)


#: separates a format from a weight-rounding method in a candidate name (``int4_b128:gptq``)
ROUNDING_SEP = ":"
#: weight-rounding methods (:mod:`lpcompile.rounding`); ``nearest`` is the default and never written
ROUNDING_METHODS = ("nearest", "stochastic", "rtn", "mse", "gptq")


def split_candidate(name: str) -> tuple[str, str | None]:
    """``"int4_b128:gptq"`` → ``("int4_b128", "gptq")``; no suffix (or ``:nearest``) → ``(name, None)``.

    A candidate is a (format, rounding) pair: the solver treats each name as its own choice (same
    bits, the loss of the weights that rounding writes); the plan keeps the suffixed name and the
    weight pass rounds with the suffix's method. The format part is not canonicalised here.
    """
    base, sep, method = name.strip().partition(ROUNDING_SEP)
    if not sep:
        return base, None
    method = method.strip().lower()
    if method not in ROUNDING_METHODS:
        raise FormatError(f"unknown rounding {method!r} in {name!r}; known: {', '.join(ROUNDING_METHODS)}")
    return base, (None if method == "nearest" else method)


def needs_input_hessians(rounding: str, formats: Sequence[str]) -> bool:
    """Whether writing ``formats`` (their ``:rounding`` suffix, else ``rounding``) needs the layers'
    input ``XᵀX`` (``mse`` / ``gptq``, :mod:`lpcompile.rounding`)."""
    return any((split_candidate(f)[1] or rounding) in ("mse", "gptq") for f in formats)


def canonical_name(name: str) -> str:
    """Resolve aliases (``int4`` → ``int4_b128``); raise ``FormatError`` on unknown names.

    A rounding suffix is kept (``int4:gptq`` → ``int4_b128:gptq``; ``:nearest`` is dropped).
    """
    base, method = split_candidate(name)
    if method is not None:
        return f"{canonical_name(base)}{ROUNDING_SEP}{method}"
    key = base.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _REGISTRY:
        try:
            return _grammar_format(key).name
        except FormatError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise FormatError(
                f"unknown format {name!r} ({detail}); registry: {', '.join(format_names())} "
                "(aliases: int4, fp8; grammar: see lpcompile.format_grammar)"
            ) from None
    return key


def get_format(name: str) -> Format:
    """Look a format up by name, alias or grammar name (:mod:`lpcompile.format_grammar`); a rounding
    suffix (``int4_b128:gptq``) is accepted and does not change the format."""
    key = canonical_name(split_candidate(name)[0])
    return _REGISTRY[key] if key in _REGISTRY else _grammar_format(key)


def _identity_key(f: Format) -> tuple[object, ...]:
    return (
        f.element, f.storage_bits, f.scale, f.scale_dtype, f.block_size, f.activation, f.zero_point, f.tensor_scale,
        f.offset_dtype,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _grammar_format(key: str) -> Format:
    """The :class:`Format` of a grammar name; a registry entry when the definitions coincide."""
    from lpcompile import format_grammar

    spec = format_grammar.parse(key)
    element = spec.element
    fmt = Format(
        spec.name,
        element,
        spec.storage_bits,
        scale=spec.scale,  # type: ignore[arg-type]
        scale_dtype=spec.scale_dtype,
        block_size=spec.block_size,
        activation=spec.activation,
        description=spec.description,
        zero_point=spec.zero_point,
        tensor_scale=spec.tensor_scale,
        offset_dtype=spec.offset_dtype,
    )
    for known in _REGISTRY.values():
        if _identity_key(known) == _identity_key(fmt):
            return known
    return fmt


def weight_rounding_key(fmt: Format) -> Format | str:
    """What decides the weights ``fmt`` stores: formats with equal keys write the same codes, scales and
    decoded weights (``int8`` and ``w8a8_dyn``, ``bf16`` and ``bf16w`` differ in their activations only)."""
    return replace(fmt, name="", activation=None, description="") if is_classic(fmt) else fmt.name


def is_classic(fmt: Format) -> bool:
    """Whether the original reference below handles ``fmt`` (the registry's families: symmetric
    int4/int8 with fp32/fp16 scales, per-channel FP8, bf16/fp16/fp32 casts); other grammar formats
    use :mod:`lpcompile.format_grammar`."""
    if fmt.zero_point or fmt.tensor_scale or fmt.scale_dtype not in (None, "float32", "float16"):
        return False
    if fmt.element in FLOAT_SPECS:
        return fmt.scale != "per_block"
    return fmt.element in INT_RANGES


def parse_format_list(text: str) -> tuple[str, ...]:
    """Parse ``"fp8_e4m3,int8,int4"`` into canonical names (order kept, duplicates dropped)."""
    names = [canonical_name(part) for part in text.split(",") if part.strip()]
    if not names:
        raise FormatError("empty format list")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Element-level rounding references
# ---------------------------------------------------------------------------------------------


def round_to_float(
    x: np.ndarray, element: str, rounding: Rounding = "nearest", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Round float32 values to a float element type, returning codes in that type.

    Round-to-nearest-even is ml_dtypes' cast. FP8 E4M3FN saturates finite values (and ±inf) to
    ±448 like ONNX ``QuantizeLinear(saturate=1)``; other types overflow to ±inf as IEEE casts do.
    NaN stays NaN. Stochastic rounding picks the upper neighbour with probability equal to the
    fractional distance, so it is unbiased.
    """
    spec = FLOAT_SPECS[element]
    x = np.asarray(x, dtype=np.float32)
    saturate = element.startswith("float8")
    if saturate:
        x = np.where(np.isnan(x), x, np.clip(x, -spec.max_value, spec.max_value)).astype(np.float32)
    if rounding == "nearest":
        return x.astype(spec.np_dtype)
    if rng is None:
        raise ValueError("stochastic rounding needs an rng")
    xd = x.astype(np.float64)
    finite = np.isfinite(xd)
    ax = np.where(finite & (xd != 0), np.abs(xd), 1.0)
    exp = np.maximum(np.floor(np.log2(ax)), spec.min_exponent)
    ulp = np.exp2(exp - spec.mantissa_bits)
    lo = np.floor(xd / ulp) * ulp
    frac = np.where(finite, (xd - lo) / ulp, 0.0)
    up = rng.random(size=xd.shape) < frac
    out = np.where(finite, lo + up * ulp, xd)
    if saturate:
        out = np.clip(out, -spec.max_value, spec.max_value)
    return out.astype(np.float32).astype(spec.np_dtype)


def round_to_int(
    x: np.ndarray, qmin: int, qmax: int, rounding: Rounding = "nearest", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Round to integers (half-to-even, or stochastic) and clip to ``[qmin, qmax]``; NaN → 0."""
    x = np.asarray(x)
    if rounding == "nearest" and x.dtype in (np.float32, np.float64):
        # rint is exact in either float type; one rounded copy, clipped in place, NaN zeroed where there is one
        q = np.rint(x)
        np.clip(q, qmin, qmax, out=q)
        nan = np.isnan(q)
        if nan.any():
            q[nan] = 0.0
        return q.astype(np.int8)
    x = np.asarray(x, dtype=np.float64)
    x = np.where(np.isnan(x), 0.0, x)
    if rounding == "nearest":
        q = np.rint(x)
    else:
        if rng is None:
            raise ValueError("stochastic rounding needs an rng")
        q = np.floor(x + rng.random(size=x.shape))
    return np.clip(q, qmin, qmax).astype(np.int8)


# ---------------------------------------------------------------------------------------------
# Weight quantization
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A stored weight: codes, scales and the DequantizeLinear attributes that decode them.

    Attributes:
        format: the format name.
        codes: stored elements (ml_dtypes/np float types, or int8 holding int4/int8 values).
        scale: ``None`` for plain casts; per-channel 1-D (length = channels) or per-block with the
            weight's rank (reduction axis divided into blocks), in ``float32`` or ``float16``.
        axis: DequantizeLinear ``axis`` (channel axis for per-channel, reduction axis for blocks).
        block_size: DequantizeLinear ``block_size`` (0 when not blocked).
    """

    format: str
    codes: np.ndarray
    scale: np.ndarray | None
    axis: int
    block_size: int
    zero_point: np.ndarray | None = None
    tensor_scale: float | None = None


def _block_scale_shape(shape: tuple[int, ...], axis: int, block: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = -(-shape[axis] // block)
    return tuple(out)


def _finite_amax(w: np.ndarray, axes: tuple[int, ...], keepdims: bool = True) -> np.ndarray:
    """max |w| over ``axes`` in float64, NaN read as 0 and ±Inf as float32's max."""
    if not w.size:
        return np.zeros([1] * w.ndim)
    fast = np.max(np.abs(w), axis=axes, keepdims=keepdims)  # exact in w's type; NaN and Inf show in it
    if np.isfinite(fast).all():
        return fast.astype(np.float64)
    a = np.abs(np.where(np.isnan(w), 0.0, w)).astype(np.float64)
    a = np.where(np.isinf(a), np.finfo(np.float32).max, a)
    return np.max(a, axis=axes, keepdims=keepdims)


def _expand_blocks(scale: np.ndarray, axis: int, block: int, length: int) -> np.ndarray:
    return np.repeat(scale, block, axis=axis).take(np.arange(length), axis=axis)


def _per_block(x: np.ndarray, scale: np.ndarray, axis: int, block: int, op: Callable[..., np.ndarray]) -> np.ndarray:
    """``op(x, scale expanded over its blocks)``: a broadcast over ``x`` split into (blocks, block) along
    ``axis`` when the blocks tile the axis (no expanded copy of the scales), else the expanded scales."""
    if x.shape[axis] % block:
        return op(x, _expand_blocks(scale, axis, block, x.shape[axis]))
    split = (*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])
    return op(x.reshape(split), np.expand_dims(scale, axis + 1)).reshape(x.shape)


def quantize_weight(
    fmt: Format | str,
    w: np.ndarray,
    layout: WeightLayout,
    rounding: Rounding = "nearest",
    seed: int | None = None,
) -> QuantizedWeight:
    """Quantize a float32 weight tensor by ``fmt`` (the reference every pass and check uses).

    Args:
        fmt: the format or its name.
        w: the weight, float32.
        layout: channel and reduction axes.
        rounding: ``"nearest"`` (half-to-even) or ``"stochastic"`` (seeded by ``seed``).
        seed: seed for stochastic rounding.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    w = np.asarray(w, dtype=np.float32)
    if layout.flatten and fmt.scale == "per_block":  # codes and scales on the flattened view when it is cheaper
        view, flat = blocked_view(w.shape, layout, fmt.block_size)
        return quantize_weight(fmt, w.reshape(view), flat, rounding, seed)
    if not is_classic(fmt):
        return _quantize_grammar(fmt, w, layout, rounding)
    rng = np.random.default_rng(seed) if rounding == "stochastic" else None
    if w.ndim == 0 and fmt.scale != "none":
        raise FormatError(f"format {fmt.name} needs a weight of rank >= 1")
    if fmt.scale == "none":
        return QuantizedWeight(fmt.name, round_to_float(w, fmt.element, rounding, rng), None, 0, 0)
    if fmt.scale == "per_channel":
        c = layout.channel_axis % w.ndim
        other = tuple(i for i in range(w.ndim) if i != c)
        amax = _finite_amax(w, other).reshape(-1)
        qmax = FLOAT_SPECS[fmt.element].max_value if fmt.is_float else INT_QMAX[fmt.element]
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(np.finfo(np.float32).tiny)).astype(np.float32)
        bshape = [1] * w.ndim
        bshape[c] = -1
        scaled = w / scale.reshape(bshape)
        if fmt.is_float:
            codes = round_to_float(scaled, fmt.element, rounding, rng)
        else:
            codes = round_to_int(scaled, *INT_RANGES[fmt.element], rounding, rng)
        return QuantizedWeight(fmt.name, codes, scale, c, 0)
    # per_block along the reduction axis
    r = layout.reduction_axis % w.ndim
    block = fmt._block(w.shape, layout)
    nblk = -(-w.shape[r] // block)
    pad = nblk * block - w.shape[r]
    wp = np.pad(w, [(0, pad) if i == r else (0, 0) for i in range(w.ndim)]) if pad else w
    split = list(wp.shape)
    split[r : r + 1] = [nblk, block]
    amax = _finite_amax(wp.reshape(split), (r + 1,), keepdims=False)
    qmax = INT_QMAX[fmt.element]
    scale16 = np.minimum(amax / qmax, 65504.0).astype(np.float16)
    tiny16 = np.float16(np.finfo(np.float16).smallest_subnormal)
    scale16 = np.where(amax > 0, np.maximum(scale16, tiny16), np.float16(1.0)).astype(np.float16)
    scale = (amax / qmax).astype(np.float32) if fmt.scale_dtype == "float32" else scale16
    scaled = _per_block(w, scale.astype(np.float32), r, block, np.divide)
    codes = round_to_int(scaled, *INT_RANGES[fmt.element], rounding, rng)
    return QuantizedWeight(fmt.name, codes, scale, r, block)


def _grammar_spec(fmt: Format) -> object:
    from lpcompile import format_grammar

    return format_grammar.Spec(
        fmt.name,
        fmt.element,
        fmt.storage_bits,
        fmt.scale,
        fmt.scale_dtype or "float32",
        fmt.block_size,
        fmt.zero_point,
        fmt.tensor_scale,
        fmt.activation,
        fmt.description,
        fmt.offset_dtype,
    )


def _quantize_grammar(fmt: Format, w: np.ndarray, layout: WeightLayout, rounding: str) -> QuantizedWeight:
    from lpcompile import format_grammar

    if rounding != "nearest":
        raise FormatError(f"format {fmt.name}: only round-to-nearest is implemented for this family")
    if w.ndim == 0:
        raise FormatError(f"format {fmt.name} needs a weight of rank >= 1")
    enc = format_grammar.quantize(_grammar_spec(fmt), w, layout.channel_axis, layout.reduction_axis)  # type: ignore[arg-type]
    return QuantizedWeight(fmt.name, enc.codes, enc.scale, enc.axis, enc.block_size, enc.zero_point, enc.tensor_scale)


def _dequantize_grammar(fmt: Format, q: QuantizedWeight) -> np.ndarray:
    from lpcompile import format_grammar

    enc = format_grammar.Encoded(q.codes, q.scale, q.zero_point, q.tensor_scale, q.axis, q.block_size)  # type: ignore[arg-type]
    return format_grammar.dequantize(_grammar_spec(fmt), enc)  # type: ignore[arg-type]


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """Decode a stored weight to float32 exactly as ONNX ``DequantizeLinear`` (+``Cast``) does.

    Per-block int4 with fp16 scales decodes to fp16 (``codes * scale`` rounded once to fp16, the
    DequantizeLinear output type) and is then widened to fp32.
    """
    fmt = get_format(q.format)
    if not is_classic(fmt):
        return _dequantize_grammar(fmt, q)
    if q.scale is None:
        return q.codes.astype(np.float32)
    values = q.codes.astype(np.float32)
    if q.block_size:
        out = _per_block(values, q.scale.astype(np.float32), q.axis, q.block_size, np.multiply)
        if fmt.scale_dtype == "float16":
            out = out.astype(np.float16).astype(np.float32)
        return out.astype(np.float32)
    bshape = [1] * q.codes.ndim
    bshape[q.axis] = -1
    return (values * q.scale.astype(np.float32).reshape(bshape)).astype(np.float32)


def qdq_weight(
    fmt: Format | str,
    w: np.ndarray,
    layout: WeightLayout,
    rounding: Rounding = "nearest",
    seed: int | None = None,
) -> np.ndarray:
    """Quantize then dequantize: the weight the rewritten model actually computes with."""
    w = np.asarray(w, dtype=np.float32)
    return dequantize(quantize_weight(fmt, w, layout, rounding, seed)).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Activation rounding
# ---------------------------------------------------------------------------------------------


INT8_ACTIVATION_MAX = 127
"""Symmetric int8 activations: ``amax`` maps to code 127 (zero point 0, codes -128..127 representable)."""


def dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """ONNX ``DynamicQuantizeLinear`` then ``DequantizeLinear`` of one tensor (the reference, in numpy).

    The range always holds 0: ``lo = min(0, min x)``, ``hi = max(0, max x)``; ``s = (hi − lo)/255`` (fp32),
    ``z = clip(rint(−lo/s), 0, 255)``, codes ``clip(rint(x/s) + z, 0, 255)``, decoded ``(q − z)·s``.
    NaN/±Inf are left out of the range (they have no uint8 code; ORT's kernel would spread them over the
    scale). An all-zero tensor (``s = 0``) decodes to zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    finite = x[np.isfinite(x)]
    lo = np.float32(min(0.0, float(finite.min()))) if finite.size else np.float32(0.0)
    hi = np.float32(max(0.0, float(finite.max()))) if finite.size else np.float32(0.0)
    s = np.float32((hi - lo) / np.float32(255.0))
    if s == 0:
        return np.zeros_like(x)
    z = np.float32(np.clip(np.rint(-lo / s), 0, 255))
    q = np.clip(np.rint(x / s) + z, 0, 255)
    return ((q - z) * s).astype(np.float32)


def scaled_activation(element: str | None) -> bool:
    """Whether rounding an activation to ``element`` needs a calibrated per-tensor scale (FP8, int8)."""
    return element is not None and (element.startswith("float8") or element == "int8")


def grid_activation(element: str | None) -> bool:
    """Whether ``element`` rounds activations to an integer / FP8 grid (calibrated or per-run scale).

    An embedding table (a Gather's weight) has no float activation input for such a format.
    """
    return scaled_activation(element) or element == DYNAMIC_UINT8


def activation_scale(amax: float, element: str) -> float:
    """Per-tensor scale mapping a calibrated ``amax`` onto an FP8 / int8 grid (1.0 for casts)."""
    if not scaled_activation(element):
        return 1.0
    amax = float(amax)
    if not math.isfinite(amax) or amax <= 0:
        return 1.0
    top = INT8_ACTIVATION_MAX if element == "int8" else FLOAT_SPECS[element].max_value
    return float(np.float32(amax / top))


def qdq_activation(x: np.ndarray, element: str, scale: float = 1.0) -> np.ndarray:
    """Round an activation the way the rewritten graph does (QDQ for FP8, Cast round trip else).

    FP8: ``QuantizeLinear(x, scale)`` (x / scale, RNE, saturating) then ``DequantizeLinear``.
    int8: ``QuantizeLinear(x, scale, int8 zero point 0)`` (x / scale, RNE, clipped to -128..127)
    then ``DequantizeLinear``.
    bf16/fp16: a Cast round trip (RNE).
    uint8 dynamic (``w8a8_dyn``): :func:`dynamic_uint8` of each sample along axis 0 (``scale`` unused).
    """
    x = np.asarray(x, dtype=np.float32)
    if element == DYNAMIC_UINT8:
        # one range per sample: the deployed model runs at batch 1, where the op's range is the sample's
        if x.ndim < 2:
            return dynamic_uint8(x)
        return np.stack([dynamic_uint8(xi) for xi in x]).reshape(x.shape)
    if element == "int8":
        s = np.float32(scale)
        return (np.clip(np.rint(x / s), -128, 127).astype(np.float32) * s).astype(np.float32)
    if element.startswith("float8"):
        s = np.float32(scale)
        return (round_to_float(x / s, element).astype(np.float32) * s).astype(np.float32)
    return x.astype(FLOAT_SPECS[element].np_dtype).astype(np.float32)

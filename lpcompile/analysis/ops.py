"""The op table of the differentiable interpreter: ONNX op -> torch implementation.

Every entry is ``fn(ctx, inputs, attrs) -> list[torch.Tensor]``:

- ``ctx`` is an :class:`OpContext` (opset of the node's domain, number of outputs, static ONNX
  element types of inputs/outputs where known),
- ``inputs`` holds one torch tensor per node input (``None`` for an omitted optional input;
  trailing omitted inputs may be absent from the list),
- ``attrs`` maps attribute names to Python values (ints, floats, str, lists, torch tensors for
  TENSOR attributes).

Implementations use differentiable torch ops only (no fused attention kernels), so the
interpreter supports double backward. Integer/shape tensors are computed in torch int64/int32.
Rounding in QuantizeLinear has zero gradient, which is the intended straight-through-free
semantics of a quantizer. Keys are the op type for the default domain ("" / "ai.onnx") and
``"<domain>::<op_type>"`` for other domains (``"com.microsoft::MatMulNBits"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

TP = onnx.TensorProto


@dataclass(frozen=True)
class OpContext:
    """Static facts about one node, fixed when the graph is built.

    Attributes:
        op_type: the node's op type.
        domain: the node's domain ("" for the default ONNX domain).
        opset: the opset version imported for the node's domain.
        num_outputs: number of outputs the node declares (including omitted ones).
        name: node name, for error messages.
        input_types: ONNX element type of each input where known statically, else 0.
        output_types: ONNX element type of each output where known statically, else 0.
    """

    op_type: str
    domain: str
    opset: int
    num_outputs: int
    name: str = ""
    input_types: tuple[int, ...] = ()
    output_types: tuple[int, ...] = ()

    def input_type(self, i: int) -> int:
        return self.input_types[i] if i < len(self.input_types) else 0

    def output_type(self, i: int) -> int:
        return self.output_types[i] if i < len(self.output_types) else 0


Args = list[torch.Tensor | None]
Attrs = dict[str, Any]
Outs = list[torch.Tensor]
OpFn = Callable[[OpContext, Args, Attrs], Outs]


class OpEvalError(LpError):
    """An op got inputs or attributes the interpreter does not implement."""


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------

#: ONNX element type -> torch dtype used to hold it. INT4/UINT4 have no torch dtype and are
#: held as int8/uint8 values; unsigned 16/32/64-bit are widened to signed int32/int64/int64.
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TP.FLOAT: torch.float32,
    TP.DOUBLE: torch.float64,
    TP.FLOAT16: torch.float16,
    TP.BFLOAT16: torch.bfloat16,
    TP.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TP.FLOAT8E5M2: torch.float8_e5m2,
    TP.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TP.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    TP.INT8: torch.int8,
    TP.UINT8: torch.uint8,
    TP.INT16: torch.int16,
    TP.UINT16: torch.int32,
    TP.INT32: torch.int32,
    TP.UINT32: torch.int64,
    TP.INT64: torch.int64,
    TP.UINT64: torch.int64,
    TP.BOOL: torch.bool,
    TP.INT4: torch.int8,
    TP.UINT4: torch.uint8,
}

TORCH_TO_ONNX: dict[torch.dtype, int] = {
    torch.float32: TP.FLOAT,
    torch.float64: TP.DOUBLE,
    torch.float16: TP.FLOAT16,
    torch.bfloat16: TP.BFLOAT16,
    torch.float8_e4m3fn: TP.FLOAT8E4M3FN,
    torch.float8_e5m2: TP.FLOAT8E5M2,
    torch.float8_e4m3fnuz: TP.FLOAT8E4M3FNUZ,
    torch.float8_e5m2fnuz: TP.FLOAT8E5M2FNUZ,
    torch.int8: TP.INT8,
    torch.uint8: TP.UINT8,
    torch.int16: TP.INT16,
    torch.int32: TP.INT32,
    torch.int64: TP.INT64,
    torch.bool: TP.BOOL,
}

#: integer ranges of the quantized integer types (for saturation)
_INT_RANGE: dict[int, tuple[int, int]] = {
    TP.INT8: (-128, 127),
    TP.UINT8: (0, 255),
    TP.INT16: (-32768, 32767),
    TP.UINT16: (0, 65535),
    TP.INT32: (-(2**31), 2**31 - 1),
    TP.INT4: (-8, 7),
    TP.UINT4: (0, 15),
}

#: largest finite value and the magnitude beyond which a non-saturating cast overflows
#: (E4M3: > 464 -> NaN; E5M2: >= 61440 -> Inf, as ml_dtypes and the ONNX reference do)
_FLOAT8_LIMITS: dict[int, tuple[float, float]] = {
    TP.FLOAT8E4M3FN: (448.0, 464.0),
    TP.FLOAT8E4M3FNUZ: (240.0, 248.0),
    TP.FLOAT8E5M2: (57344.0, 61440.0),
    TP.FLOAT8E5M2FNUZ: (57344.0, 61440.0),
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype that holds values of ONNX element type ``onnx_type``."""
    try:
        return ONNX_TO_TORCH[onnx_type]
    except KeyError:
        name = TP.DataType.Name(onnx_type) if onnx_type in TP.DataType.values() else str(onnx_type)
        raise OpEvalError(f"ONNX element type {name} is not supported by the interpreter") from None


def numpy_to_torch(arr: np.ndarray) -> torch.Tensor:
    """Convert a numpy array (ml_dtypes included) to a torch tensor of the matching dtype."""
    import ml_dtypes

    dt = arr.dtype
    if dt == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.uint16).astype(np.int32) << 16).view(torch.float32).to(torch.bfloat16)
    fp8 = {
        ml_dtypes.float8_e4m3fn: torch.float8_e4m3fn,
        ml_dtypes.float8_e5m2: torch.float8_e5m2,
        ml_dtypes.float8_e4m3fnuz: torch.float8_e4m3fnuz,
        ml_dtypes.float8_e5m2fnuz: torch.float8_e5m2fnuz,
    }
    for mdt, tdt in fp8.items():
        if dt == mdt:
            return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).copy()).view(tdt)
    if dt == ml_dtypes.int4:
        return torch.from_numpy(arr.astype(np.int8))
    if dt == ml_dtypes.uint4:
        return torch.from_numpy(arr.astype(np.uint8))
    if dt in (np.uint16,):
        return torch.from_numpy(arr.astype(np.int32))
    if dt in (np.uint32, np.uint64):
        return torch.from_numpy(arr.astype(np.int64))
    if dt.kind in "OSU":
        raise OpEvalError("string tensors are not supported by the interpreter")
    return torch.from_numpy(np.array(arr, copy=True))


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """Convert an ONNX TensorProto (inline data) to a torch tensor."""
    from onnx import numpy_helper

    return numpy_to_torch(numpy_helper.to_array(t))


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _flat_ints(values: object) -> list[int]:
    """Nested Python lists (``Tensor.tolist``) flattened to ints."""
    if isinstance(values, list):
        return [v for x in values for v in _flat_ints(x)]
    return [int(values)]  # type: ignore[call-overload]


def _ints(t: torch.Tensor | Sequence[int] | None) -> list[int] | None:
    """Integer values of a constant-like input. ``Tensor.tolist`` dispatches no torch op, so a shape
    held in an initializer stays a Python int under ``torch.export`` (the MLIR path traces this)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return _flat_ints(t.tolist())
    return [int(v) for v in t]


def _req_ints(t: torch.Tensor | None) -> list[int]:
    if t is None:
        raise OpEvalError("a required integer input is missing")
    return _flat_ints(t.tolist())


def _opt(inputs: Args, i: int) -> torch.Tensor | None:
    return inputs[i] if i < len(inputs) else None


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

_OPS: dict[str, OpFn] = {}


def _key(op_type: str, domain: str = "") -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def _reg(*names: str, domain: str = "") -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for n in names:
            _OPS[_key(n, domain)] = fn
        return fn

    return deco


def op_key(op_type: str, domain: str) -> str:
    """Registry key of an op: ``op_type`` for the default domain, else ``domain::op_type``."""
    return _key(op_type, domain)


def lookup(op_type: str, domain: str = "") -> OpFn | None:
    """The implementation of ``op_type`` in ``domain``, or None."""
    return _OPS.get(_key(op_type, domain))


def registered_ops() -> frozenset[str]:
    """All registry keys."""
    return frozenset(_OPS)


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    def impl(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
        return [fn(inputs[0])]

    return impl


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "IsNaN": torch.isnan,
    "Not": torch.logical_not,
    "Softsign": F.softsign,
    "Softplus": F.softplus,
    "Mish": F.mish,
}
for _name, _fn in _UNARY.items():
    _OPS[_name] = _unary(_fn)


@_reg("IsInf")
def _isinf(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    return [(torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))]


@_reg("Identity")
def _identity(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [inputs[0]]


@_reg("Dropout")
def _dropout(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    out = [x]
    if ctx.num_outputs > 1:
        out.append(torch.ones(x.shape, dtype=torch.bool))
    return out


@_reg("Add")
def _add(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [inputs[0] + inputs[1]]


@_reg("Sub")
def _sub(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [inputs[0] - inputs[1]]


@_reg("Mul")
def _mul(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    a, b = inputs[0], inputs[1]
    if a.dtype == torch.bool:
        return [a & b]
    return [a * b]


@_reg("Div")
def _div(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    a, b = inputs[0], inputs[1]
    if _is_float(a):
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


@_reg("Pow")
def _pow(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, y = inputs[0], inputs[1]
    if _is_float(x) and not _is_float(y):
        y = y.to(x.dtype)
    out = torch.pow(x, y)
    return [out.to(x.dtype) if out.dtype != x.dtype else out]


@_reg("Mod")
def _mod(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    a, b = inputs[0], inputs[1]
    if attrs.get("fmod", 0) or _is_float(a):
        return [torch.fmod(a, b)]
    return [torch.remainder(a, b)]


def _cmp(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def impl(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
        return [fn(inputs[0], inputs[1])]

    return impl


for _name, _fn2 in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}.items():
    _OPS[_name] = _cmp(_fn2)


@_reg("BitwiseNot")
def _bitwise_not(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [torch.bitwise_not(inputs[0])]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean: bool = False) -> OpFn:
    def impl(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
        xs = [x for x in inputs if x is not None]
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        if mean:
            out = out / len(xs)
        return [out]

    return impl


_OPS["Max"] = _variadic(torch.maximum)
_OPS["Min"] = _variadic(torch.minimum)
_OPS["Sum"] = _variadic(torch.add)
_OPS["Mean"] = _variadic(torch.add, mean=True)


@_reg("Where")
def _where(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [torch.where(inputs[0].to(torch.bool), inputs[1], inputs[2])]


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


@_reg("LeakyRelu")
def _leaky_relu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))]


@_reg("PRelu")
def _prelu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, slope = inputs[0], inputs[1]
    return [torch.where(x < 0, x * slope, x)]


@_reg("Elu")
def _elu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [F.elu(inputs[0], attrs.get("alpha", 1.0))]


@_reg("Celu")
def _celu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [F.celu(inputs[0], attrs.get("alpha", 1.0))]


@_reg("Selu")
def _selu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]


@_reg("ThresholdedRelu")
def _thresholded_relu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    return [torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x))]


@_reg("HardSigmoid")
def _hard_sigmoid(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    return [torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)]


@_reg("HardSwish")
def _hard_swish(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    return [x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)]


@_reg("Gelu")
def _gelu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


@_reg("Gelu", domain="com.microsoft")
def _ms_gelu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [F.gelu(inputs[0])]


@_reg("FastGelu", domain="com.microsoft")
def _ms_fast_gelu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    bias = _opt(inputs, 1)
    if bias is not None:
        x = x + bias
    return [F.gelu(x, approximate="tanh")]


@_reg("Clip")
def _clip(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    if ctx.opset < 11:
        lo: Any = attrs.get("min", -math.inf)
        hi: Any = attrs.get("max", math.inf)
        return [torch.clamp(x, lo, hi)]
    lo, hi = _opt(inputs, 1), _opt(inputs, 2)
    if lo is None and hi is None:
        return [x]
    return [torch.clamp(x, min=lo, max=hi)]


def _softmax_like(fn: Callable[..., torch.Tensor]) -> OpFn:
    def impl(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
        x = inputs[0]
        if ctx.opset >= 13:
            return [fn(x, dim=attrs.get("axis", -1))]
        # opset < 13: coerce to 2-D [prod(shape[:axis]), prod(shape[axis:])]
        axis = _axis(attrs.get("axis", 1), x.dim())
        lead = math.prod(x.shape[:axis])
        y = fn(x.reshape(lead, -1), dim=1)
        return [y.reshape(x.shape)]

    return impl


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    idx = torch.argmax(x, dim=dim, keepdim=True)
    return torch.zeros_like(x).scatter(dim, idx, 1.0)


_OPS["Softmax"] = _softmax_like(torch.softmax)
_OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)
_OPS["Hardmax"] = _softmax_like(_hardmax)


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------


@_reg("LayerNormalization")
def _layer_norm(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, scale, bias = inputs[0], _opt(inputs, 1), _opt(inputs, 2)
    axis = _axis(attrs.get("axis", -1), x.dim())
    eps = attrs.get("epsilon", 1e-5)
    dims = tuple(range(axis, x.dim()))
    xf = x.float() if attrs.get("stash_type", 1) == 1 and x.dtype != torch.float64 else x
    mean = xf.mean(dim=dims, keepdim=True)
    d = xf - mean
    var = (d * d).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    y = (d * inv).to(x.dtype)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv][: max(1, ctx.num_outputs)]


def _rms(x: torch.Tensor, scale: torch.Tensor | None, axis: int, eps: float, stash: bool) -> list[torch.Tensor]:
    dims = tuple(range(axis, x.dim()))
    xf = x.float() if stash and x.dtype != torch.float64 else x
    inv = torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + eps)
    y = (xf * inv).to(x.dtype)
    if scale is not None:
        y = y * scale
    return [y, inv]


@_reg("RMSNormalization")
def _rms_norm(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axis = _axis(attrs.get("axis", -1), x.dim())
    return _rms(x, _opt(inputs, 1), axis, attrs.get("epsilon", 1e-5), attrs.get("stash_type", 1) == 1)[:1]


@_reg("SimplifiedLayerNormalization")  # ORT contrib op registered in the default domain
def _simplified_ln(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axis = _axis(attrs.get("axis", -1), x.dim())
    y, inv = _rms(x, _opt(inputs, 1), axis, attrs.get("epsilon", 1e-5), attrs.get("stash_type", 1) == 1)
    return [y, inv][: max(1, ctx.num_outputs)]


@_reg("SkipSimplifiedLayerNormalization", domain="com.microsoft")
def _skip_simplified_ln(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, skip, gamma, bias = inputs[0], inputs[1], _opt(inputs, 2), _opt(inputs, 3)
    s = x + skip
    if bias is not None:
        s = s + bias
    y, inv = _rms(s, gamma, s.dim() - 1, attrs.get("epsilon", 1e-5), True)
    outs = [y, torch.zeros(0), inv, s]
    return outs[: max(1, ctx.num_outputs)]


@_reg("SkipLayerNormalization", domain="com.microsoft")
def _skip_ln(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, skip, gamma, beta, bias = (inputs + [None] * 5)[:5]
    s = x + skip
    if bias is not None:
        s = s + bias
    y, mean, inv = _layer_norm(
        OpContext("LayerNormalization", "", 17, 3), [s, gamma, beta], {"epsilon": attrs.get("epsilon", 1e-12)}
    )
    return [y, mean, inv, s][: max(1, ctx.num_outputs)]


@_reg("BatchNormalization")
def _batch_norm(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, scale, bias, mean, var = inputs[:5]
    if attrs.get("training_mode", 0):
        raise OpEvalError(f"BatchNormalization {ctx.name!r}: training_mode=1 is not supported")
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = attrs.get("epsilon", 1e-5)
    inv = torch.rsqrt(var.reshape(shape) + eps)
    y = (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)
    return [y]


@_reg("InstanceNormalization")
def _instance_norm(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, scale, bias = inputs[:3]
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    var = (d * d).mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = d * torch.rsqrt(var + attrs.get("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)
    return [y]


@_reg("GroupNormalization")
def _group_norm(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, scale, bias = inputs[:3]
    g = attrs["num_groups"]
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(dim=2, keepdim=True)
    d = xg - mean
    var = (d * d).mean(dim=2, keepdim=True)
    y = (d * torch.rsqrt(var + attrs.get("epsilon", 1e-5))).reshape(x.shape)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if scale.numel() == c:  # opset 21: per channel
        return [y * scale.reshape(shape) + bias.reshape(shape)]
    # opset 18: per group
    rep = c // g
    return [y * scale.repeat_interleave(rep).reshape(shape) + bias.repeat_interleave(rep).reshape(shape)]


# --------------------------------------------------------------------------------------------
# linear algebra
# --------------------------------------------------------------------------------------------


@_reg("MatMul")
def _matmul(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [torch.matmul(inputs[0], inputs[1])]


@_reg("Gemm")
def _gemm(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


@_reg("Einsum")
def _einsum(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [torch.einsum(attrs["equation"], *[x for x in inputs if x is not None])]


# --------------------------------------------------------------------------------------------
# convolution and pooling
# --------------------------------------------------------------------------------------------


def _conv_pads(
    attrs: dict[str, Any],
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for a Conv/Pool, resolving auto_pad."""
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            out = -(-in_spatial[i] // strides[i])
            eff_k = (kernel[i] - 1) * dilations[i] + 1
            total = max(0, (out - 1) * strides[i] + eff_k - in_spatial[i])
            small, big = total // 2, total - total // 2
            if auto_pad == "SAME_UPPER":
                begins.append(small)
                ends.append(big)
            else:
                begins.append(big)
                ends.append(small)
        return begins + ends
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(attrs.get("pads", [0] * (2 * n)))


def _torch_pad_spec(pads: Sequence[int]) -> list[int]:
    """ONNX spatial pads [b1..bn, e1..en] -> F.pad spec (last dim first)."""
    n = len(pads) // 2
    spec: list[int] = []
    for i in reversed(range(n)):
        spec += [pads[i], pads[i + n]]
    return spec


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_reg("Conv")
def _conv(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    if n not in _CONV:
        raise OpEvalError(f"Conv {ctx.name!r}: {n}-D convolution is not supported")
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = _conv_pads(attrs, x.shape[2:], kernel, strides, dilations)
    group = attrs.get("group", 1)
    if pads[:n] == pads[n:]:
        return [_CONV[n](x, w, b, stride=strides, padding=pads[:n], dilation=dilations, groups=group)]
    x = F.pad(x, _torch_pad_spec(pads))
    return [_CONV[n](x, w, b, stride=strides, padding=0, dilation=dilations, groups=group)]


@_reg("ConvTranspose")
def _conv_transpose(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    if n not in _CONV_T:
        raise OpEvalError(f"ConvTranspose {ctx.name!r}: {n}-D is not supported")
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    out_pad = list(attrs.get("output_padding", [0] * n))
    group = attrs.get("group", 1)
    in_sp = list(x.shape[2:])
    full = [strides[i] * (in_sp[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(n)]
    pads = _conv_transpose_pads(attrs, in_sp, strides, full)
    if any(p < 0 for p in pads):
        raise OpEvalError(f"ConvTranspose {ctx.name!r}: output_shape larger than the full output")
    y = _CONV_T[n](x, w, None, stride=strides, padding=0, output_padding=0, groups=group, dilation=dilations)
    if any(out_pad):
        spec: list[int] = []
        for i in reversed(range(n)):
            spec += [0, out_pad[i]]
        y = F.pad(y, spec)
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + n]) for i in range(n)]
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return [y]


def _conv_transpose_pads(
    attrs: dict[str, Any], in_sp: Sequence[int], strides: Sequence[int], full: Sequence[int]
) -> list[int]:
    """ONNX ConvTranspose pads: explicit, or from output_shape / SAME_* (total padding split with
    the larger half at the end for SAME_UPPER, at the start otherwise)."""
    n = len(full)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if "output_shape" in attrs:
            target = list(attrs["output_shape"])[-n:]
        else:
            target = [in_sp[i] * strides[i] for i in range(n)]
        total = [full[i] - target[i] for i in range(n)]
        small = [t // 2 for t in total]
        begins = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small, strict=True)]
        return begins + [total[i] - begins[i] for i in range(n)]
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(attrs.get("pads", [0] * (2 * n)))


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@_reg("AveragePool")
def _avg_pool(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    if any(d != 1 for d in dilations):
        raise OpEvalError(f"AveragePool {ctx.name!r}: dilations are not supported")
    pads = _conv_pads(attrs, x.shape[2:], kernel, strides, dilations)
    ceil = bool(attrs.get("ceil_mode", 0))
    if not any(pads):
        return [_AVG[n](x, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)]
    xp = F.pad(x, _torch_pad_spec(pads))
    y = _AVG[n](xp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if attrs.get("count_include_pad", 0):
        return [y]
    mask = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), _torch_pad_spec(pads))
    cnt = _AVG[n](mask, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return [y / cnt]


@_reg("MaxPool")
def _max_pool(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    if ctx.num_outputs > 1:
        raise OpEvalError(f"MaxPool {ctx.name!r}: the Indices output is not supported")
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = _conv_pads(attrs, x.shape[2:], kernel, strides, dilations)
    ceil = bool(attrs.get("ceil_mode", 0))
    if any(pads):
        x = F.pad(x, _torch_pad_spec(pads), value=-math.inf)
    return [_MAX[n](x, kernel, strides, 0, dilation=dilations, ceil_mode=ceil)]


@_reg("GlobalAveragePool")
def _global_avg(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@_reg("GlobalMaxPool")
def _global_max(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------


def _reduce_axes(ctx: OpContext, inputs: Args, attrs: Attrs) -> list[int] | None:
    axes = _ints(_opt(inputs, 1))
    if axes is None:
        axes = list(attrs["axes"]) if "axes" in attrs else None
    return axes


def _reducer(fn: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]) -> OpFn:
    def impl(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
        x = inputs[0]
        keep = bool(attrs.get("keepdims", 1))
        axes = _reduce_axes(ctx, inputs, attrs)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        if x.dim() == 0:
            return [fn(x.reshape(1), (0,), False)]
        dims = tuple(sorted(_axis(a, x.dim()) for a in axes))
        return [fn(x, dims, keep)]

    return impl


def _r_prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep) if keep else torch.prod(x, dim=d)
    return x


_REDUCERS: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _r_prod,
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}
for _name, _rfn in _REDUCERS.items():
    _OPS[_name] = _reducer(_rfn)


def _arg_reduce(largest: bool) -> OpFn:
    def impl(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
        x = inputs[0]
        axis = _axis(attrs.get("axis", 0), x.dim())
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = torch.flip(x, dims=(axis,))
            idx = torch.argmax(flipped, axis, keep) if largest else torch.argmin(flipped, axis, keep)
            return [x.shape[axis] - 1 - idx]
        return [torch.argmax(x, axis, keep) if largest else torch.argmin(x, axis, keep)]

    return impl


_OPS["ArgMax"] = _arg_reduce(True)
_OPS["ArgMin"] = _arg_reduce(False)


@_reg("CumSum")
def _cumsum(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axis = _axis(int(inputs[1].reshape(-1)[0]), x.dim())
    if attrs.get("reverse", 0):
        x = torch.flip(x, dims=(axis,))
    y = torch.cumsum(x, dim=axis)
    if attrs.get("exclusive", 0):
        y = y - x
    if attrs.get("reverse", 0):
        y = torch.flip(y, dims=(axis,))
    return [y]


@_reg("TopK")
def _topk(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    k = attrs["k"] if ctx.opset < 10 else int(inputs[1].reshape(-1)[0])
    axis = _axis(attrs.get("axis", -1), x.dim())
    vals, idx = torch.topk(x, k, dim=axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return [vals, idx]


# --------------------------------------------------------------------------------------------
# shape manipulation
# --------------------------------------------------------------------------------------------


@_reg("Reshape")
def _reshape(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    shape = _req_ints(inputs[1]) if ctx.opset >= 5 else list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@_reg("Flatten")
def _flatten(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@_reg("Transpose")
def _transpose(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


@_reg("Concat")
def _concat(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    xs = [x for x in inputs if x is not None]
    return [torch.cat(xs, dim=attrs["axis"])]


@_reg("Split")
def _split(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    dim = x.shape[axis]
    n_out = ctx.num_outputs
    # input since opset 13; attribute in opsets 2-12 (optional input in opset 1)
    sizes = _ints(_opt(inputs, 1)) if ctx.opset >= 13 else attrs.get("split") or _ints(_opt(inputs, 1))
    if not sizes:
        if "num_outputs" in attrs:
            n_out = attrs["num_outputs"]
            chunk = -(-dim // n_out)
            sizes = [chunk] * (n_out - 1) + [dim - chunk * (n_out - 1)]
        else:
            sizes = [dim // n_out] * n_out
    return list(torch.split(x, list(sizes), dim=axis))


def _axes_arg(ctx: OpContext, inputs: Args, attrs: Attrs) -> list[int] | None:
    if ctx.opset >= 13:
        return _ints(_opt(inputs, 1))
    return list(attrs["axes"]) if "axes" in attrs else None


@_reg("Unsqueeze")
def _unsqueeze(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axes = _axes_arg(ctx, inputs, attrs) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


@_reg("Squeeze")
def _squeeze(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    axes = _axes_arg(ctx, inputs, attrs)
    if not axes:
        return [x.reshape([s for s in x.shape if s != 1])]
    dims = {_axis(a, x.dim()) for a in axes}
    return [x.reshape([s for i, s in enumerate(x.shape) if i not in dims])]


@_reg("Expand")
def _expand(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    shape = _req_ints(inputs[1])
    out = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return [x.expand(out)]


@_reg("Tile")
def _tile(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    reps = _req_ints(inputs[1])
    return [inputs[0].repeat(*reps)]


def _slice_dim(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    if step == 0:
        raise OpEvalError("Slice: step must not be 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        index = [slice(None)] * x.dim()
        index[axis] = slice(start, end, step)
        return x[tuple(index)]
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    idx = torch.arange(start, end, step, dtype=torch.int64)
    return x.index_select(axis, idx)


@_reg("Slice")
def _slice(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    if ctx.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]) or [], _ints(inputs[2]) or []
        axes = _ints(_opt(inputs, 3)) or list(range(len(starts)))
        steps = _ints(_opt(inputs, 4)) or [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        x = _slice_dim(x, _axis(a, x.dim()), s, e, st)
    return [x]


@_reg("Gather")
def _gather(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, idx = inputs[0], inputs[1].to(torch.int64)
    axis = _axis(attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]


@_reg("GatherElements")
def _gather_elements(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, idx = inputs[0], inputs[1].to(torch.int64)
    axis = _axis(attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


@_reg("GatherND")
def _gather_nd(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    data, idx = inputs[0], inputs[1].to(torch.int64)
    b = attrs.get("batch_dims", 0)
    k = idx.shape[-1]
    batch_shape = data.shape[:b]
    nb = math.prod(batch_shape)
    d = data.reshape(nb, *data.shape[b:])
    ind = idx.reshape(nb, -1, k)
    dims = torch.tensor(data.shape[b : b + k], dtype=torch.int64)
    ind = torch.where(ind < 0, ind + dims, ind)
    bidx = torch.arange(nb, dtype=torch.int64).reshape(nb, 1).expand(nb, ind.shape[1])
    out = d[(bidx, *[ind[..., j] for j in range(k)])]
    return [out.reshape((*idx.shape[:-1], *data.shape[b + k :]))]


@_reg("ScatterND")
def _scatter_nd(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    data, idx, upd = inputs[0], inputs[1].to(torch.int64), inputs[2]
    k = idx.shape[-1]
    dims = torch.tensor(data.shape[:k], dtype=torch.int64)
    ind = idx.reshape(-1, k)
    ind = torch.where(ind < 0, ind + dims, ind)
    u = upd.reshape(ind.shape[0], *data.shape[k:])
    red = attrs.get("reduction", "none")
    key = tuple(ind[:, j] for j in range(k))
    if red == "none":
        return [data.index_put(key, u)]
    if red == "add":
        return [data.index_put(key, u, accumulate=True)]
    raise OpEvalError(f"ScatterND {ctx.name!r}: reduction {red!r} is not supported")


@_reg("ScatterElements")
def _scatter_elements(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    data, idx, upd = inputs[0], inputs[1].to(torch.int64), inputs[2]
    axis = _axis(attrs.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    red = attrs.get("reduction", "none")
    if red == "none":
        return [torch.scatter(data, axis, idx, upd)]
    torch_red = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[red]
    return [torch.scatter_reduce(data, axis, idx, upd, torch_red, include_self=True)]


@_reg("Shape")
def _shape(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    shape = list(inputs[0].shape)
    rank = len(shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return [torch.tensor(shape[start:end], dtype=torch.int64)]


@_reg("Size")
def _size(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


@_reg("Trilu")
def _trilu(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    k_t = _opt(inputs, 1)
    k = int(k_t.reshape(-1)[0]) if k_t is not None else 0
    return [torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)]


@_reg("Pad")
def _pad(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if ctx.opset < 11:
        pads = list(attrs["pads"])
        value: Any = attrs.get("value", 0.0)
        axes = list(range(x.dim()))
    else:
        pads = _ints(inputs[1]) or []
        cv = _opt(inputs, 2)
        value = cv.reshape(-1)[0].item() if cv is not None and cv.numel() else 0
        axes_t = _ints(_opt(inputs, 3))
        axes = [_axis(a, x.dim()) for a in axes_t] if axes_t else list(range(x.dim()))
    n = len(axes)
    full_b, full_e = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        full_b[a], full_e[a] = pads[i], pads[i + n]
    spec: list[int] = []
    last = max([i for i in range(x.dim()) if full_b[i] or full_e[i]], default=-1)
    for i in reversed(range(x.dim())):
        if i > last:
            continue
        spec += [full_b[i], full_e[i]]
    if not spec:
        return [x]
    if mode == "constant":
        return [F.pad(x, spec, value=value)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise OpEvalError(f"Pad {ctx.name!r}: mode {mode!r} is not supported")
    # torch pads only the trailing (rank-2) dims in non-constant modes: pad each axis alone
    for i in range(x.dim()):
        if not (full_b[i] or full_e[i]):
            continue
        moved = x.movedim(i, -1)
        shp = moved.shape
        y = F.pad(moved.reshape(1, -1, shp[-1]), [full_b[i], full_e[i]], mode=torch_mode)
        x = y.reshape(*shp[:-1], y.shape[-1]).movedim(-1, i)
    return [x]


@_reg("Resize")
def _resize(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    """Resize for the common modes: nearest (asymmetric, floor), linear/cubic (half_pixel,
    pytorch_half_pixel, align_corners), over the spatial dims only."""
    x = inputs[0]
    if ctx.opset < 11:
        scales_t, sizes_t = _opt(inputs, 1), None
    else:
        scales_t, sizes_t = _opt(inputs, 2), _opt(inputs, 3)
    mode = attrs.get("mode", "nearest")
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel" if ctx.opset >= 11 else "asymmetric")
    nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    if attrs.get("axes") or attrs.get("antialias", 0) or attrs.get("exclude_outside", 0):
        raise OpEvalError(f"Resize {ctx.name!r}: axes/antialias/exclude_outside are not supported")
    n = x.dim() - 2
    scales = [float(s) for s in scales_t.reshape(-1).tolist()] if scales_t is not None and scales_t.numel() else None
    sizes = _ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
    if (scales and scales[:2] != [1.0, 1.0]) or (sizes and sizes[:2] != list(x.shape[:2])):
        raise OpEvalError(f"Resize {ctx.name!r}: resizing batch or channel dims is not supported")
    kw: dict[str, Any] = {}
    if sizes:
        kw["size"] = sizes[2:]
    elif scales:
        kw["scale_factor"] = scales[2:]
        kw["recompute_scale_factor"] = False
    else:
        raise OpEvalError(f"Resize {ctx.name!r}: needs scales or sizes")
    if mode == "nearest":
        if ctm != "asymmetric" or nearest_mode != "floor":
            raise OpEvalError(
                f"Resize {ctx.name!r}: nearest supports coordinate_transformation_mode=asymmetric, "
                "nearest_mode=floor only"
            )
        return [F.interpolate(x, mode="nearest", **kw)]
    if mode in ("linear", "cubic"):
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise OpEvalError(f"Resize {ctx.name!r}: coordinate_transformation_mode {ctm!r} not supported")
        if mode == "cubic" and (n != 2 or attrs.get("cubic_coeff_a", -0.75) != -0.75):
            raise OpEvalError(f"Resize {ctx.name!r}: cubic supports 2-D with cubic_coeff_a=-0.75 only")
        tmode = "bicubic" if mode == "cubic" else {1: "linear", 2: "bilinear", 3: "trilinear"}[n]
        align = ctm == "align_corners"
        if align:
            kw.pop("recompute_scale_factor", None)
        return [F.interpolate(x, mode=tmode, align_corners=align, **kw)]
    raise OpEvalError(f"Resize {ctx.name!r}: mode {mode!r} is not supported")


# --------------------------------------------------------------------------------------------
# constants, types, ranges
# --------------------------------------------------------------------------------------------


@_reg("Constant")
def _constant(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    if "value" in attrs:
        return [attrs["value"]]
    if "sparse_value" in attrs:
        return [attrs["sparse_value"]]
    if "value_float" in attrs:
        return [torch.tensor(attrs["value_float"], dtype=torch.float32)]
    if "value_floats" in attrs:
        return [torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)]
    if "value_int" in attrs:
        return [torch.tensor(attrs["value_int"], dtype=torch.int64)]
    if "value_ints" in attrs:
        return [torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)]
    raise OpEvalError(f"Constant {ctx.name!r}: string constants are not supported")


@_reg("ConstantOfShape")
def _constant_of_shape(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    shape = _ints(inputs[0]) or []
    value = attrs.get("value")
    if value is None:
        return [torch.zeros(shape, dtype=torch.float32)]
    return [value.reshape(-1)[:1].reshape([]).expand(shape).clone()]


@_reg("Range")
def _range(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    n = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return [start + torch.arange(n, dtype=start.dtype) * delta]


def _cast_to(x: torch.Tensor, to: int, saturate: bool = True) -> torch.Tensor:
    """Cast following ONNX Cast semantics (float8 with or without saturation)."""
    if to in _FLOAT8_LIMITS:
        xf = x.float() if not x.is_floating_point() or x.dtype.itemsize == 1 else x
        mx, overflow = _FLOAT8_LIMITS[to]
        if saturate:
            y = torch.clamp(xf, -mx, mx).to(ONNX_TO_TORCH[to])
        else:
            big = torch.abs(xf) >= overflow if to in (TP.FLOAT8E5M2,) else torch.abs(xf) > overflow
            y = torch.clamp(xf, -mx, mx)
            if to == TP.FLOAT8E5M2:
                y = torch.where(big, torch.sign(xf) * math.inf, y)
            else:
                y = torch.where(big, torch.full_like(xf, math.nan), y)
            y = y.to(ONNX_TO_TORCH[to])
        return y
    if to in (TP.INT4, TP.UINT4):  # semantics differ between runtimes (wrap vs saturate)
        raise OpEvalError("Cast to INT4/UINT4 is not supported; use QuantizeLinear")
    dt = torch_dtype(to)
    if x.dtype.itemsize == 1 and x.is_floating_point() and dt != torch.float32:
        x = x.float()
    return x.to(dt)


@_reg("Cast")
def _cast(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    return [_cast_to(inputs[0], attrs["to"], bool(attrs.get("saturate", 1)))]


@_reg("CastLike")
def _cast_like(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    target = ctx.input_type(1) or TORCH_TO_ONNX[inputs[1].dtype]
    return [_cast_to(inputs[0], target, bool(attrs.get("saturate", 1)))]


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def _q_broadcast(p: torch.Tensor, x: torch.Tensor, axis: int, block_size: int, what: str) -> torch.Tensor:
    """Broadcast a scale / zero point (per-tensor, per-axis or blocked) against ``x``."""
    if p.numel() == 1 and block_size == 0:
        return p.reshape([])
    axis = _axis(axis, x.dim())
    if block_size > 0:
        if p.dim() != x.dim():
            raise OpEvalError(f"blocked quantization: {what} must have the rank of the input")
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    if p.dim() != 1 or p.shape[0] != x.shape[axis]:
        raise OpEvalError(f"per-axis quantization: {what} has shape {tuple(p.shape)}, input {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


@_reg("DequantizeLinear")
def _dequantize(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, scale, zp = inputs[0], inputs[1], _opt(inputs, 2)
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    out_dtype = torch_dtype(attrs["output_dtype"]) if attrs.get("output_dtype") else scale.dtype
    s = _q_broadcast(scale, x, axis, block, "scale")
    if x.is_floating_point():  # float8: zero point must be 0
        y = x.float() * s
    else:  # integer domain subtraction, then convert, as ORT does
        xi = x.to(torch.int64)
        if zp is not None:
            xi = xi - _q_broadcast(zp, x, axis, block, "zero point").to(torch.int64)
        y = xi.to(s.dtype) * s
    return [y.to(out_dtype)]


@_reg("QuantizeLinear")
def _quantize(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    x, scale, zp = inputs[0], inputs[1], _opt(inputs, 2)
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    to = ctx.input_type(2) if zp is not None else 0
    if not to and zp is not None:
        to = TORCH_TO_ONNX.get(zp.dtype, 0)
    if not to:
        to = attrs.get("output_dtype", 0) or ctx.output_type(0) or TP.UINT8
    s = _q_broadcast(scale, x, axis, block, "scale").to(x.dtype)
    y = x / s
    if to in _FLOAT8_LIMITS:
        return [_cast_to(y, to, bool(attrs.get("saturate", 1)))]
    if to not in _INT_RANGE:
        raise OpEvalError(f"QuantizeLinear {ctx.name!r}: output type {to} is not supported")
    y = torch.round(y.float())
    if zp is not None:
        y = y + _q_broadcast(zp, x, axis, block, "zero point").float()
    lo, hi = _INT_RANGE[to]
    return [torch.clamp(y, lo, hi).to(ONNX_TO_TORCH[to])]


@_reg("DynamicQuantizeLinear")
def _dynamic_quantize(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    """uint8 codes, scale and zero point from the tensor's own range (which always holds 0)."""
    x = inputs[0].float()
    # NaN/±Inf out of the range, data-independently (torch.export; torch-mlir has no isfinite): x − x ≠ 0
    finite = torch.where((x - x) == 0, x, torch.zeros_like(x))
    lo = torch.clamp(finite.min(), max=0.0)
    hi = torch.clamp(finite.max(), min=0.0)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero tensor: codes and zp 0
    zp = torch.clamp(torch.round(-lo / safe), 0, 255)
    q = torch.clamp(torch.round(x / safe) + zp, 0, 255)
    return [q.to(torch.uint8), scale, zp.to(torch.uint8)]


@_reg("MatMulInteger")
def _matmul_integer(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    """int32 ``(A − a_zp) @ (B − b_zp)``, exact (float64 products of 8-bit codes stay exact)."""
    a, b = inputs[0].to(torch.float64), inputs[1].to(torch.float64)
    a_zp, b_zp = _opt(inputs, 2), _opt(inputs, 3)
    if a_zp is not None:
        a = a - a_zp.to(torch.float64)
    if b_zp is not None:
        b = b - b_zp.to(torch.float64)
    return [torch.matmul(a, b).to(torch.int32)]


@_reg("MatMulNBits", domain="com.microsoft")
def _matmul_nbits(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    """y = A @ dequant(B)^T (+ bias), B packed as [N, n_blocks, blob] little-endian nibbles."""
    a, b, scales = inputs[0], inputs[1], inputs[2]
    zp, g_idx, bias = _opt(inputs, 3), _opt(inputs, 4), _opt(inputs, 5)
    k_dim, n_dim = attrs["K"], attrs["N"]
    bits, block = attrs.get("bits", 4), attrs["block_size"]
    if g_idx is not None and g_idx.numel():
        raise OpEvalError(f"MatMulNBits {ctx.name!r}: g_idx is not supported")
    if bits not in (2, 4, 8):
        raise OpEvalError(f"MatMulNBits {ctx.name!r}: bits={bits} is not supported")
    n_blocks = -(-k_dim // block)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    raw = b.to(torch.int32).reshape(n_dim, n_blocks, -1)
    q = torch.stack([(raw >> (bits * i)) & mask for i in range(per_byte)], dim=-1).reshape(n_dim, n_blocks, -1)
    q = q[:, :, :block].float()
    sc = scales.reshape(n_dim, n_blocks).float()
    if zp is None:
        z = torch.full((n_dim, n_blocks), float(1 << (bits - 1)))
    elif zp.is_floating_point():
        z = zp.reshape(n_dim, n_blocks).float()
    else:
        zr = zp.to(torch.int32).reshape(n_dim, -1)
        z = torch.stack([(zr >> (bits * i)) & mask for i in range(per_byte)], dim=-1).reshape(n_dim, -1)
        z = z[:, :n_blocks].float()
    w = (q - z.unsqueeze(-1)) * sc.unsqueeze(-1)
    w = w.reshape(n_dim, n_blocks * block)[:, :k_dim].to(a.dtype)
    y = torch.matmul(a, w.transpose(0, 1))
    if bias is not None:
        y = y + bias
    return [y]


# --------------------------------------------------------------------------------------------
# recurrent ops (LSTM / GRU / RNN): default activations, full-length sequences
# --------------------------------------------------------------------------------------------

_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_RNN_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _rnn_check(ctx: OpContext, inputs: Args, attrs: Attrs) -> None:
    op = ctx.op_type
    dirs = 2 if attrs.get("direction", "forward") == "bidirectional" else 1
    acts = attrs.get("activations")
    if acts is not None and [a.lower() for a in acts] != [a.lower() for a in _RNN_DEFAULT_ACTS[op] * dirs]:
        raise OpEvalError(f"{op} {ctx.name!r}: only the default activations are implemented, got {acts}")
    if attrs.get("clip") is not None:
        raise OpEvalError(f"{op} {ctx.name!r}: clip is not implemented")
    if attrs.get("input_forget", 0):
        raise OpEvalError(f"{op} {ctx.name!r}: input_forget=1 is not implemented")
    lens = _opt(inputs, 4)
    if lens is not None:
        x = inputs[0]
        seq = x.shape[1] if attrs.get("layout", 0) else x.shape[0]
        if bool((lens.to(torch.int64) != seq).any()):
            raise OpEvalError(f"{op} {ctx.name!r}: sequence_lens shorter than the sequence are not implemented")


def _rnn_cell(
    op: str,
    x_t: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    w: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor | None,
    p: torch.Tensor | None,
    linear_before_reset: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = w.shape[0] // _RNN_GATES[op]
    wb, rb = (b[: w.shape[0]], b[w.shape[0] :]) if b is not None else (None, None)
    xw = x_t @ w.T + (wb if wb is not None else 0)
    if op == "LSTM":
        g = xw + h @ r.T + (rb if rb is not None else 0)
        i, o, f, cc = g.split(n, dim=-1)
        if p is not None:
            pi, po, pf = p.split(n)
            i, f = i + pi * c, f + pf * c
        i, f, cc = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(cc)
        c = f * c + i * cc
        if p is not None:
            o = o + po * c
        return torch.sigmoid(o) * torch.tanh(c), c
    if op == "GRU":
        rz, rr, rh = r.split(n)
        bz, br, bh = rb.split(n) if rb is not None else (0, 0, 0)
        xz, xr, xh = xw.split(n, dim=-1)
        z = torch.sigmoid(xz + h @ rz.T + bz)
        rt = torch.sigmoid(xr + h @ rr.T + br)
        hh = torch.tanh(xh + (rt * (h @ rh.T + bh) if linear_before_reset else (rt * h) @ rh.T + bh))
        return (1 - z) * hh + z * h, None
    return torch.tanh(xw + h @ r.T + (rb if rb is not None else 0)), None


@_reg("LSTM", "GRU", "RNN")
def _rnn(ctx: OpContext, inputs: Args, attrs: Attrs) -> Outs:
    """ONNX LSTM / GRU / RNN with default activations over full-length sequences (differentiable)."""
    _rnn_check(ctx, inputs, attrs)
    op = ctx.op_type
    x, w, r = inputs[0], inputs[1], inputs[2]
    b = _opt(inputs, 3)
    layout = int(attrs.get("layout", 0))
    if layout:
        x = x.transpose(0, 1)  # -> [seq, batch, in]
    seq, batch = x.shape[0], x.shape[1]
    hidden = int(attrs.get("hidden_size", r.shape[-1]))
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    h0, c0 = _opt(inputs, 5), _opt(inputs, 6) if op == "LSTM" else None
    p = _opt(inputs, 7) if op == "LSTM" else None
    if layout and h0 is not None:
        h0 = h0.transpose(0, 1)
    if layout and c0 is not None:
        c0 = c0.transpose(0, 1)
    lbr = int(attrs.get("linear_before_reset", 0))
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = (c0[d] if c0 is not None else x.new_zeros(batch, hidden)) if op == "LSTM" else None
        steps = range(seq - 1, -1, -1) if reverse else range(seq)
        out: list[torch.Tensor] = [x.new_zeros(0)] * seq
        for t in steps:
            h, c = _rnn_cell(
                op, x[t], h, c, w[d], r[d], b[d] if b is not None else None, p[d] if p is not None else None, lbr
            )
            out[t] = h
        ys.append(torch.stack(out))  # [seq, batch, H]
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, dim=1)  # [seq, dirs, batch, H]
    y_h = torch.stack(hs)  # [dirs, batch, H]
    if layout:
        y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
    outs = [y, y_h]
    if op == "LSTM":
        y_c = torch.stack(cs)
        outs.append(y_c.transpose(0, 1) if layout else y_c)
    return outs

"""Shared pieces of lpcompile's TIR kernels: storage conventions, targets, exact element codecs.

Storage conventions (every kernel family follows them, so kernels never depend on TVM's own
conversions of exotic types — its LLVM fp8 conversions are wrong for 18 codes and it folds
in-kernel round trips):

* FP8 codes (E4M3FN, E5M2) travel as ``uint8`` bit patterns; kernels decode them with a
  256-entry float32 table (:func:`fp8_table`, from ml_dtypes) or hand them to the tensor cores
  as raw bytes.
* bfloat16 travels as ``uint16`` bit patterns (decode: ``bits << 16``), float16 as TVM
  ``float16`` (its conversions are IEEE-exact on both targets).
* int4 codes travel packed, eight per ``uint32`` word (see :mod:`.int4_matmul`).

Symbolic batch: every kernel takes its row count ``M`` from the argument (a ``T.int64`` var),
so one compiled kernel serves any batch size; ``K`` and ``N`` are static.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import ml_dtypes
import numpy as np

from lpcompile.errors import UsageError

logger = logging.getLogger(__name__)

Fp8Element = Literal["float8_e4m3fn", "float8_e5m2"]
HalfElement = Literal["bfloat16", "float16"]
FP8_ELEMENTS: tuple[str, ...] = ("float8_e4m3fn", "float8_e5m2")
HALF_ELEMENTS: tuple[str, ...] = ("bfloat16", "float16")

#: TIR storage dtype of each activation / half element.
STORAGE_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "uint16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
}


@dataclass(frozen=True)
class Fp8Spec:
    """Bit layout of an FP8 element: exponent bias, mantissa bits, largest finite code, NaN code."""

    bias: int
    mantissa_bits: int
    max_code: int
    nan_code: int


FP8_SPECS: dict[str, Fp8Spec] = {
    "float8_e4m3fn": Fp8Spec(bias=7, mantissa_bits=3, max_code=0x7E, nan_code=0x7F),
    "float8_e5m2": Fp8Spec(bias=15, mantissa_bits=2, max_code=0x7B, nan_code=0x7E),
}

_NP_FP8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def check_fp8(element: str) -> Fp8Spec:
    if element not in FP8_SPECS:
        raise UsageError(f"unsupported fp8 element {element!r}; expected one of {', '.join(FP8_ELEMENTS)}")
    return FP8_SPECS[element]


def check_half(element: str) -> None:
    if element not in HALF_ELEMENTS:
        raise UsageError(f"unsupported 16-bit element {element!r}; expected bfloat16 or float16")


def fp8_table(element: str) -> np.ndarray:
    """``table[code]`` = the float32 value of every FP8 bit pattern (ml_dtypes is the reference)."""
    check_fp8(element)
    return np.arange(256, dtype=np.uint8).view(_NP_FP8[element]).astype(np.float32)


def fp8_codes(values: np.ndarray, element: str) -> np.ndarray:
    """ml_dtypes FP8 array (or float values already on the grid) → ``uint8`` bit patterns."""
    check_fp8(element)
    arr = np.asarray(values)
    if arr.dtype != _NP_FP8[element]:
        arr = arr.astype(np.float32).astype(_NP_FP8[element])
    return np.ascontiguousarray(arr).view(np.uint8)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 (or float32, rounded to nearest even) → ``uint16`` bit patterns."""
    arr = np.asarray(values)
    if arr.dtype != ml_dtypes.bfloat16:
        arr = arr.astype(np.float32).astype(ml_dtypes.bfloat16)
    return np.ascontiguousarray(arr).view(np.uint16)


def half_storage(values: np.ndarray, element: str) -> np.ndarray:
    """A 16-bit weight as the kernels store it (uint16 bits for bf16, float16 for fp16)."""
    check_half(element)
    if element == "bfloat16":
        return bf16_bits(values)
    return np.ascontiguousarray(np.asarray(values).astype(np.float16))


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------


def host_llvm_target() -> dict[str, str]:
    """The LLVM target for this machine's CPU (vector width of the host)."""
    from tvm.target import codegen

    try:
        cpu = codegen.llvm_get_system_cpu()
    except Exception:  # pragma: no cover - exotic hosts
        cpu = "generic"
    return {"kind": "llvm", "mcpu": cpu}


def cuda_target(arch: str = "sm_90") -> dict[str, str]:
    return {"kind": "cuda", "arch": arch}


def as_target(target: Any) -> Any:
    """``"llvm"`` / ``"cuda"`` / a dict / a ``tvm.target.Target`` → ``tvm.target.Target``."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if target == "llvm":
        target = host_llvm_target()
    elif target == "cuda":
        target = cuda_target()
    try:
        return tvm.target.Target(target)
    except Exception as exc:
        raise UsageError(f"invalid TVM target {target!r}: {exc}") from exc


def is_cuda(target: Any) -> bool:
    return str(as_target(target).kind.name) == "cuda"


def cuda_arch(target: Any) -> int:
    """SM version of a CUDA target as an integer (``sm_90`` → 90; 0 when unknown)."""
    tgt = as_target(target)
    arch = str(tgt.attrs.get("arch", "")) if hasattr(tgt, "attrs") else ""
    digits = "".join(ch for ch in arch if ch.isdigit())
    return int(digits) if digits else 0


def finish(func: Any, name: str) -> Any:
    """Mark a hand-scheduled kernel: global symbol, no aliasing, opaque to Relax fusion and to dlight."""
    return func.with_attrs(
        {
            "global_symbol": name,
            "tir.noalias": True,
            "tirx.is_scheduled": True,
            "op_pattern": 8,  # kOpaque: FuseOps leaves the call alone
        }
    )


# ----------------------------------------------------------------------------------------------
# exact element codecs as TIR expressions (llvm and cuda alike)
# ----------------------------------------------------------------------------------------------


def u32(v: int) -> Any:
    from tvm import tirx

    return tirx.const(v, "uint32")


def f32(v: float) -> Any:
    from tvm import tirx

    return tirx.const(v, "float32")


def bf16_to_f32(bits: Any) -> Any:
    """``uint16`` bfloat16 bits → float32 (exact)."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", bits), u32(16)))


def f32_to_bf16(v: Any) -> Any:
    """float32 → ``uint16`` bfloat16 bits, round to nearest even; NaN stays a quiet NaN."""
    from tvm import tirx

    b = tirx.reinterpret("uint32", v)
    lsb = tirx.bitwise_and(tirx.shift_right(b, u32(16)), u32(1))
    rounded = tirx.shift_right(b + u32(0x7FFF) + lsb, u32(16))
    nan = tirx.bitwise_or(tirx.shift_right(b, u32(16)), u32(0x0040))
    is_nan = tirx.bitwise_and(b, u32(0x7FFFFFFF)) > u32(0x7F800000)
    return tirx.Cast("uint16", tirx.Select(is_nan, nan, rounded))


def f32_to_fp8(v: Any, element: str) -> Any:
    """float32 → ``uint8`` FP8 code: round to nearest even, saturate to ±max (ONNX ``saturate=1``).

    ``|v| < 2^(1−bias)`` (subnormal range): the code is ``rint(|v| · 2^(bias−1+mbits))``, whose
    largest value is exactly the smallest normal's code. Otherwise the float32 bits are rounded
    to ``mbits`` mantissa bits (RNE on the integer pattern) and the exponent rebased. ±inf
    saturates, NaN gives the format's NaN code.
    """
    from tvm import tirx

    spec = check_fp8(element)
    drop = 23 - spec.mantissa_bits
    b = tirx.reinterpret("uint32", v)
    sign = tirx.bitwise_and(tirx.shift_right(b, u32(24)), u32(0x80))
    mag = tirx.bitwise_and(b, u32(0x7FFFFFFF))
    a = tirx.reinterpret("float32", mag)
    min_normal = 2.0 ** (1 - spec.bias)
    sub = tirx.Cast("uint32", tirx.nearbyint(a * f32(2.0 ** (spec.bias - 1 + spec.mantissa_bits))))
    lsb = tirx.bitwise_and(tirx.shift_right(mag, u32(drop)), u32(1))
    rounded = tirx.shift_right(mag + u32((1 << (drop - 1)) - 1) + lsb, u32(drop))
    rebased = rounded - u32((127 - spec.bias) << spec.mantissa_bits)
    norm = tirx.min(rebased, u32(spec.max_code))
    code = tirx.Select(a < f32(min_normal), sub, norm)
    code = tirx.Select(mag > u32(0x7F800000), u32(spec.nan_code), tirx.bitwise_or(code, sign))
    return tirx.Cast("uint8", code)


def load_as_f32(buf: Any, *idx: Any) -> Any:
    """Read an activation element as float32 whatever its storage (float32 / float16 / bf16 bits)."""
    from tvm import tirx

    v = buf[idx]
    if buf.dtype == "float32":
        return v
    if buf.dtype == "uint16":
        return bf16_to_f32(v)
    return tirx.Cast("float32", v)

"""Targets that know their kernels: how each (op, format) is written and whether it runs fast.

A *target* is where the rewritten model is deployed:

* ``"qdq"`` — portable standard ONNX (checker-clean, no contrib ops), tuned for ONNX Runtime CPU
  with its default session options;
* ``"ort"`` — ONNX Runtime CPU, with its contrib kernels (``com.microsoft.MatMulNBits``);
* ``"tvm"`` — lpcompile's TVM lowering (:mod:`lpcompile.runtime.tvm`), which matches the
  ``DequantizeLinear`` patterns of a weight and runs its own low-precision kernels.

Per target and per (op, format) :func:`weight_kernel` says how the weight is written
(:class:`WeightForm`) and whether the runtime has a kernel at least as fast as fp32 for it.
Where it has none, the form that runs fastest *while keeping the stored size* is written:
:attr:`WeightForm.DECODE_ONCE`, a decode subgraph of standard ops on initializers that ONNX
Runtime constant-folds at session creation.

What was checked on ONNX Runtime 1.32 CPU (2 threads, batch 1; ``benchmarks/latency.py`` and
``tests/test_targets.py``):

* ``DequantizeLinear`` on an initializer is *never* constant-folded (ORT keeps it for its QDQ
  fusions): a weight ``DequantizeLinear`` is re-run on every inference. At
  ``ORT_ENABLE_EXTENDED``+ an int8 (fp32 scale) ``DequantizeLinear → MatMul`` is fused into a
  ``MatMulNBits`` whose default accuracy level quantizes the activations to int8 (unfaithful); an
  int4 one with fp16 block scales is not fused at all and runs 60–90× slower than fp32 on a
  1024×1024 MatMul.
* ``Cast`` / ``Mul`` / ``Reshape`` / ``Pad`` / ``Slice`` on initializers *are* folded from
  ``ORT_ENABLE_BASIC`` up (the default is ``ORT_ENABLE_ALL``): a decode written with them costs
  nothing per inference, and the folded fp32 weight is pre-packed for the fp32 GEMM like an
  original weight, so inference runs at fp32 speed. The file keeps the codes and scales only
  (plus a few shared int64 shape vectors for blocked formats).
  Memory: the session holds the decoded fp32 weights (4 bytes per weight, the same as the fp32
  model); folding briefly holds one or two fp32 intermediates of the weight being decoded.
  With graph optimisation disabled (lpcompile's ``"exact"`` measurement sessions) the decode is
  re-run per inference, with the same numbers.
* The decode-once arithmetic is the reference's (``lpcompile.formats.dequantize``): one fp32
  multiply per element, and for fp16 block scales a rounding of the (exact) product to fp16
  then back, so the folded weights are bit-identical to the ``DequantizeLinear`` decode.
* ``MatMulNBits`` bits=4, ``accuracy_level=0`` (fp32 arithmetic on decoded weights): 0.5–0.7×
  fp32 at batch 1 for K ≥ 384, ≈1.05× for 64×64. bits=8 with ``accuracy_level=0``: 2–9× *slower*
  than fp32 (only ``accuracy_level=4``, int8 activations, is fast), so int8 MatMul weights are
  decoded once on ``"ort"`` too.
* ORT has no weight-only int4/int8 Conv kernel; int8 W8A8 (``ConvInteger`` /
  ``QLinearConv`` with ``DynamicQuantizeLinear``) would round the activations as well, which an
  ``int8`` plan (fp32 activations) does not ask for: Conv weights are decoded once.

The two-pass softmax runs faster only where the target has a real two-pass kernel (TVM); on ORT
CPU its function body (a dozen standard ops) is slower than the fused ``Softmax``
(:func:`softmax_pays`). FP8 activation rounding is written as ``Div → Cast(fp8, saturate) →
Cast(fp32) → Mul`` on ORT targets (:func:`activation_style`): bit-identical to a Q/DQ pair, and
left intact at every ORT optimisation level (ORT's QDQ transforms at ``ORT_ENABLE_ALL`` drop
FP8 zero points and change the Q/DQ form's results).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from lpcompile.errors import UsageError
from lpcompile.formats import Format, get_format

logger = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = ("qdq", "ort", "tvm")
DEFAULT_TARGET = "qdq"
OpClass = Literal["matmul", "conv", "gather", "other"]
ActivationStyle = Literal["qdq", "cast"]


class WeightForm(StrEnum):
    """How a stored weight is turned back into the fp32 tensor its op reads."""

    DEQUANTIZE = "dequantize"
    """``DequantizeLinear`` (+ ``Cast`` for fp16 block scales), re-run per inference in ORT."""
    DECODE_ONCE = "decode-once"
    """``Cast``/``Mul``/``Reshape`` on initializers: constant-folded at session creation."""
    CAST = "cast"
    """A 16-bit float weight widened by ``Cast(to=FLOAT)`` (constant-folded like the above)."""
    MATMUL_NBITS = "matmul-nbits"
    """The MatMul becomes ``com.microsoft.MatMulNBits`` (packed int4 codes, fp32 scales)."""


@dataclass(frozen=True)
class Kernel:
    """How a target writes one (op, format) weight and what its runtime makes of it.

    Attributes:
        form: the written form.
        fast: whether the runtime runs it at least as fast as the fp32 op at batch 1 (measured
            where stated in the module docstring; declared otherwise).
        note: one line for tables and logs.
    """

    form: WeightForm
    fast: bool
    note: str


def check_target(target: str) -> str:
    """Return ``target`` as a plain string, or raise ``UsageError`` for an unknown one."""
    name = str(target)
    if name not in TARGETS:
        raise UsageError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    return name


def op_class(op_type: str) -> OpClass:
    """The kernel family of a weighted op (``Gemm`` is normalised to ``MatMul`` before rewriting)."""
    if op_type in ("MatMul", "Gemm", "MatMulNBits"):
        return "matmul"
    if op_type in ("Conv", "ConvTranspose"):
        return "conv"
    if op_type in ("Gather", "GatherBlockQuantized"):
        return "gather"
    return "other"


def nbits_block_ok(block_size: int, rank: int, axis: int) -> bool:
    """Whether an int4 blocking fits ``MatMulNBits``: 2-D ``[K, N]``, blocks along K, power of two ≥ 16."""
    bs = int(block_size)
    return rank == 2 and axis == 0 and bs >= 16 and (bs & (bs - 1)) == 0


def weight_kernel(
    target: str, op_type: str, fmt: Format | str, *, block_size: int = 0, rank: int = 2, axis: int = 0
) -> Kernel:
    """How ``target`` writes the weight of an ``op_type`` node stored in ``fmt``.

    Args:
        target: ``"qdq"``, ``"ort"`` or ``"tvm"``.
        op_type: the weighted node's op type (``MatMul``, ``Conv``, ``Gather``, ...).
        fmt: the weight's format (or its name).
        block_size: the stored block size along the blocked axis (0 when unblocked); the
            effective one, ``min(format block, axis length)``.
        rank: rank of the weight.
        axis: the blocked axis (reduction axis) for blocked formats.
    """
    tgt = check_target(target)
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    cls = op_class(op_type)
    if f.is_identity:
        return Kernel(WeightForm.CAST, True, "fp32: unchanged")
    if f.scale == "none":
        # bf16 / fp16 weights: a Cast on an initializer, folded by ORT (and matched by the TVM lowering)
        return Kernel(WeightForm.CAST, tgt != "tvm" or cls == "matmul", "16-bit weight widened once by Cast")
    if tgt == "tvm":
        fast = cls == "matmul"
        note = "TVM lowering matches DequantizeLinear → MatMul" if fast else "folded at build time by the lowering"
        return Kernel(WeightForm.DEQUANTIZE, fast, note)
    if tgt == "ort" and cls == "matmul" and f.element == "int4" and nbits_block_ok(block_size, rank, axis):
        return Kernel(WeightForm.MATMUL_NBITS, True, "MatMulNBits bits=4 accuracy_level=0 (0.5-0.7x fp32 at K>=384)")
    reason = {
        "matmul": "no faithful weight-only kernel faster than fp32" if tgt == "ort" else "standard ops only",
        "conv": "ORT has no weight-only int4/int8 Conv kernel",
        "gather": "decoded once (GatherBlockQuantized not written)",
        "other": "decoded once",
    }[cls]
    return Kernel(WeightForm.DECODE_ONCE, True, f"decoded once at session start: {reason}")


def weight_form(
    target: str, op_type: str, fmt: Format | str, *, block_size: int = 0, rank: int = 2, axis: int = 0
) -> WeightForm:
    """The :class:`WeightForm` of :func:`weight_kernel` (see there)."""
    return weight_kernel(target, op_type, fmt, block_size=block_size, rank=rank, axis=axis).form


def activation_style(target: str) -> ActivationStyle:
    """How FP8 activation rounding is written: ``"cast"`` (Div/Cast/Cast/Mul) or ``"qdq"`` (Q/DQ pair).

    The TVM lowering matches the Q/DQ pair (its FP8 GEMM kernels); on ORT targets the cast form is
    the faithful one at every optimisation level (see the module docstring).
    """
    return "qdq" if check_target(target) == "tvm" else "cast"


def softmax_pays(target: str) -> bool:
    """Whether the two-pass softmax runs faster than the runtime's own ``Softmax`` on ``target``.

    Only the TVM lowering has a real two-pass kernel; on ONNX Runtime the function body (a dozen
    standard ops) is slower than the fused ``Softmax``, so the ``auto`` softmax policy keeps
    ``Softmax`` there.
    """
    return check_target(target) == "tvm"


def decode_once_bytes(weight_elements: int) -> int:
    """Resident memory a decode-once weight costs in the session: its fp32 value (4 bytes/element)."""
    return 4 * int(weight_elements)


@dataclass(frozen=True)
class KernelRow:
    """One row of :func:`kernel_table`."""

    target: str
    op: str
    format: str
    form: str
    fast: bool
    note: str


TABLE_FORMATS: tuple[str, ...] = ("int4_b128", "int4_b32", "int8", "fp8_e4m3", "bf16", "fp16")


def kernel_table(formats: tuple[str, ...] = TABLE_FORMATS) -> list[KernelRow]:
    """Every target's declared kernel per (op, format), for docs, reports and ``--help`` tables."""
    rows = []
    for target in TARGETS:
        for op in ("MatMul", "Conv"):
            for name in formats:
                f = get_format(name)
                bs = int(f.block_size or 0)
                rank, axis = (2, 0) if op == "MatMul" else (4, 1)
                k = weight_kernel(target, op, f, block_size=bs, rank=rank, axis=axis)
                rows.append(KernelRow(target, op, f.name, str(k.form), k.fast, k.note))
    return rows


__all__ = [
    "DEFAULT_TARGET",
    "TARGETS",
    "Kernel",
    "KernelRow",
    "WeightForm",
    "activation_style",
    "check_target",
    "decode_once_bytes",
    "kernel_table",
    "nbits_block_ok",
    "op_class",
    "softmax_pays",
    "weight_form",
    "weight_kernel",
]

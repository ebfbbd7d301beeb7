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
* ``MatMulNBits`` bits=4, ``accuracy_level=0`` (fp32 arithmetic on decoded weights), batch 1,
  2 threads, against the fp32 MatMul with its pre-packed weight: 0.4–0.7× from K·N ≈ 590k weights
  up (384×1536, 768×768, 1024², 2048²), but 1.2–1.5× *slower* up to K·N = 262k (384², 512², 1568×128,
  288×1152 gave 1.18×): a small fp32 weight stays in cache and its GEMV beats the nibble unpacking.
  So MatMulNBits is written only from :data:`NBITS_MIN_ELEMENTS` weights up (measured on this
  machine's 1 MB L2; machine-specific). bits=8 with ``accuracy_level=0``: 2–9× *slower* than fp32
  (only ``accuracy_level=4``, int8 activations, is fast), so int8 MatMul weights are decoded once.
* ORT has no weight-only int4/int8 Conv kernel; int8 W8A8 (``ConvInteger`` /
  ``QLinearConv`` with ``DynamicQuantizeLinear``) would round the activations as well, which an
  ``int8`` plan (fp32 activations) does not ask for: Conv weights are decoded once.
* W8A8 int8 (format ``w8a8``: the plan asks for int8 activations too) on a MatMul: ``ort`` writes
  ``com.microsoft.MatMulIntegerToFloat`` with uint8 activations (:mod:`lpcompile.passes.w8a8`),
  0.25–0.27× an fp32 MatMul+bias of 47×384×1536 (2 threads). The standard Q/DQ form is fused by
  ORT into the same kernel only without a bias ``Add`` (``MatMulAddFusion`` runs first and leaves a
  ``Gemm`` with per-run DQs, 3.1–3.3×) and with int8 activations it takes the s8s8 path (20×), so
  ``qdq`` decodes a ``w8a8`` weight once and rounds the activation per run. On a Conv, measured on
  one 1×1 Conv 32→64 at 28×28: weight DQ + activation Q/DQ → ``FusedConv`` with a per-run DQ 1.34×,
  + an output Q/DQ → ``QLinearConv`` between NCHW↔NHWC ``Transpose`` s 1.21×, explicit
  ``ConvInteger`` 5.1×: no faster-than-fp32 Conv form without quantizing whole chains of tensors
  (what ``quantize_static`` does: 0.61× on EfficientNet-Lite0 at KL 0.32), so ``w8a8`` Conv weights
  are decoded once and ``runs_fast`` says no.

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

import numpy as np
import onnx_ir as ir

from lpcompile.errors import UsageError
from lpcompile.formats import DYNAMIC_UINT8, Format, get_format, is_classic
from lpcompile.passes._common import cast_to, dq_chain, is_onnx_op

logger = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = ("qdq", "ort", "tvm")
NBITS_MIN_ELEMENTS = 1 << 19
"""Smallest weight (K·N elements) written as MatMulNBits on ``"ort"``; smaller ones are decoded once."""
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
    target: str,
    op_type: str,
    fmt: Format | str,
    *,
    block_size: int = 0,
    rank: int = 2,
    axis: int = 0,
    elements: int = 0,
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
        elements: the weight's element count (0: unknown, treated as large).
    """
    tgt = check_target(target)
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    cls = op_class(op_type)
    if f.is_identity:
        return Kernel(WeightForm.CAST, True, "fp32: unchanged")
    if f.scale == "none":
        # bf16 / fp16 weights: a Cast on an initializer, folded by ORT (and matched by the TVM lowering)
        return Kernel(WeightForm.CAST, tgt != "tvm" or cls == "matmul", "16-bit weight widened once by Cast")
    if f.activation == DYNAMIC_UINT8 and tgt != "tvm":
        # W8A8 dynamic: per-channel DequantizeLinear weight (never a decoded float weight, which ORT's
        # WeightBiasQuantization would re-quantize per tensor); on "ort" a MatMul becomes MatMulIntegerToFloat
        # fed by DynamicQuantizeLinear, on "qdq" the standard MatMulInteger → Cast → Mul (passes/w8a8.py); ORT
        # fuses both into DynamicQuantizeMatMul. ORT's Conv form (ConvInteger) is slower than fp32.
        if cls == "matmul":
            return Kernel(WeightForm.DEQUANTIZE, True, "W8A8 dynamic: DynamicQuantizeLinear + int8 GEMM")
        return Kernel(WeightForm.DEQUANTIZE, False, "W8A8 dynamic: per-channel DequantizeLinear, decoded per run")
    if f.activation == "int8" and tgt != "tvm" and cls in ("matmul", "conv"):
        # W8A8 int8: the weight stays a per-channel DequantizeLinear. A decoded (float) weight behind
        # the activation's DequantizeLinear is re-quantized *per tensor* by ORT's WeightBiasQuantization
        # (ORT_ENABLE_BASIC and up): EfficientNet-Lite0 w8a8 went from KL 0.039 as written to 0.99.
        # On "ort", passes/w8a8.py turns the MatMuls into MatMulIntegerToFloat and passes/qlinear_conv.py
        # the Convs whose output is rounded anyway into QLinearConv chains; the rest run a per-run decode.
        if tgt == "ort":
            note = (
                "MatMulIntegerToFloat (int8 GEMM, passes/w8a8.py)"
                if cls == "matmul"
                else ("QLinearConv where its output is rounded anyway (passes/qlinear_conv.py)")
            )
            return Kernel(WeightForm.DEQUANTIZE, True, f"W8A8: {note}")
        return Kernel(WeightForm.DEQUANTIZE, False, "W8A8: per-channel DequantizeLinear weight, decoded per run")
    if tgt == "tvm" and not is_classic(f):
        # grammar families (FP4/FP6, NF4, asymmetric or 2–7-bit ints, E8M0/E4M3 scales) are written as the
        # portable table decode (passes/table_decode.py): no TVM kernel matches it, the lowering only folds
        # DequantizeLinear/Cast, so the decode goes through TVM's ONNX converters
        return Kernel(WeightForm.DEQUANTIZE, False, "portable table decode: no TVM low-precision kernel")
    if tgt == "tvm":
        fast = cls == "matmul"
        note = "TVM lowering matches DequantizeLinear → MatMul" if fast else "folded at build time by the lowering"
        return Kernel(WeightForm.DEQUANTIZE, fast, note)
    if tgt == "ort" and cls == "matmul" and f.element == "int4" and nbits_block_ok(block_size, rank, axis):
        if 0 < elements < NBITS_MIN_ELEMENTS:
            return Kernel(
                WeightForm.DECODE_ONCE, True, "decoded once: MatMulNBits is slower than fp32 on small weights"
            )
        return Kernel(WeightForm.MATMUL_NBITS, True, "MatMulNBits bits=4 accuracy_level=0 (0.4-0.7x fp32)")
    reason = {
        "matmul": "no faithful weight-only kernel faster than fp32" if tgt == "ort" else "standard ops only",
        "conv": "ORT has no weight-only int4/int8 Conv kernel",
        "gather": "decoded once (GatherBlockQuantized not written)",
        "other": "decoded once",
    }[cls]
    return Kernel(WeightForm.DECODE_ONCE, True, f"decoded once at session start: {reason}")


def weight_form(
    target: str,
    op_type: str,
    fmt: Format | str,
    *,
    block_size: int = 0,
    rank: int = 2,
    axis: int = 0,
    elements: int = 0,
) -> WeightForm:
    """The :class:`WeightForm` of :func:`weight_kernel` (see there)."""
    return weight_kernel(target, op_type, fmt, block_size=block_size, rank=rank, axis=axis, elements=elements).form


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


def activation_kernel(target: str, element: str | None, op_type: str = "MatMul") -> Kernel:
    """What rounding an activation to ``element`` costs on ``target`` (``None``: fp32, free).

    ORT CPU has no FP8 and almost no bf16 arithmetic: the rounding is emulated by per-inference
    elementwise ops (FP8: ``Div → Cast → Cast → Mul``; bf16/fp16: a ``Cast`` round trip), so a
    format that rounds activations never runs faster than fp32 there (measured: uniform FP8 on the
    digits MLP 1.2× fp32 at batch 1 with decode-once weights; the Q/DQ form 2.5×, and unfaithful at
    ``ORT_ENABLE_ALL``). The TVM lowering fuses the rounding into its kernels.

    int8 (``w8a8``) on an ``ort`` MatMul is the exception: written as ``MatMulIntegerToFloat`` with
    uint8 activations (:mod:`lpcompile.passes.w8a8`; 0.25–0.27× an fp32 MatMul of 47×384×1536 with
    bias, measured), and on an ``ort`` Conv whose output reaches only later int8 roundings, a uint8
    ``QLinearConv`` chain (:mod:`lpcompile.passes.qlinear_conv`; uniform w8a8 EfficientNet-Lite0 0.95–1.06×
    fp32; 0.55–0.57× with ``int8_residuals``, :mod:`lpcompile.passes.qlinear_add`). Elsewhere the Q/DQ pair
    is a per-run rounding (on ``qdq`` ORT turns a biased Q/DQ MatMul into a Gemm with per-run DQs).
    """
    tgt = check_target(target)
    if element is None:
        return Kernel(WeightForm.CAST, True, "fp32 activations")
    if tgt == "tvm":
        return Kernel(WeightForm.DEQUANTIZE, True, "rounding fused into the TVM kernel")
    if element == "int8":
        if op_class(op_type) == "matmul" and tgt == "ort":
            return Kernel(WeightForm.DEQUANTIZE, True, "int8 Q/DQ fused into MatMulIntegerToFloat")
        if op_class(op_type) == "conv" and tgt == "ort":
            return Kernel(WeightForm.DEQUANTIZE, True, "uint8 QLinearConv chains where the output is rounded anyway")
        return Kernel(WeightForm.DEQUANTIZE, False, "int8 rounding per run: Q/DQ pair (no fused kernel)")
    if element == DYNAMIC_UINT8:
        if op_class(op_type) == "matmul":
            return Kernel(WeightForm.DEQUANTIZE, True, "DynamicQuantizeLinear feeding an int8 GEMM")
        return Kernel(WeightForm.DEQUANTIZE, False, "uint8 dynamic rounding per run: DynamicQuantizeLinear + DQ")
    if element.startswith("float8"):
        return Kernel(WeightForm.CAST, False, "FP8 rounding emulated per run: Div, Cast(fp8), Cast(fp32), Mul")
    return Kernel(WeightForm.CAST, False, f"{element} rounding emulated per run: a Cast round trip")


def runs_fast(
    target: str, op_type: str, fmt: Format | str, *, block_size: int = 0, rank: int = 2, axis: int = 0
) -> bool:
    """Whether ``target`` runs an ``op_type`` node in ``fmt`` at least as fast as fp32 (weights and activations)."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    weight = weight_kernel(target, op_type, f, block_size=block_size, rank=rank, axis=axis)
    return weight.fast and activation_kernel(target, f.activation, op_type).fast


def latency_formats(target: str, formats: tuple[str, ...], objective: str = "size") -> tuple[str, ...]:
    """The candidate formats an objective allows on ``target``.

    ``"size"``: all of ``formats``. ``"latency"``: only formats every op runs at least as fast as
    fp32 (on ORT: weight-only formats; no activation rounding); when none is left, all of them
    (no budget is refused because of the objective). ``"both"`` is ``"size"`` here: it needs a
    tie-break inside the solver (prefer the faster of equal-loss choices).
    """
    if objective not in ("size", "latency", "both"):
        raise UsageError(f"unknown objective {objective!r}: use size, latency or both")
    if objective != "latency":
        return tuple(formats)
    fast = tuple(f for f in formats if activation_kernel(target, get_format(f).activation).fast)
    if not fast:
        logger.warning("objective latency: no format of %s runs fast on %s; keeping all", formats, target)
        return tuple(formats)
    return fast


# Declared batch-1 cost of one weighted op relative to its fp32 op on ONNX Runtime CPU (2 threads),
# from the measurements in the module docstring and benchmarks/latency.py; a cached on-machine
# microbenchmark would replace these numbers.
_RELATIVE_COST = {
    WeightForm.DECODE_ONCE: 1.0,
    WeightForm.CAST: 1.0,
    WeightForm.MATMUL_NBITS: 0.6,
    WeightForm.DEQUANTIZE: 3.0,
}
_ACTIVATION_COST = {"float8": 0.3, "half": 0.1, "int8": 0.1}
_INT8_GEMM_COST = 0.3
"""W8A8 MatMulIntegerToFloat over the fp32 MatMul (0.22–0.39× measured on 47–128 rows, K, N 384–1536)."""
_INT8_CONV_COST = 1.0
"""W8A8 Convs as uint8 QLinearConv chains: uniform w8a8 EfficientNet-Lite0 ran at 0.95–1.06× fp32 quiet (whole model;
0.69–0.88× at load 5–11), so no faster than a decoded-once weight."""
_INT8_CONV_RESIDUAL_COST = 0.6
"""The same with ``int8_residuals`` (QLinearAdd residuals, one chain through the blocks): 0.55× (0.52–0.62) and 0.57×
(0.54–0.70) in two runs over six session pairs, ``benchmarks/w8a8_conv.py``."""


def relative_latency(
    target: str,
    op_type: str,
    fmt: Format | str,
    *,
    block_size: int = 0,
    rank: int = 2,
    axis: int = 0,
    elements: int = 0,
    int8_residuals: bool = False,
) -> float:
    """Declared batch-1 latency of an op in ``fmt`` over its fp32 latency on ``target`` (a solver tie-break).

    A declared table (``_RELATIVE_COST``; measured figures in the module docstring), not a per-machine
    measurement: decode-once and cast weights 1.0, MatMulNBits 0.6, a per-run DequantizeLinear 3.0,
    the int8 GEMM of ``w8a8`` on ``ort`` 0.3; activation rounding emulated per run adds 0.1–0.3.
    ``int8_residuals``: the model is written with :mod:`lpcompile.passes.qlinear_add`, so a ``w8a8``
    Conv on ``ort`` runs in an int8 chain through residual blocks (0.6).
    """
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    if f.is_identity:
        return 1.0
    tgt = check_target(target)
    act = activation_kernel(tgt, f.activation, op_type)
    if f.activation in ("int8", DYNAMIC_UINT8) and act.fast:
        if op_class(op_type) != "conv":
            return _INT8_GEMM_COST
        return _INT8_CONV_RESIDUAL_COST if int8_residuals and tgt == "ort" else _INT8_CONV_COST
    form = weight_form(tgt, op_type, f, block_size=block_size, rank=rank, axis=axis, elements=elements)
    cost = _RELATIVE_COST[form] if tgt != "tvm" else 1.0
    if not act.fast and f.activation is not None:
        key = (
            "float8" if f.activation.startswith("float8")
            else "int8" if f.activation in ("int8", DYNAMIC_UINT8) else "half"
        )
        cost += _ACTIVATION_COST[key]
    return cost


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


TABLE_FORMATS: tuple[str, ...] = ("int4_b128", "int4_b32", "int8", "w8a8", "w8a8_dyn", "fp8_e4m3", "bf16", "fp16")


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


# -- converting a decode-once model back to the DequantizeLinear form ---------------------------
# The TVM lowering (lpcompile.runtime.tvm.patterns) matches DequantizeLinear weight patterns; a
# model written for "qdq"/"ort" decodes its weights once with Cast/Mul/Flatten/Concat instead. The
# two forms hold the same codes and scales, so one converts into the other exactly.

_DECODE_OPS = ("Cast", "Mul", "Flatten", "Concat")


@dataclass(frozen=True, eq=False)
class _Decoded:
    """The stored weight behind a decode-once chain, in DequantizeLinear's layout."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int
    block_size: int


def _init_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def _scaled(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """``[Cast32 ← Cast16 ←] Mul(Cast(codes), scale | Cast(scale))``: (codes, scale, fp16-rounded)."""
    if value is None:
        return None
    node = value.producer()
    rounded = False
    if node is not None and cast_to(node) == ir.DataType.FLOAT and node.inputs[0] is not None:
        inner = node.inputs[0].producer()
        if inner is not None and cast_to(inner) == ir.DataType.FLOAT16:
            rounded = True
            node = inner.inputs[0].producer() if inner.inputs[0] is not None else None
    if node is None or not is_onnx_op(node, "Mul") or len(node.inputs) != 2:
        return None
    c, sv = node.inputs
    cast = c.producer() if c is not None else None
    if cast is None or cast_to(cast) != ir.DataType.FLOAT:
        return None
    codes = _init_array(cast.inputs[0])
    sp = sv.producer() if sv is not None else None
    scale = _init_array(sp.inputs[0]) if sp is not None and cast_to(sp) == ir.DataType.FLOAT else _init_array(sv)
    if codes is None or scale is None or (codes.dtype.kind == "f" and codes.dtype.itemsize >= 4):
        return None
    return codes, scale, rounded


def _blocked(value: ir.Value | None, r: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int, bool] | None:
    """``Flatten(scaled [K//b, b, N] | [O, K//b, b])``: 2-D codes, 2-D scales, axis, block, rounded."""
    node = value.producer() if value is not None else None
    if node is None or not is_onnx_op(node, "Flatten"):
        return None
    m = _scaled(node.inputs[0])
    if m is None or m[0].ndim != 3:
        return None
    codes, scale, rounded = m
    axis = 2 - node.attributes.get_int("axis", 1)
    if axis not in (0, 1) or (r is not None and axis != r):
        return None
    if axis == 0:
        full, b, n = codes.shape
        return codes.reshape(full * b, n), scale.reshape(full, n), 0, b, rounded
    o, full, b = codes.shape
    return codes.reshape(o, full * b), scale.reshape(o, full), 1, b, rounded


def _decoded(value: ir.Value) -> tuple[_Decoded, bool] | None:
    """The stored weight a decode-once chain ending in ``value`` decodes, and whether it rounds via fp16."""
    node = value.producer()
    if node is None:
        return None
    if is_onnx_op(node, "Concat") and len(node.inputs) == 2:
        r = node.attributes.get_int("axis", 0)
        main = _blocked(node.inputs[0], r)
        tail = _scaled(node.inputs[1])
        if main is None or tail is None or tail[0].ndim != 2:
            return None
        codes = np.concatenate([main[0].astype(np.int8), tail[0].astype(np.int8)], axis=r).astype(main[0].dtype)
        scale = np.concatenate([main[1], tail[1].astype(main[1].dtype)], axis=r)
        return _Decoded(codes, scale, r, main[3]), main[4]
    if is_onnx_op(node, "Flatten"):
        m = _blocked(value)
        return (_Decoded(m[0], m[1], m[2], m[3]), m[4]) if m is not None else None
    if is_onnx_op(node, "Mul"):
        m = _scaled(value)
        if m is None or m[2]:
            return None
        codes, scale, _ = m
        dims = list(scale.shape)
        t = len(dims) - 1
        if not dims or any(d != 1 for d in dims[1:]) or codes.ndim - 1 - t < 0:
            return None
        axis = codes.ndim - 1 - t
        if codes.shape[axis] != dims[0]:
            return None
        return _Decoded(codes, scale.reshape(-1), axis, 0), False
    return None


def to_dequantize_form(model: ir.Model) -> int:
    """Rewrite every decode-once weight decode of ``model`` (in place) as ``DequantizeLinear`` (+ ``Cast``).

    The result is the ``"tvm"`` target's form of the same codes and scales (names ``<n>/weight_dq``,
    ``<n>/weight_cast``, ``<n>`` the first consumer). Returns how many decodes were rewritten.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from lpcompile.passes._common import Namer, add_initializer

    graph = model.graph
    namer = Namer(graph)
    count = 0
    for node in list(graph):
        if node.domain in ("", "ai.onnx") and node.op_type in _DECODE_OPS:
            continue
        for value in list(node.inputs):
            if value is None or value.producer() is None or value.dtype != ir.DataType.FLOAT:
                continue
            found = _decoded(value)
            if found is None:
                continue
            d, rounded = found
            base = node.name or value.name or "weight"
            w = (value.name or "weight").split("_weight_")[0]
            codes = add_initializer(graph, namer, f"{w}_q", np.ascontiguousarray(d.codes))
            scale = add_initializer(graph, namer, f"{w}_scale", np.ascontiguousarray(d.scale))
            serves = [c.name or "" for c in value.consumers()]
            half = rounded and d.scale.dtype == np.float16
            shape = list(d.codes.shape)
            new = dq_chain(namer, codes, scale, d.axis, d.block_size, shape, half, base, w, serves)
            graph.insert_before(node, new)
            value.replace_all_uses_with(new[-1].outputs[0])
            count += 1
    acts = _fp8_casts_to_qdq(graph, namer)
    if count or acts:
        RemoveUnusedNodesPass()(model)
    logger.info("rewrote %d decode-once weight(s) and %d FP8 activation rounding(s) as Q/DQ", count, acts)
    return count + acts


_FP8_TYPES = {ir.DataType.FLOAT8E4M3FN: "float8_e4m3fn", ir.DataType.FLOAT8E5M2: "float8_e5m2"}


def _fp8_casts_to_qdq(graph: ir.Graph, namer: object) -> int:
    """``Mul(Cast32(Cast_fp8(Div(x, s))), s)`` (the ORT targets' FP8 activation rounding) → ``DQ(Q(x, s, 0), s, 0)``."""
    from lpcompile.formats import FLOAT_SPECS
    from lpcompile.passes._common import ACT_DQ, ACT_Q, add_initializer, make_node

    count = 0
    for mul in list(graph):
        if not is_onnx_op(mul, "Mul") or len(mul.inputs) != 2 or mul.inputs[0] is None:
            continue
        back = mul.inputs[0].producer()
        if back is None or cast_to(back) != ir.DataType.FLOAT or back.inputs[0] is None:
            continue
        q = back.inputs[0].producer()
        fp8 = cast_to(q) if q is not None else None
        if q is None or fp8 not in _FP8_TYPES or q.inputs[0] is None:
            continue
        div = q.inputs[0].producer()
        if div is None or not is_onnx_op(div, "Div") or len(div.inputs) != 2 or div.inputs[1] is not mul.inputs[1]:
            continue
        x, scale = div.inputs
        if x is None or scale is None or not scale.is_initializer():
            continue
        base = (mul.name or "act").rsplit("/", 1)[0]
        zp = add_initializer(
            graph, namer, f"{x.name or 'x'}_act_zp", np.zeros((), dtype=FLOAT_SPECS[_FP8_TYPES[fp8]].np_dtype)
        )
        serves = [c.name or "" for c in mul.outputs[0].consumers()]
        qn = make_node(
            "QuantizeLinear",
            [x, scale, zp],
            {"saturate": 1},
            name=namer.node(base + ACT_Q),
            out_name=namer.value(f"{x.name}_act_q"),
            out_dtype=fp8,
            out_shape=x.shape,
            serves=serves,
        )
        dq = make_node(
            "DequantizeLinear",
            [qn.outputs[0], scale, zp],
            None,
            name=namer.node(base + ACT_DQ),
            out_name=namer.value(f"{x.name}_act_dq"),
            out_dtype=ir.DataType.FLOAT,
            out_shape=x.shape,
            serves=serves,
        )
        graph.insert_before(mul, [qn, dq])
        mul.outputs[0].replace_all_uses_with(dq.outputs[0], replace_graph_outputs=True)
        count += 1
    return count


__all__ = [
    "DEFAULT_TARGET",
    "TARGETS",
    "Kernel",
    "KernelRow",
    "WeightForm",
    "activation_kernel",
    "activation_style",
    "check_target",
    "decode_once_bytes",
    "kernel_table",
    "latency_formats",
    "nbits_block_ok",
    "op_class",
    "relative_latency",
    "runs_fast",
    "softmax_pays",
    "to_dequantize_form",
    "weight_form",
    "weight_kernel",
]

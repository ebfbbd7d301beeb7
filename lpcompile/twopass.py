"""The two-pass softmax (Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020).

Write ``e^x = 2^n · p`` with ``n = round(x · log2 e)``, ``t = x − n · ln 2`` and ``p = e^t``
(``t ∈ [−ln2/2, ln2/2]``, so ``p ∈ [0.707, 1.415]``: it never overflows). Then

* pass 1 reads ``x`` once and reduces the row to a pair ``(m, e)`` with
  ``e' = max(e, n)``, ``m ← m · 2^(e − e') + p · 2^(n − e')`` (``Σ e^x = m · 2^e``);
* pass 2 reads ``x`` again and writes ``y = (p / m) · 2^(n − e)``.

There is no max pass and nothing overflows, whatever the range of the logits; a kernel reads
the row twice and writes it once instead of three reads and one write.

This module holds

* a numpy reference of both algorithms (:func:`two_pass_softmax`, :func:`three_pass_softmax`)
  that can emulate fp16 / bf16 storage (inputs and outputs rounded with ml_dtypes) and a
  low-precision compute type (every intermediate rounded), with the same reduction order
  (a pairwise tree) and the same ``exp`` (correctly rounded) in both, so they compare fairly;
* the ONNX function ``lpcompile.TwoPassSoftmax`` (:func:`function_proto`), a drop-in for
  ``Softmax`` (opset 13+ semantics) whose body uses standard ops only;
* :func:`softmax_f64`, the float64 reference used by tests and benchmarks.

Semantics shared by the reference, the ONNX function and the TVM kernels
------------------------------------------------------------------------
* Finite inputs are clamped to ``[−16384, 16384]`` (:data:`X_CLAMP`). This keeps ``n`` below
  2^15 so that ``n · ln2_hi`` is exact in fp32 (Cody–Waite reduction with a 9-bit ``ln2_hi``)
  and ``t`` is accurate to a few fp32 ULPs. Logits beyond ±16384 saturate: a row such as
  ``[20000, 19999]`` gives ``[0.5, 0.5]`` instead of ``[0.73, 0.27]``. Large negative mask
  values (``-1e9``, ``finfo.min``) behave exactly like ``Softmax``.
* ``x = −inf`` contributes ``p · 2^n = 0`` (masked element).
* A fully masked row (every element ``−inf``) gives **all zeros**. ONNX ``Softmax`` (and the
  three-pass reference here) gives NaN for such a row (``−inf − (−inf)``).
* ``+inf`` saturates to ``+X_CLAMP`` (ONNX ``Softmax`` gives NaN); ``NaN`` anywhere in a row
  makes that row NaN, as in ``Softmax``.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

DOMAIN = "lpcompile"
"""ONNX domain of the function op."""
FUNCTION_NAME = "TwoPassSoftmax"
"""op_type of the function op."""
DOMAIN_VERSION = 1
"""Version under which models import :data:`DOMAIN`."""
MIN_OPSET = 15
"""Lowest default-domain opset the function body can be written in (needs CastLike-15)."""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LN2_HI = 0.693359375
"""ln 2 rounded to 9 significant bits: ``n · LN2_HI`` is exact in fp32 for ``|n| < 2^15``."""
LN2_LO = LN2 - LN2_HI
"""The rest of ln 2 (``≈ −2.1219e−4``)."""
X_CLAMP = 16384.0
"""Finite inputs are clamped to ``[−X_CLAMP, X_CLAMP]`` (so ``|n| ≤ 23637 < 2^15``)."""
_E_IDENTITY = -(2.0**30)
"""Exponent of the identity pair ``(0, −2^30)`` used to pad tree reductions."""

_DTYPES: dict[str, Any] = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


# ----------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------


def _as_dtype(dtype: Any) -> np.dtype[Any]:
    """Normalise ``dtype`` (a name, numpy/ml_dtypes type or dtype) to one of the supported dtypes."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise LpError(f"unsupported softmax dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return np.dtype(_DTYPES[dtype])
    dt = np.dtype(dtype)
    if dt.name not in _DTYPES:
        raise LpError(f"unsupported softmax dtype {dt.name!r}; expected one of {sorted(_DTYPES)}")
    return dt


def _exp(a: np.ndarray, cd: np.dtype[Any]) -> np.ndarray:
    """``exp`` correctly rounded to ``cd`` (computed in float64, rounded once)."""
    return np.exp(a.astype(np.float64)).astype(cd)


def _scale2(a: np.ndarray, k: np.ndarray, cd: np.dtype[Any]) -> np.ndarray:
    """``a · 2^k`` rounded once to ``cd`` (exact unless the result is subnormal or underflows)."""
    return (a.astype(np.float64) * np.exp2(k.astype(np.float64))).astype(cd)


def _to_rows(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Move ``axis`` last and flatten the rest: returns ``(rows, moved_shape)``."""
    if x.ndim == 0:
        raise LpError("softmax needs an input of rank >= 1")
    if not -x.ndim <= axis < x.ndim:
        raise LpError(f"softmax axis {axis} is out of range for rank {x.ndim}")
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _from_rows(y: np.ndarray, moved_shape: tuple[int, ...], axis: int) -> np.ndarray:
    return np.moveaxis(y.reshape(moved_shape), -1, axis)


def _tree_pairs(m: np.ndarray, e: np.ndarray, cd: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise tree reduction of ``(m, e)`` pairs along the last axis, every sum rounded to ``cd``.

    Combining ``(m1, e1)`` and ``(m2, e2)``: ``e' = max(e1, e2)``,
    ``m' = m1 · 2^(e1 − e') + m2 · 2^(e2 − e')``; then ``m'`` is renormalised to ``[0.5, 1)``
    (its binary exponent moves into ``e'``, an exact step), so ``m`` cannot overflow even with
    an fp16 accumulator.
    """
    while m.shape[-1] > 1:
        if m.shape[-1] % 2:
            m = np.concatenate([m, np.zeros_like(m[..., :1])], axis=-1)
            e = np.concatenate([e, np.full_like(e[..., :1], _E_IDENTITY)], axis=-1)
        m1, m2, e1, e2 = m[..., 0::2], m[..., 1::2], e[..., 0::2], e[..., 1::2]
        en = np.maximum(e1, e2)
        m = (_scale2(m1, e1 - en, cd) + _scale2(m2, e2 - en, cd)).astype(cd)
        frac, k = np.frexp(m.astype(np.float64))
        m = frac.astype(cd)
        e = np.where(frac == 0, en, en + k)
    return m[..., 0], e[..., 0]


def _tree_sum(s: np.ndarray, cd: np.dtype[Any]) -> np.ndarray:
    """Pairwise tree sum along the last axis, every sum rounded to ``cd``."""
    while s.shape[-1] > 1:
        if s.shape[-1] % 2:
            s = np.concatenate([s, np.zeros_like(s[..., :1])], axis=-1)
        s = (s[..., 0::2] + s[..., 1::2]).astype(cd)
    return s[..., 0]


def two_pass_softmax(
    x: np.ndarray,
    axis: int = -1,
    dtype: Any = np.float32,
    compute_dtype: Any = np.float32,
) -> np.ndarray:
    """Numpy reference of the two-pass softmax.

    Args:
        x: input logits (any float dtype, any rank >= 1).
        axis: softmax axis (negative counts from the end), as ONNX ``Softmax`` opset 13+.
        dtype: storage format of the input and output ("float32", "float16", "bfloat16",
            "float64" or the numpy/ml_dtypes type): ``x`` is rounded to it first and ``y`` is
            rounded to it last (the fp16/bf16 surroundings of the op).
        compute_dtype: precision of every intermediate (``n``, ``t``, ``p``, the accumulator
            ``m``, ``p/m``). A kernel uses float32; a low-precision ``compute_dtype`` emulates a
            kernel that computes in fp16/bf16 (the Cody–Waite reduction then loses accuracy for
            large ``|x|``, but nothing overflows).

    Returns:
        ``y`` with the shape of ``x`` and dtype ``dtype``. Fully masked rows (all ``−inf``) are
        zeros; see the module docstring for the other special values.
    """
    sd, cd = _as_dtype(dtype), _as_dtype(compute_dtype)
    rows, moved_shape = _to_rows(np.asarray(x), axis)
    with np.errstate(all="ignore"):
        xs = rows.astype(sd).astype(cd)
        neg_inf = np.isneginf(xs)
        xc = np.where(np.isnan(xs), xs, np.clip(xs, cd.type(-X_CLAMP), cd.type(X_CLAMP))).astype(cd)
        n = np.round((xc * cd.type(LOG2E)).astype(cd))
        t = ((xc - (n * cd.type(LN2_HI)).astype(cd)).astype(cd) - (n * cd.type(LN2_LO)).astype(cd)).astype(cd)
        p = np.where(neg_inf, cd.type(0), _exp(t, cd)).astype(cd)
        # pass 1: one read of x -> (m, e) per row
        m, e = _tree_pairs(p, n.astype(np.float64), cd)
        # pass 2: second read of x -> y = (p / m) * 2^(n - e); a fully masked row has m = 0, p = 0
        q = (p / np.where(m == 0, cd.type(1), m)[:, None]).astype(cd)
        y = _scale2(q, n.astype(np.float64) - e[:, None], np.dtype(np.float64))
    return _from_rows(y.astype(sd), moved_shape, axis)


def three_pass_softmax(
    x: np.ndarray,
    axis: int = -1,
    dtype: Any = np.float32,
    compute_dtype: Any = np.float32,
) -> np.ndarray:
    """Numpy reference of the classic three-pass softmax (max pass, sum-of-exp pass, write pass).

    Same arguments, rounding emulation, ``exp`` and tree summation order as
    :func:`two_pass_softmax`. Unlike it (and like ONNX ``Softmax``), a fully masked row gives NaN,
    and a sum in a low-precision ``compute_dtype`` can overflow (fp16: rows longer than ~65k).
    """
    sd, cd = _as_dtype(dtype), _as_dtype(compute_dtype)
    rows, moved_shape = _to_rows(np.asarray(x), axis)
    with np.errstate(all="ignore"):
        xs = rows.astype(sd).astype(cd)
        mx = xs.max(axis=-1, keepdims=True)  # pass 1
        q = _exp((xs - mx).astype(cd), cd)  # pass 2 (recomputed in pass 3 by a kernel)
        s = _tree_sum(q, cd)
        y = (q / s[:, None]).astype(cd)  # pass 3
    return _from_rows(y.astype(sd), moved_shape, axis)


def softmax_f64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """float64 softmax of ``x`` (no rounding of ``x``) with two-pass semantics for fully masked rows.

    Rows whose elements are all ``−inf`` give zeros (as :func:`two_pass_softmax`); finite inputs
    are not clamped, so it is the exact reference for ``|x| ≤ X_CLAMP``.
    """
    rows, moved_shape = _to_rows(np.asarray(x, dtype=np.float64), axis)
    with np.errstate(all="ignore"):
        mx = rows.max(axis=-1, keepdims=True)
        masked = np.isneginf(mx)
        q = np.exp(rows - np.where(masked, 0.0, mx))
        s = q.sum(axis=-1, keepdims=True)
        y = np.where(masked, 0.0, q / np.where(masked, 1.0, s))
    return _from_rows(y, moved_shape, axis)


# ----------------------------------------------------------------------------------------------
# ONNX function
# ----------------------------------------------------------------------------------------------


def _const_f(name: str, value: float) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value=oh.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _const_i64(name: str, values: list[int]) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value=oh.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _with_ref(node: onnx.NodeProto, attr: str) -> onnx.NodeProto:
    """Add the int attribute ``attr`` of ``node`` as a reference to the function attribute ``axis``."""
    node.attribute.append(oh.make_attribute_ref(attr, onnx.AttributeProto.INT, ref_attr_name="axis"))
    return node


def function_proto(opset: int = 21) -> onnx.FunctionProto:
    """The ONNX function ``lpcompile.TwoPassSoftmax(X) -> Y`` with attribute ``axis`` (default −1).

    Semantics are those of ONNX ``Softmax`` (opset 13+: softmax along one axis, negative axes
    allowed) except for the special values listed in the module docstring (fully masked rows
    give zeros, not NaN). ``X`` may be float16, bfloat16, float or double; the body computes in
    float32 (double inputs are therefore computed at float32 accuracy) and casts back with
    ``CastLike``.

    The body, in standard ops::

        xf = Cast<to=FLOAT>(X);  xc = Where(IsNaN(xf), xf, Clip(xf, -16384, 16384))
        n  = Round(xc * log2e);  t = (xc - n*ln2_hi) - n*ln2_lo;  p = Where(IsInf-(xf), 0, Exp(t))
        e  = ReduceMax(n, axis)                     # pass 1: exponent of the (m, e) pair
        s  = Pow(2, n - e);  m = ReduceSum(p * s, axis)   # pass 1: mantissa of the pair
        Y  = CastLike(p / Max(m, 0.5) * s, X)      # pass 2

    ``e = ReduceMax(n)`` is the exponent that the pairwise ``(m, e)`` reduction ends with, and
    ``m = Σ p·2^(n−e)`` its mantissa (up to summation order): it is the same pass-1 reduction
    written as two data-parallel reductions over the same read of ``x``, not a max pass over the
    values of ``x`` (``n`` is an integer exponent, and nothing is subtracted from ``x``). A row
    with any unmasked element has ``m ≥ p(n = e) ≥ 0.707``, so ``Max(m, 0.5)`` only changes fully
    masked rows (``m = 0``, all ``p = 0``), which become zeros.

    Args:
        opset: default-domain opset of the body; it must equal the model's (ONNX requires a
            model-local function to import the same versions as the model). 15 <= opset; for
            opset < 18 ``ReduceMax`` takes no ``axes`` input and ``TopK(k=1)`` computes ``e``.

    Raises:
        LpError: ``opset`` < 15 (no ``CastLike``).
    """
    if opset < MIN_OPSET:
        raise LpError(f"lpcompile.TwoPassSoftmax needs default-domain opset >= {MIN_OPSET}, got {opset}")
    nodes: list[onnx.NodeProto] = [
        _const_f("c_lim", X_CLAMP),
        _const_f("c_nlim", -X_CLAMP),
        _const_f("c_log2e", LOG2E),
        _const_f("c_ln2_hi", LN2_HI),
        _const_f("c_ln2_lo", LN2_LO),
        _const_f("c_zero", 0.0),
        _const_f("c_two", 2.0),
        _const_f("c_half", 0.5),
        _const_i64("c_shape1", [1]),
        _with_ref(oh.make_node("Constant", [], ["axis_s"]), "value_int"),
        oh.make_node("Reshape", ["axis_s", "c_shape1"], ["axes"]),
        oh.make_node("Cast", ["X"], ["xf"], to=TensorProto.FLOAT),
        oh.make_node("IsNaN", ["xf"], ["is_nan"]),
        oh.make_node("IsInf", ["xf"], ["is_ninf"], detect_positive=0, detect_negative=1),
        oh.make_node("Clip", ["xf", "c_nlim", "c_lim"], ["x_clip"]),
        oh.make_node("Where", ["is_nan", "xf", "x_clip"], ["xc"]),
        oh.make_node("Mul", ["xc", "c_log2e"], ["x_log2e"]),
        oh.make_node("Round", ["x_log2e"], ["n"]),
        oh.make_node("Mul", ["n", "c_ln2_hi"], ["n_hi"]),
        oh.make_node("Sub", ["xc", "n_hi"], ["t_hi"]),
        oh.make_node("Mul", ["n", "c_ln2_lo"], ["n_lo"]),
        oh.make_node("Sub", ["t_hi", "n_lo"], ["t"]),
        oh.make_node("Exp", ["t"], ["p_all"]),
        oh.make_node("Where", ["is_ninf", "c_zero", "p_all"], ["p"]),
    ]
    if opset >= 18:
        nodes.append(oh.make_node("ReduceMax", ["n", "axes"], ["e"], keepdims=1))
    else:
        topk = oh.make_node("TopK", ["n", "c_shape1"], ["e", "e_idx"], largest=1, sorted=0)
        nodes.append(_with_ref(topk, "axis"))
    nodes += [
        oh.make_node("Sub", ["n", "e"], ["n_minus_e"]),
        oh.make_node("Pow", ["c_two", "n_minus_e"], ["s"]),
        oh.make_node("Mul", ["p", "s"], ["ps"]),
        oh.make_node("ReduceSum", ["ps", "axes"], ["m"], keepdims=1),
        oh.make_node("Max", ["m", "c_half"], ["m_safe"]),
        oh.make_node("Div", ["p", "m_safe"], ["q"]),
        oh.make_node("Mul", ["q", "s"], ["yf"]),
        oh.make_node("CastLike", ["yf", "X"], ["Y"]),
    ]
    return oh.make_function(
        DOMAIN,
        FUNCTION_NAME,
        ["X"],
        ["Y"],
        nodes,
        [oh.make_opsetid("", opset)],
        attribute_protos=[oh.make_attribute("axis", -1)],
        doc_string=(
            "Two-pass softmax (Dukhan & Ablavatski): Softmax(axis) semantics without a max pass; "
            "fully masked (-inf) rows give zeros instead of NaN; finite inputs clamped to +-16384."
        ),
    )


def make_two_pass_node(input: str, output: str, axis: int = -1, name: str | None = None) -> onnx.NodeProto:
    """A ``lpcompile.TwoPassSoftmax`` NodeProto (the model must import domain ``lpcompile`` and
    hold :func:`function_proto` in ``model.functions``)."""
    return oh.make_node(FUNCTION_NAME, [input], [output], name=name, domain=DOMAIN, axis=axis)


def add_function_to_model(model: onnx.ModelProto) -> bool:
    """Add the function and the ``lpcompile: 1`` opset import to ``model`` if missing.

    Returns:
        True if the model was changed.

    Raises:
        LpError: the model's default-domain opset is below :data:`MIN_OPSET`.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise LpError("model has no default-domain opset import")
    changed = False
    if not any(f.domain == DOMAIN and f.name == FUNCTION_NAME for f in model.functions):
        model.functions.append(function_proto(opset))
        changed = True
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid(DOMAIN, DOMAIN_VERSION))
        changed = True
    return changed


def ulp(dtype: Any, value: Any = 1.0) -> Any:
    """Spacing of ``dtype`` at ``|value|`` (a float for a scalar, an array for an array): the unit
    for tolerances derived from the format. Subnormal range: the smallest subnormal."""
    dt = _as_dtype(dtype)
    fi = ml_dtypes.finfo(dt)
    v = np.abs(np.asarray(value, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        exp = np.where(v > 0, np.floor(np.log2(np.where(v > 0, v, 1.0))), float(fi.minexp))
    exp = np.maximum(exp, int(fi.minexp))
    out = np.exp2(exp - int(fi.nmant))
    return float(out) if out.ndim == 0 else out


__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "FUNCTION_NAME",
    "MIN_OPSET",
    "X_CLAMP",
    "add_function_to_model",
    "function_proto",
    "make_two_pass_node",
    "softmax_f64",
    "three_pass_softmax",
    "two_pass_softmax",
    "ulp",
]

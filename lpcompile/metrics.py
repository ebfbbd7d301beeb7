"""Output-distortion metrics between a reference and a test model (pure numpy).

Conventions:

* All arithmetic is float64; ml_dtypes inputs (bf16, fp8) are widened first.
* Elementwise error ``e = |ref − test|``, except that positions where both hold the same value
  (including the same ±inf, or both NaN) count as zero error, and any other position where either
  side is non-finite counts as infinite error. So a NaN or Inf that appears only in ``test`` makes
  SQNR ``-inf`` and ``max_abs``/``mean_abs`` ``inf`` — reported, never raised.
* **Samples are axis 0.** :func:`cosine` flattens each sample and averages the per-sample cosine
  similarity over samples (arrays of rank ≤ 1 are one sample). Two all-zero samples have cosine 1,
  a zero vs non-zero sample 0; a sample with a non-finite value in either array has cosine NaN,
  so the mean is NaN.
* :func:`kl_divergence` and :func:`top1_agreement` work over the last axis (classes); every
  leading position (batch, and sequence for ``[B, T, V]`` logits) is one sample; an optional
  ``mask`` over the leading positions (an attention mask) leaves padded positions out.
* **What an output is** — one rule, :func:`output_kind`, shared with the analysis loss
  (:mod:`lpcompile.analysis.losses`): ``classifier`` (rank-2 class scores), ``sequence`` (per-position
  class scores, e.g. ``[B, T, V]`` LM logits or a recogniser's per-step softmax), ``tensor``
  (embeddings, hidden states, regressions) or ``integer``. Top-1 and KL are computed for
  ``classifier`` and ``sequence`` outputs only (per position for ``sequence``).
* :meth:`OutputMetrics.to_dict` is JSON-safe: non-finite floats are written as the strings
  ``"inf"``, ``"-inf"``, ``"nan"`` (``float(s)`` reads them back); ``None`` means "not computed".
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lpcompile.errors import LpError

logger = logging.getLogger(__name__)

PROBABILITY_ATOL = 1e-3


def _f64(a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == np.float64:
        return arr
    return arr.astype(np.float64)


def _check_shapes(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        raise LpError(f"shape mismatch: reference {ref.shape} vs test {test.shape}")


def abs_error(ref: Any, test: Any) -> np.ndarray:
    """Elementwise ``|ref − test|`` in float64 with the non-finite rules of the module docstring."""
    r, t = _f64(ref), _f64(test)
    _check_shapes(r, t)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.array(np.abs(r - t), dtype=np.float64)
    same = (r == t) | (np.isnan(r) & np.isnan(t))
    err[same] = 0.0
    err[~np.isfinite(err)] = np.inf
    return err


def sqnr_db(ref: Any, test: Any) -> float:
    """Signal-to-quantisation-noise ratio ``10·log10(Σref² / Σ(ref−test)²)`` in dB.

    ``+inf`` when the arrays are identical (zero noise, including two all-zero arrays), ``-inf``
    when the reference is all zeros but the test is not, or when the test has a non-finite value
    the reference does not. Non-finite reference values are left out of the signal power.
    """
    r = _f64(ref)
    err = abs_error(r, test)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise):
        return -math.inf
    finite = r[np.isfinite(r)]
    signal = float(np.sum(finite * finite))
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _per_sample(a: np.ndarray) -> np.ndarray:
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)


def cosine(ref: Any, test: Any) -> float:
    """Mean over samples (axis 0) of the cosine similarity of the flattened samples.

    Arrays of rank ≤ 1 are one sample. Two zero samples → 1.0; one zero → 0.0; a non-finite
    value in either → NaN for that sample (so the mean is NaN). An empty batch gives 1.0.
    """
    r, t = _f64(ref), _f64(test)
    _check_shapes(r, t)
    r2, t2 = _per_sample(r), _per_sample(t)
    if r2.shape[0] == 0:
        return 1.0
    values = np.empty(r2.shape[0], dtype=np.float64)
    for i in range(r2.shape[0]):
        a, b = r2[i], t2[i]
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            values[i] = np.nan
            continue
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 and nb == 0.0:
            values[i] = 1.0
        elif na == 0.0 or nb == 0.0:
            values[i] = 0.0
        else:
            values[i] = float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))
    return float(np.mean(values))


def max_abs(ref: Any, test: Any) -> float:
    """Largest elementwise absolute error (``inf`` for a non-finite mismatch, 0 for empty arrays)."""
    err = abs_error(ref, test)
    return float(err.max()) if err.size else 0.0


def mean_abs(ref: Any, test: Any) -> float:
    """Mean elementwise absolute error (``inf`` for a non-finite mismatch, 0 for empty arrays)."""
    err = abs_error(ref, test)
    return float(err.mean()) if err.size else 0.0


def nonfinite_count(array: Any) -> int:
    """Number of NaN/±Inf entries (0 for integer and bool arrays)."""
    a = np.asarray(array)
    if a.dtype.kind in "biu":
        return 0
    return int(np.size(a) - np.count_nonzero(np.isfinite(_f64(a))))


def top1_agreement(ref_logits: Any, test_logits: Any, mask: Any = None) -> float:
    """Fraction of positions whose argmax over the last axis agrees (1.0 for no positions).

    ``mask`` (shape ``ref.shape[:-1]``) restricts the count to the positions where it is non-zero.
    """
    r, t = _f64(ref_logits), _f64(test_logits)
    _check_shapes(r, t)
    if r.ndim == 0:
        raise LpError("top1_agreement needs at least one axis of classes")
    if r.size == 0:
        return 1.0
    return (
        masked_mean(np.argmax(r, axis=-1) == np.argmax(t, axis=-1), mask)
        if mask is not None
        else float(np.mean(np.argmax(r, axis=-1) == np.argmax(t, axis=-1)))
    )


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (max subtracted; a row of all ``-inf`` stays NaN)."""
    x = _f64(x)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        shifted = x - m
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl_divergence(ref_logits: Any, test_logits: Any, from_logits: bool = True, mask: Any = None) -> float:
    """Mean over positions of ``KL(p_ref ‖ p_test)`` along the last axis, in nats.

    Args:
        ref_logits: reference logits (or probabilities when ``from_logits`` is False).
        test_logits: test logits / probabilities, same shape.
        from_logits: apply log-softmax first; otherwise the inputs are probabilities, which are
            renormalised along the last axis and clipped at 1e-12 before the log.
        mask: optional 0/1 weights over the leading positions (shape ``ref.shape[:-1]``): the
            mean is taken over the positions where it is non-zero (padding left out).

    Terms with ``p_ref = 0`` contribute 0. NaN in ``test`` propagates to a NaN result.
    """
    r, t = np.asarray(ref_logits), np.asarray(test_logits)
    _check_shapes(r, t)
    if r.ndim == 0:
        raise LpError("kl_divergence needs at least one axis of classes")
    if r.size == 0:
        return 0.0
    # positions are independent: convert to float64 and reduce KL_ROWS_ELEMENTS at a time (an LLM's
    # 4 × 128 × 49,152 logits are 200 MB per float64 copy, and the whole-array form made about seven)
    r2, t2 = r.reshape(-1, r.shape[-1]), t.reshape(-1, t.shape[-1])
    step = max(1, KL_ROWS_ELEMENTS // max(1, r.shape[-1]))
    per_position = np.concatenate(
        [_kl_rows(r2[i : i + step], t2[i : i + step], from_logits) for i in range(0, r2.shape[0], step)]
    ).reshape(r.shape[:-1])
    if np.isnan(per_position).any():
        return float("nan")
    return masked_mean(np.maximum(per_position, 0.0), mask)


#: float64 elements of logits :func:`kl_divergence` converts and reduces at a time
KL_ROWS_ELEMENTS = 1 << 20


def _kl_rows(ref: np.ndarray, test: np.ndarray, from_logits: bool) -> np.ndarray:
    """``KL(p_ref ‖ p_test)`` of each row of two ``[rows, classes]`` arrays (float64, NaN propagated)."""
    r, t = _f64(ref), _f64(test)
    if from_logits:
        lp, lq = log_softmax(r), log_softmax(t)
    else:
        eps = 1e-12
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.clip(r, eps, None)
            q = np.clip(t, eps, None)
            lp = np.log(p / np.sum(p, axis=-1, keepdims=True))
            lq = np.log(q / np.sum(q, axis=-1, keepdims=True))
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0.0, p * (lp - lq), 0.0)
    terms = np.where(np.isnan(lq), np.nan, terms)
    return np.sum(terms, axis=-1)


def is_probability_like(array: Any, atol: float = PROBABILITY_ATOL) -> bool:
    """True for a float array in [0, 1] whose last axis sums to 1 (within ``atol``): softmax output."""
    a = np.asarray(array)
    if a.ndim == 0 or a.size == 0 or a.dtype.kind in "biu" or a.shape[-1] < 2:
        return False
    x = _f64(a)
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        return False
    return bool(np.allclose(x.sum(axis=-1), 1.0, rtol=0.0, atol=atol))


_SCORE_NAME = re.compile(r"logit|prob|score|class|pred", re.IGNORECASE)
_TENSOR_NAME = re.compile(r"embed|hidden|feature|pool|state|vector|encod|represent|box|coord|mask", re.IGNORECASE)
_CLASS_WIDTHS = (10, 100, 1000, 1001)
_SOFTMAX_OPS = ("Softmax", "LogSoftmax")

OutputKind = str
"""``"classifier"``, ``"sequence"``, ``"tensor"`` or ``"integer"`` (see :func:`output_kind`)."""


def output_kind(
    name: str,
    shape: Sequence[Any] | None,
    *,
    integer: bool = False,
    producer: str | None = None,
    vocab: int | None = None,
    probability_like: bool = False,
) -> OutputKind:
    """What an output holds — the one rule used for the analysis loss and for eval metrics.

    First match wins: integer/bool element type → ``integer``; rank < 2, or a last dim that is
    unknown or < 2 → ``tensor``; class scores — produced by Softmax/LogSoftmax, values that are
    probabilities (``probability_like``), or a name with ``logit``/``prob``/``score``/``class``/
    ``pred`` — are ``classifier`` at rank 2 and ``sequence`` above; names of embeddings and
    hidden states (``embed``, ``hidden``, ``feature``, ``pool``, ``state``, ...) → ``tensor``;
    rank 2 with 10/100/1000/1001 columns → ``classifier``; rank ≥ 3 whose last dim equals the
    model's token vocabulary (``vocab``: the rows of its embedding table) → ``sequence``;
    otherwise ``tensor``.
    """
    if integer:
        return "integer"
    if shape is None or len(shape) < 2:
        return "tensor"
    last = shape[-1]
    if not isinstance(last, int | np.integer) or int(last) < 2:
        return "tensor"
    scores = "classifier" if len(shape) == 2 else "sequence"
    if producer in _SOFTMAX_OPS or probability_like or _SCORE_NAME.search(name):
        return scores
    if _TENSOR_NAME.search(name):
        return "tensor"
    if len(shape) == 2 and int(last) in _CLASS_WIDTHS:
        return "classifier"
    if len(shape) >= 3 and vocab is not None and int(last) == vocab:
        return "sequence"
    return "tensor"


def array_kind(name: str, array: Any, **hints: Any) -> OutputKind:
    """:func:`output_kind` of an array (integer dtype and probability values read from the data)."""
    a = np.asarray(array)
    if a.dtype.kind in "biu":
        return "integer"
    return output_kind(name, a.shape, probability_like=is_probability_like(a), **hints)


def is_classifier_like(shape_or_array: Any, name: str = "") -> bool:
    """True when :func:`output_kind` says ``classifier`` (rank-2 class scores)."""
    if isinstance(shape_or_array, np.ndarray):
        return array_kind(name, shape_or_array) == "classifier"
    return output_kind(name, tuple(shape_or_array)) == "classifier"


def masked_mean(values: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of ``values`` over the positions where ``mask`` (broadcast over trailing axes) is non-zero."""
    v = np.asarray(values, dtype=np.float64)
    if mask is None:
        return float(np.mean(v)) if v.size else 0.0
    m = np.asarray(mask, dtype=np.float64)
    m = m.reshape(m.shape + (1,) * (v.ndim - m.ndim))
    m = np.broadcast_to(m, v.shape)
    total = float(np.sum(m))
    return float(np.sum(v * m) / total) if total > 0 else 0.0


def position_mask(mask: Any, shape: Sequence[int], last_axis_is_classes: bool = True) -> np.ndarray | None:
    """``mask`` ([B, T] 0/1) when it covers the leading positions of an output of ``shape``, else None.

    With ``last_axis_is_classes`` the positions are every axis but the last (``[B, T]`` of
    ``[B, T, V]``); otherwise the mask must match the first ``mask.ndim`` axes.
    """
    if mask is None:
        return None
    m = np.asarray(mask)
    lead = tuple(shape[:-1]) if last_axis_is_classes else tuple(shape[: m.ndim])
    return m if m.ndim >= 1 and tuple(m.shape) == lead else None


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _read_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class OutputMetrics:
    """Distortion of one model output.

    Attributes:
        sqnr_db: see :func:`sqnr_db`.
        cosine: see :func:`cosine` (mean of per-sample cosines, samples = axis 0).
        max_abs: largest absolute error.
        mean_abs: mean absolute error.
        top1: top-1 agreement for ``classifier`` / ``sequence`` outputs (per position for
            ``sequence``, padding left out), else None.
        kl: KL(ref ‖ test) in nats for the same outputs (softmax of logits, or the
            probabilities themselves when the reference output is probability-like), else None.
        nonfinite: NaN/Inf count in the test output.
        ref_nonfinite: NaN/Inf count in the reference output.
        kind: the output's kind (:func:`output_kind`), None when not recorded.
        exact: fraction of elements that are identical (integer outputs only), else None.
    """

    sqnr_db: float
    cosine: float
    max_abs: float
    mean_abs: float
    top1: float | None = None
    kl: float | None = None
    nonfinite: int = 0
    ref_nonfinite: int = 0
    kind: str | None = None
    exact: float | None = None

    def to_dict(self) -> dict[str, float | str | int | None]:
        """JSON-safe dict: non-finite floats as ``"inf"`` / ``"-inf"`` / ``"nan"``."""
        out: dict[str, float | str | int | None] = {}
        for key, value in asdict(self).items():
            if key == "kind":
                out[key] = value
            else:
                out[key] = value if isinstance(value, int) and not isinstance(value, bool) else _json_float(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputMetrics:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                sqnr_db=float(data["sqnr_db"]),
                cosine=float(data["cosine"]),
                max_abs=float(data["max_abs"]),
                mean_abs=float(data["mean_abs"]),
                top1=_read_float(data.get("top1")),
                kl=_read_float(data.get("kl")),
                nonfinite=int(data.get("nonfinite", 0)),
                ref_nonfinite=int(data.get("ref_nonfinite", 0)),
                kind=data.get("kind"),
                exact=_read_float(data.get("exact")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LpError(f"malformed output metrics: {exc}") from None


def output_metrics(ref: Any, test: Any, kind: str | None = None, mask: Any = None) -> OutputMetrics:
    """All metrics for one output pair (same shape).

    Args:
        ref: the reference output.
        test: the test output.
        kind: :func:`output_kind` of the output (default: :func:`array_kind` of ``ref``, no name).
        mask: 0/1 positions (an attention mask ``[B, T]``) to leave padding out of top-1 and KL of
            ``sequence`` outputs; ignored when its shape does not cover the output's positions.
    """
    r, t = np.asarray(ref), np.asarray(test)
    if r.shape != t.shape:
        raise LpError(f"shape mismatch: reference {r.shape} vs test {t.shape}")
    kind = kind or array_kind("", r)
    top1 = kl = exact = None
    if kind in ("classifier", "sequence") and r.ndim >= 1 and r.size:
        m = position_mask(mask, r.shape) if kind == "sequence" else None
        top1 = top1_agreement(r, t, m)
        kl = kl_divergence(r, t, from_logits=not is_probability_like(r), mask=m)
    if kind == "integer":
        exact = float(np.mean(r == t)) if r.size else 1.0
    nonfinite = nonfinite_count(t)
    if nonfinite:
        logger.warning("test output has %d non-finite value(s)", nonfinite)
    return OutputMetrics(
        sqnr_db=sqnr_db(r, t),
        cosine=cosine(r, t),
        max_abs=max_abs(r, t),
        mean_abs=mean_abs(r, t),
        top1=top1,
        kl=kl,
        nonfinite=nonfinite,
        ref_nonfinite=nonfinite_count(r),
        kind=kind,
        exact=exact,
    )


def compare_outputs(
    ref: Mapping[str, Any],
    test: Mapping[str, Any],
    kinds: Mapping[str, str] | None = None,
    mask: Any = None,
) -> dict[str, OutputMetrics]:
    """Metrics per output name, in the reference's order.

    ``kinds`` gives each output's :func:`output_kind` (default: :func:`array_kind` by name and
    data); ``mask`` is an attention mask applied to ``sequence`` outputs it covers.

    Raises:
        LpError: when the output names differ or an output's shapes differ.
    """
    missing = [n for n in ref if n not in test]
    extra = [n for n in test if n not in ref]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing in test: {', '.join(missing)}")
        if extra:
            parts.append(f"not in reference: {', '.join(extra)}")
        raise LpError(f"outputs differ ({'; '.join(parts)})")
    out: dict[str, OutputMetrics] = {}
    for name in ref:
        r, t = np.asarray(ref[name]), np.asarray(test[name])
        if r.shape != t.shape:
            raise LpError(f"output {name!r}: shape mismatch, reference {r.shape} vs test {t.shape}")
        kind = (kinds or {}).get(name) or array_kind(name, r)
        out[name] = output_metrics(r, t, kind, mask)
    return out

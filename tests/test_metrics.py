"""Output metrics against hand-computed values and edge cases (identical, zeros, NaN/Inf)."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest

from lpcompile.errors import LpError
from lpcompile.metrics import (
    OutputMetrics,
    compare_outputs,
    cosine,
    is_classifier_like,
    is_probability_like,
    kl_divergence,
    max_abs,
    mean_abs,
    sqnr_db,
    top1_agreement,
)


def test_sqnr_hand_computed() -> None:
    ref = np.array([3.0, 4.0])  # signal power 25
    test = np.array([3.0, 4.5])  # noise power 0.25
    assert sqnr_db(ref, test) == pytest.approx(20.0, abs=1e-12)  # 10*log10(100)


def test_identical_gives_inf_sqnr_and_unit_cosine() -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    assert sqnr_db(x, x) == math.inf
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert max_abs(x, x) == 0.0
    assert mean_abs(x, x) == 0.0


def test_zeros() -> None:
    z = np.zeros((2, 3))
    assert sqnr_db(z, z) == math.inf
    assert cosine(z, z) == 1.0
    assert sqnr_db(z, np.ones((2, 3))) == -math.inf
    assert cosine(z, np.ones((2, 3))) == 0.0


def test_cosine_is_mean_of_per_sample_cosines() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 1.0]])
    test = np.array([[0.0, 1.0], [1.0, 1.0]])  # per sample: 0 and 1
    assert cosine(ref, test) == pytest.approx(0.5, abs=1e-12)
    # (a global cosine over the flattened batch would give 2/3 here)
    assert cosine(ref, -ref) == pytest.approx(-1.0, abs=1e-12)


def test_max_mean_abs() -> None:
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    test = np.array([1.5, 2.0, 2.0, 4.0])
    assert max_abs(ref, test) == 1.0
    assert mean_abs(ref, test) == pytest.approx(0.375, abs=1e-15)


def test_top1_agreement() -> None:
    ref = np.array([[1, 2, 3], [3, 2, 1], [0, 5, 0], [1, 0, 0]], dtype=np.float32)
    test = np.array([[1, 2, 4], [1, 2, 3], [0, 5, 1], [0, 1, 0]], dtype=np.float32)
    assert top1_agreement(ref, test) == 0.5


def test_kl_hand_computed() -> None:
    # softmax([0, 0]) = (1/2, 1/2); softmax([0, ln 3]) = (1/4, 3/4)
    ref = np.array([[0.0, 0.0]])
    test = np.array([[0.0, math.log(3.0)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(ref, test) == pytest.approx(expected, abs=1e-12)
    assert kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-15)
    # probabilities directly
    p, q = np.array([[0.2, 0.8]]), np.array([[0.8, 0.2]])
    expected = 0.2 * math.log(0.25) + 0.8 * math.log(4.0)
    assert kl_divergence(p, q, from_logits=False) == pytest.approx(expected, abs=1e-9)


def test_kl_is_stable_for_large_logits() -> None:
    ref = np.array([[1000.0, 0.0, -1000.0]])
    assert math.isfinite(kl_divergence(ref, ref + 1e4))  # shift-invariant: 0
    assert kl_divergence(ref, ref + 1e4) == pytest.approx(0.0, abs=1e-12)


def test_heuristics() -> None:
    probs = np.array([[0.1, 0.9], [0.5, 0.5]], dtype=np.float32)
    assert is_probability_like(probs)
    assert not is_probability_like(np.array([[0.1, 0.2]]))
    assert not is_probability_like(np.array([[-1.0, 2.0]]))
    assert is_classifier_like((8, 10))
    assert is_classifier_like(np.zeros((3, 1000), np.float32))
    assert not is_classifier_like((8, 16, 32000))  # LM logits are rank 3
    assert not is_classifier_like((8, 1))
    assert is_classifier_like(("batch", 10))
    assert not is_classifier_like(("batch", None))
    assert not is_classifier_like(np.zeros((3, 10), np.int64))


def test_nonfinite_in_test_is_reported_not_raised() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    test = ref.copy()
    test[0, 1] = np.nan
    test[1, 2] = np.inf
    m = compare_outputs({"y": ref}, {"y": test})["y"]
    assert m.nonfinite == 2
    assert m.sqnr_db == -math.inf
    assert m.max_abs == math.inf
    assert math.isnan(m.cosine)
    d = m.to_dict()
    assert d["sqnr_db"] == "-inf" and d["max_abs"] == "inf" and d["cosine"] == "nan"
    json.dumps(d, allow_nan=False)  # JSON-safe


def test_same_inf_on_both_sides_is_no_error() -> None:
    ref = np.array([1.0, np.inf])
    assert max_abs(ref, ref.copy()) == 0.0
    assert sqnr_db(ref, ref.copy()) == math.inf


def test_compare_outputs_classifier_fields_and_roundtrip() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    hidden = rng.standard_normal((6, 4, 8)).astype(np.float32)
    out = compare_outputs({"logits": logits, "h": hidden}, {"logits": logits + 0.01, "h": hidden})
    assert list(out) == ["logits", "h"]
    assert out["logits"].top1 is not None and out["logits"].kl is not None
    assert out["h"].top1 is None and out["h"].kl is None
    assert out["h"].sqnr_db == math.inf and out["h"].to_dict()["sqnr_db"] == "inf"
    for m in out.values():
        again = OutputMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
        assert again.to_dict() == m.to_dict()


def test_compare_outputs_low_precision_dtypes() -> None:
    ref = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    test = ref.astype(ml_dtypes.bfloat16)
    m = compare_outputs({"y": ref}, {"y": test})["y"]
    # bf16 has 8 significant bits: relative rounding error <= 2^-9
    assert m.max_abs <= 2.0 * 2.0**-9
    assert m.sqnr_db > 40.0


def test_compare_outputs_mismatch_errors() -> None:
    with pytest.raises(LpError, match="missing in test"):
        compare_outputs({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(LpError, match="shape mismatch"):
        compare_outputs({"a": np.zeros(2)}, {"a": np.zeros(3)})


def test_output_kind_is_one_rule() -> None:
    from lpcompile.metrics import array_kind, output_kind

    assert output_kind("logits", ("batch", 7)) == "classifier"
    assert output_kind("output", (8, 1000)) == "classifier"  # ImageNet width
    assert output_kind("sentence_embedding", (8, 384)) == "tensor"  # no top-1 for embeddings
    assert output_kind("output", (8, 384)) == "tensor"
    assert output_kind("output", (2, 16, 32000), vocab=32000) == "sequence"  # LM logits by vocabulary
    assert output_kind("last_hidden_state", (2, 16, 576), vocab=49152) == "tensor"
    assert output_kind("y", (1, 40, 12), producer="Softmax") == "sequence"  # per-step softmax
    assert output_kind("ids", (2, 5), integer=True) == "integer"
    assert output_kind("x", (5,)) == "tensor"
    probs = np.full((4, 3), 1 / 3, dtype=np.float32)
    assert array_kind("out", probs) == "classifier"  # probability rows
    assert array_kind("n", np.zeros((4, 3), np.int64)) == "integer"


def test_masked_kl_and_top1_leave_padding_out() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2, 4, 6))
    test = ref + 0.05 * rng.standard_normal(ref.shape)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    garbage = test.copy()
    garbage[mask == 0] = -ref[mask == 0] * 50  # padded positions disagree completely
    kept = mask.astype(bool)
    assert kl_divergence(ref, garbage, mask=mask) == pytest.approx(kl_divergence(ref[kept], test[kept]), rel=1e-12)
    assert top1_agreement(ref, garbage, mask) == top1_agreement(ref[kept], test[kept])
    out = compare_outputs({"output": ref}, {"output": garbage}, kinds={"output": "sequence"}, mask=mask)
    assert out["output"].top1 == top1_agreement(ref[kept], test[kept]) and out["output"].kind == "sequence"


def test_kl_divergence_in_row_blocks_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """KL is reduced a block of positions at a time (an LLM's logits in float64 are 200 MB per copy):
    any block size gives the same number, with a mask and with NaN."""
    import lpcompile.metrics as metrics

    rng = np.random.default_rng(3)
    r = rng.normal(size=(3, 50, 100)).astype(np.float32)
    t = r + 0.1 * rng.normal(size=r.shape).astype(np.float32)
    mask = (rng.random((3, 50)) > 0.3).astype(np.int64)
    whole = (metrics.kl_divergence(r, t), metrics.kl_divergence(r, t, mask=mask))
    for rows in (1, 7, 150):
        monkeypatch.setattr(metrics, "KL_ROWS_ELEMENTS", rows * 100)
        assert (metrics.kl_divergence(r, t), metrics.kl_divergence(r, t, mask=mask)) == whole
    bad = t.copy()
    bad[2, 49, 0] = np.nan
    assert np.isnan(metrics.kl_divergence(r, bad))

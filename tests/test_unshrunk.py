"""The loss prediction uses the raw ``XᵀX``, the rounding the shrunk one (:func:`lpcompile.rounding.unshrunk`),
and a grouped Conv's dead channels (zero input) add nothing to the Kronecker prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lpcompile.analysis.input_hessians as ih
from lpcompile.analysis.input_hessians import ConvGeometry, HessianAccumulator, HessianSpec, HessianStore
from lpcompile.formats import dequantize
from lpcompile.graph import WeightLayout
from lpcompile.rounding import FactoredXtX, candidate, kron_loss, round_weight, to_2d, unshrunk

SEED = 23
MATMUL = WeightLayout(channel_axis=1, reduction_axis=0)
DEPTHWISE = WeightLayout(channel_axis=0, reduction_axis=1, flatten=True)


def _accumulator(rule: str, monkeypatch: pytest.MonkeyPatch) -> HessianAccumulator:
    """A MatMul input (K = 24, 10 rows: heavily shrunk) and a depthwise 3×3 Conv input (4 channels)."""
    monkeypatch.setattr(ih, "SHRINK_RULE", rule)
    rng = np.random.default_rng(SEED)
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET")
    acc = HessianAccumulator(
        {"x": HessianSpec("x", "matmul", 24), "c": HessianSpec("c", "conv", 9, geom, groups=4)}, sample_stats=True
    )
    for _ in range(2):
        x = rng.standard_normal((5, 1, 24)) @ rng.standard_normal((24, 24))
        c = rng.standard_normal((5, 4, 5, 5)) * np.exp(rng.standard_normal((1, 4, 1, 1)))
        acc.update({"x": torch.from_numpy(x).float(), "c": torch.from_numpy(c).float()})
    return acc


@pytest.mark.parametrize("rule", ["constant", "ledoit_wolf"])
def test_unshrunk_gives_the_raw_mean_back(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = _accumulator(rule, monkeypatch)
    shrunk, raw = acc.result(shrink=True), acc.result(shrink=False)
    for name in ("x", "c"):
        delta = np.broadcast_to(np.asarray(shrunk[name].shrinkage), shrunk[name].shape[:-2])
        back = unshrunk(shrunk[name])
        assert np.any(delta > 0)
        assert not np.allclose(shrunk[name], raw[name])
        ok = delta < 1.0  # a matrix shrunk all the way (Ledoit–Wolf can say δ = 1) is kept as it is
        np.testing.assert_allclose(back[ok], raw[name][ok], rtol=1e-9, atol=1e-12 * np.abs(raw[name]).max())
        np.testing.assert_array_equal(back[~ok], np.asarray(shrunk[name])[~ok])
        assert unshrunk(raw[name]) is raw[name]  # nothing to undo


def test_a_spilled_matrix_keeps_its_shrinkage(monkeypatch: pytest.MonkeyPatch) -> None:
    acc = _accumulator("constant", monkeypatch)
    shrunk, raw = acc.result(shrink=True), acc.result(shrink=False)
    store = HessianStore(limit=0)  # every matrix through disk
    try:
        for k, v in shrunk.items():
            store[k] = v
        assert store.files
        for k in shrunk:
            back = store[k]
            assert isinstance(back, FactoredXtX)
            np.testing.assert_array_equal(back, shrunk[k])
            np.testing.assert_allclose(unshrunk(back), raw[k], rtol=1e-9, atol=1e-12 * np.abs(raw[k]).max())
    finally:
        store.close()


def test_candidate_predicts_with_the_raw_mean_and_rounds_with_the_shrunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few rows (K = 24 from 10): the shrunk matrix hides the correlations GPTQ arranged its error against."""
    acc = _accumulator("constant", monkeypatch)
    h, raw = acc.result(shrink=True)["x"], acc.result(shrink=False)["x"]
    rng = np.random.default_rng(SEED)
    w = (rng.standard_normal((24, 6)) * 0.1).astype(np.float32)
    diag = np.abs(rng.standard_normal(w.shape))
    q, pred = candidate("int4_b32", w, MATMUL, "gptq", diag, hessian=h)
    expect = round_weight("int4_b32", w, MATMUL, "gptq", hessian=h)
    np.testing.assert_array_equal(q.codes, expect.codes)  # rounded with the shrunk matrix
    delta = dequantize(q).reshape(w.shape).astype(np.float64) - w
    assert pred == pytest.approx(kron_loss(delta, MATMUL, diag, raw), rel=1e-9)
    assert pred != pytest.approx(kron_loss(delta, MATMUL, diag, h), rel=1e-3)


def test_grouped_kron_loss_skips_dead_channels() -> None:
    """A depthwise channel whose input is always zero (after ReLU) has XᵀX = 0: before, one such channel
    sent the whole node back to the diagonal prediction; now it adds nothing and the others keep theirs."""
    rng = np.random.default_rng(SEED)
    c = 4
    x = rng.standard_normal((c, 40, 9))
    h = np.einsum("gri,grj->gij", x, x) / 40
    h[2] = 0.0  # channel 2 never sees a non-zero input
    w = (rng.standard_normal((c, 1, 3, 3)) * 0.1).astype(np.float32)
    delta = rng.standard_normal(w.shape) * 0.01
    diag = np.abs(rng.standard_normal(w.shape))
    got = kron_loss(delta, DEPTHWISE, diag, h)
    d2, g2 = to_2d(delta, DEPTHWISE), to_2d(diag, DEPTHWISE)  # [9, C]
    expect = 0.0
    for g in (0, 1, 3):
        hn = h[g] / np.diagonal(h[g]).mean()
        expect += 0.5 * g2[:, g].sum() / 9 * float(d2[:, g] @ hn @ d2[:, g])
    assert got == pytest.approx(expect, rel=1e-12)
    assert got != pytest.approx(0.5 * float(np.sum(diag * delta * delta)), rel=1e-3)  # not the diagonal fallback

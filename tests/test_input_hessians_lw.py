"""Ledoit–Wolf shrinkage intensities over calibration samples (:meth:`HessianAccumulator.ledoit_wolf`)
against a direct numpy computation, for a masked MatMul input and a depthwise Conv."""

from __future__ import annotations

import numpy as np
import torch

from lpcompile.analysis.input_hessians import ConvGeometry, HessianAccumulator, HessianSpec, _conv_rows

SEED = 19


def _direct(per_sample_rows: list[np.ndarray]) -> tuple[np.ndarray, float]:
    n = sum(len(r) for r in per_sample_rows)
    s = sum(r.T @ r for r in per_sample_rows) / n
    beta2 = sum((len(r) / n) ** 2 * np.sum((r.T @ r / len(r) - s) ** 2) for r in per_sample_rows if len(r))
    mu = np.trace(s) / s.shape[0]
    gamma2 = np.sum((s - mu * np.eye(s.shape[0])) ** 2)
    return s, min(1.0, beta2 / gamma2)


def test_ledoit_wolf_matmul_with_mask() -> None:
    rng = np.random.default_rng(SEED)
    k = 12
    x = rng.standard_normal((5, 7, k)) @ rng.standard_normal((k, k))
    x *= np.exp(rng.standard_normal((5, 1, k)))  # each sample its own scales: samples differ
    mask = np.ones((5, 7), np.int64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    acc = HessianAccumulator({"x": HessianSpec("x", "matmul", k)}, sample_stats=True)
    acc.update({"x": torch.from_numpy(x[:3]).float()}, mask[:3])
    acc.update({"x": torch.from_numpy(x[3:]).float()}, mask[3:])
    rows = [x[b][mask[b].astype(bool)] for b in range(5)]
    s, delta = _direct(rows)
    np.testing.assert_allclose(acc.result(shrink=False)["x"], s, rtol=1e-5, atol=1e-5 * np.abs(s).max())
    assert np.isclose(float(acc.ledoit_wolf("x")), delta, rtol=1e-4)
    # the batch path (no per-sample moments) sums the same rows
    plain = HessianAccumulator({"x": HessianSpec("x", "matmul", k)})
    plain.update({"x": torch.from_numpy(x).float()}, mask)
    np.testing.assert_allclose(plain.result(shrink=False)["x"], s, rtol=1e-5, atol=1e-5 * np.abs(s).max())
    assert plain.ledoit_wolf("x") is None


def test_ledoit_wolf_depthwise_per_group() -> None:
    rng = np.random.default_rng(SEED)
    c = 3
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET")
    x = rng.standard_normal((4, c, 6, 6)).astype(np.float32) * np.exp(rng.standard_normal((4, c, 1, 1))).astype(
        np.float32
    )
    acc = HessianAccumulator({"x": HessianSpec("x", "conv", 9, geom, groups=c)}, sample_stats=True)
    acc.update({"x": torch.from_numpy(x)})
    lw = acc.ledoit_wolf("x")
    assert lw.shape == (c,)
    for g in range(c):
        rows = [_conv_rows(torch.from_numpy(x[b : b + 1, g : g + 1]), geom).double().numpy() for b in range(4)]
        s, delta = _direct(rows)
        np.testing.assert_allclose(acc.result(shrink=False)["x"][g], s, rtol=1e-5, atol=1e-5 * np.abs(s).max())
        assert np.isclose(lw[g], delta, rtol=1e-4)


def test_iid_isotropic_rows_shrink_fully_structured_rows_little() -> None:
    """Rows drawn from ``N(0, I)`` are best estimated by ``μI`` (δ near 1); a strongly correlated input
    with many samples is kept nearly as measured (δ small)."""
    rng = np.random.default_rng(SEED)
    k = 16
    iso = HessianAccumulator({"x": HessianSpec("x", "matmul", k)}, sample_stats=True)
    iso.update({"x": torch.from_numpy(rng.standard_normal((64, k))).float()})
    assert float(iso.ledoit_wolf("x")) > 0.5
    mix = rng.standard_normal((k, k)) * np.linspace(3, 0.1, k)[:, None]
    cor = HessianAccumulator({"x": HessianSpec("x", "matmul", k)}, sample_stats=True)
    cor.update({"x": torch.from_numpy(rng.standard_normal((2000, k)) @ mix).float()})
    assert float(cor.ledoit_wolf("x")) < 0.05


def test_result_with_the_ledoit_wolf_rule(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lpcompile.analysis import input_hessians as ih

    rng = np.random.default_rng(SEED)
    k = 10
    mix = rng.standard_normal((k, k)) * np.linspace(3, 0.2, k)[:, None]
    x = ((rng.standard_normal((20, 8, k)) @ mix) * np.exp(0.3 * rng.standard_normal((20, 1, k)))).astype(np.float32)
    monkeypatch.setattr(ih, "SHRINK_RULE", "ledoit_wolf")
    acc = HessianAccumulator({"x": HessianSpec("x", "matmul", k)})
    assert acc.sample_stats
    acc.update({"x": torch.from_numpy(x)})
    raw = acc.result(shrink=False)["x"]
    delta = float(acc.ledoit_wolf("x"))
    assert 0.0 < delta < 1.0
    exp = raw * (1 - delta)
    np.fill_diagonal(exp, (1 - delta) * np.diag(raw) + delta * np.diag(raw).mean())
    np.testing.assert_allclose(acc.result()["x"], exp, rtol=1e-12, atol=1e-15)

"""The lazy-batch GPTQ of :func:`lpcompile.rounding._gptq` against the column-by-column reference it
replaced (issue 19): the same codes up to float noise, for integer, float and table grids, with and
without act-order, and the factorisation of a :class:`FactoredXtX` is made once across ``round_weight``
calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpcompile import rounding as R
from lpcompile.formats import WeightLayout, dequantize

SEED = 19
MATMUL = WeightLayout(channel_axis=1, reduction_axis=0)


def _reference_gptq(grid, w, scale, hessian, cfg, zero=None, offset=None):  # type: ignore[no-untyped-def]
    """The column-by-column implementation on ``Wᵀ`` (lpcompile before wave 5), kept as the reference."""
    assert offset is None  # the float-offset formats are not among the compared ones
    k = w.shape[0]
    perm, hinv = R._gptq_factor(np.asarray(hessian), cfg)
    wt = w.T.contiguous().clone()
    st = scale.T.contiguous()
    zt = zero.T.contiguous() if zero is not None else None
    if perm is not None:
        wt, st = wt[:, perm], st[:, perm]
        zt = zt[:, perm] if zt is not None else None
    q = torch.zeros_like(wt)
    bs = cfg.block
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = wt[:, i1:i2].clone()
        e1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        s1 = st[:, i1:i2]
        z1 = zt[:, i1:i2] if zt is not None else None
        for i in range(i2 - i1):
            col = w1[:, i]
            sc = s1[:, i]
            if z1 is None:
                c = grid.codes(col / sc)
                dec = grid.decode(c, sc)
            else:
                c = grid.codes(col / sc + z1[:, i])
                dec = grid.decode(c - z1[:, i], sc)
            q[:, i1 + i] = c
            err = (col - dec) / h1[i, i]
            if i + 1 < i2 - i1:
                w1[:, i + 1 :].sub_(torch.outer(err, h1[i, i + 1 :]))
            e1[:, i] = err
        if i2 < k:
            wt[:, i2:].sub_(e1 @ hinv[i1:i2, i2:])
    if perm is not None:
        out = torch.empty_like(q)
        out[:, perm] = q
        q = out
    return q.T.contiguous()


def _problem(k: int, n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, : k // 8] *= 5.0
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return w, x.T @ x / len(x)


def _out_err(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = q.reshape(w.shape).astype(np.float64) - w
    return float(np.einsum("kn,kn->", d, h @ d))


@pytest.mark.parametrize(
    "fmt", ["int4_b128", "int4_pc", "int3_b32", "int8", "fp8_e4m3", "nf4_b64", "int4_asym_b32", "mxfp4"]
)
@pytest.mark.parametrize("act_order", [True, False])
def test_fast_gptq_matches_column_reference(fmt: str, act_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = _problem(320, 48)
    cfg = R.RoundingConfig(act_order=act_order, block=64)
    fast = dequantize(R.round_weight(fmt, w, MATMUL, "gptq", hessian=h, config=cfg))
    monkeypatch.setattr(R, "_gptq", _reference_gptq)
    ref = dequantize(R.round_weight(fmt, w, MATMUL, "gptq", hessian=h, config=cfg))
    # float noise (an addr_ against an outer-then-sub) may move a value lying on a rounding midpoint
    assert np.mean(fast != ref) < 2e-3
    e_fast, e_ref = _out_err(w, fast, h), _out_err(w, ref, h)
    assert abs(e_fast - e_ref) <= 1e-3 * e_ref
    near = dequantize(R.round_weight(fmt, w, MATMUL, "nearest"))
    assert e_fast < _out_err(w, near, h)


def test_factorisation_is_made_once_through_round_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = _problem(96, 8)
    hx = np.array(h).view(R.FactoredXtX)
    calls = []
    orig = R._inverse_cholesky

    def counting(m: torch.Tensor, damp: float) -> torch.Tensor:
        calls.append(m.shape)
        return orig(m, damp)

    monkeypatch.setattr(R, "_inverse_cholesky", counting)
    a = R.round_weight("int4_b32", w, MATMUL, "gptq", hessian=hx)
    b = R.round_weight("int4_pc", w, MATMUL, "gptq", hessian=hx)
    c = R.round_weight("int4_b32", w, MATMUL, "gptq", hessian=hx)
    assert len(calls) == 1
    np.testing.assert_array_equal(a.codes, c.codes)
    assert b.codes.shape == a.codes.shape

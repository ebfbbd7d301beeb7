"""One GPTQ ``round_weight`` call, the column-by-column implementation before wave 5 (kept in
``tests/test_gptq_fast.py``, refactorising per call as ``round_weight`` did) against the current one,
side by side in one process on a K=1536, N=384 weight (MiniLM's FFN output shape) with a correlated
XᵀX: seconds per call, the output error ``tr(ΔᵀHΔ)`` of each and the fraction of differing values.

    nice -n 10 python benchmarks/gptq_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from test_gptq_fast import _reference_gptq

    from lpcompile import rounding as R
    from lpcompile.formats import WeightLayout, dequantize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--formats", default="int4_b128,int4_pc,int3_b32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    k, n = 1536, 384
    x = rng.standard_normal((3000, k)).astype(np.float32)
    x[:, :100] *= 4
    x = x @ (np.eye(k, dtype=np.float32) + 0.3 * rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k))
    h64 = (x.T.astype(np.float64) @ x) / len(x)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    lay = WeightLayout(channel_axis=1, reduction_axis=0)
    fast = R._gptq
    for fmt in args.formats.split(","):
        res = {}
        for name, fn, h in (("before", _reference_gptq, np.array(h64)), ("now", fast, h64.copy().view(R.FactoredXtX))):
            R._gptq = fn
            R.round_weight(fmt, w, lay, "gptq", hessian=h) if name == "now" else None  # factor made once
            if name == "now":
                h.rounded.clear()  # time the rounding, not the kept result
            t = time.perf_counter()
            q = dequantize(R.round_weight(fmt, w, lay, "gptq", hessian=h)).reshape(w.shape)
            dt = time.perf_counter() - t
            d = q - w
            res[name] = (q, dt, float(np.einsum("kn,kn->", d, h64 @ d)))
        R._gptq = fast
        print(
            f"{fmt}: before {res['before'][1]:.3f} s  now {res['now'][1]:.3f} s "
            f"({res['before'][1] / res['now'][1]:.2f}×); output error before {res['before'][2]:.6e} "
            f"now {res['now'][2]:.6e}; differing values {np.mean(res['before'][0] != res['now'][0]):.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()

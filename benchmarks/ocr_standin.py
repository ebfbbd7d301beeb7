"""Peak RSS of ``lpcompile MODEL --budget 4.5bits`` on an OCR-style CNN+transformer text recogniser (issue 18).

Issue 18 names "the OCR-style CNN+transformer" among the models whose compile must peak at most at
2 × the fp32 weights + 1 GiB (it measured 2.7 GB on a 10 MB third-party recogniser). No such model
installs offline here, so this script builds a stand-in of the same kind and size with seeded weights:
a text-line recogniser in the style of CRNN/SVTR — input ``[N, 3, 48, 320]``, a Conv stem and body
(strided 3×3 Convs, one depthwise-separable block, BatchNorm folded by the exporter, Hardswish), the
feature map averaged over its height into a sequence of 80 columns, two pre-norm transformer encoder
layers (d = 192, 6 heads, MLP 768, GELU), and a CTC head of 6,625 classes (PaddleOCR's Chinese
dictionary size) — about 2.7M weights, 10.6 MB fp32. Calibration images are synthetic text lines
(light background, dark glyph-like strokes), seeded.

It then runs the bare compile in fresh processes under ``/usr/bin/time -v`` (``--repeats`` times) and
reports the peak RSS against the limit, with the load average before and after. The model and data
are cached in ``artifacts/bench/ocr_standin/``.

    python benchmarks/ocr_standin.py [--repeats 1] [--json-out benchmarks/ocr_standin.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lpcompile.io_utils import atomic_write_text  # noqa: E402

logger = logging.getLogger("ocr_standin")

WORK = ROOT / "artifacts" / "bench" / "ocr_standin"
SEED = 18
HEIGHT, WIDTH, CLASSES, DIM = 48, 320, 6625, 192
GIB = 2**30


def build_model(path: Path) -> None:
    """Export the seeded recogniser to ONNX (opset 21)."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)

    def conv(cin: int, cout: int, stride: tuple[int, int], groups: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.Hardswish()
        )

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
            self.heads = 6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.n2(x))))

    class Recogniser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                conv(3, 32, (2, 2)),  # 24 × 160
                conv(32, 64, (2, 1)),  # 12 × 160
                conv(64, 64, (1, 1), groups=64),  # depthwise
                nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.Hardswish(),  # pointwise
                conv(128, 160, (2, 2)),  # 6 × 80
                conv(160, DIM, (2, 1)),  # 3 × 80
            )  # fmt: skip
            self.blocks = nn.Sequential(Block(), Block())
            self.norm = nn.LayerNorm(DIM)
            self.head = nn.Linear(DIM, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.body(x).mean(dim=2).transpose(1, 2)  # [N, 80, DIM]
            return self.head(self.norm(self.blocks(f)))

    model = Recogniser().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.zeros(1, 3, HEIGHT, WIDTH)
    with tempfile.TemporaryDirectory(prefix="ocr_standin_") as tmp:
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (x,), str(out), input_names=["image"], output_names=["logits"], opset_version=21,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}}, dynamo=True, external_data=False,
        )  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, path)


def build_calib(path: Path, n: int = 32) -> None:
    """``n`` synthetic text lines: a light, slightly uneven background with dark strokes of glyph size."""
    rng = np.random.default_rng(SEED)
    img = np.empty((n, 3, HEIGHT, WIDTH), np.float32)
    for i in range(n):
        bg = 0.8 + 0.1 * rng.random() + 0.05 * rng.standard_normal((1, HEIGHT, WIDTH))
        line = np.repeat(bg, 3, axis=0)
        x = int(rng.integers(4, 20))
        while x < WIDTH - 12:
            w, h = int(rng.integers(2, 5)), int(rng.integers(14, 34))
            y = int(rng.integers(4, HEIGHT - h - 2))
            line[:, y : y + h, x : x + w] = 0.1 + 0.1 * rng.random()  # a vertical stroke
            if rng.random() < 0.6:  # and a horizontal one
                yy = int(rng.integers(y, y + h))
                line[:, yy : yy + 2, x : x + int(rng.integers(6, 14))] = 0.1
            x += int(rng.integers(8, 18))
        img[i] = (line - 0.5) / 0.5  # PaddleOCR-style normalisation to [-1, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, image=img)
    os.replace(f.name, path)


def fp32_weight_bytes(path: Path) -> int:
    """4 bytes per element of every floating initializer (the issue's "fp32 weights")."""
    import onnx

    m = onnx.load(str(path))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return sum(4 * int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type in floats)


def compile_once(model: Path, calib: Path, out_dir: Path) -> dict[str, Any]:
    """One ``lpcompile MODEL --budget 4.5bits`` under ``nice -n 10 /usr/bin/time -v``."""
    out = out_dir / "ocr.lp.onnx"
    cmd = [
        "nice", "-n", "10", "/usr/bin/time", "-v", sys.executable, "-m", "lpcompile", str(model),
        "--budget", "4.5bits", "--calib", str(calib), "-o", str(out), "--force",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"compile failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = " ".join(ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if "bits/weight" in ln)
    return {
        "peak_rss_kib": int(m.group(1)), "wall_s": wall, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "summary": summary,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "ocr_standin.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    model, calib = WORK / "recogniser.onnx", WORK / "calib.npz"
    if not model.exists():
        build_model(model)
    if not calib.exists():
        build_calib(calib)
    weights = fp32_weight_bytes(model)
    limit = 2 * weights + GIB
    runs = []
    with tempfile.TemporaryDirectory(prefix="ocr_standin_out_") as tmp:
        for i in range(max(1, args.repeats)):
            r = compile_once(model, calib, Path(tmp))
            runs.append(r)
            logger.info("run %d: peak %.0f MiB, %.1f s", i, r["peak_rss_kib"] / 1024, r["wall_s"])
    peak = max(r["peak_rss_kib"] for r in runs) * 1024
    print(f"OCR-style recogniser stand-in: {weights / 2**20:.1f} MiB fp32 weights, limit {limit / 2**20:.1f} MiB")
    print(f"{'run':>4} {'peak RSS MiB':>13} {'÷ limit':>8} {'wall s':>8}  load before → after")
    for i, r in enumerate(runs):
        mib = r["peak_rss_kib"] / 1024
        lb, la = r["loadavg_before"][0], r["loadavg_after"][0]
        print(f"{i:>4} {mib:13.0f} {mib * 2**20 / limit:8.2f} {r['wall_s']:8.1f}  {lb:.2f} → {la:.2f}")
    print(runs[-1]["summary"])
    payload = {
        "model": "OCR-style CNN+transformer recogniser stand-in (benchmarks/ocr_standin.py, seeded)",
        "fp32_weight_bytes": weights, "limit_bytes": limit, "peak_rss_bytes": peak, "within_limit": peak <= limit,
        "runs": runs,
    }  # fmt: skip
    atomic_write_text(args.json_out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()

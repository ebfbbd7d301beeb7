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

It then measures the bare compile as ``benchmarks/compile_memory.py --models ocr --new-only`` does
(fresh processes under ``/usr/bin/time -v``, ``--repeats`` times; peak RSS against the limit, load
average before and after). The model and data are cached in ``artifacts/bench/ocr_standin/``.

    python benchmarks/ocr_standin.py [--repeats 1] [--json-out benchmarks/ocr_standin.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORK = ROOT / "artifacts" / "bench" / "ocr_standin"
SEED = 18
HEIGHT, WIDTH, CLASSES, DIM = 48, 320, 6625, 192


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


def build() -> tuple[Path, Path]:
    """The stand-in's model and calibration file (cached in :data:`WORK`, built when missing)."""
    model, calib = WORK / "recogniser.onnx", WORK / "calib.npz"
    if not model.exists():
        build_model(model)
    if not calib.exists():
        build_calib(calib)
    return model, calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "ocr_standin.json")
    args = ap.parse_args()
    build()
    from compile_memory import main as compile_memory

    argv = ["--models", "ocr", "--new-only", "--repeats", str(args.repeats), "--json-out", str(args.json_out)]
    raise SystemExit(compile_memory(argv))


if __name__ == "__main__":
    main()

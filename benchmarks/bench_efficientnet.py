"""EfficientNet-Lite0 (ImageNet, 4.65M params): top-1/top-5 agreement and KL to fp32 on natural photos
shipped by scikit-learn, matplotlib and scikit-image, as deterministic 224×224 crops and flips.

Evaluation photos (8): skimage astronaut, coffee, rocket, stereo_motorcycle (left), camera (grey,
replicated), sklearn china.jpg and flower.jpg, matplotlib grace_hopper.jpg; 56 crops each (one full
square, 3×3 grids at 80/60/45 % of the short side, each also mirrored) = 448 inputs, of which every
second one (224, ``eval_stride=2``) is evaluated on 2 shared cores.
Calibration photos (other photos): skimage chelsea, hubble_deep_field, coins, brick, grass, gravel.

    python benchmarks/bench_efficientnet.py [--methods ...] [--budgets ...] [--validate]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import classifier_scores, run_batched
from harness import ARTIFACTS, Metric, Task, common_args, run_from_args, setup_logging

SIZE = 224


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-9))).clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return a[:, :, :3]


def eval_photos() -> dict[str, np.ndarray]:
    import matplotlib
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_image

    mpl = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {
        "astronaut": _rgb(sk.astronaut()),
        "coffee": _rgb(sk.coffee()),
        "rocket": _rgb(sk.rocket()),
        "motorcycle": _rgb(sk.stereo_motorcycle()[0]),
        "camera": _rgb(sk.camera()),
        "china": _rgb(load_sample_image("china.jpg")),
        "flower": _rgb(load_sample_image("flower.jpg")),
        "grace_hopper": _rgb(np.asarray(Image.open(mpl).convert("RGB"))),
    }


def calib_photos() -> dict[str, np.ndarray]:
    import skimage.data as sk

    return {
        "chelsea": _rgb(sk.chelsea()),
        "hubble": _rgb(sk.hubble_deep_field()),
        "coins": _rgb(sk.coins()),
        "brick": _rgb(sk.brick()),
        "grass": _rgb(sk.grass()),
        "gravel": _rgb(sk.gravel()),
    }


def crops(img: np.ndarray, scales: tuple[float, ...] = (0.8, 0.6, 0.45), grid: int = 3) -> list[np.ndarray]:
    """Deterministic square crops resized to 224 (full square + grid at each scale), each also mirrored."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    boxes = [((h - side) // 2, (w - side) // 2, side)]
    for s in scales:
        c = int(side * s)
        for i in range(grid):
            for j in range(grid):
                boxes.append((round(i * (h - c) / (grid - 1)), round(j * (w - c) / (grid - 1)), c))
    out = []
    for top, left, c in boxes:
        patch = Image.fromarray(img[top : top + c, left : left + c]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        a = np.asarray(patch)
        out += [a, a[:, ::-1]]
    return out


def preprocess(images: list[np.ndarray]) -> np.ndarray:
    """uint8 HWC RGB → float32 NCHW, (x − 127) / 128 (EfficientNet-Lite reference preprocessing)."""
    x = np.stack(images).astype(np.float32)
    return np.ascontiguousarray(((x - 127.0) / 128.0).transpose(0, 3, 1, 2))


def efficientnet_task(workdir: Path = ARTIFACTS, calib_n: int = 48, eval_stride: int = 2) -> Task:
    from lpcompile.frontend.zoo import efficientnet_lite0_onnx

    d = workdir / "efficientnet_lite0"
    d.mkdir(parents=True, exist_ok=True)
    model = efficientnet_lite0_onnx(workdir / "efficientnet_lite0.onnx")
    calib = d / f"calib{calib_n}.npz"
    if not calib.exists():
        pool = [c for img in calib_photos().values() for c in crops(img)]
        idx = np.random.default_rng(0).choice(len(pool), calib_n, replace=False)
        np.savez(calib, input=preprocess([pool[i] for i in sorted(idx)]))
    evalx = d / "eval.npy"
    if not evalx.exists():
        np.save(evalx, preprocess([c for img in eval_photos().values() for c in crops(img)]))
    x = np.load(evalx)[::eval_stride]

    def collect(sess: object) -> dict[str, np.ndarray]:
        return run_batched(sess, {"input": x}, 32)

    def score(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
        return classifier_scores(out["logits"], ref["logits"])

    return Task(
        name="efficientnet_lite0",
        model=model,
        calib=calib,
        collect=collect,
        score=score,
        metrics=(
            Metric("kl", "KL", False, "{:.2e}"),
            Metric("top1_agree", "top1=", True, "{:.4f}"),
            Metric("top5_agree", "top5∋", True, "{:.4f}"),
        ),
        latency_feed={"input": x[:1]},
        analysis={"probes": 16, "batch_size": 16},
        nncf_batch=16,
        notes=f"{len(x)} evaluation crops of 8 photos; calibration: {calib_n} crops of 6 other photos.",
    )


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    args = p.parse_args()
    setup_logging()
    run_from_args(efficientnet_task(), args)


if __name__ == "__main__":
    main()

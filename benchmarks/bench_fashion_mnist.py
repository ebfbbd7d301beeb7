"""Fashion-MNIST CNN (trained here, seeded, 1 epoch: about a minute): accuracy on the 10,000 test images with
true labels, top-1 agreement and KL to fp32; lpcompile vs peers at 4.25–8 bits.

Data: Debian package ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``), IDX
files under ``/usr/share/datasets/fashion-mnist/``.

    python benchmarks/bench_fashion_mnist.py [--methods ...] [--budgets 4.25,4.5] [--validate]
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import classifier_scores, run_batched
from harness import ARTIFACTS, Metric, Task, common_args, run_from_args, setup_logging

DATA = Path("/usr/share/datasets/fashion-mnist")
SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``kind`` = ``train`` or ``t10k``: images as float32 ``[N, 1, 28, 28]`` in [0, 1], labels int64."""
    x = read_idx(DATA / f"{kind}-images-idx3-ubyte.gz").astype(np.float32)[:, None] / 255.0
    y = read_idx(DATA / f"{kind}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def train_cnn(out: Path, epochs: int = 1) -> Path:
    """Train a small CNN (2 conv + 2 linear, ~107k weights) with a fixed seed and export it to ONNX."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # deterministic, and no OpenMP spinning on a shared machine
    x, y = load_split("train")
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.onnx.export(
        model,
        (torch.zeros(2, 1, 28, 28),),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        opset_version=20,
        dynamo=True,
    )
    tmp = out.with_suffix(".tmp")
    prog.save(str(tmp))
    tmp.replace(out)
    return out


def fashion_task(workdir: Path = ARTIFACTS) -> Task:
    d = workdir / "fashion_mnist_cnn"
    model = d / "fp32.onnx"
    if not model.exists():
        train_cnn(model)
    calib = d / "calib.npz"
    xtr, _ = load_split("train")
    if not calib.exists():
        rng = np.random.default_rng(SEED)
        np.savez(calib, image=xtr[rng.choice(len(xtr), 256, replace=False)])
    x, y = load_split("t10k")

    def collect(sess: object) -> dict[str, np.ndarray]:
        return run_batched(sess, {"image": x}, 500)

    def score(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
        return classifier_scores(out["logits"], ref["logits"], y)

    return Task(
        name="fashion_mnist_cnn",
        model=model,
        calib=calib,
        collect=collect,
        score=score,
        metrics=(
            Metric("kl", "KL", False, "{:.2e}"),
            Metric("accuracy", "acc", True, "{:.4f}"),
            Metric("top1_agree", "top1=", True, "{:.4f}"),
        ),
        latency_feed={"image": x[:1]},
        analysis={"probes": 32, "batch_size": 32},
        nncf_batch=32,
        notes="CNN trained here (1 epoch, seed 0); calibration: 256 training images; evaluation: the 10,000 "
        "test images with their labels.",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    args = p.parse_args()
    setup_logging()
    run_from_args(fashion_task(), args)


if __name__ == "__main__":
    main()

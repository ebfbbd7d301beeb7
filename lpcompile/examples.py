"""The embedded default: small real models trained in seconds on scikit-learn's digits.

``build_digits(folder)`` trains (seeded, deterministic) an MLP and a small CNN on the 8×8 digit
images bundled with scikit-learn, writes them as ONNX (built directly with ``onnx.helper`` so the
graph is stable across torch versions), and writes calibration / held-out data as ``.npz`` keyed
by the input name. Everything is derived from the seed; rebuilding gives identical files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lpcompile.io_utils import atomic_path, atomic_write_bytes

logger = logging.getLogger(__name__)

INPUT_NAME = "pixels"


@dataclass(frozen=True)
class ExampleArtifacts:
    """Paths written by :func:`build_digits`."""

    mlp: Path
    cnn: Path
    calib: Path
    heldout: Path
    labels: Path
    mlp_accuracy: float
    cnn_accuracy: float


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(model, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()


def _mlp_onnx(layers: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    nodes, inits = [], []
    nodes.append(helper.make_node("Flatten", [INPUT_NAME], ["x0"], name="flatten", axis=1))
    prev = "x0"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.T.copy(), f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"mm{i}"], name=f"fc{i}"))
        out = "logits" if i == len(layers) - 1 else f"z{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [out], name=f"fc{i}/bias"))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="lpcompile.examples", ir_version=10
    )


def _cnn_onnx(sd: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in sd.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "img_shape"))
    n = helper.make_node
    nodes = [
        n("Reshape", [INPUT_NAME, "img_shape"], ["img"], name="to_image"),
        n("Conv", ["img", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        n("Relu", ["c1"], ["r1"], name="relu1"),
        n("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["c2"], ["r2"], name="relu2"),
        n("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["feat"], name="flatten", axis=1),
        n("Gemm", ["feat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="lpcompile.examples", ir_version=10
    )


def build_digits(folder: str | Path, seed: int = 0, force: bool = False) -> ExampleArtifacts:
    """Train and write the example models and data into ``folder`` (skipped when present)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        k: folder / f
        for k, f in [
            ("mlp", "digits_mlp.onnx"),
            ("cnn", "digits_cnn.onnx"),
            ("calib", "digits_calib.npz"),
            ("heldout", "digits_heldout.npz"),
            ("labels", "digits_heldout_labels.npy"),
        ]
    }
    xtr, ytr, xte, yte = _digits(seed)
    if all(p.exists() for p in paths.values()) and not force:
        logger.info("example models already in %s", folder)
        return ExampleArtifacts(**paths, mlp_accuracy=float("nan"), cnn_accuracy=float("nan"))
    torch.manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mlp = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        _train(mlp, xtr, ytr, epochs=15, seed=seed)
        cnn = torch.nn.ModuleDict(
            {
                "conv1": torch.nn.Conv2d(1, 32, 3, padding=1),
                "conv2": torch.nn.Conv2d(32, 64, 3, padding=1, stride=2),
                "fc": torch.nn.Linear(64, 10),
            }
        )

        def cnn_forward(x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(cnn["conv1"](x.reshape(-1, 1, 8, 8)))
            h = torch.relu(cnn["conv2"](h)).mean(dim=(2, 3))
            return cnn["fc"](h)

        class _Wrap(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = cnn

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return cnn_forward(x)

        _train(_Wrap(), xtr, ytr, epochs=25, seed=seed)
    with torch.no_grad():
        xt = torch.from_numpy(xte)
        mlp_acc = float((mlp(xt).argmax(1).numpy() == yte).mean())
        cnn_acc = float((cnn_forward(xt).argmax(1).numpy() == yte).mean())
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    mlp_proto = _mlp_onnx([(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears])
    cnn_proto = _cnn_onnx({k: v.detach().numpy().copy() for k, v in cnn.state_dict().items()})
    for proto, key in ((mlp_proto, "mlp"), (cnn_proto, "cnn")):
        onnx.checker.check_model(proto, full_check=True)
        atomic_write_bytes(paths[key], proto.SerializeToString())
    for key, arr in (("calib", xtr[:256]), ("heldout", xte)):
        with atomic_path(paths[key], suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{INPUT_NAME: arr})
    with atomic_path(paths["labels"], suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, yte)
    logger.info("digits MLP accuracy %.3f, CNN accuracy %.3f", mlp_acc, cnn_acc)
    return ExampleArtifacts(**paths, mlp_accuracy=mlp_acc, cnn_accuracy=cnn_acc)

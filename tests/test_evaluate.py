"""End-to-end evaluation of a rewritten model against its reference on two tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from lpcompile.errors import CalibrationError, LpError
from lpcompile.evaluate import evaluate
from lpcompile.frontend.calib import CalibrationSet
from lpcompile.metrics import sqnr_db

REFERENCE = """
<ir_version: 10, opset_import: ["" : 21]>
ref (float[batch, 8] x) => (float[batch, 5] logits) {
    h = MatMul(x, w)
    logits = Relu(h)
}
"""

# the "rewritten" model rounds the weight to fp16 with a Cast round trip
REWRITTEN = """
<ir_version: 10, opset_import: ["" : 21]>
lp (float[batch, 8] x) => (float[batch, 5] logits) {
    w16 = Cast<to = 10>(w)
    wq = Cast<to = 1>(w16)
    h = MatMul(x, wq)
    logits = Relu(h)
}
"""


def _weight() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((8, 5)).astype(np.float32)


def _model(text: str, bits: str | None = None) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(_weight(), "w"))
    if bits is not None:
        onnx.helper.set_model_props(model, {"lpcompile.achieved_bits": bits})
    return model


def test_identical_models_give_inf_sqnr() -> None:
    ref = _model(REFERENCE)
    report = evaluate(ref, ref, batch_size=3)
    m = report.outputs["logits"]
    assert m.sqnr_db == math.inf and m.max_abs == 0.0 and m.top1 == 1.0
    assert report.synthetic and report.num_samples == 8 and report.achieved_bits is None
    d = json.loads(report.to_json())
    assert d["outputs"]["logits"]["sqnr_db"] == "inf"


def test_rewritten_model_against_numpy(tmp_path) -> None:
    ref_path, lp_path = tmp_path / "ref.onnx", tmp_path / "lp.onnx"
    onnx.save(_model(REFERENCE), str(ref_path))
    onnx.save(_model(REWRITTEN, bits="16"), str(lp_path))
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    calib = CalibrationSet({"x": x}, source="mem")
    report = evaluate(lp_path, ir.from_proto(_model(REFERENCE)), calib, batch_size=4)
    assert report.num_samples == 6 and not report.synthetic
    assert report.achieved_bits == 16.0
    w = _weight()
    ref_y = np.maximum(x.astype(np.float64) @ w, 0)
    lp_y = np.maximum(x.astype(np.float64) @ w.astype(np.float16).astype(np.float64), 0)
    m = report.outputs["logits"]
    # ORT computes in fp32: compare SQNR against the float64 numpy model to 0.5 dB
    assert m.sqnr_db == pytest.approx(sqnr_db(ref_y, lp_y), abs=0.5)
    assert 50.0 < m.sqnr_db < 120.0  # fp16 weights (11 significant bits) give roughly 60-70 dB
    assert m.cosine > 0.9999 and m.top1 is not None and m.kl is not None
    assert set(report.to_dict()) == {"num_samples", "synthetic", "achieved_bits", "outputs"}


def test_mismatched_models_and_data() -> None:
    ref = _model(REFERENCE)
    other = _model(REFERENCE.replace("logits", "out"))
    with pytest.raises(LpError, match="different outputs"):
        evaluate(other, ref)
    with pytest.raises(CalibrationError, match="missing input"):
        evaluate(ref, ref, CalibrationSet({"y": np.zeros((2, 8), np.float32)}))

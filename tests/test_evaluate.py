"""End-to-end evaluation of a rewritten model against its reference on two tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from lpcompile.errors import CalibrationError, LpError, UsageError
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
    report = evaluate(ref, ref, batch_size=3, synthetic=True, num_samples=8)
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
    assert set(report.to_dict()) == {
        "num_samples",
        "synthetic",
        "achieved_bits",
        "outputs",
        "distortion",
        "loss",
        "loss_outputs",
    }


def test_mismatched_models_and_data() -> None:
    ref = _model(REFERENCE)
    other = _model(REFERENCE.replace("logits", "out"))
    with pytest.raises(LpError, match="different outputs"):
        evaluate(other, ref)
    with pytest.raises(UsageError, match="--synthetic"):
        evaluate(ref, ref)
    with pytest.raises(CalibrationError, match="missing input"):
        evaluate(ref, ref, CalibrationSet({"y": np.zeros((2, 8), np.float32)}))


def _independent(ref: onnx.ModelProto, test: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Both models run by plain onnxruntime sessions (no lpcompile code), optimisations off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = []
    for m in (ref, test):
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs.append(dict(zip(names, sess.run(names, feed), strict=True)))
    return outs[0], outs[1]


def _lm_pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The causal LM of test_models_as_they_come and a copy with its lm_head weight rounded to fp16 then int-ish."""
    from test_models_as_they_come import causal_lm

    ref = causal_lm()
    test = onnx.ModelProto()
    test.CopyFrom(ref)
    for init in test.graph.initializer:
        if init.name in ("lm_head.w", "up.w"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((np.round(w * 4) / 4).astype(np.float32), init.name))
    return ref, test


def test_numbers_match_an_independent_measurement_to_4_digits() -> None:
    from test_models_as_they_come import padded_tokens

    ref, test = _lm_pair()
    data = padded_tokens(12, 10, seed=3)
    report = evaluate(test, ref, CalibrationSet(data, "tokens"), batch_size=5)
    r, t = _independent(ref, test, data)
    mask = data["attention_mask"].astype(bool)
    # per-position top-1 and KL over the unpadded positions of the [B, T, V] logits
    lr, lt = r["output"].astype(np.float64), t["output"].astype(np.float64)
    top1 = float(np.mean((lr.argmax(-1) == lt.argmax(-1))[mask]))
    pr = np.exp(lr - lr.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    pt = np.exp(lt - lt.max(-1, keepdims=True))
    pt /= pt.sum(-1, keepdims=True)
    kl = float(np.mean(np.sum(pr * (np.log(pr) - np.log(pt)), axis=-1)[mask]))
    m = report.outputs["output"]
    assert m.kind == "sequence"
    assert m.top1 == pytest.approx(top1, rel=1e-4) and top1 < 1.0
    assert m.kl == pytest.approx(kl, rel=1e-4) and kl > 0
    # cosine: mean over samples of the flattened per-sample cosine (padding included, as documented)
    a, b = lr.reshape(12, -1), lt.reshape(12, -1)
    cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
    assert m.cosine == pytest.approx(cos, rel=1e-4)
    sq = 10 * np.log10(np.sum(lr**2) / np.sum((lr - lt) ** 2))
    assert m.sqnr_db == pytest.approx(sq, rel=1e-4)
    hidden = report.outputs["last_hidden_state"]
    assert hidden.kind == "tensor" and hidden.top1 is None and hidden.kl is None
    # the distortion is the analysis loss: KL over unpadded positions + masked normalised MSE of the hidden state
    hr, ht = r["last_hidden_state"].astype(np.float64), t["last_hidden_state"].astype(np.float64)
    mse = np.sum(((hr - ht) ** 2) * mask[..., None]) / np.sum(hr**2 * mask[..., None])
    assert report.distortion == pytest.approx(kl + mse, rel=1e-4)
    assert "padding masked by attention_mask" in report.loss


def test_metrics_by_output_kind_for_an_encoder_with_integer_outputs() -> None:
    from test_models_as_they_come import encoder, padded_tokens

    ref = encoder()
    report = evaluate(ref, ref, CalibrationSet(padded_tokens(4, 6), "tokens"))
    kinds = {name: m.kind for name, m in report.outputs.items()}
    assert kinds == {
        "sentence_embedding": "tensor",
        "token_count": "integer",
        "top_dim": "integer",
        "mask_fraction": "tensor",
    }
    assert report.outputs["sentence_embedding"].top1 is None  # no top-1 for embeddings
    assert report.outputs["token_count"].exact == 1.0
    assert report.loss_outputs == ("sentence_embedding",) and report.distortion == 0.0


def test_fixed_batch_is_honoured_in_eval() -> None:
    from test_models_as_they_come import recogniser

    ref = recogniser()
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 24)).astype(np.float32)
    report = evaluate(ref, ref, CalibrationSet({"input1": x}, "lines"), batch_size=8)
    m = report.outputs["probs"]
    assert report.num_samples == 3 and m.kind == "sequence" and m.top1 == 1.0


def test_state_outputs_are_joined_along_their_batch_axis() -> None:
    from test_models_as_they_come import vad

    ref = vad()
    rng = np.random.default_rng(0)
    data = {
        "input": rng.standard_normal((10, 64)).astype(np.float32),
        "sr": np.int64(16000),
        "state": rng.standard_normal((2, 10, 16)).astype(np.float32),
    }
    calib = CalibrationSet(data, "audio", sample_axes={"input": 0, "sr": None, "state": 1})
    report = evaluate(ref, ref, calib, batch_size=4)
    assert report.num_samples == 10 and report.outputs["stateN"].cosine == 1.0
    from lpcompile.evaluate import output_sample_axes

    assert output_sample_axes(ref) == {"output": 0, "stateN": 1}
